//! One module per step of the bench, in the order they run: [`raw`], [`kv`] (a
//! diagnostic), [`e2e`], [`latency`], [`rss`], [`cluster`], [`failover`], [`handoff`],
//! [`merges`], [`cold`]. Each step starts what it measures (through [`crate::processes`]) and stops it
//! when it ends, however it ends; a step that fails is recorded and the run goes on.

pub mod cluster;
pub mod cold;
pub mod e2e;
pub mod failover;
pub mod handoff;
pub mod kv;
pub mod latency;
pub mod merges;
pub mod raw;
pub mod rss;

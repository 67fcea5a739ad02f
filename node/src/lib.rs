//! The CRM cluster node: everything that touches NATS, and none of the rules.
//!
//! Grouped by role: [`ingest`] routes ingested channel events to the shard logs (the router
//! and its identity directory); [`shard`] applies the shard logs this node serves through the
//! domain's shard engines and publishes their actor events; [`api`] answers queries and
//! commands; [`value`] fits and distributes the customer-value model (and holds `crm-node clv
//! fit`, the one command without NATS); [`cluster`] is membership, leases, assignment and
//! snapshots; [`cli`] holds the client subcommands. [`run`] wires the roles together for
//! `crm-node run`. Subject names live only in [`subjects`]; stream, KV and consumer set-up in
//! [`jetstream`]; dead-letter publication in [`dead_letters`].

pub mod api;
pub mod backoff;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod contracts;
pub mod dead_letters;
pub mod fnv;
pub mod ingest;
pub mod jetstream;
pub mod loadgen;
pub mod logging;
pub mod metrics;
pub mod run;
pub mod shard;
pub mod sharding;
pub mod shutdown;
pub mod subjects;
pub mod value;

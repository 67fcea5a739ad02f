//! The CRM cluster node: everything that touches NATS, and none of the rules.
//!
//! A node routes ingested channel events to shard logs ([`router`]), applies the shard logs
//! it serves through the domain's shard engines ([`shard_worker`]), answers queries
//! ([`query`]) and commands ([`commands`]), and publishes actor events and dead letters
//! ([`events`], [`dlq`]). [`node`] wires them together for `crm-node run`; [`client`] holds
//! the client subcommands. Subject names live only in [`subjects`]; stream, KV and consumer
//! set-up in [`jetstream`]; the identity directory in [`identity_directory`]; the
//! customer-value fit and model distribution in [`value`]. [`clv_cli`] is `crm-node clv
//! fit`, the one command without NATS: the customer-value models over a transactions file.

pub mod client;
pub mod cluster;
pub mod clv_cli;
pub mod commands;
pub mod config;
pub mod dlq;
pub mod events;
pub mod identity_directory;
pub mod jetstream;
pub mod loadgen;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod query;
pub mod router;
pub mod shard_log;
pub mod shard_worker;
pub mod sharding;
pub mod shutdown;
pub mod subjects;
pub mod value;

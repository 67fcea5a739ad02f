//! The client subcommands of `crm-node` (send, query, redeem, watch, tick, load, stats,
//! status, drain): each one a NATS client of a running cluster.

pub mod client;

//! Customer value on the cluster: the fit service (`crm.cmd.value.fit`, the summary
//! scatter/gather, the model watch that appends each new model to the served shard logs)
//! and `crm-node clv fit`, the same models over a transactions file without NATS.

pub mod cli;
pub mod service;

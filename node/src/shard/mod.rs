//! Shards: the worker that applies one shard's log through the domain's shard engine and
//! publishes what a batch produces (actor events, dead letters, redeem replies, the apply
//! audit), and the strictly ordered reader of that log. Only the holder of a shard's lease
//! runs its worker.

pub mod log_reader;
pub mod worker;

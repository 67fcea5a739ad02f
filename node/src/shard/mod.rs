//! Shards: the worker that applies one shard's log through the domain's shard engine, the
//! strictly ordered reader of that log, and the publication of the actor events a batch
//! produces. Only the holder of a shard's lease runs its worker.

pub mod actor_events;
pub mod log_reader;
pub mod worker;

//! The CRM domain: channel events, the single customer view, loyalty and retention rules,
//! the customer actor and the sled store. Pure of NATS: the node crate feeds it commands
//! read from the shard log and publishes what it returns.
//!
//! Map: [`ingest`] validates public JSON into [`ingest::ChannelEvent`]; [`shard_message`] is
//! what the shard log carries and what applying it yields; [`apply::apply`] is the one pure
//! function from (state, message, rules) to (new state, outcome); [`rules`], [`loyalty`]
//! and [`retention`] hold the rule engines, which add their actor events to an
//! [`emit::Emitter`]; [`state`] the customer state; [`view`] the
//! 360 view; [`codec`] the versioned bincode format; [`store`] the sled store;
//! [`actor`] the customer actors and [`engine`] the per-shard engine that drives them;
//! [`value`] the customer-value models (BG/NBD, Gamma-Gamma, CLV) behind `crm-node clv
//! fit`, and [`value::live`] their use in the live engine (summaries, published model,
//! view block).

pub mod actor;
pub mod actor_event;
pub mod apply;
pub mod codec;
pub mod emit;
pub mod engine;
pub mod identity;
pub mod ingest;
pub mod loyalty;
pub mod money;
pub mod retention;
pub mod rules;
pub mod shard_message;
pub mod state;
pub mod store;
pub mod time;
pub mod value;
pub mod view;

//! The request/reply API: the 360 view query (`crm.query.customer`) and the commands that
//! change state (`crm.cmd.redeem`, `crm.cmd.tick`), which are written into the shard logs,
//! never applied beside them.

pub mod commands;
pub mod query;

//! Ingest: the router that takes channel events from `CRM_INGEST`, resolves each one's
//! identifiers to a customer through the identity directory, and appends it to its shard's
//! log. Only the holder of the router lease runs it.

pub mod identity_directory;
pub mod router;

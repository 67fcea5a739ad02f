//! The public JSON contracts and their JSON Schemas: the list of what adapters, agents and
//! dashboards written in other languages can validate against, each generated from the
//! Rust type that produces it (so a field is spelled once, in the type).
//!
//! `docs/schema/<file>` holds each schema as published; `tests/contract_schemas.rs` fails
//! when a file differs from what the type generates now (and rewrites them with
//! `CRM_WRITE_SCHEMAS=1`), and the protocol tests validate real replies and events against
//! them. Nothing here is on a hot path: schemas are generated on demand.

use crate::cluster::status::ClusterStatus;
use crate::dead_letters::DeadLetterHeaders;
use crate::metrics::NodeStats;
use crm_actors::actor_event::ActorEventJson;
use crm_actors::view::CustomerReply;
use schemars::{schema_for, Schema};

/// One public contract: where its schema is published and how to generate it.
pub struct Contract {
    /// File name under `docs/schema/`.
    pub file: &'static str,
    /// Where the JSON travels (subject or command), for the docs and error messages.
    pub carried_by: &'static str,
    /// The schema generated from the Rust type.
    pub schema: fn() -> Schema,
}

/// Every published contract, in the order `docs/protocol.md` presents them.
pub const CONTRACTS: &[Contract] = &[
    Contract {
        file: "customer-reply.schema.json",
        carried_by: "reply of crm.query.customer (the 360 view)",
        schema: || schema_for!(CustomerReply),
    },
    Contract {
        file: "actor-event.schema.json",
        carried_by: "crm.events.<type>.<customer_id> (stream CRM_EVENTS)",
        schema: || schema_for!(ActorEventJson),
    },
    Contract {
        file: "dead-letter-headers.schema.json",
        carried_by: "the headers of crm.dlq.<reason> messages (stream CRM_DLQ)",
        schema: || schema_for!(DeadLetterHeaders),
    },
    Contract {
        file: "node-stats.schema.json",
        carried_by: "reply of crm.node.stats (a node's counters)",
        schema: || schema_for!(NodeStats),
    },
    Contract {
        file: "cluster-status.schema.json",
        carried_by: "crm-node status --json",
        schema: || schema_for!(ClusterStatus),
    },
];

impl Contract {
    /// The schema as published: pretty JSON ending with a newline.
    pub fn render(&self) -> String {
        // A schema is a JSON value already: serialising it cannot fail.
        let mut text = serde_json::to_string_pretty(&(self.schema)()).unwrap_or_default();
        text.push('\n');
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_renders_an_object_schema_with_properties() {
        for contract in CONTRACTS {
            let schema: serde_json::Value =
                serde_json::from_str(&contract.render()).expect("schema JSON");
            assert!(
                schema.get("properties").is_some() || schema.get("oneOf").is_some(),
                "{} has neither properties nor variants: {schema}",
                contract.file
            );
        }
    }
}

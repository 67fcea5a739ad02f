//! Every NATS name the cluster uses: subjects, stream names, KV buckets and keys, durable
//! consumer names. This is the only module that spells one; everything else calls these
//! functions and constants, so a rename is a one-file change.
//!
//! Subject layout (`<...>` is one subject token):
//!
//! | subject | stream | who publishes | who reads |
//! | --- | --- | --- | --- |
//! | `crm.ingest.<channel>` | `CRM_INGEST` | channel adapters | the router (durable `crm-router`) |
//! | `crm.shard.<n>` | `CRM_SHARDS` | the router, commands, the ticker | shard worker of shard n |
//! | `crm.events.<type>.<customer_id>` | `CRM_EVENTS` | shard workers | dashboards |
//! | `crm.dlq.<reason>` | `CRM_DLQ` | the router, shard workers | operators |
//! | `crm.query.customer` | none (request/reply) | query clients | query responders |
//! | `crm.cmd.redeem`, `crm.cmd.tick` | none (request/reply) | clients, ops | command responders |
//! | `crm.node.stats` | none (request/reply) | ops | every node |
//! | `crm.snapshot.<n>.<id>` | `CRM_SNAPSHOTS` | the owner of shard n | the next owner |
//! | `crm.audit.<n>` | `CRM_AUDIT` | the owner of shard n (one record per applied batch) | operators, tests |
//! | `crm.owner.<n>.view` | none (request/reply) | any node forwarding a query | the owner of shard n |
//!
//! KV buckets: `crm_identity` (identifier -> customer), `crm_cluster` (shard count, shard
//! assignment, drain requests), `crm_nodes` (heartbeats), `crm_leases` (shard, coordinator
//! and router leases), `crm_snapshots` (each shard's last snapshot), `crm_value` (model).
//!
//! A *token* (channel, customer id, dead-letter reason) must be subject-safe: ASCII letters,
//! digits, `-` and `_`, 1 to [`TOKEN_MAX_BYTES`] bytes ([`is_token`]). No dots (they split
//! tokens), no `*`/`>` (wildcards), no spaces. An actor event type is two such tokens joined by
//! a dot (`points.earned`, [`is_event_type`]). Our customer ids are `c` followed by lower-case
//! hex and reasons are snake_case, so they always qualify; channel tokens come from adapters
//! and are checked by [`is_token`] where they enter. Identifier
//! values (emails, phones, ...) never appear in a subject or a KV key: the identity directory
//! stores keyed hashes of them.

/// Longest subject token accepted by [`is_token`], in bytes.
pub const TOKEN_MAX_BYTES: usize = 128;

/// Prefix of ingest subjects: adapters publish to `crm.ingest.<channel>`.
pub const INGEST_PREFIX: &str = "crm.ingest";
/// Stream holding every ingested channel event.
pub const INGEST_STREAM: &str = "CRM_INGEST";
/// Subjects of [`INGEST_STREAM`].
pub const INGEST_ALL: &str = "crm.ingest.>";
/// Durable name of the ingest consumer every node's router shares.
pub const INGEST_DURABLE: &str = "crm-router";

/// Prefix of shard-log subjects: `crm.shard.<n>`.
pub const SHARD_PREFIX: &str = "crm.shard";
/// Stream holding the ordered log of every shard.
pub const SHARDS_STREAM: &str = "CRM_SHARDS";
/// Subjects of [`SHARDS_STREAM`].
pub const SHARDS_ALL: &str = "crm.shard.>";

/// Prefix of actor-event subjects: `crm.events.<type>.<customer_id>`.
pub const EVENTS_PREFIX: &str = "crm.events";
/// Stream holding recent actor events (bounded by age and bytes).
pub const EVENTS_STREAM: &str = "CRM_EVENTS";
/// Subjects of [`EVENTS_STREAM`]; also the subscription for every actor event.
pub const EVENTS_ALL: &str = "crm.events.>";

/// Prefix of dead-letter subjects: `crm.dlq.<reason>`.
pub const DLQ_PREFIX: &str = "crm.dlq";
/// Stream holding dead letters.
pub const DLQ_STREAM: &str = "CRM_DLQ";
/// Subjects of [`DLQ_STREAM`].
pub const DLQ_ALL: &str = "crm.dlq.>";

/// Prefix of snapshot subjects: `crm.snapshot.<n>.<id>`.
pub const SNAPSHOT_PREFIX: &str = "crm.snapshot";
/// Stream holding shard snapshots (pieces; each shard's manifest is in [`KV_SNAPSHOTS`]).
pub const SNAPSHOTS_STREAM: &str = "CRM_SNAPSHOTS";
/// Subjects of [`SNAPSHOTS_STREAM`].
pub const SNAPSHOTS_ALL: &str = "crm.snapshot.>";

/// Prefix of apply-audit subjects: `crm.audit.<n>`.
pub const AUDIT_PREFIX: &str = "crm.audit";
/// Stream holding one record per applied shard batch (owner, epoch, sequences).
pub const AUDIT_STREAM: &str = "CRM_AUDIT";
/// Subjects of [`AUDIT_STREAM`].
pub const AUDIT_ALL: &str = "crm.audit.>";

/// Request/reply: the 360 view of one customer.
pub const QUERY_CUSTOMER: &str = "crm.query.customer";
/// Request/reply: redeem a reward.
pub const CMD_REDEEM: &str = "crm.cmd.redeem";
/// Request/reply: write a tick (event-time clock) into every shard log.
pub const CMD_TICK: &str = "crm.cmd.tick";
/// Request/reply: fit the customer-value models on every customer and publish them.
pub const CMD_VALUE_FIT: &str = "crm.cmd.value.fit";
/// Scatter/gather (every node answers, in chunks): the customer-value summaries of the
/// shards a node serves, for a fit.
pub const VALUE_COLLECT: &str = "crm.value.collect";
/// Request/reply (every node answers): node counters.
pub const NODE_STATS: &str = "crm.node.stats";

/// KV bucket: identifier hash -> customer id.
pub const KV_IDENTITY: &str = "crm_identity";
/// KV bucket: cluster metadata (shard count, ...).
pub const KV_CLUSTER: &str = "crm_cluster";
/// KV bucket: the published customer-value model (JSON, versioned).
pub const KV_VALUE: &str = "crm_value";
/// Key in [`KV_VALUE`] holding the current model.
pub const VALUE_MODEL_KEY: &str = "model";
/// Key in [`KV_CLUSTER`] holding the cluster's shard count (decimal text).
pub const CLUSTER_KEY_SHARD_COUNT: &str = "shard_count";
/// Key in [`KV_CLUSTER`] holding a fingerprint of the identity secret (16 hex characters of
/// an HMAC of a fixed text): every node must hash identifiers with the same secret.
pub const CLUSTER_KEY_IDENTITY_FINGERPRINT: &str = "identity_fingerprint";
/// Key in [`KV_CLUSTER`] holding the ingest sequence the router consumer was last rewound
/// to (decimal text): where a router starts when the consumer is gone.
pub const CLUSTER_KEY_INGEST_FLOOR: &str = "ingest_floor";
/// Key in [`KV_CLUSTER`] holding the shard assignment the coordinator wrote (JSON).
pub const CLUSTER_KEY_ASSIGNMENT: &str = "assignment";
/// KV bucket: node id -> heartbeat (JSON).
pub const KV_NODES: &str = "crm_nodes";
/// KV bucket: leases (JSON): `shard-<n>`, [`LEASE_COORDINATOR`], [`LEASE_ROUTER`].
pub const KV_LEASES: &str = "crm_leases";
/// Lease key of the coordinator (assigns shards).
pub const LEASE_COORDINATOR: &str = "coordinator";
/// Lease key of the router (one node routes ingest at a time, keeping each customer's
/// events in order).
pub const LEASE_ROUTER: &str = "router";
/// KV bucket: `shard-<n>` -> the shard's last snapshot manifest (JSON).
pub const KV_SNAPSHOTS: &str = "crm_snapshots";

/// The lease key (in [`KV_LEASES`]) and snapshot key (in [`KV_SNAPSHOTS`]) of `shard`.
pub fn shard_key(shard: u32) -> String {
    format!("shard-{shard}")
}

/// A drain request for `node_id` in [`KV_CLUSTER`].
pub fn drain_key(node_id: &str) -> String {
    format!("drain-{node_id}")
}

/// The subject of one snapshot's pieces.
pub fn snapshot(shard: u32, id: &str) -> String {
    format!("{SNAPSHOT_PREFIX}.{shard}.{id}")
}

/// The audit subject of `shard`.
pub fn audit(shard: u32) -> String {
    format!("{AUDIT_PREFIX}.{shard}")
}

/// Where the owner of `shard` answers forwarded view queries.
pub fn owner_view(shard: u32) -> String {
    format!("crm.owner.{shard}.view")
}

/// Whether `token` can be used as one subject token (see the module docs).
pub fn is_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= TOKEN_MAX_BYTES
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `crm.ingest.<channel>`. `channel` must be a token ([`is_token`]).
pub fn ingest(channel: &str) -> String {
    debug_assert!(
        is_token(channel),
        "channel '{channel}' is not a subject token"
    );
    format!("{INGEST_PREFIX}.{channel}")
}

/// The channel of an ingest subject: `crm.ingest.web` -> `web`. `None` for any other subject,
/// including `crm.ingest.a.b` (more than one token) and tokens [`is_token`] refuses.
pub fn channel_from_ingest_subject(subject: &str) -> Option<&str> {
    let channel = subject.strip_prefix(INGEST_PREFIX)?.strip_prefix('.')?;
    is_token(channel).then_some(channel)
}

/// `crm.shard.<n>`.
pub fn shard(shard: u32) -> String {
    format!("{SHARD_PREFIX}.{shard}")
}

/// The shard number of a shard-log subject: `crm.shard.7` -> 7. `None` for anything else.
pub fn shard_from_subject(subject: &str) -> Option<u32> {
    let number = subject.strip_prefix(SHARD_PREFIX)?.strip_prefix('.')?;
    // Reject `+7`, `07`-style aliases so one shard has exactly one subject.
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if number.len() > 1 && number.starts_with('0') {
        return None;
    }
    number.parse().ok()
}

/// Whether an actor event type is usable in a subject: dot-separated tokens
/// (`points.earned`, `tier.changed`).
pub fn is_event_type(event_type: &str) -> bool {
    event_type.split('.').all(is_token)
}

/// `crm.events.<event_type>.<customer_id>`. The event type is dot-separated tokens
/// ([`is_event_type`]: `points.earned` spans two), the customer id one token.
pub fn event(event_type: &str, customer_id: &str) -> String {
    debug_assert!(
        is_event_type(event_type),
        "event type '{event_type}' is not a subject token"
    );
    debug_assert!(
        is_token(customer_id),
        "customer id '{customer_id}' is not a subject token"
    );
    format!("{EVENTS_PREFIX}.{event_type}.{customer_id}")
}

/// Subscription for every event of one type: `crm.events.<event_type>.*`.
pub fn events_of_type(event_type: &str) -> String {
    debug_assert!(
        is_event_type(event_type),
        "event type '{event_type}' is not a subject token"
    );
    format!("{EVENTS_PREFIX}.{event_type}.*")
}

/// Subscription for every event of one customer: `crm.events.*.*.<customer_id>`. Matches the
/// documented event types, which are all two tokens (`<family>.<name>`, e.g.
/// `points.earned`); a wildcard cannot span a varying number of tokens.
pub fn events_of_customer(customer_id: &str) -> String {
    debug_assert!(
        is_token(customer_id),
        "customer id '{customer_id}' is not a subject token"
    );
    format!("{EVENTS_PREFIX}.*.*.{customer_id}")
}

/// `crm.dlq.<reason>`. `reason` must be a token (the `RejectReason::as_str` values are).
pub fn dlq(reason: &str) -> String {
    debug_assert!(is_token(reason), "reason '{reason}' is not a subject token");
    format!("{DLQ_PREFIX}.{reason}")
}

/// The KV stream backing `bucket`: `KV_<bucket>`.
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The subjects of the KV stream backing `bucket`: `$KV.<bucket>.>`.
pub fn kv_subjects(bucket: &str) -> String {
    format!("$KV.{bucket}.>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip_through_their_parsers() {
        assert_eq!(ingest("web"), "crm.ingest.web");
        assert_eq!(
            channel_from_ingest_subject(&ingest("store_pos")),
            Some("store_pos")
        );
        assert_eq!(shard(17), "crm.shard.17");
        assert_eq!(shard_from_subject(&shard(17)), Some(17));
        assert_eq!(shard_from_subject(&shard(0)), Some(0));
        assert_eq!(
            event("tier_changed", "c0a1"),
            "crm.events.tier_changed.c0a1"
        );
        assert_eq!(dlq("malformed"), "crm.dlq.malformed");
        assert_eq!(
            events_of_customer("c0a1"),
            "crm.events.*.*.c0a1",
            "matches {}",
            event("points.earned", "c0a1")
        );
        assert_eq!(kv_stream(KV_IDENTITY), "KV_crm_identity");
        assert_eq!(kv_subjects(KV_IDENTITY), "$KV.crm_identity.>");
    }

    #[test]
    fn foreign_or_ambiguous_subjects_do_not_parse() {
        assert_eq!(channel_from_ingest_subject("crm.ingest"), None);
        assert_eq!(channel_from_ingest_subject("crm.ingest."), None);
        assert_eq!(channel_from_ingest_subject("crm.ingest.a.b"), None);
        assert_eq!(channel_from_ingest_subject("crm.ingestweb"), None);
        assert_eq!(channel_from_ingest_subject("crm.shard.1"), None);
        assert_eq!(shard_from_subject("crm.shard.x"), None);
        assert_eq!(shard_from_subject("crm.shard.07"), None);
        assert_eq!(shard_from_subject("crm.shard.+7"), None);
        assert_eq!(shard_from_subject("crm.shard.1.2"), None);
        assert_eq!(shard_from_subject("crm.shard.99999999999"), None);
        assert_eq!(shard_from_subject("crm.shards.1"), None);
    }

    #[test]
    fn only_subject_safe_tokens_are_tokens() {
        assert!(is_token("web"));
        assert!(is_token("c0123456789abcdef01234567"));
        assert!(is_token("points_earned"));
        for bad in ["", "a.b", "a b", "*", ">", "a>", "é", "a\tb"] {
            assert!(!is_token(bad), "{bad:?}");
        }
        assert!(!is_token(&"x".repeat(TOKEN_MAX_BYTES + 1)));
    }
}

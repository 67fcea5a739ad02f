//! Dead letters: inputs that cannot be applied, kept in the `CRM_DLQ` stream with a reason.
//!
//! A dead letter's body is the original bytes, unchanged; its headers say why
//! (`Crm-Reason`, `Crm-Message`) and where it came from (`Crm-Source-Subject`,
//! `Crm-Source-Sequence`). It is published on `crm.dlq.<reason>` with a `Nats-Msg-Id`
//! derived from the source, so a redelivered bad input is dead-lettered once.
//!
//! The headers are one contract, [`DeadLetterHeaders`]: written by [`publish`] (the router
//! and the shard workers call it) and read back with [`DeadLetterHeaders::from_headers`];
//! its JSON schema (`schemars::schema_for!(DeadLetterHeaders)`) describes them as an object
//! keyed by header name. This module never decides what is a dead letter.

use crate::subjects;
use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::Context;
use async_nats::HeaderMap;
use crm_actors::ingest::Rejection;
use serde::{Deserialize, Serialize};

/// Header naming the reason token (also the subject's last token).
pub const HEADER_REASON: &str = "Crm-Reason";
/// Header with the readable explanation: the field and the fix.
pub const HEADER_MESSAGE: &str = "Crm-Message";
/// Header with the subject the input arrived on.
pub const HEADER_SOURCE_SUBJECT: &str = "Crm-Source-Subject";
/// Header with the input's sequence in its source stream.
pub const HEADER_SOURCE_SEQUENCE: &str = "Crm-Source-Sequence";
/// Header set when the body had to be cut to fit the server's largest message: the
/// original length in bytes (the whole input stays in its source stream).
pub const HEADER_TRUNCATED: &str = "Crm-Truncated";
/// Room kept under the server's largest message for the headers' framing.
const FRAMING_BYTES: usize = 256;

/// The headers of a dead letter (besides `Nats-Msg-Id`): why it is one and where it came
/// from. The serde names are the header names ([`HEADER_REASON`] and the other constants;
/// a test keeps them equal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeadLetterHeaders {
    /// The reason token (also the subject's last token), e.g. `invalid_json`.
    #[serde(rename = "Crm-Reason")]
    pub reason: String,
    /// The readable explanation: the field and the fix (control characters replaced by
    /// spaces, at most 1,024 characters).
    #[serde(rename = "Crm-Message")]
    pub message: String,
    /// The subject the input arrived on.
    #[serde(rename = "Crm-Source-Subject")]
    pub source_subject: String,
    /// The input's sequence in its source stream.
    #[serde(rename = "Crm-Source-Sequence")]
    pub source_sequence: u64,
    /// Set when the body was cut to fit the server's largest message: the original length
    /// in bytes (the whole input stays in its source stream).
    #[serde(
        rename = "Crm-Truncated",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub truncated: Option<u64>,
}

/// A dead letter's headers that cannot be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeadLetterHeadersError {
    #[error("dead letter without header {0} (not published by crm-node?)")]
    Missing(&'static str),
    #[error("dead-letter header {header} is {value:?}, not a whole number")]
    NotANumber { header: &'static str, value: String },
}

impl DeadLetterHeaders {
    /// The NATS headers, one per field (`Crm-Truncated` only when set).
    pub fn to_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_REASON, self.reason.as_str());
        headers.insert(HEADER_MESSAGE, self.message.as_str());
        headers.insert(HEADER_SOURCE_SUBJECT, self.source_subject.as_str());
        headers.insert(
            HEADER_SOURCE_SEQUENCE,
            self.source_sequence.to_string().as_str(),
        );
        if let Some(length) = self.truncated {
            headers.insert(HEADER_TRUNCATED, length.to_string().as_str());
        }
        headers
    }

    /// Reads the headers of a dead letter back.
    pub fn from_headers(headers: &HeaderMap) -> Result<DeadLetterHeaders, DeadLetterHeadersError> {
        let text = |name: &'static str| headers.get(name).map(|value| value.as_str());
        let required = |name: &'static str| {
            text(name)
                .map(str::to_string)
                .ok_or(DeadLetterHeadersError::Missing(name))
        };
        let number = |name: &'static str, value: &str| {
            value
                .trim()
                .parse()
                .map_err(|_| DeadLetterHeadersError::NotANumber {
                    header: name,
                    value: value.to_string(),
                })
        };
        let (reason, message, source_subject, sequence) = (
            required(HEADER_REASON)?,
            required(HEADER_MESSAGE)?,
            required(HEADER_SOURCE_SUBJECT)?,
            required(HEADER_SOURCE_SEQUENCE)?,
        );
        Ok(DeadLetterHeaders {
            reason,
            message,
            source_subject,
            source_sequence: number(HEADER_SOURCE_SEQUENCE, &sequence)?,
            truncated: text(HEADER_TRUNCATED)
                .map(|value| number(HEADER_TRUNCATED, value))
                .transpose()?,
        })
    }
}

/// Publishes one dead letter; the caller awaits the returned ack before acking the source.
pub async fn publish(
    jetstream: &Context,
    rejection: &Rejection,
    source_subject: &str,
    source_sequence: u64,
    original: bytes::Bytes,
) -> Result<PublishAckFuture, PublishError> {
    let message_id = format!("dlq-{source_subject}-{source_sequence}");
    publish_as(
        jetstream,
        rejection,
        source_subject,
        source_sequence,
        message_id,
        original,
    )
    .await
}

/// Publishes the dead letter of a channel event a survivor held back during a merge and
/// refused when the merge completed. The shard record that released it (a `MergeIn`, at
/// `source_sequence` on `source_subject`) may release several, so the event id is part of
/// the dedup id; the body is [`ReleasedDeadLetter`] as JSON (the held event's adapter bytes
/// are not known to the shard worker: look the event id up in `CRM_INGEST`).
pub async fn publish_released(
    jetstream: &Context,
    rejection: &Rejection,
    source_subject: &str,
    source_sequence: u64,
    released: &ReleasedDeadLetter,
) -> Result<PublishAckFuture, PublishError> {
    let message_id = released_message_id(source_subject, source_sequence, &released.event_id);
    let body = serde_json::to_vec(released).unwrap_or_default();
    publish_as(
        jetstream,
        rejection,
        source_subject,
        source_sequence,
        message_id,
        body.into(),
    )
    .await
}

/// The body of the dead letter of a released held event (see [`publish_released`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasedDeadLetter {
    /// The survivor that held the event and refused it when its merge completed.
    pub customer_id: String,
    /// The held event's id (its `Nats-Msg-Id` in `CRM_INGEST`).
    pub event_id: String,
    /// Always `true`: the event was held back for a merge, then refused.
    pub released_by_merge: bool,
}

/// `dlq-<subject>-<sequence>-<event id>`, header-safe.
fn released_message_id(source_subject: &str, source_sequence: u64, event_id: &str) -> String {
    header_safe(&format!(
        "dlq-{source_subject}-{source_sequence}-{event_id}"
    ))
}

async fn publish_as(
    jetstream: &Context,
    rejection: &Rejection,
    source_subject: &str,
    source_sequence: u64,
    message_id: String,
    original: bytes::Bytes,
) -> Result<PublishAckFuture, PublishError> {
    let mut headers = DeadLetterHeaders {
        reason: rejection.reason.as_str().to_string(),
        message: header_safe(&rejection.message),
        source_subject: header_safe(source_subject),
        source_sequence,
        truncated: None,
    };
    let sequence = source_sequence.to_string();
    let headers_len = [
        message_id.as_str(),
        headers.reason.as_str(),
        headers.message.as_str(),
        headers.source_subject.as_str(),
        sequence.as_str(),
    ]
    .iter()
    .map(|value| value.len() + 32)
    .sum::<usize>();
    // An input close to the largest message the server takes (an oversized event) no longer
    // fits once the headers are added; refused, it would block the router for good.
    let room = jetstream
        .client()
        .server_info()
        .max_payload
        .saturating_sub(headers_len + FRAMING_BYTES);
    let payload = if original.len() > room {
        headers.truncated = Some(original.len() as u64);
        original.slice(..room)
    } else {
        original
    };
    let publish = Publish::build()
        .payload(payload)
        .headers(headers.to_headers())
        .message_id(message_id.as_str());
    jetstream
        .send_publish(subjects::dlq(rejection.reason.as_str()), publish)
        .await
}

/// Header values may not hold line breaks; keep them short too.
fn header_safe(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1024)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_events_of_one_record_get_distinct_header_safe_dedup_ids() {
        let first = released_message_id("crm.shard.3", 41, "e-1");
        let second = released_message_id("crm.shard.3", 41, "e-2");
        assert_ne!(first, second);
        assert_eq!(first, "dlq-crm.shard.3-41-e-1");
        assert_eq!(
            released_message_id("crm.shard.3", 41, "bad\nid"),
            "dlq-crm.shard.3-41-bad id"
        );
        let body = serde_json::to_value(ReleasedDeadLetter {
            customer_id: "c1".into(),
            event_id: "e-1".into(),
            released_by_merge: true,
        })
        .expect("serialises");
        assert_eq!(
            body,
            serde_json::json!({"customer_id": "c1", "event_id": "e-1", "released_by_merge": true})
        );
    }

    fn sample(truncated: Option<u64>) -> DeadLetterHeaders {
        DeadLetterHeaders {
            reason: "invalid_json".into(),
            message: "payload is not JSON: fix the body".into(),
            source_subject: "crm.ingest.web".into(),
            source_sequence: 42,
            truncated,
        }
    }

    #[test]
    fn headers_go_out_under_their_names_and_read_back() {
        for truncated in [None, Some(2_000_000)] {
            let headers = sample(truncated).to_headers();
            assert_eq!(
                headers.get(HEADER_REASON).map(|v| v.as_str()),
                Some("invalid_json")
            );
            assert_eq!(
                headers.get(HEADER_SOURCE_SEQUENCE).map(|v| v.as_str()),
                Some("42")
            );
            assert_eq!(
                headers
                    .get(HEADER_TRUNCATED)
                    .map(|v| v.as_str().to_string()),
                truncated.map(|n| n.to_string())
            );
            assert_eq!(
                DeadLetterHeaders::from_headers(&headers),
                Ok(sample(truncated))
            );
        }
    }

    #[test]
    fn unreadable_headers_name_the_header() {
        let mut headers = sample(None).to_headers();
        headers.insert(HEADER_SOURCE_SEQUENCE, "forty-two");
        assert_eq!(
            DeadLetterHeaders::from_headers(&headers),
            Err(DeadLetterHeadersError::NotANumber {
                header: HEADER_SOURCE_SEQUENCE,
                value: "forty-two".into()
            })
        );
        assert_eq!(
            DeadLetterHeaders::from_headers(&HeaderMap::new()),
            Err(DeadLetterHeadersError::Missing(HEADER_REASON))
        );
    }

    #[test]
    fn the_schema_and_json_use_the_header_names() {
        let json = serde_json::to_value(sample(Some(7))).expect("serialisable");
        let mut keys: Vec<&str> = json
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut names = [
            HEADER_REASON,
            HEADER_MESSAGE,
            HEADER_SOURCE_SUBJECT,
            HEADER_SOURCE_SEQUENCE,
            HEADER_TRUNCATED,
        ];
        names.sort_unstable();
        assert_eq!(keys, names);
        let schema =
            serde_json::to_value(schemars::schema_for!(DeadLetterHeaders)).expect("schema");
        let mut properties: Vec<&str> = schema["properties"]
            .as_object()
            .expect("properties")
            .keys()
            .map(String::as_str)
            .collect();
        properties.sort_unstable();
        assert_eq!(properties, names);
    }
}

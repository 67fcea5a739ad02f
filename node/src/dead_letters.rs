//! Dead letters: inputs that cannot be applied, kept in the `CRM_DLQ` stream with a reason.
//!
//! A dead letter's body is the original bytes, unchanged; its headers say why
//! (`Crm-Reason`, `Crm-Message`) and where it came from (`Crm-Source-Subject`,
//! `Crm-Source-Sequence`). It is published on `crm.dlq.<reason>` with a `Nats-Msg-Id`
//! derived from the source, so a redelivered bad input is dead-lettered once.

use crate::subjects;
use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::Context;
use crm_actors::ingest::Rejection;

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

/// Publishes one dead letter; the caller awaits the returned ack before acking the source.
pub async fn publish(
    jetstream: &Context,
    rejection: &Rejection,
    source_subject: &str,
    source_sequence: u64,
    original: bytes::Bytes,
) -> Result<PublishAckFuture, PublishError> {
    let message_id = format!("dlq-{source_subject}-{source_sequence}");
    let message = header_safe(&rejection.message);
    let source = header_safe(source_subject);
    let sequence = source_sequence.to_string();
    let headers_len = [
        message_id.as_str(),
        rejection.reason.as_str(),
        message.as_str(),
        source.as_str(),
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
    let (payload, truncated) = if original.len() > room {
        (original.slice(..room), Some(original.len()))
    } else {
        (original, None)
    };
    let mut publish = Publish::build()
        .payload(payload)
        .message_id(message_id.as_str())
        .header(HEADER_REASON, rejection.reason.as_str())
        .header(HEADER_MESSAGE, message.as_str())
        .header(HEADER_SOURCE_SUBJECT, source.as_str())
        .header(HEADER_SOURCE_SEQUENCE, sequence.as_str());
    if let Some(length) = truncated {
        publish = publish.header(HEADER_TRUNCATED, length.to_string().as_str());
    }
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

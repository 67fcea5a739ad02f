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
use crm_actors::event::Rejection;

/// Header naming the reason token (also the subject's last token).
pub const HEADER_REASON: &str = "Crm-Reason";
/// Header with the readable explanation: the field and the fix.
pub const HEADER_MESSAGE: &str = "Crm-Message";
/// Header with the subject the input arrived on.
pub const HEADER_SOURCE_SUBJECT: &str = "Crm-Source-Subject";
/// Header with the input's sequence in its source stream.
pub const HEADER_SOURCE_SEQUENCE: &str = "Crm-Source-Sequence";

/// Publishes one dead letter; the caller awaits the returned ack before acking the source.
pub async fn publish(
    jetstream: &Context,
    rejection: &Rejection,
    source_subject: &str,
    source_sequence: u64,
    original: bytes::Bytes,
) -> Result<PublishAckFuture, PublishError> {
    let publish = Publish::build()
        .payload(original)
        .message_id(format!("dlq-{source_subject}-{source_sequence}"))
        .header(HEADER_REASON, rejection.reason.as_str())
        .header(HEADER_MESSAGE, header_safe(&rejection.message).as_str())
        .header(HEADER_SOURCE_SUBJECT, header_safe(source_subject).as_str())
        .header(HEADER_SOURCE_SEQUENCE, source_sequence.to_string().as_str());
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

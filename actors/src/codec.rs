//! The one place that turns internal values into bytes and back.
//!
//! Records on the shard log (`ShardMessage`) and values in sled (customer state, shard meta)
//! are bincode 2 (standard config, through serde) behind one leading format version byte,
//! [`FORMAT_VERSION`]. A reader that meets another version fails with a [`CodecError`] that
//! names both versions instead of misreading the bytes, so the format can change later by
//! bumping the byte and teaching [`decode`] the old one. Public contracts (adapters,
//! dashboards, queries) are JSON and never pass through here.
//!
//! bincode is not self-describing: types encoded here must not use `#[serde(flatten)]`,
//! `#[serde(untagged)]`, internally tagged enums or `serde_json::Value`, which need
//! `deserialize_any`. The round-trip tests catch such a type.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The format version byte this build writes and reads. History: 1, the first format;
/// 2, customer state gained its purchase days (`ValueHistory`) and the shard log the
/// `Routed` record; 3, orders record their expired points and application order, and
/// loyalty whether the first-purchase bonus was granted. No deployment ever held version 1
/// or 2 data, so version 3 reads neither. 4: the customer state gained its merges
/// (`MergeState`, its last field) and the shard log the merge commands (variants appended
/// at the end of `CustomerCommand`, so every version-3 record reads as it was written).
/// Version 3 is still read: records and values as they are, a customer state through
/// [`decode_state`], which appends an empty `MergeState`.
pub const FORMAT_VERSION: u8 = 4;

/// The oldest format version this build reads (see [`FORMAT_VERSION`]).
pub const FORMAT_VERSION_OLDEST: u8 = 3;

/// Why bytes could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// No bytes at all where a record was expected.
    #[error("empty record: expected format version byte {expected} followed by bincode")]
    Empty { expected: u8 },
    /// Written by another build (or another program) with another format version.
    #[error(
        "format version {found} is not readable by this build (it reads version {expected}); \
         run a build that knows version {found}, or rebuild the data from the shard log"
    )]
    WrongVersion { found: u8, expected: u8 },
    /// The right version byte, but the bincode body does not decode into the expected type.
    #[error("record body (format version {version}) does not decode: {source}")]
    Decode {
        version: u8,
        #[source]
        source: bincode::error::DecodeError,
    },
    /// The body decoded but left bytes unread: the record is not of the expected type.
    #[error("record has {trailing} unread bytes after its body; it is not of the expected type")]
    TrailingBytes { trailing: usize },
    /// The value cannot be represented in bincode (a programming error in a type).
    #[error("value cannot be encoded: {0}")]
    Encode(#[from] bincode::error::EncodeError),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` as the version byte followed by bincode; fails only for types bincode
/// cannot represent (a programming error, see the module notes).
pub fn try_encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut bytes = Vec::with_capacity(64);
    bytes.push(FORMAT_VERSION);
    bincode::serde::encode_into_std_write(value, &mut bytes, config())?;
    Ok(bytes)
}

/// Encodes `value` as the version byte followed by bincode.
///
/// # Panics
/// Only if the type cannot be represented in bincode (a sequence without a known length, a
/// failing custom `Serialize`): a bug in the type, never caused by input data. Use
/// [`try_encode`] where a failure must be handled.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    match try_encode(value) {
        Ok(bytes) => bytes,
        Err(error) => panic!("codec::encode of {}: {error}", std::any::type_name::<T>()),
    }
}

/// Decodes bytes written by [`encode`]: checks the version byte, decodes the body, and
/// refuses trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (version, body) = split_version(bytes)?;
    decode_body(version, body)
}

/// A customer state written by this build or by a format-3 build (whose state ends before
/// the `merge` field: an empty one is appended before decoding).
pub fn decode_state(bytes: &[u8]) -> Result<crate::state::CustomerState, CodecError> {
    let (version, body) = split_version(bytes)?;
    if version == FORMAT_VERSION {
        return decode_body(version, body);
    }
    let mut migrated = body.to_vec();
    bincode::serde::encode_into_std_write(
        crate::state::MergeState::default(),
        &mut migrated,
        config(),
    )?;
    decode_body(version, &migrated)
}

fn split_version(bytes: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty {
        expected: FORMAT_VERSION,
    })?;
    if !(FORMAT_VERSION_OLDEST..=FORMAT_VERSION).contains(&version) {
        return Err(CodecError::WrongVersion {
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    Ok((version, body))
}

fn decode_body<T: DeserializeOwned>(version: u8, body: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(body, config())
        .map_err(|source| CodecError::Decode { version, source })?;
    if used != body.len() {
        return Err(CodecError::TrailingBytes {
            trailing: body.len() - used,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{parse_ingest, IngestLimits};
    use crate::shard_message::{CustomerCommand, ShardMessage};

    fn purchase_message() -> ShardMessage {
        let json = serde_json::json!({
            "v": 1, "event_id": "e-1", "type": "purchase", "occurred_at": "2026-01-02T10:00:00Z",
            "identity": {"email": "ann@example.com"},
            "order_id": "o-1", "amount": 25.5, "currency": "EUR",
            "items": [{"sku": "s1", "category": "shoes", "qty": 1, "price": 25.5}]
        });
        let event = parse_ingest("web", json.to_string().as_bytes(), &IngestLimits::default())
            .expect("test event is valid");
        ShardMessage::Customer {
            customer_id: "c-1".to_string(),
            command: CustomerCommand::Event {
                event,
                conflict: None,
            },
            reply_to: Some("_INBOX.x".to_string()),
        }
    }

    #[test]
    fn a_shard_message_round_trips_behind_the_version_byte() {
        let message = purchase_message();
        let bytes = encode(&message);
        assert_eq!(bytes[0], FORMAT_VERSION);
        let back: ShardMessage = decode(&bytes).expect("round trip");
        assert_eq!(back, message);
        let tick = ShardMessage::Tick { at_ms: -5 };
        assert_eq!(decode::<ShardMessage>(&encode(&tick)).expect("tick"), tick);
    }

    #[test]
    fn a_customer_state_round_trips() {
        let state = crate::state::CustomerState::new("c-1");
        let bytes = encode(&state);
        let back: crate::state::CustomerState = decode(&bytes).expect("round trip");
        assert_eq!(encode(&back), bytes);
    }

    #[test]
    fn a_format_3_customer_state_reads_with_no_merges() {
        // A version-3 state is this build's state without its last field.
        let mut state = crate::state::CustomerState::new("c-1");
        state.created_at_ms = Some(5);
        let current = encode(&state);
        let empty_merge = encode(&crate::state::MergeState::default());
        let mut old = current[..current.len() - (empty_merge.len() - 1)].to_vec();
        old[0] = 3;
        assert_eq!(decode_state(&old).expect("format 3"), state);
        assert_eq!(decode_state(&current).expect("format 4"), state);
        assert!(decode::<crate::state::CustomerState>(&old).is_err());
    }

    #[test]
    fn another_version_byte_is_refused_with_both_versions_named() {
        let mut bytes = encode(&purchase_message());
        bytes[0] = 7;
        let error = decode::<ShardMessage>(&bytes).expect_err("wrong version");
        assert!(matches!(
            error,
            CodecError::WrongVersion {
                found: 7,
                expected: FORMAT_VERSION
            }
        ));
        let text = error.to_string();
        assert!(
            text.contains('7') && text.contains(&FORMAT_VERSION.to_string()),
            "{text}"
        );
    }

    #[test]
    fn empty_truncated_and_padded_records_are_refused() {
        assert!(matches!(
            decode::<ShardMessage>(&[]),
            Err(CodecError::Empty { .. })
        ));
        let bytes = encode(&purchase_message());
        assert!(matches!(
            decode::<ShardMessage>(&bytes[..bytes.len() / 2]),
            Err(CodecError::Decode { .. })
        ));
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(matches!(
            decode::<ShardMessage>(&padded),
            Err(CodecError::TrailingBytes { trailing: 1 })
        ));
    }
}

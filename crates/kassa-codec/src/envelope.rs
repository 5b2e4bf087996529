//! The event envelope and its frame.

use sha2::{Digest, Sha256};

/// The frame format this code writes. Readers accept `1..=FORMAT_VERSION`.
pub const FORMAT_VERSION: u16 = 1;

/// No frame may be larger than this: a length or a varint that claims more is
/// corruption, and decoding refuses it before allocating.
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The `prev_hash` of the first record of every log.
pub const GENESIS_HASH: Hash = [0u8; 32];

/// One stored or transported event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique id of the event; deterministic from its cause where it has one,
    /// so consumers can drop duplicates by id.
    pub event_id: u128,
    /// Stable type name, e.g. `payment.captured`. Never reused for another layout.
    pub event_type: String,
    /// The stream (entity) the event belongs to: a payment, a batch, a provider.
    pub stream_id: u128,
    /// 1-based position within the stream, without gaps.
    pub stream_seq: u64,
    /// 1-based position within the whole log, without gaps.
    pub position: u64,
    /// When it was recorded, ms since the Unix epoch (injected, never read by the core).
    pub timestamp_ms: i64,
    /// The event or command that caused this one.
    pub causation_id: Option<u128>,
    /// The request or flow this belongs to (one payment's journey across services).
    pub correlation_id: Option<u128>,
    /// The encoded domain event (see [`crate::events`]).
    pub payload: Vec<u8>,
    /// The hash of the previous record in the log ([`GENESIS_HASH`] for the first).
    pub prev_hash: Hash,
}

/// The bincode body of a version-1 frame, as decoded: the type name and the
/// payload borrowed from the frame. Field order is the format: a new field
/// means a new version.
///
/// Encoded and decoded with bincode's own (not serde's) traits: the bytes are
/// the same — varints for the integers, a `0`/`1` tag before an option's
/// value, a varint length before the type name and the payload, the hash's
/// 32 bytes as they are — but the hash is read in one copy instead of through
/// serde's visitors one byte at a time, and nothing is copied until the caller
/// wants an owned [`Envelope`]. `tests::the_body_is_the_serde_encoding` holds
/// the two equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeRef<'a> {
    pub event_id: u128,
    pub event_type: &'a str,
    pub stream_id: u128,
    pub stream_seq: u64,
    pub position: u64,
    pub timestamp_ms: i64,
    pub causation_id: Option<u128>,
    pub correlation_id: Option<u128>,
    pub payload: &'a [u8],
    pub prev_hash: Hash,
}

impl EnvelopeRef<'_> {
    /// The envelope with its own copy of the type name and the payload.
    pub fn to_owned(&self) -> Envelope {
        Envelope {
            event_id: self.event_id,
            event_type: self.event_type.to_owned(),
            stream_id: self.stream_id,
            stream_seq: self.stream_seq,
            position: self.position,
            timestamp_ms: self.timestamp_ms,
            causation_id: self.causation_id,
            correlation_id: self.correlation_id,
            payload: self.payload.to_vec(),
            prev_hash: self.prev_hash,
        }
    }
}

impl<'de: 'a, 'a, Context> bincode::BorrowDecode<'de, Context> for EnvelopeRef<'a> {
    fn borrow_decode<D: bincode::de::BorrowDecoder<'de, Context = Context>>(
        d: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        use bincode::Decode;
        Ok(EnvelopeRef {
            event_id: u128::decode(d)?,
            event_type: <&str>::borrow_decode(d)?,
            stream_id: u128::decode(d)?,
            stream_seq: u64::decode(d)?,
            position: u64::decode(d)?,
            timestamp_ms: i64::decode(d)?,
            causation_id: Option::<u128>::decode(d)?,
            correlation_id: Option::<u128>::decode(d)?,
            payload: <&[u8]>::borrow_decode(d)?,
            prev_hash: Hash::decode(d)?,
        })
    }
}

/// The same body, borrowed for encoding (no copy of type name or payload).
/// Must list exactly the fields of [`EnvelopeRef`], in the same order.
struct BodyV1Ref<'a> {
    event_id: u128,
    event_type: &'a str,
    stream_id: u128,
    stream_seq: u64,
    position: u64,
    timestamp_ms: i64,
    causation_id: Option<u128>,
    correlation_id: Option<u128>,
    payload: &'a [u8],
    prev_hash: &'a Hash,
}

impl bincode::Encode for BodyV1Ref<'_> {
    fn encode<E: bincode::enc::Encoder>(&self, e: &mut E) -> Result<(), bincode::error::EncodeError> {
        self.event_id.encode(e)?;
        self.event_type.encode(e)?;
        self.stream_id.encode(e)?;
        self.stream_seq.encode(e)?;
        self.position.encode(e)?;
        self.timestamp_ms.encode(e)?;
        self.causation_id.encode(e)?;
        self.correlation_id.encode(e)?;
        self.payload.encode(e)?;
        self.prev_hash.encode(e)
    }
}

/// Why bytes could not be decoded. Never a panic: every input gets one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("frame is {len} bytes, shorter than the 6-byte minimum (truncated?)")]
    Truncated { len: usize },
    #[error("frame is {len} bytes, over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("frame format version {found} is not supported by this build (it reads 1 to {supported}); upgrade Kassa")]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("frame checksum mismatch: stored {stored:#010x}, computed {computed:#010x} (corrupted bytes)")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("frame body does not decode: {reason}")]
    Malformed { reason: String },
    #[error("frame body has {extra} trailing bytes after the envelope")]
    TrailingBytes { extra: usize },
    #[error("unknown event type {event_type:?}: written by a newer Kassa?")]
    UnknownEventType { event_type: String },
    #[error("payload of {event_type:?} does not decode: {reason}")]
    BadPayload { event_type: String, reason: String },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<FRAME_BYTES_MAX>()
}

/// Encode an envelope as a frame (see the crate docs for the layout).
pub fn encode_frame(envelope: &Envelope) -> Vec<u8> {
    let mut frame = Vec::with_capacity(64 + envelope.payload.len() + envelope.event_type.len());
    encode_frame_into(envelope, &mut frame);
    frame
}

/// Append an envelope's frame to `out` (no intermediate buffer); returns
/// where the frame starts.
pub fn encode_frame_into(envelope: &Envelope, out: &mut Vec<u8>) -> usize {
    let body = BodyV1Ref {
        event_id: envelope.event_id,
        event_type: &envelope.event_type,
        stream_id: envelope.stream_id,
        stream_seq: envelope.stream_seq,
        position: envelope.position,
        timestamp_ms: envelope.timestamp_ms,
        causation_id: envelope.causation_id,
        correlation_id: envelope.correlation_id,
        payload: &envelope.payload,
        prev_hash: &envelope.prev_hash,
    };
    let start = out.len();
    // Room for the fixed fields at their widest, so the encoder does not grow `out` bit by bit.
    out.reserve(160 + envelope.event_type.len() + envelope.payload.len());
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    // Encoding plain owned data into a Vec cannot fail.
    bincode::encode_into_std_write(&body, out, config()).expect("encoding into a Vec cannot fail");
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
    start
}

/// Decode and verify a frame: length, version, checksum, body, no trailing bytes.
pub fn decode_frame(frame: &[u8]) -> Result<Envelope, CodecError> {
    decode_frame_ref(frame).map(|envelope| envelope.to_owned())
}

/// [`decode_frame`], borrowing the type name and the payload from `frame`.
pub fn decode_frame_ref(frame: &[u8]) -> Result<EnvelopeRef<'_>, CodecError> {
    if frame.len() < 6 {
        return Err(CodecError::Truncated { len: frame.len() });
    }
    if frame.len() > FRAME_BYTES_MAX {
        return Err(CodecError::TooLarge { len: frame.len(), max: FRAME_BYTES_MAX });
    }
    let version = u16::from_le_bytes([frame[0], frame[1]]);
    if version == 0 || version > FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion { found: version, supported: FORMAT_VERSION });
    }
    let (covered, crc_bytes) = frame.split_at(frame.len() - 4);
    let stored = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
    let computed = crc32c::crc32c(covered);
    if stored != computed {
        return Err(CodecError::ChecksumMismatch { stored, computed });
    }
    let body_bytes = &covered[2..];
    let (body, read): (EnvelopeRef<'_>, usize) = bincode::borrow_decode_from_slice(body_bytes, config())
        .map_err(|e| CodecError::Malformed { reason: e.to_string() })?;
    if read != body_bytes.len() {
        return Err(CodecError::TrailingBytes { extra: body_bytes.len() - read });
    }
    Ok(body)
}

/// The record hash of a frame: what the next record carries as `prev_hash`.
pub fn frame_hash(frame: &[u8]) -> Hash {
    Sha256::digest(frame).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Envelope {
        Envelope {
            event_id: 7,
            event_type: "payment.requested".into(),
            stream_id: 9,
            stream_seq: 1,
            position: 42,
            timestamp_ms: 1_795_651_200_000,
            causation_id: Some(3),
            correlation_id: None,
            payload: vec![1, 2, 3],
            prev_hash: [5; 32],
        }
    }

    #[test]
    fn round_trips() {
        let frame = encode_frame(&sample());
        assert_eq!(decode_frame(&frame), Ok(sample()));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let frame = encode_frame(&sample());
        for byte in 0..frame.len() {
            for bit in 0..8 {
                let mut bad = frame.clone();
                bad[byte] ^= 1 << bit;
                assert!(decode_frame(&bad).is_err(), "flip at {byte}:{bit} went unnoticed");
            }
        }
    }

    #[test]
    fn truncation_and_future_versions_are_clear_errors() {
        let frame = encode_frame(&sample());
        for len in 0..frame.len() {
            assert!(decode_frame(&frame[..len]).is_err());
        }
        let mut future = frame.clone();
        future[0..2].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(decode_frame(&future), Err(CodecError::UnsupportedVersion { found: 2, supported: 1 }));
        assert!(decode_frame(&future).unwrap_err().to_string().contains("upgrade Kassa"));
    }

    /// The serde form the frames were written with before: the format.
    #[derive(serde::Serialize)]
    struct SerdeBody<'a> {
        event_id: u128,
        event_type: &'a str,
        stream_id: u128,
        stream_seq: u64,
        position: u64,
        timestamp_ms: i64,
        causation_id: Option<u128>,
        correlation_id: Option<u128>,
        #[serde(with = "serde_bytes_like")]
        payload: &'a [u8],
        prev_hash: Hash,
    }

    mod serde_bytes_like {
        #[allow(clippy::ptr_arg)]
        pub fn serialize<S: serde::Serializer>(bytes: &&[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(bytes)
        }
    }

    fn any_envelope() -> impl Strategy<Value = Envelope> {
        (
            (any::<u128>(), "[a-z._]{0,40}", any::<u128>(), any::<u64>(), any::<u64>(), any::<i64>()),
            (
                any::<Option<u128>>(),
                any::<Option<u128>>(),
                prop::collection::vec(any::<u8>(), 0..600),
                any::<[u8; 32]>(),
            ),
        )
            .prop_map(|((event_id, event_type, stream_id, stream_seq, position, timestamp_ms), rest)| {
                let (causation_id, correlation_id, payload, prev_hash) = rest;
                Envelope {
                    event_id,
                    event_type,
                    stream_id,
                    stream_seq,
                    position,
                    timestamp_ms,
                    causation_id,
                    correlation_id,
                    payload,
                    prev_hash,
                }
            })
    }

    proptest! {
        /// Frames are what serde's bincode wrote (so every log and golden file
        /// still reads), and serde's frames decode to the same envelope.
        #[test]
        fn the_body_is_the_serde_encoding(envelope in any_envelope()) {
            let serde_body = SerdeBody {
                event_id: envelope.event_id,
                event_type: &envelope.event_type,
                stream_id: envelope.stream_id,
                stream_seq: envelope.stream_seq,
                position: envelope.position,
                timestamp_ms: envelope.timestamp_ms,
                causation_id: envelope.causation_id,
                correlation_id: envelope.correlation_id,
                payload: &envelope.payload,
                prev_hash: envelope.prev_hash,
            };
            let mut serde_frame = FORMAT_VERSION.to_le_bytes().to_vec();
            bincode::serde::encode_into_std_write(&serde_body, &mut serde_frame, config()).unwrap();
            let crc = crc32c::crc32c(&serde_frame);
            serde_frame.extend_from_slice(&crc.to_le_bytes());
            prop_assert_eq!(&encode_frame(&envelope), &serde_frame);
            prop_assert_eq!(decode_frame(&serde_frame), Ok(envelope));
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame(&bytes);
        }

        #[test]
        fn garbage_with_a_valid_header_and_crc_never_panics(body in prop::collection::vec(any::<u8>(), 0..256)) {
            let mut frame = FORMAT_VERSION.to_le_bytes().to_vec();
            frame.extend_from_slice(&body);
            let crc = crc32c::crc32c(&frame);
            frame.extend_from_slice(&crc.to_le_bytes());
            let _ = decode_frame(&frame);
        }
    }
}

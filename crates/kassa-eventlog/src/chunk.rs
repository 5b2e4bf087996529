//! A chunk: consecutive frames stored under one key, each `[u32 LE length][frame]`.
//!
//! Chunks amortize RocksDB's per-key cost over many events (appends and
//! sequential reads are the hot paths); every frame inside keeps its own
//! checksum and chain link, so a chunk is verified frame by frame.

use crate::LogError;
use kassa_codec::{Envelope, EnvelopeRef, Hash, decode_frame_ref, encode_frame_into, frame_hash};

/// Encode an envelope straight into the chunk; returns its record hash.
pub fn push_frame(chunk: &mut Vec<u8>, envelope: &Envelope) -> Hash {
    let len_at = chunk.len();
    chunk.extend_from_slice(&[0; 4]);
    let start = encode_frame_into(envelope, chunk);
    let len = (chunk.len() - start) as u32;
    chunk[len_at..start].copy_from_slice(&len.to_le_bytes());
    frame_hash(&chunk[start..])
}

/// The frames of a chunk, without decoding them.
pub fn frames(chunk: &[u8], first_position: u64) -> Result<Vec<&[u8]>, LogError> {
    let mut frames = Vec::new();
    let mut rest = chunk;
    while !rest.is_empty() {
        let position = first_position + frames.len() as u64;
        let bad = |reason: &str| LogError::BadChunk { position, reason: reason.to_owned() };
        let len_bytes: [u8; 4] =
            rest.get(..4).and_then(|b| b.try_into().ok()).ok_or_else(|| bad("truncated length"))?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        let frame = rest.get(4..4 + len).ok_or_else(|| bad("frame runs past the end of its chunk"))?;
        frames.push(frame);
        rest = &rest[4 + len..];
    }
    if frames.is_empty() {
        return Err(LogError::BadChunk { position: first_position, reason: "empty chunk".into() });
    }
    Ok(frames)
}

/// Decode one frame that must hold the record at `position`: its checksum
/// and body, and the position it names.
pub fn decode_at(frame: &[u8], position: u64) -> Result<Envelope, LogError> {
    decode_ref_at(frame, position).map(|envelope| envelope.to_owned())
}

/// [`decode_at`], borrowing the type name and the payload from `frame`.
pub fn decode_ref_at(frame: &[u8], position: u64) -> Result<EnvelopeRef<'_>, LogError> {
    let envelope = decode_frame_ref(frame).map_err(|source| LogError::Corrupt { position, source })?;
    if envelope.position != position {
        return Err(LogError::Gap { expected: position, found: envelope.position });
    }
    Ok(envelope)
}

/// Decode and verify every frame of a chunk: checksum, position without gaps,
/// and the hash chain from `anchor` (the hash of the record before the chunk).
/// Returns each envelope with its own record hash.
pub fn decode_verified(chunk: &[u8], first_position: u64, anchor: Hash) -> Result<Vec<(Envelope, Hash)>, LogError> {
    let mut prev = anchor;
    let mut out = Vec::new();
    for (index, frame) in frames(chunk, first_position)?.into_iter().enumerate() {
        let expected = first_position + index as u64;
        let envelope = decode_at(frame, expected)?;
        if envelope.prev_hash != prev {
            return Err(LogError::ChainBroken { position: expected });
        }
        prev = frame_hash(frame);
        out.push((envelope, prev));
    }
    Ok(out)
}

//! The one place that knows how Kassa's bytes look.
//!
//! Everything stored or transported is an [`Envelope`] encoded as a *frame*:
//!
//! ```text
//! ┌──────────────┬───────────────────────────────┬──────────────┐
//! │ version u16  │ bincode 2 body (EnvelopeBody) │ crc32c u32   │
//! │ little end.  │ standard config, varints      │ over all     │
//! └──────────────┴───────────────────────────────┴──────────────┘
//! ```
//!
//! The version comes first so a reader refuses a frame from the future before
//! trying to decode it. The CRC32C covers version and body. The frame's
//! SHA-256 is the record hash; the next record carries it as `prev_hash`, which
//! makes the log a hash chain: a changed, dropped or reordered record breaks it.
//!
//! bincode is pinned at `=2.0.1` (3.0.0 is a deliberate compile error and the
//! project is unmaintained). No other crate calls bincode: to move to another
//! format, add a version here and keep decoding the old one.

pub mod envelope;
pub mod events;

pub use envelope::{
    CodecError, Envelope, EnvelopeRef, FORMAT_VERSION, FRAME_BYTES_MAX, GENESIS_HASH, Hash, decode_frame,
    decode_frame_ref, encode_frame, encode_frame_into, frame_hash,
};
pub use events::{EventPayload, decode_value, encode_value};

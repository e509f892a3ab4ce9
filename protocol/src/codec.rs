//! The envelope: one version byte, then the postcard body, under a per-message size cap.

use serde::{Serialize, de::DeserializeOwned};

/// The version byte that starts every Outpost message. A decoder refuses any other.
pub const WIRE_VERSION: u8 = 5;

/// Why bytes could not be decoded into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload is empty: not even a version byte.
    #[error("empty payload")]
    Empty,
    /// The payload is larger than this message can ever be; rejected before decoding.
    #[error("payload of {len} bytes exceeds the {max}-byte limit")]
    Oversize {
        /// Length of the payload received.
        len: usize,
        /// Largest payload this message type accepts.
        max: usize,
    },
    /// The payload was written by a protocol version this build does not speak.
    #[error(
        "wire version {0}, but this build speaks version {WIRE_VERSION}: upgrade the controller and the agents together"
    )]
    UnknownVersion(u8),
    /// The body does not decode as this message (truncated, bad tag, bound exceeded, bad id).
    #[error("malformed body")]
    Malformed,
    /// The body decoded but bytes were left over after it.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The output buffer (or the message's size cap) is too small for this message.
    #[error("message does not fit in {0} bytes")]
    TooLarge(usize),
}

/// A message of the Outpost protocol: serializable, bounded and versioned.
pub trait Message: Serialize + DeserializeOwned {
    /// A short name for logs and counters (`report`, `desired`...).
    const NAME: &'static str;
    /// The largest encoded size, version byte included. Decoders reject anything longer
    /// before decoding; encoders refuse to produce it.
    const MAX_SIZE: usize;

    /// Encodes into `buf` and returns the written prefix.
    fn encode<'b>(&self, buf: &'b mut [u8]) -> Result<&'b [u8], EncodeError> {
        let cap = buf.len().min(Self::MAX_SIZE);
        let (first, rest) = buf[..cap]
            .split_first_mut()
            .ok_or(EncodeError::TooLarge(cap))?;
        *first = WIRE_VERSION;
        let body_len = postcard::to_slice(self, rest)
            .map_err(|_| EncodeError::TooLarge(cap))?
            .len();
        Ok(&buf[..1 + body_len])
    }

    /// Encodes into a new vector.
    #[cfg(feature = "std")]
    fn to_vec(&self) -> Result<alloc::vec::Vec<u8>, EncodeError> {
        let out = postcard::to_extend(self, alloc::vec![WIRE_VERSION])
            .map_err(|_| EncodeError::TooLarge(Self::MAX_SIZE))?;
        if out.len() > Self::MAX_SIZE {
            return Err(EncodeError::TooLarge(Self::MAX_SIZE));
        }
        Ok(out)
    }

    /// Decodes a whole payload: size cap first, then version, then body, then no leftovers.
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > Self::MAX_SIZE {
            return Err(DecodeError::Oversize {
                len: bytes.len(),
                max: Self::MAX_SIZE,
            });
        }
        let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
        if version != WIRE_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let (msg, rest) = postcard::take_from_bytes(body).map_err(|_| DecodeError::Malformed)?;
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes(rest.len()));
        }
        Ok(msg)
    }
}

//! The flashed form: `OPDC` magic, a version byte, the body length (u32 LE), the postcard body,
//! and a CRC-32 (ISO-HDLC, LE) over everything before it. Decoding is `no_std` and checks, in
//! order: length, magic, version, declared length, CRC, body, leftovers.

use crate::schema::DeviceConfig;

/// The first four bytes of every flashed config.
pub const MAGIC: [u8; 4] = *b"OPDC";
/// The flashed format's version.
pub const VERSION: u8 = 2;
/// Magic, version and length.
pub const HEADER_LEN: usize = 4 + 1 + 4;
/// The CRC at the end.
pub const CRC_LEN: usize = 4;
/// The largest flashed config.
pub const MAX_FLASHED_LEN: usize = 16 * 1024;

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// Why bytes are not a valid flashed config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlashError {
    /// Shorter than a header and a CRC.
    #[error("too short to be a flashed config ({0} bytes)")]
    TooShort(usize),
    /// Larger than any flashed config can be.
    #[error("{0} bytes is larger than a flashed config can be ({MAX_FLASHED_LEN})")]
    Oversize(usize),
    /// Does not start with `OPDC`.
    #[error("not an Outpost device config (bad magic)")]
    BadMagic,
    /// Written by a format version this build does not read.
    #[error("flashed config version {0} is not supported (this build reads version {VERSION})")]
    UnknownVersion(u8),
    /// The declared body length does not match the data.
    #[error("declared length {declared} does not match the {actual}-byte body")]
    LengthMismatch {
        /// What the header says.
        declared: usize,
        /// What is there.
        actual: usize,
    },
    /// The data is damaged.
    #[error("CRC mismatch: stored {stored:#010x}, computed {computed:#010x} (corrupt config)")]
    BadCrc {
        /// The CRC stored in the config.
        stored: u32,
        /// The CRC of the data.
        computed: u32,
    },
    /// The body is not a valid config (or names an invalid node id, label...).
    #[error("the config body is malformed")]
    Malformed,
    /// The output buffer is too small.
    #[error("the output buffer is too small")]
    BufferTooSmall,
}

/// Writes the flashed form of `cfg` into `buf`; returns the bytes written.
pub fn encode<'b>(cfg: &DeviceConfig, buf: &'b mut [u8]) -> Result<&'b [u8], FlashError> {
    if buf.len() < HEADER_LEN + CRC_LEN {
        return Err(FlashError::BufferTooSmall);
    }
    let cap = buf.len().min(MAX_FLASHED_LEN) - CRC_LEN;
    let body_len = postcard::to_slice(cfg, &mut buf[HEADER_LEN..cap])
        .map_err(|_| FlashError::BufferTooSmall)?
        .len();
    buf[..4].copy_from_slice(&MAGIC);
    buf[4] = VERSION;
    // body_len < MAX_FLASHED_LEN, so it fits in a u32.
    buf[5..HEADER_LEN].copy_from_slice(&(body_len as u32).to_le_bytes());
    let end = HEADER_LEN + body_len;
    let crc = CRC32.checksum(&buf[..end]);
    buf[end..end + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(&buf[..end + CRC_LEN])
}

/// Encodes into a new vector.
#[cfg(feature = "std")]
pub fn to_vec(cfg: &DeviceConfig) -> Result<std::vec::Vec<u8>, FlashError> {
    let mut buf = std::vec![0u8; MAX_FLASHED_LEN];
    let n = encode(cfg, &mut buf)?.len();
    buf.truncate(n);
    Ok(buf)
}

/// Whether `bytes` look like a flashed config (start with the magic).
pub fn is_flashed(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC)
}

/// Decodes and verifies a flashed config.
pub fn decode(bytes: &[u8]) -> Result<DeviceConfig, FlashError> {
    if bytes.len() > MAX_FLASHED_LEN {
        return Err(FlashError::Oversize(bytes.len()));
    }
    if bytes.len() < HEADER_LEN + CRC_LEN {
        return Err(FlashError::TooShort(bytes.len()));
    }
    if bytes[..4] != MAGIC {
        return Err(FlashError::BadMagic);
    }
    let version = bytes[4];
    if version != VERSION && version != 1 {
        return Err(FlashError::UnknownVersion(version));
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&bytes[5..HEADER_LEN]);
    let declared = u32::from_le_bytes(len) as usize;
    let actual = bytes.len() - HEADER_LEN - CRC_LEN;
    if declared != actual {
        return Err(FlashError::LengthMismatch { declared, actual });
    }
    let end = HEADER_LEN + actual;
    let mut stored = [0u8; 4];
    stored.copy_from_slice(&bytes[end..]);
    let stored = u32::from_le_bytes(stored);
    let computed = CRC32.checksum(&bytes[..end]);
    if stored != computed {
        return Err(FlashError::BadCrc { stored, computed });
    }
    let body = &bytes[HEADER_LEN..end];
    // Version 1 is version 2 without its last field, an `Option` (`None` is one zero byte).
    let mut v1 = [0u8; MAX_FLASHED_LEN];
    let body = if version == 1 {
        v1[..body.len()].copy_from_slice(body);
        &v1[..=body.len()]
    } else {
        body
    };
    let (cfg, rest) = postcard::take_from_bytes(body).map_err(|_| FlashError::Malformed)?;
    if !rest.is_empty() {
        return Err(FlashError::Malformed);
    }
    Ok(cfg)
}

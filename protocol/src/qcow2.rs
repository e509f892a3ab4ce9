//! The one check every side makes before a qcow2 image is used: its header names no other
//! file. A qcow2 file may name a backing file or an external data file (any path on the host
//! that reads it) and carry features newer readers must understand; an image from an upload
//! or a URL that does any of that could make a guest read a host file. Pure: a function of
//! the file's first bytes (the header and its extensions, well within the first cluster),
//! shared by the controller (uploads) and the agent (every image before use).

use core::fmt;

/// qcow2's magic, `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// How many of a file's first bytes [`check`] needs at most.
pub const HEAD: usize = 64 * 1024;

/// Incompatible feature bits a reader may accept: dirty (0), compression type (3), extended L2
/// entries (4). Corrupt (1), an external data file (2) and anything unknown are refused.
const ALLOWED_INCOMPATIBLE: u64 = 1 | (1 << 3) | (1 << 4);

/// The header extension that names an external data file.
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Why a qcow2 image is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qcow2Error {
    /// Not qcow2 at all (no magic).
    NotQcow2,
    /// The header is cut short or inconsistent.
    Truncated,
    /// A version other than 2 or 3.
    Version(u32),
    /// It names a backing file.
    BackingFile,
    /// It names an external data file.
    ExternalData,
    /// It is marked corrupt.
    Corrupt,
    /// Incompatible features this reader does not know (the bits).
    UnknownFeatures(u64),
}

impl fmt::Display for Qcow2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotQcow2 => f.write_str("not a qcow2 image"),
            Self::Truncated => f.write_str("its qcow2 header is cut short"),
            Self::Version(v) => write!(f, "qcow2 version {v} (2 or 3 expected)"),
            Self::BackingFile => {
                f.write_str("it names a backing file (a path on the host): refused")
            }
            Self::ExternalData => {
                f.write_str("it names an external data file (a path on the host): refused")
            }
            Self::Corrupt => f.write_str("it is marked corrupt"),
            Self::UnknownFeatures(b) => write!(f, "unknown incompatible features {b:#x}"),
        }
    }
}

impl core::error::Error for Qcow2Error {}

fn be32(h: &[u8], at: usize) -> Result<u32, Qcow2Error> {
    h.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or(Qcow2Error::Truncated)
}

fn be64(h: &[u8], at: usize) -> Result<u64, Qcow2Error> {
    h.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or(Qcow2Error::Truncated)
}

/// Checks a qcow2 image from its first bytes (at least the header and its extensions; at most
/// [`HEAD`] are ever needed): self-contained, no backing or external data file, no feature
/// this reader does not know.
pub fn check(head: &[u8]) -> Result<(), Qcow2Error> {
    if head.get(..4) != Some(&MAGIC[..]) {
        return Err(Qcow2Error::NotQcow2);
    }
    let version = be32(head, 4)?;
    if version != 2 && version != 3 {
        return Err(Qcow2Error::Version(version));
    }
    if be64(head, 8)? != 0 || be32(head, 16)? != 0 {
        return Err(Qcow2Error::BackingFile);
    }
    let header_len = if version == 2 {
        72
    } else {
        let incompatible = be64(head, 72)?;
        if incompatible & (1 << 2) != 0 {
            return Err(Qcow2Error::ExternalData);
        }
        if incompatible & (1 << 1) != 0 {
            return Err(Qcow2Error::Corrupt);
        }
        let unknown = incompatible & !ALLOWED_INCOMPATIBLE;
        if unknown != 0 {
            return Err(Qcow2Error::UnknownFeatures(unknown));
        }
        let len = be32(head, 100)? as usize;
        if len < 104 {
            return Err(Qcow2Error::Truncated);
        }
        len
    };
    // The header extensions follow the header, each type, length and data padded to 8 bytes,
    // until the end marker (type 0).
    let mut at = header_len;
    loop {
        if at >= HEAD {
            return Err(Qcow2Error::Truncated);
        }
        let (kind, len) = (be32(head, at)?, be32(head, at + 4)? as usize);
        if kind == 0 {
            return Ok(());
        }
        if kind == EXT_DATA_FILE {
            return Err(Qcow2Error::ExternalData);
        }
        at = at
            .checked_add(8 + len.div_ceil(8) * 8)
            .ok_or(Qcow2Error::Truncated)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// A minimal version-3 header (104 bytes) followed by `ext`.
    fn header(backing: u64, incompatible: u64, ext: &[u8]) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&3u32.to_be_bytes());
        h.extend_from_slice(&backing.to_be_bytes()); // backing file offset
        h.extend_from_slice(&(if backing == 0 { 0u32 } else { 10 }).to_be_bytes());
        h.extend_from_slice(&16u32.to_be_bytes()); // cluster bits
        h.extend_from_slice(&(1u64 << 30).to_be_bytes()); // size
        h.resize(72, 0);
        h.extend_from_slice(&incompatible.to_be_bytes());
        h.extend_from_slice(&0u64.to_be_bytes()); // compatible
        h.extend_from_slice(&0u64.to_be_bytes()); // autoclear
        h.extend_from_slice(&4u32.to_be_bytes()); // refcount order
        h.extend_from_slice(&104u32.to_be_bytes()); // header length
        h.extend_from_slice(ext);
        h
    }

    fn ext(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&kind.to_be_bytes());
        e.extend_from_slice(&(data.len() as u32).to_be_bytes());
        e.extend_from_slice(data);
        e.resize(e.len().div_ceil(8) * 8, 0);
        e
    }

    #[test]
    fn self_contained_images_pass_the_rest_are_refused() {
        let end = ext(0, &[]);
        assert_eq!(check(&header(0, 0, &end)), Ok(()));
        // Dirty and extended L2 are fine; a backing file format extension alone is harmless.
        let fmt = [ext(0xe279_2aca, b"qcow2"), end.clone()].concat();
        assert_eq!(check(&header(0, 1 | 1 << 4, &fmt)), Ok(()));
        assert_eq!(check(&header(512, 0, &end)), Err(Qcow2Error::BackingFile));
        assert_eq!(
            check(&header(0, 1 << 2, &end)),
            Err(Qcow2Error::ExternalData)
        );
        let data = [ext(EXT_DATA_FILE, b"/etc/shadow"), end.clone()].concat();
        assert_eq!(check(&header(0, 0, &data)), Err(Qcow2Error::ExternalData));
        assert_eq!(check(&header(0, 1 << 1, &end)), Err(Qcow2Error::Corrupt));
        assert_eq!(
            check(&header(0, 1 << 9, &end)),
            Err(Qcow2Error::UnknownFeatures(1 << 9))
        );
        assert_eq!(check(b"QFI\xfb\0\0\0\x03"), Err(Qcow2Error::Truncated));
        assert_eq!(check(&header(0, 0, &[])), Err(Qcow2Error::Truncated));
        assert_eq!(check(b"\0\0\0\0 raw disk"), Err(Qcow2Error::NotQcow2));
        let mut v4 = header(0, 0, &end);
        v4[7] = 4;
        assert_eq!(check(&v4), Err(Qcow2Error::Version(4)));
    }

    #[test]
    fn a_real_qemu_img_header_passes() {
        // The first bytes `qemu-img create -f qcow2 x.qcow2 1G` writes (QEMU 7.2).
        let mut h = header(0, 0, &[]);
        h.extend_from_slice(&[0; 8]);
        assert_eq!(check(&h), Ok(()));
    }
}

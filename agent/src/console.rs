//! An instance's serial console log, read for the controller: its tail, or the bytes after an
//! offset, at most one chunk, with control characters and terminal escapes removed. (libvirt's
//! virtlogd writes the log and rotates it by size, so a chatty guest cannot fill the disk.)

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

use outpost_protocol::limits::MAX_CONSOLE_CHUNK;

/// What was read: where it starts, where the next read should start, and the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// Offset of the first byte.
    pub start: u64,
    /// Offset after the last byte read.
    pub next: u64,
    /// The text, cleaned.
    pub data: Vec<u8>,
}

/// Reads the log at `path`: from `from` (a log shorter than that was rotated: from its start),
/// or its last `lines` lines.
pub fn read(path: &Path, from: Option<u64>, lines: u16) -> std::io::Result<Read> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = match from {
        Some(at) if at <= len => at,
        Some(_) => 0,
        None => len.saturating_sub(MAX_CONSOLE_CHUNK as u64),
    };
    f.seek(SeekFrom::Start(start))?;
    let mut raw = Vec::with_capacity(MAX_CONSOLE_CHUNK);
    f.take(MAX_CONSOLE_CHUNK as u64).read_to_end(&mut raw)?;
    let next = start + raw.len() as u64;
    let (start, raw) = match from {
        Some(_) => (start, raw),
        None => {
            // The last `lines` lines of the tail read.
            let mut cut = raw.len();
            let mut seen = 0;
            let body = raw.strip_suffix(b"\n").unwrap_or(&raw);
            for (i, b) in body.iter().enumerate().rev() {
                if *b == b'\n' {
                    seen += 1;
                    if seen == lines {
                        cut = i + 1;
                        break;
                    }
                }
                cut = i;
            }
            (start + cut as u64, raw[cut..].to_vec())
        }
    };
    Ok(Read {
        start,
        next,
        data: clean(&raw),
    })
}

/// Removes terminal escape sequences and control characters (keeping newlines and tabs;
/// carriage returns go).
pub fn clean(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            0x1b => {
                // ESC [ ... final byte (0x40..=0x7e), or ESC and one byte.
                i += 1;
                if raw.get(i) == Some(&b'[') {
                    i += 1;
                    while i < raw.len() && !(0x40..=0x7e).contains(&raw[i]) {
                        i += 1;
                    }
                }
                i += 1;
            }
            b'\n' | b'\t' => {
                out.push(raw[i]);
                i += 1;
            }
            c if c < 0x20 || c == 0x7f => i += 1,
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn escapes_and_controls_go_text_stays() {
        assert_eq!(
            clean(b"\x1b[2J\x1b[0mHello\r\n\x07wor\x1b[1;31mld\tok\n"),
            b"Hello\nworld\tok\n"
        );
    }

    #[test]
    fn tails_and_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        std::fs::write(&p, b"one\ntwo\nthree\nfour\n").unwrap();
        let r = read(&p, None, 2).unwrap();
        assert_eq!(r.data, b"three\nfour\n");
        assert_eq!((r.start, r.next), (8, 19));
        let r = read(&p, Some(4), 0).unwrap();
        assert_eq!(r.data, b"two\nthree\nfour\n");
        // Nothing new: an empty read that ends where it starts.
        let r = read(&p, Some(19), 0).unwrap();
        assert!(r.data.is_empty());
        assert_eq!(r.next, 19);
        // Rotated (shorter than the offset): from its start.
        std::fs::write(&p, b"new\n").unwrap();
        assert_eq!(read(&p, Some(19), 0).unwrap().data, b"new\n");
        // More lines asked than there are: all of them.
        assert_eq!(read(&p, None, 10).unwrap().data, b"new\n");
    }
}

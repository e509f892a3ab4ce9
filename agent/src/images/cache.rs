//! The image cache on disk: verified blobs by SHA-256 under `IMAGE_DIR/sha256/HEX`, downloads
//! in progress under `IMAGE_DIR/partial/` (the bytes so far, and what they are a copy of), so
//! that a restarted agent resumes where it stopped.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use outpost_protocol::limits::MAX_CACHED;
use outpost_protocol::{Digest, Image};

/// The cache under an image directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// The cache of `image_dir`.
    pub fn new(image_dir: &Path) -> Self {
        Self {
            dir: image_dir.to_owned(),
        }
    }

    /// Where a verified blob is.
    pub fn blob(&self, d: &Digest) -> PathBuf {
        self.dir.join("sha256").join(d.to_string())
    }

    /// Where a download in progress keeps its bytes.
    pub fn partial(&self, d: &Digest) -> PathBuf {
        self.dir.join("partial").join(d.to_string())
    }

    /// Where a download in progress notes its source (to restart from zero if it changed).
    pub fn partial_source(&self, d: &Digest) -> PathBuf {
        self.dir.join("partial").join(format!("{d}.source"))
    }

    /// Where a boot file is: a file of the image directory, or a cached blob.
    pub fn path(&self, image: &Image) -> PathBuf {
        match image {
            Image::File(f) => self.dir.join(f.as_str()),
            Image::Blob(b) => self.blob(&b.digest),
        }
    }

    /// Whether a blob is cached.
    pub fn has(&self, d: &Digest) -> bool {
        self.blob(d).is_file()
    }

    /// The cached blobs, most recently used first (their files' modification times, touched
    /// on use), with when each was last used.
    pub fn list(&self) -> Vec<(Digest, SystemTime)> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("sha256")) else {
            return Vec::new();
        };
        let mut v: Vec<(Digest, SystemTime)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let d = Digest::parse(e.file_name().to_str()?)?;
                let t = e.metadata().ok()?.modified().ok()?;
                Some((d, t))
            })
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// The digests to report in the inventory: the most recently used, at most [`MAX_CACHED`].
    pub fn reported(&self) -> heapless::Vec<Digest, MAX_CACHED> {
        self.list()
            .into_iter()
            .map(|(d, _)| d)
            .take(MAX_CACHED)
            .collect()
    }

    /// Marks a blob used now (eviction removes the least recently used first).
    pub fn touch(&self, d: &Digest) {
        let _ = std::fs::File::options()
            .append(true)
            .open(self.blob(d))
            .and_then(|f| f.set_modified(SystemTime::now()));
    }

    /// Removes cached blobs not in `keep` that were last used before `older_than`, or, to free
    /// `need` bytes, the least recently used first. Returns what was removed.
    pub fn evict(
        &self,
        keep: &std::collections::BTreeSet<Digest>,
        older_than: SystemTime,
        mut need: u64,
    ) -> Vec<Digest> {
        let mut out = Vec::new();
        for (d, used) in self.list().into_iter().rev() {
            if keep.contains(&d) {
                continue;
            }
            if used < older_than || need > 0 {
                let p = self.blob(&d);
                let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                if std::fs::remove_file(&p).is_ok() {
                    need = need.saturating_sub(size);
                    out.push(d);
                }
            }
        }
        out
    }
}

/// Free bytes (for unprivileged users) of the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> u64 {
    #[allow(
        clippy::useless_conversion,
        reason = "the C types are narrower on 32-bit targets"
    )]
    nix::sys::statvfs::statvfs(dir)
        .map(|s| u64::from(s.blocks_available()) * u64::from(s.fragment_size()))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn eviction_keeps_what_is_used_and_frees_the_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::new(dir.path());
        std::fs::create_dir_all(dir.path().join("sha256")).unwrap();
        let now = SystemTime::now();
        let d = |b: u8| Digest([b; 32]);
        for (b, age) in [(1u8, 30), (2, 20), (3, 10)] {
            let p = c.blob(&d(b));
            std::fs::write(&p, vec![0u8; 100]).unwrap();
            std::fs::File::options()
                .append(true)
                .open(&p)
                .unwrap()
                .set_modified(now - std::time::Duration::from_secs(age))
                .unwrap();
        }
        assert_eq!(c.reported().as_slice(), &[d(3), d(2), d(1)]);
        let keep = [d(1)].into_iter().collect();
        // Nothing old enough, 150 bytes wanted: the least recently used not kept goes first.
        let gone = c.evict(&keep, now - std::time::Duration::from_secs(3600), 150);
        assert_eq!(gone, [d(2), d(3)]);
        assert!(c.has(&d(1)));
        // Past the TTL, an unused blob goes.
        std::fs::write(c.blob(&d(4)), b"x").unwrap();
        let gone = c.evict(&keep, now + std::time::Duration::from_secs(1), 0);
        assert_eq!(gone, [d(4)]);
    }
}

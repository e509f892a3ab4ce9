//! The controller's blob store: image content by SHA-256 in `DATA_DIR/blobs/sha256/HEX`,
//! written through a temporary file that is hashed as it streams in, synced, and renamed into
//! place only once complete (a crash leaves no half-written blob under a digest).

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use outpost_protocol::Digest;
use sha2::Digest as _;

/// Why the blob store failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// A file operation failed (the disk is full, the directory is not writable...).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BlobError {
    let what = what.into();
    move |source| BlobError::Io { what, source }
}

/// The blob store.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
    /// Blobs a request is writing or about to refer to (how many requests): never removed
    /// under a request that needs them.
    held: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<Digest, usize>>>,
}

/// Blobs held for a request (see [`BlobStore::hold`]); let go when dropped.
#[derive(Debug)]
pub struct BlobHold {
    store: BlobStore,
    digests: Vec<Digest>,
}

impl Drop for BlobHold {
    fn drop(&mut self) {
        let mut held = self.store.held.lock().unwrap_or_else(|e| e.into_inner());
        for d in &self.digests {
            if let Some(n) = held.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    held.remove(d);
                }
            }
        }
    }
}

/// How old an unreferenced blob must be before the sweep removes it (an upload or a create
/// may be about to refer to it).
pub const SWEEP_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

impl BlobStore {
    /// The store under `data_dir` (directories made 0700 when first written).
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("blobs"),
            held: std::sync::Arc::default(),
        }
    }

    /// Holds `digests` for a request that writes them and then asks the fleet to refer to
    /// them: no removal takes them away before the hold is dropped.
    pub fn hold(&self, digests: &[Digest]) -> BlobHold {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for d in digests {
            *held.entry(*d).or_insert(0) += 1;
        }
        BlobHold {
            store: self.clone(),
            digests: digests.to_vec(),
        }
    }

    /// Every blob stored, with when it was last written.
    pub fn list(&self) -> Vec<(Digest, std::time::SystemTime)> {
        let Ok(dir) = std::fs::read_dir(self.dir.join("sha256")) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| {
                let d = Digest::parse(e.file_name().to_str()?)?;
                let at = e.metadata().ok()?.modified().ok()?;
                Some((d, at))
            })
            .collect()
    }

    /// Removes the blobs not in `referenced`, not held, and older than [`SWEEP_GRACE`]
    /// (what refused creates or lost uploads left); how many.
    pub fn sweep(&self, referenced: &std::collections::HashSet<Digest>) -> usize {
        let now = std::time::SystemTime::now();
        let old =
            |at: std::time::SystemTime| now.duration_since(at).is_ok_and(|a| a >= SWEEP_GRACE);
        let mut removed = 0;
        for (d, at) in self.list() {
            if old(at) && !referenced.contains(&d) && self.remove(&d).is_ok() && !self.has(&d) {
                removed += 1;
            }
        }
        // Uploads a crash cut short.
        if let Ok(dir) = std::fs::read_dir(self.dir.join("tmp")) {
            for e in dir.flatten() {
                let stale = e.metadata().and_then(|m| m.modified()).is_ok_and(old);
                if stale && std::fs::remove_file(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Where a blob's bytes are.
    pub fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join("sha256").join(d.to_string())
    }

    /// Whether the store holds this blob.
    pub fn has(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    /// Starts writing a new blob.
    pub fn writer(&self) -> Result<BlobWriter, BlobError> {
        for d in [self.dir.join("sha256"), self.dir.join("tmp")] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(io(format!("creating {}", d.display())))?;
        }
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("upload-{:016x}", fastrand::u64(..)));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(format!("creating {}", tmp.display())))?;
        Ok(BlobWriter {
            store: self.clone(),
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            hash: sha2::Sha256::new(),
            size: 0,
            head: Vec::new(),
        })
    }

    /// Removes a blob (one nothing refers to any more), unless a request holds it (it is
    /// about to be referred to: its request removes it if that fails).
    pub fn remove(&self, d: &Digest) -> Result<(), BlobError> {
        if self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(d)
        {
            return Ok(());
        }
        match std::fs::remove_file(self.path(d)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io(format!("removing blob {d}"))(e))
            }
            _ => Ok(()),
        }
    }
}

/// How many first bytes a writer keeps to tell the format and check a qcow2 header (with
/// its extensions: see [`outpost_protocol::qcow2::HEAD`]).
pub const HEAD_LEN: usize = outpost_protocol::qcow2::HEAD;

/// A blob being written: hashed as it goes; the temporary file is removed unless finished.
pub struct BlobWriter {
    store: BlobStore,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    hash: sha2::Sha256,
    size: u64,
    head: Vec<u8>,
}

impl BlobWriter {
    /// Appends bytes.
    pub fn write(&mut self, b: &[u8]) -> Result<(), BlobError> {
        if self.head.len() < HEAD_LEN {
            let take = (HEAD_LEN - self.head.len()).min(b.len());
            self.head.extend_from_slice(&b[..take]);
        }
        self.hash.update(b);
        self.size += b.len() as u64;
        if let Some(f) = &mut self.file {
            f.write_all(b).map_err(io("writing the upload"))?;
        }
        Ok(())
    }

    /// The first bytes written (up to [`HEAD_LEN`]).
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Syncs the content and moves it under its digest; returns the digest and size.
    pub fn finish(mut self) -> Result<(Digest, u64), BlobError> {
        let r = self.complete();
        if r.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        r
    }

    fn complete(&mut self) -> Result<(Digest, u64), BlobError> {
        let f = self.file.take().expect("finished once");
        let f = f
            .into_inner()
            .map_err(|e| io("writing the upload")(e.into_error()))?;
        f.sync_all().map_err(io("syncing the upload"))?;
        let digest = Digest(self.hash.clone().finalize().into());
        let to = self.store.path(&digest);
        std::fs::rename(&self.tmp, &to).map_err(io(format!("storing {}", to.display())))?;
        if let Some(dir) = to.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("syncing the blob directory"))?;
        }
        Ok((digest, self.size))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Blob downloads served at once, in all and per node: a node (or many) that opens
/// downloads and stalls them holds at most this much of the controller.
#[derive(Debug)]
pub struct Transfers {
    all: std::sync::Arc<tokio::sync::Semaphore>,
    per_node: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    node_max: usize,
}

/// Blob downloads served at once, in all.
pub const MAX_TRANSFERS: usize = 32;
/// Blob downloads served at once to one node.
pub const MAX_NODE_TRANSFERS: usize = 2;

impl Default for Transfers {
    fn default() -> Self {
        Self::new(MAX_TRANSFERS, MAX_NODE_TRANSFERS)
    }
}

/// One download's place, given back when dropped (when its response body ends).
#[derive(Debug)]
pub struct Transfer {
    _all: tokio::sync::OwnedSemaphorePermit,
    node: String,
    per_node: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl Drop for Transfer {
    fn drop(&mut self) {
        let mut m = self.per_node.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.node) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.node);
            }
        }
    }
}

impl Transfers {
    /// At most `all` downloads at once, `node_max` per node.
    pub fn new(all: usize, node_max: usize) -> Self {
        Self {
            all: std::sync::Arc::new(tokio::sync::Semaphore::new(all)),
            per_node: std::sync::Arc::default(),
            node_max,
        }
    }

    /// A place for a download to `node`, if there is one.
    pub fn take(&self, node: &str) -> Option<Transfer> {
        let mut m = self.per_node.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.get(node).copied().unwrap_or(0);
        if n >= self.node_max {
            return None;
        }
        let all = std::sync::Arc::clone(&self.all).try_acquire_owned().ok()?;
        m.insert(node.to_owned(), n + 1);
        Some(Transfer {
            _all: all,
            node: node.to_owned(),
            per_node: std::sync::Arc::clone(&self.per_node),
        })
    }
}

#[cfg(test)]
mod transfer_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn downloads_are_capped_in_all_and_per_node() {
        let t = Transfers::new(3, 2);
        let a1 = t.take("a").unwrap();
        let _a2 = t.take("a").unwrap();
        assert!(t.take("a").is_none(), "two per node");
        let _b1 = t.take("b").unwrap();
        assert!(t.take("c").is_none(), "three in all");
        drop(a1);
        assert!(
            t.take("c").is_some(),
            "a finished download gives its place back"
        );
    }
}

#[cfg(test)]
mod sweep_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn put(store: &BlobStore, text: &[u8], age: std::time::Duration) -> Digest {
        let mut w = store.writer().unwrap();
        w.write(text).unwrap();
        let (d, _) = w.finish().unwrap();
        let f = std::fs::File::options()
            .write(true)
            .open(store.path(&d))
            .unwrap();
        f.set_modified(std::time::SystemTime::now() - age).unwrap();
        d
    }

    #[test]
    fn the_sweep_takes_old_unreferenced_unheld_blobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        let old = SWEEP_GRACE * 2;
        let kept = put(&store, b"referenced", old);
        let gone = put(&store, b"nothing refers to it", old);
        let young = put(
            &store,
            b"an upload about to be named",
            std::time::Duration::ZERO,
        );
        let held = put(&store, b"a create under way", old);
        let hold = store.hold(&[held]);
        let referenced = std::collections::HashSet::from([kept]);
        assert_eq!(store.sweep(&referenced), 1);
        assert!(store.has(&kept) && store.has(&young) && store.has(&held));
        assert!(!store.has(&gone));
        // A held blob is not removed, even when asked; once let go, it may be.
        store.remove(&held).unwrap();
        assert!(store.has(&held));
        drop(hold);
        store.remove(&held).unwrap();
        assert!(!store.has(&held));
    }
}

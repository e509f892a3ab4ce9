//! The durable copy of the node's desired state: one file in the state directory, in the wire
//! encoding (versioned, size-capped), replaced atomically (write, fsync, rename, fsync dir).

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use outpost_protocol::{DecodeError, DesiredState, EncodeError, Message};

/// The file name inside the state directory.
pub const DESIRED_FILE: &str = "desired.bin";

/// Why the desired state could not be stored or loaded.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file exists but does not decode.
    #[error("{path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The decode error.
        source: DecodeError,
    },
    /// The state cannot be encoded (cannot happen for a decoded state).
    #[error("desired state does not encode: {0}")]
    Encode(#[from] EncodeError),
}

/// The desired-state file of one agent.
#[derive(Debug, Clone)]
pub struct DesiredStore {
    dir: PathBuf,
}

impl DesiredStore {
    /// A store in `state_dir` (created if missing).
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(state_dir).map_err(|source| StoreError::Io {
            path: state_dir.to_owned(),
            source,
        })?;
        Ok(Self {
            dir: state_dir.to_owned(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(DESIRED_FILE)
    }

    /// The stored desired state; `None` if none was ever stored.
    pub fn load(&self) -> Result<Option<DesiredState>, StoreError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        DesiredState::decode(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Corrupt { path, source })
    }

    /// Replaces the stored state atomically: after a crash the file holds the old state or the
    /// new one, never a mix.
    pub fn save(&self, d: &DesiredState) -> Result<(), StoreError> {
        let bytes = d.to_vec()?;
        let path = self.path();
        let tmp = self.dir.join(format!("{DESIRED_FILE}.tmp"));
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = DesiredStore::open(dir.path()).unwrap();
        assert!(store.load().unwrap().is_none());
        let d = DesiredState {
            generation: 3,
            ..Default::default()
        };
        store.save(&d).unwrap();
        assert_eq!(store.load().unwrap(), Some(d));
        assert!(!dir.path().join("desired.bin.tmp").exists());
    }

    #[test]
    fn corrupt_file_is_reported_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = DesiredStore::open(dir.path()).unwrap();
        fs::write(store.path(), [9, 9, 9]).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
    }
}

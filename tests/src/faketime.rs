//! A wall clock that tests can step while a process runs: libfaketime (Debian's `faketime`)
//! preloaded, reading its offset from a file. The monotonic clock is left alone, as on a
//! real machine whose clock is stepped (NTP, an operator, an RTC-less device after a boot).
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::path::{Path, PathBuf};

/// Where Debian puts the thread-safe libfaketime.
const LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// One process's (or several processes') wall clock.
pub struct FakeClock {
    file: PathBuf,
}

impl FakeClock {
    /// A clock at `offset` (libfaketime's syntax: `+0`, `+3600`, `-1d`, `@1970-01-01 00:00:01`),
    /// its file under `dir`.
    pub fn new(dir: &Path, name: &str, offset: &str) -> Self {
        assert!(
            Path::new(LIB).exists(),
            "{LIB} is missing: scripts/setup installs Debian's faketime"
        );
        let c = Self {
            file: dir.join(format!("{name}.faketime")),
        };
        c.set(offset);
        c
    }

    /// Steps the clock to `offset` from the real time (read within a second).
    pub fn set(&self, offset: &str) {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset}\n")).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    /// The environment a process needs to run on this clock.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("LD_PRELOAD", LIB.to_owned()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            ("FAKETIME_CACHE_DURATION", "1".to_owned()),
            ("DONT_FAKE_MONOTONIC", "1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

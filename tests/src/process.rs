//! Processes: the workspace's binaries built once, children killed on drop, free ports,
//! and waiting on a condition.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The workspace root.
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
}

/// Runs `cmd` in the workspace once per test process (per `once`), then returns `path` under
/// the target directory.
fn built(once: &'static OnceLock<()>, mut cmd: Command, what: &str, path: &str) -> PathBuf {
    once.get_or_init(|| {
        let st = cmd.current_dir(workspace()).status().unwrap();
        assert!(st.success(), "{what} failed");
    });
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join("target"))
        .join(path)
}

/// The path of a workspace binary, built once per test process.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "-q", "--bins"]);
    built(
        &BUILT,
        cmd,
        "building the workspace binaries",
        &format!("debug/{name}"),
    )
}

/// The agent cross-compiled for aarch64 (debug) by `cross/build-aarch64`, which also checks
/// that it links only against the C library and libvirt. Built once per test process.
pub fn aarch64_agent() -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let mut cmd = Command::new(workspace().join("cross/build-aarch64"));
    cmd.arg("--debug");
    built(
        &BUILT,
        cmd,
        "cross/build-aarch64",
        "aarch64-unknown-linux-gnu/debug/outpost-agent",
    )
}

/// Sends signal `sig` (`STOP`, `CONT`, `TERM`...) to process `pid` (for a process whose
/// [`Proc`] is borrowed elsewhere).
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
}

/// Runs `cmd`, which must succeed (else its stderr is the panic), and returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `f` returns `Some`, polling every 50 ms, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks that `f` holds at every poll (each 100 ms) for `d`: a bounded check that something
/// does *not* happen, instead of a bare sleep.
pub fn holds_for(d: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        assert!(f(), "{what} stopped holding");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    child: Option<Child>,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Self {
            child: Some(child),
            log,
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        c.wait().unwrap()
    }

    /// Whether it is still running (it has not exited, crashed or aborted).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Sends signal `sig` (`STOP`, `CONT`, `TERM`...) to the process.
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The SHA-256 of a file, in hex (by `sha256sum`, independent of the code under test).
pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// An HTTP request with `curl` (`token` as a bearer token, `body` as JSON when not empty):
/// its status (0 when there was no answer) and body.
pub fn curl(method: &str, url: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-w", "\n%{http_code}", "-X", method]);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if !body.is_empty() {
        c.args(["-H", "Content-Type: application/json", "--data", body]);
    }
    let out = c
        .arg(url)
        .output()
        .expect("curl (scripts/setup installs it)");
    let all = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = all.rsplit_once('\n').unwrap_or(("", ""));
    (code.parse().unwrap_or(0), body.to_owned())
}

//! A throwaway PostgreSQL server: `initdb` in a temporary directory, the server started on a
//! free loopback port (as the `postgres` user when the tests run as root, since PostgreSQL
//! refuses to run as root), password authentication over TCP.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{Proc, free_port, wait_for};

/// The role the tests log in as, and its password.
pub const PG_USER: &str = "outpost";
/// The password of [`PG_USER`].
pub const PG_PASSWORD: &str = "test-password-not-secret";

/// A PostgreSQL server in a temporary directory.
pub struct Postgres {
    /// Its port on 127.0.0.1.
    pub port: u16,
    data: PathBuf,
    bin: PathBuf,
    proc: Option<Proc>,
}

/// Where Debian keeps the server's binaries (`/usr/lib/postgresql/VERSION/bin`).
pub fn pg_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run scripts/setup (it installs postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found
        .pop()
        .expect("no /usr/lib/postgresql/*/bin/initdb: run scripts/setup")
}

/// `cmd`, as the `postgres` user when this process is root.
fn as_owner(program: &Path) -> Command {
    if nix_is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
}

impl Postgres {
    /// Makes a cluster in `dir/pg` and starts it.
    pub fn start(dir: &Path) -> Self {
        let bin = pg_bin();
        let data = dir.join("pg");
        std::fs::create_dir_all(&data).unwrap();
        let pwfile = dir.join("pg-password");
        std::fs::write(&pwfile, PG_PASSWORD).unwrap();
        if nix_is_root() {
            for p in [dir, &data, &pwfile] {
                let ok = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(p)
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "chown {}", p.display());
            }
        }
        let out = as_owner(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                PG_USER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["-E", "UTF8", "--no-instructions"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Self {
            port: free_port(),
            data,
            bin,
            proc: None,
        };
        pg.run();
        pg
    }

    fn run(&mut self) {
        let mut cmd = as_owner(&self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("port={}", self.port)])
            .args([
                "-c",
                &format!("unix_socket_directories={}", self.data.display()),
            ])
            .args(["-c", "max_connections=50"]);
        self.proc = Some(Proc::spawn(cmd, self.data.with_extension("log")));
        let port = self.port;
        wait_for(
            Duration::from_secs(60),
            "PostgreSQL to accept connections",
            || {
                let ok = Command::new(self.bin.join("pg_isready"))
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q"])
                    .status()
                    .ok()?
                    .success();
                ok.then_some(())
            },
        );
    }

    /// The URL a controller is given (no password: that goes in a file).
    pub fn url(&self) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/postgres", self.port)
    }

    /// The URL through another port (a [`crate::Link`] in front of this server).
    pub fn url_via(&self, port: u16) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{port}/postgres")
    }

    /// Runs SQL with psql; its output (unaligned, tuples only).
    pub fn sql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                PG_USER,
            ])
            .args(["-d", "postgres", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env("PGPASSWORD", PG_PASSWORD)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Stops the server abruptly (SIGKILL to the postmaster; its backends follow) and starts
    /// it again on the same port: what a crash and a supervisor's restart look like.
    pub fn restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            // A fast shutdown, as a supervisor would do: the children stop with it.
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(p.pid().to_string())
                .status();
            wait_for(Duration::from_secs(30), "PostgreSQL to stop", || {
                (!p.alive()).then_some(())
            });
        }
        self.run();
    }

    /// Turns TLS on with `server.pem` and `server.key` from `pki` (see [`crate::make_pki`]) and
    /// refuses connections without it; restarts the server.
    pub fn require_tls(&mut self, pki: &Path) {
        for f in ["server.pem", "server.key"] {
            let to = self.data.join(f);
            std::fs::copy(pki.join(f), &to).unwrap();
            std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            if nix_is_root() {
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&to)
                    .status()
                    .unwrap();
            }
        }
        let conf = self.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str("\nssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text).unwrap();
        let hba = self.data.join("pg_hba.conf");
        let text = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(&hba, format!("hostnossl all all 0.0.0.0/0 reject\n{text}")).unwrap();
        self.restart();
    }

    /// Its log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(p) = self.proc.take() {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(p.pid().to_string())
                .status();
            std::thread::sleep(Duration::from_millis(300));
            drop(p);
        }
    }
}

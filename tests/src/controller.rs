//! The controller process and the `outpost` CLI against it.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{Proc, bin, free_port, wait_for};

/// Makes a named API token with `outpost-controller tokens create NAME --role ROLE` in
/// `data_dir` (with `extra` arguments, `--expires 3s`...): its secret.
pub fn make_token(data_dir: &Path, name: &str, role: &str, extra: &[&str]) -> String {
    crate::process::run_ok(
        Command::new(bin("outpost-controller"))
            .args(["tokens", "create", name, "--role", role, "--data-dir"])
            .arg(data_dir)
            .args(extra),
    )
    .trim()
    .to_owned()
}

/// A controller process with its own data directory and ports.
pub struct Controller {
    /// Its HTTP API, `http://127.0.0.1:PORT`.
    pub api: String,
    /// The MQTT port agents use (embedded broker, or the external one).
    pub mqtt_port: u16,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Extra arguments (`--broker ...`).
    pub args: Vec<String>,
    /// The process.
    pub proc: Option<Proc>,
    /// The API token the CLI calls carry (set it to the one given with `--api-token-file`).
    pub token: Option<String>,
    /// Extra environment (a [`FakeClock`](crate::FakeClock)'s).
    pub env: Vec<(String, String)>,
    /// A command the controller runs under (`prlimit --nofile=160:160 --`).
    pub under: Vec<String>,
}

impl Controller {
    /// A controller with an embedded broker on a free port.
    pub fn embedded(dir: &Path) -> Self {
        let port = free_port();
        Self::new(
            dir,
            port,
            vec!["--mqtt-listen".into(), format!("127.0.0.1:{port}")],
        )
    }

    /// A controller using the broker on `port`.
    pub fn external(dir: &Path, port: u16) -> Self {
        Self::new(
            dir,
            port,
            vec!["--broker".into(), format!("mqtt://127.0.0.1:{port}")],
        )
    }

    /// A controller named `name` sharing the PostgreSQL store at `store_url` (password in
    /// `password_file`) and the broker on `port` with others: one leads, the rest stand by.
    pub fn ha(dir: &Path, name: &str, port: u16, store_url: &str, password_file: &Path) -> Self {
        let mut c = Self::external(dir, port);
        c.data_dir = dir.join(format!("controller-{name}"));
        c.args.extend([
            "--store".into(),
            store_url.into(),
            "--store-password-file".into(),
            password_file.display().to_string(),
            "--name".into(),
            name.into(),
        ]);
        c
    }

    /// The CLI pointed at several controllers (`--api A,B`): it finds the leader.
    pub fn any_of(controllers: &[&Controller]) -> Self {
        let mut c = Self::new(
            Path::new("/nonexistent"),
            controllers[0].mqtt_port,
            Vec::new(),
        );
        c.api = controllers
            .iter()
            .map(|c| c.api.as_str())
            .collect::<Vec<_>>()
            .join(",");
        c.token = controllers[0].token.clone();
        c
    }

    /// Starts (or restarts) the process and waits for its API to answer `/healthz` (a standby
    /// answers that, not the fleet's calls).
    pub fn start_standby(&mut self) {
        self.spawn();
        wait_for(Duration::from_secs(60), "the controller's API", || {
            (self.http("GET", "/healthz", "").0 == 200).then_some(())
        });
    }

    /// `GET /v1/status` as JSON (its `role`, `epoch`, `leader`).
    pub fn status(&self) -> serde_json::Value {
        let (code, body) = match &self.token {
            Some(t) => crate::process::curl("GET", &format!("{}/v1/status", self.api), Some(t), ""),
            None => self.http("GET", "/v1/status", ""),
        };
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn new(dir: &Path, mqtt_port: u16, args: Vec<String>) -> Self {
        Self {
            api: format!("http://127.0.0.1:{}", free_port()),
            mqtt_port,
            data_dir: dir.join("controller-data"),
            args,
            proc: None,
            token: None,
            env: Vec::new(),
            under: Vec::new(),
        }
    }

    /// Starts (or restarts) the process and waits for its API.
    pub fn start(&mut self) {
        self.spawn();
        wait_for(Duration::from_secs(60), "the controller's API", || {
            self.cli(&["nodes", "list"]).ok()
        });
    }

    fn spawn(&mut self) {
        let mut cmd = match self.under.split_first() {
            None => Command::new(bin("outpost-controller")),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("outpost-controller"));
                c
            }
        };
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--api-listen")
            .arg(self.api.trim_start_matches("http://"))
            .arg("--liveness-timeout")
            .arg("5")
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        self.proc = Some(Proc::spawn(cmd, self.data_dir.with_extension("log")));
    }

    /// Runs the `outpost` CLI against this controller with `--json`; Ok(JSON) or Err(stderr).
    pub fn cli(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = self.run_cli(&[&["--json"], args].concat())?;
        serde_json::from_str(&out).map_err(|e| e.to_string())
    }

    /// Runs the `outpost` CLI against this controller as a person does (text); Ok(stdout) or
    /// Err(stderr).
    pub fn cli_text(&self, args: &[&str]) -> Result<String, String> {
        self.run_cli(args)
    }

    fn run_cli(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(bin("outpost"));
        cmd.arg("--api").arg(&self.api).args(args);
        if let Some(t) = &self.token {
            cmd.env("OUTPOST_API_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A raw HTTP request to the API (no token): its status and body.
    pub fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        use std::io::{Read as _, Write as _};
        let host = self.api.trim_start_matches("http://");
        let Ok(mut s) = std::net::TcpStream::connect(host) else {
            return (0, "connection refused".into());
        };
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, body.to_owned())
    }

    /// Creates a direct-kernel-boot instance of the tiny guest (256 MiB unless `extra` says
    /// `--memory`), with `extra` arguments.
    pub fn create(&self, name: &str, extra: &[&str]) -> Result<serde_json::Value, String> {
        let mut args = vec![
            "instances",
            "create",
            name,
            "--kernel",
            "vmlinuz",
            "--initrd",
            "initrd.img",
            "--cmdline",
            "console=ttyS0 quiet",
        ];
        if !extra.contains(&"--memory") {
            args.extend_from_slice(&["--memory", "256"]);
        }
        args.extend_from_slice(extra);
        self.cli(&args)
    }

    /// The node instance `name` is on (`-` when none).
    pub fn node_of(&self, name: &str) -> String {
        self.cli(&["instances", "show", name]).unwrap()["node"]
            .as_str()
            .unwrap_or("-")
            .to_owned()
    }

    /// The id of instance `name`.
    pub fn id_of(&self, name: &str) -> String {
        self.cli(&["instances", "show", name]).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The phase of an instance (by name), if it exists.
    pub fn phase(&self, name: &str) -> Option<String> {
        let v = self.cli(&["instances", "show", name]).ok()?;
        v["phase"].as_str().map(str::to_owned)
    }

    /// Waits until instance `name` is in `phase`.
    pub fn wait_phase(&self, name: &str, phase: &str, timeout: Duration) {
        wait_for(timeout, &format!("{name} to be {phase}"), || {
            (self.phase(name).as_deref() == Some(phase)).then_some(())
        });
    }

    /// Waits until `n` nodes are up.
    pub fn wait_nodes_up(&self, n: usize) {
        wait_for(Duration::from_secs(30), &format!("{n} nodes up"), || {
            let v = self.cli(&["nodes", "list"]).ok()?;
            let up = v.as_array()?.iter().filter(|n| n["state"] == "up").count();
            (up >= n).then_some(())
        });
    }

    /// The process.
    pub fn proc(&mut self) -> &mut Proc {
        self.proc.as_mut().unwrap()
    }
}

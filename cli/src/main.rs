//! `outpost`: the command-line client of the controller's HTTP API. It knows the API only
//! through its JSON shapes (`outpost_controller::views`) and never links the embedded broker.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use outpost_controller::views::{
    CreateBody, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, EventView, ImageView, InstanceView, NodeView,
};
use serde_json::Value;

/// Writes a line to stdout; a reader that went away (`outpost ... | head`) ends the command
/// quietly instead of a panic.
fn emit(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let text = args.to_string();
    let mut out = std::io::stdout().lock();
    if let Err(e) = out
        .write_all(clean::clean(&text).as_bytes())
        .and_then(|()| out.write_all(b"\n"))
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing the output: {e}");
        std::process::exit(1);
    }
}

/// Writes text (no newline added, terminal controls removed), ending quietly on a closed pipe.
fn emit_raw(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out
        .write_all(clean::clean(text).as_bytes())
        .and_then(|()| out.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing the output: {e}");
        std::process::exit(1);
    }
}

mod clean;

/// `println!` that ends quietly on a closed pipe, its text cleaned of terminal controls.
macro_rules! say {
    ($($t:tt)*) => { emit(format_args!($($t)*)) };
}

/// Manage an Outpost fleet through the controller's HTTP API.
#[derive(Debug, Parser)]
#[command(name = "outpost", version)]
struct Cli {
    /// The controller's API. Several, comma-separated, for controllers that stand by for one
    /// another: the CLI uses the first that answers and follows a standby to the leader.
    #[arg(
        long,
        global = true,
        env = "OUTPOST_API",
        default_value = "http://127.0.0.1:8080"
    )]
    api: String,
    /// Bearer token, if the API requires one (prefer --token-file or OUTPOST_API_TOKEN: an
    /// argument shows in `ps` to every user).
    #[arg(long, global = true, env = "OUTPOST_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token.
    #[arg(
        long,
        global = true,
        env = "OUTPOST_API_TOKEN_FILE",
        conflicts_with = "token"
    )]
    token_file: Option<std::path::PathBuf>,
    /// CA certificate (PEM) an https:// controller's certificate must chain to (default: the
    /// Mozilla roots).
    #[arg(long, global = true, env = "OUTPOST_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for a controller that requires mutual TLS.
    #[arg(
        long,
        global = true,
        env = "OUTPOST_CLIENT_CERT",
        requires = "client_key"
    )]
    client_cert: Option<std::path::PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(
        long,
        global = true,
        env = "OUTPOST_CLIENT_KEY",
        requires = "client_cert"
    )]
    client_key: Option<std::path::PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Nodes: list, show, cordon, uncordon, drain.
    #[command(subcommand, visible_alias = "node")]
    Nodes(NodeCmd),
    /// Instances: create, list, show, stop, start, reboot, delete.
    #[command(subcommand, visible_alias = "instance")]
    Instances(InstanceCmd),
    /// The image catalogue: upload, add, list, show, delete.
    #[command(subcommand, visible_alias = "image")]
    Images(ImageCmd),
    /// The controller's own state (broker, store, version) and the fleet in numbers.
    Status,
    /// The fleet's history: `outpost events --follow --node edge-7`.
    Events {
        /// Only this node's (and its instances').
        #[arg(long)]
        node: Option<String>,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Only the changes this actor made: a token's name, `local`, or `node` / `controller`
        /// for what they did.
        #[arg(long)]
        actor: Option<String>,
        /// Keep printing events as they happen (Server-Sent Events), until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Upload an image into the controller's catalogue (streamed; progress on a terminal):
    /// `outpost images upload debian-12.qcow2 --name debian-12 --version 2026.11`.
    Upload {
        /// The file.
        file: std::path::PathBuf,
        /// Its name in the catalogue (instances use NAME or NAME:VERSION).
        #[arg(long)]
        name: String,
        /// Its version (default: the next number for the name).
        #[arg(long)]
        version: Option<String>,
        /// The architecture it runs on (a kernel's is read from the file).
        #[arg(long)]
        arch: Option<String>,
        /// qcow2, raw, kernel or initrd (default: read from the file; raw must be said).
        #[arg(long)]
        format: Option<String>,
    },
    /// Add an image served elsewhere (an HTTP(S) server, an object store, a CDN): nodes are
    /// sent there, and check the digest.
    Add {
        /// Its name in the catalogue.
        #[arg(long)]
        name: String,
        /// Its version (default: the next number for the name).
        #[arg(long)]
        version: Option<String>,
        /// Where it is.
        #[arg(long)]
        url: String,
        /// Its SHA-256 (hex).
        #[arg(long)]
        sha256: String,
        /// Its size in bytes.
        #[arg(long)]
        size: u64,
        /// qcow2, raw, kernel or initrd.
        #[arg(long)]
        format: String,
        /// The architecture it runs on.
        #[arg(long)]
        arch: Option<String>,
    },
    /// List the catalogue.
    List,
    /// Show one image (NAME or NAME:VERSION), with the instances using it and the nodes
    /// holding it.
    Show { key: String },
    /// Delete an image (refused while instances use it).
    Delete { key: String },
    /// Seed a group of nodes with an image ahead of any instance:
    /// `outpost images prefetch debian-12 --selector zone=north --concurrency 8 --wait`.
    Prefetch {
        key: String,
        /// Only nodes with this label, key=value (repeatable).
        #[arg(long = "selector")]
        selectors: Vec<String>,
        /// At most this many nodes fetching at once, fleet-wide.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: u16,
        #[command(flatten)]
        w: WaitArgs,
    },
}

/// A reader that shows how far it got on a terminal.
struct Progress<R> {
    inner: R,
    done: u64,
    total: u64,
    shown: u64,
    tty: bool,
}

impl<R: std::io::Read> std::io::Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
        if self.tty && (pct > self.shown || n == 0) {
            self.shown = pct;
            eprint!(
                "\ruploading {pct:>3}% ({} of {} MiB)",
                self.done >> 20,
                self.total >> 20
            );
            if n == 0 {
                eprintln!();
            }
        }
        Ok(n)
    }
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// List nodes.
    List,
    /// Show one node: state, resources with allocation ratios, labels, images, instances,
    /// generations, agent version. `--wait` waits until it is up (a device just onboarded).
    Show {
        id: String,
        #[command(flatten)]
        w: WaitArgs,
    },
    /// Stop placing new instances on a node.
    Cordon { id: String },
    /// Place instances on a node again.
    Uncordon { id: String },
    /// Cordon a node and move its instances to other nodes.
    Drain { id: String },
    /// Adopt a node bound to another fleet (shown as `foreign`): its instances join this
    /// fleet as they are, and it takes this fleet's desired state from then on.
    Adopt { id: String },
    /// Accept the capacity a node reports above its ceiling (its first report, or what was
    /// approved last): until then it counts at the ceiling (a device cannot claim more on
    /// its own word to draw every placement).
    ApproveCapacity { id: String },
    /// End a node's identity conflict (state `conflict`: two agent installs connect with its
    /// flashed identity, a copied SD card or an agent reinstalled without its state): keep
    /// one install, named by the boot id `nodes show` lists. Its desired states are for that
    /// install alone; another that holds none of the node's state builds nothing.
    Resolve {
        id: String,
        /// The agent install to keep (16 hex digits).
        #[arg(long)]
        keep: String,
    },
    /// Set or remove a node's labels from the controller, without re-flashing it:
    /// `outpost nodes label edge-7 tier=gold zone-`.
    Label {
        id: String,
        /// `key=value` to set (over the flashed value), `key-` to remove.
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// Remove a node that is gone for good (refused while it holds instances; --force moves
    /// them elsewhere first). Revoke its credentials too: outpost-provision revoke NODE.
    Remove {
        id: String,
        /// Move its instances elsewhere first (rebuilt from their images: a disk is not
        /// carried); on a node that is down, those that cannot move are deleted with it.
        #[arg(long)]
        force: bool,
    },
}

/// Waiting for an operation to take effect on its node.
#[derive(Debug, Clone, Copy, clap::Args)]
struct WaitArgs {
    /// Wait until it took effect (running, stopped, gone; a node: up), or fail with the
    /// reason.
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits, in seconds.
    #[arg(long, default_value_t = 300, requires = "wait")]
    timeout: u64,
}

#[derive(Debug, Subcommand)]
enum InstanceCmd {
    /// Create an instance (placed at once, or refused with the reason).
    Create {
        #[command(flatten)]
        args: Box<CreateArgs>,
        #[command(flatten)]
        w: WaitArgs,
    },
    /// List instances, optionally only some.
    List {
        /// Only those on this node.
        #[arg(long)]
        node: Option<String>,
        /// Only those in this phase (running, stopped, error, held...; another word is refused).
        #[arg(long, value_parser = phase_name)]
        phase: Option<String>,
        /// Only those of this server group.
        #[arg(long)]
        group: Option<String>,
        /// Only those with these labels: `key=value` or `key` (any value), comma-separated
        /// or repeated; all must match.
        #[arg(long = "selector", short = 'l', value_delimiter = ',')]
        selector: Vec<String>,
    },
    /// Show one instance (by id or name).
    Show { key: String },
    /// An instance's serial console, read through its node: the last lines, or `--follow` to
    /// keep printing what it prints (until interrupted, or its node goes away).
    Console {
        key: String,
        /// How many of the last lines.
        #[arg(long, short = 'n', default_value_t = 50)]
        lines: u16,
        /// Keep printing.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// An instance's history (also after it was deleted): requested, scheduled, downloading,
    /// running, stopped, moved, failed, deleted, with when and who.
    Events { key: String },
    /// Stop an instance: the power button, forced off after the stop timeout (the agent's,
    /// 20 s by default, or --stop-timeout); --force pulls the plug at once.
    Stop {
        key: String,
        #[command(flatten)]
        p: PowerArgs,
        #[command(flatten)]
        w: WaitArgs,
    },
    /// Start an instance (also one that stopped or crashed by itself).
    Start {
        key: String,
        #[command(flatten)]
        w: WaitArgs,
    },
    /// Reboot an instance: a clean shutdown and a fresh boot, reset if the guest ignores the
    /// power button for the stop timeout (said in its reason); --force (--hard) resets at once.
    Reboot {
        key: String,
        #[command(flatten)]
        p: PowerArgs,
        #[command(flatten)]
        w: WaitArgs,
    },
    /// Delete an instance.
    Delete {
        key: String,
        /// On a node that is down: delete it at once, without waiting for the node (which is
        /// told it is gone if it ever returns).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        w: WaitArgs,
    },
}

/// How a stop or reboot is carried out.
#[derive(Debug, Clone, Copy, clap::Args)]
struct PowerArgs {
    /// At once, without asking the guest: power off (stop) or reset (reboot).
    #[arg(long, visible_alias = "hard", conflicts_with = "stop_timeout")]
    force: bool,
    /// Seconds the guest has to act on the power button before it is forced.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u16).range(1..))]
    stop_timeout: Option<u16>,
}

impl PowerArgs {
    fn body(self) -> Option<Value> {
        (self.force || self.stop_timeout.is_some()).then(|| {
            serde_json::json!({
                "force": self.force,
                "stop_timeout_secs": self.stop_timeout.unwrap_or(0),
            })
        })
    }
}

/// Whether an instance carries every label of `selector` (`key=value`, or `key` for any
/// value).
fn selected(i: &Value, selector: &[String]) -> bool {
    let labels: Vec<&str> = i["labels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    selector.iter().all(|want| {
        labels.iter().any(|l| {
            *l == want.as_str() || (!want.contains('=') && l.split('=').next() == Some(want))
        })
    })
}

/// What `--wait` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    Phase(&'static str),
    Gone,
}

impl Client {
    /// Polls image `key` until every node of a prefetch holds it, showing each node's
    /// progress on a terminal; fails naming the nodes whose download failed.
    fn wait_cached(&self, key: &str, started: &Value, w: WaitArgs) -> anyhow::Result<Value> {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(w.timeout);
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let want: Vec<String> = started["queued"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect();
        loop {
            let v = self.send("GET", &format!("/v1/images/{}", seg(key)), None)?;
            let on: Vec<&str> = v["cached_on"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let failed: Vec<String> = v["downloads"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| d["state"] == "failed" && want.iter().any(|n| d["node"] == n.as_str()))
                .map(|d| {
                    format!(
                        "{}: {}",
                        d["node"].as_str().unwrap_or_default(),
                        d["reason"].as_str().unwrap_or_default()
                    )
                })
                .collect();
            let left: Vec<&String> = want.iter().filter(|n| !on.contains(&n.as_str())).collect();
            if tty {
                eprintln!(
                    "{key}: {} of {} nodes hold it",
                    want.len() - left.len(),
                    want.len()
                );
            }
            if left.len() == failed.len() {
                if failed.is_empty() {
                    return Ok(started.clone());
                }
                bail!(
                    "{key}: {} node(s) could not fetch it: {}",
                    failed.len(),
                    failed.join("; ")
                );
            }
            if std::time::Instant::now() >= end {
                bail!(
                    "{key}: {} node(s) still fetching after {} s",
                    left.len(),
                    w.timeout
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }

    /// Runs `check` now and again whenever the fleet's event stream (filtered by `query`)
    /// brings an event, until it answers or `timeout_secs` pass (then `None`). The stream is
    /// read on its own thread; should it be unavailable, `check` runs every
    /// [`WAIT_FALLBACK`] instead.
    fn wait_events<T>(
        &self,
        query: &str,
        timeout_secs: u64,
        mut check: impl FnMut() -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<Option<T>> {
        use std::sync::mpsc::RecvTimeoutError;
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let me = self.clone();
        let path = format!("/v1/events?follow=true&live=true{query}");
        std::thread::spawn(move || {
            let opened = tx.clone();
            // Once open, one more check covers what happened before the stream did.
            let _ = me.stream(
                &path,
                "event",
                || {
                    let _ = opened.send(());
                },
                |_, _| tx.send(()).map_err(|_| anyhow::anyhow!("the wait is over")),
            );
        });
        let end = std::time::Instant::now() + std::time::Duration::from_secs(timeout_secs);
        loop {
            if let Some(v) = check()? {
                return Ok(Some(v));
            }
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match rx.recv_timeout(left.min(WAIT_FALLBACK)) {
                Ok(()) => while rx.try_recv().is_ok() {},
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(left.min(WAIT_FALLBACK));
                }
            }
        }
    }

    /// Waits until node `id` is up, or the timeout.
    fn wait_up(&self, id: &str, w: WaitArgs) -> anyhow::Result<Value> {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let mut last = String::new();
        let query = format!("&node={}", seg(id));
        let up = self.wait_events(&query, w.timeout, || {
            let state = match self.send("GET", &format!("/v1/nodes/{}", seg(id)), None) {
                Ok(v) if v["state"] == "up" => return Ok(Some(v)),
                Ok(v) => v["state"].as_str().unwrap_or_default().to_owned(),
                Err(e) if e.to_string().contains("HTTP 404") => "not registered yet".to_owned(),
                Err(e) => return Err(e),
            };
            if tty && state != last {
                eprintln!("{id}: {state}...");
            }
            last = state;
            Ok(None)
        })?;
        up.ok_or_else(|| anyhow::anyhow!("{id}: still {last} after {} s", w.timeout))
    }

    /// Waits until instance `key` is `until`, in an error phase, or the timeout.
    fn wait_for(&self, key: &str, until: Until, w: WaitArgs) -> anyhow::Result<Value> {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let mut last = String::new();
        let query = format!("&instance={}", seg(key));
        let done = self.wait_events(&query, w.timeout, || {
            let got = self.send("GET", &format!("/v1/instances/{}", seg(key)), None);
            match (got, until) {
                (Err(e), Until::Gone) if e.to_string().contains("HTTP 404") => {
                    Ok(Some(serde_json::json!({ "name": key, "phase": "deleted" })))
                }
                (Err(e), _) => Err(e),
                (Ok(v), Until::Phase(p)) if v["phase"] == p => Ok(Some(v)),
                (Ok(v), _) if v["phase"] == "error" => {
                    bail!("{key} failed: {}", v["reason"].as_str().unwrap_or_default())
                }
                (Ok(v), _) => {
                    let phase = v["phase"].as_str().unwrap_or_default().to_owned();
                    if tty && phase != last {
                        eprintln!("{key}: {phase}...");
                    }
                    last = phase;
                    Ok(None)
                }
            }
        })?;
        done.ok_or_else(|| anyhow::anyhow!("{key}: still {last} after {} s", w.timeout))
    }
}

/// How often `--wait` looks again when no event arrives (the stream wakes it at once
/// otherwise).
const WAIT_FALLBACK: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// Its name.
    name: String,
    /// Boot this disk image (a file in the agents' image directory).
    #[arg(long, conflicts_with = "kernel", required_unless_present = "kernel")]
    image: Option<String>,
    /// Direct kernel boot: this kernel file.
    #[arg(long)]
    kernel: Option<String>,
    /// Direct kernel boot: this initrd file.
    #[arg(long, requires = "kernel")]
    initrd: Option<String>,
    /// Direct kernel boot: the command line (default console=ttyS0).
    #[arg(long, requires = "kernel")]
    cmdline: Option<String>,
    /// vCPUs.
    #[arg(long, default_value_t = DEFAULT_VCPUS)]
    vcpus: u16,
    /// Memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB)]
    memory: u32,
    /// Disk in GiB (default 1 for an image, 0 for kernel boot).
    #[arg(long)]
    disk: Option<u32>,
    /// x86_64 or aarch64 (default: the controller's).
    #[arg(long)]
    arch: Option<String>,
    /// Refuse nodes without KVM.
    #[arg(long)]
    require_kvm: bool,
    /// Attach to this libvirt network.
    #[arg(long, conflicts_with = "bridge")]
    network: Option<String>,
    /// Attach to this host bridge.
    #[arg(long)]
    bridge: Option<String>,
    /// Restart policy: never, on-failure, always.
    #[arg(long)]
    restart: Option<String>,
    /// A label of the instance, key=value (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// A label the node must carry, key=value (repeatable).
    #[arg(long = "selector")]
    selectors: Vec<String>,
    /// Server group (anti-affinity unless --affinity).
    #[arg(long)]
    group: Option<String>,
    /// The group's members share one node.
    #[arg(long, requires = "group")]
    affinity: bool,
    /// cloud-init user-data (a cloud-config or a script, at most 64 KiB) on a NoCloud seed.
    #[arg(long, value_name = "FILE")]
    user_data: Option<std::path::PathBuf>,
    /// An SSH public key file for the guest (one key per line; repeatable).
    #[arg(long = "ssh-key", value_name = "FILE")]
    ssh_keys: Vec<std::path::PathBuf>,
    /// The guest's host name (default: the instance's name).
    #[arg(long)]
    hostname: Option<String>,
    /// cloud-init network-config (at most 64 KiB).
    #[arg(long, value_name = "FILE")]
    network_config: Option<std::path::PathBuf>,
}

/// A text file for the seed: UTF-8, read whole.
fn seed_text(p: &std::path::Path, what: &str) -> anyhow::Result<String> {
    let b = std::fs::read(p).with_context(|| format!("reading the {what} {}", p.display()))?;
    String::from_utf8(b)
        .map_err(|_| anyhow::anyhow!("the {what} {} is not UTF-8 text", p.display()))
}

fn pairs(v: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    v.iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("{s:?}: expected key=value"))
        })
        .collect()
}

#[derive(Clone)]
struct Client {
    agent: ureq::Agent,
    /// The API URL that answered last (the leader, once found).
    current: std::sync::Arc<std::sync::Mutex<String>>,
    /// Every API URL given (`--api A,B`).
    bases: Vec<String>,
    token: Option<String>,
    tls: ureq::tls::TlsConfig,
}

/// The TLS settings from `--ca-file`, `--client-cert` and `--client-key`.
fn tls_config(cli: &Cli) -> anyhow::Result<ureq::tls::TlsConfig> {
    use ureq::tls::{ClientCert, PemItem, RootCerts, TlsConfig, parse_pem};
    let read = |p: &std::path::PathBuf, what: &str| {
        std::fs::read(p).with_context(|| format!("reading the {what} {}", p.display()))
    };
    let certs = |pem: &[u8]| -> Vec<_> {
        parse_pem(pem)
            .filter_map(|i| match i {
                Ok(PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect()
    };
    let mut b = TlsConfig::builder();
    if let Some(ca) = &cli.ca_file {
        let certs = certs(&read(ca, "CA file")?);
        if certs.is_empty() {
            bail!("--ca-file {}: no certificate in it", ca.display());
        }
        b = b.root_certs(RootCerts::new_with_certs(&certs));
    }
    if let (Some(cert), Some(key)) = (&cli.client_cert, &cli.client_key) {
        let chain = certs(&read(cert, "client certificate")?);
        let pem = read(key, "client key")?;
        let key = parse_pem(&pem)
            .find_map(|i| match i {
                Ok(PemItem::PrivateKey(k)) => Some(k),
                _ => None,
            })
            .with_context(|| format!("--client-key {}: no private key in it", key.display()))?;
        b = b.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
    }
    Ok(b.build())
}

/// Why the controller could not be reached, with a hint for https.
fn unreachable(base: &str) -> String {
    if base.starts_with("https://") {
        format!(
            "cannot reach the controller at {base} (over TLS: its certificate must chain to --ca-file / OUTPOST_CA_FILE and name that host)"
        )
    } else {
        format!("cannot reach the controller at {base}")
    }
}

impl Client {
    /// The API URL that answered last.
    fn base(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Streams a file as the body of a POST.
    fn upload(&self, path: &str, file: &std::path::Path) -> anyhow::Result<Value> {
        let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let total = f.metadata().map(|m| m.len()).unwrap_or(0);
        // Refuse a file that is plainly not an image before sending gigabytes.
        let mut head = vec![0u8; outpost_controller::blobs::HEAD_LEN];
        let n = std::io::Read::read(&mut &f, &mut head)?;
        head.truncate(n);
        if let Some(q) = path.split_once('?').map(|(_, q)| q)
            && !q.contains("format=")
            && outpost_controller::fleet::images::sniff(&head).is_none()
        {
            bail!(
                "{} is not an image Outpost recognises (qcow2, a Linux kernel, an initrd): a raw disk needs --format raw",
                file.display()
            );
        }
        let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let mut reader = Progress {
            inner: std::io::BufReader::with_capacity(1 << 20, f),
            done: 0,
            total,
            shown: 0,
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        };
        let url = format!("{}{path}", self.base().trim_end_matches('/'));
        let mut r = self
            .agent
            .post(&url)
            .config()
            .timeout_recv_response(Some(std::time::Duration::from_secs(120)))
            .build()
            .header(CLIENT_HEADER, "cli")
            .header("Content-Type", "application/octet-stream");
        if let Some(t) = &self.token {
            r = r.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = r.send(ureq::SendBody::from_reader(&mut reader));
        Self::answer(&self.base(), resp)
    }

    fn answer(
        base: &str,
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<Value> {
        let mut resp = resp.with_context(|| unreachable(base))?;
        let status = resp.status();
        let v: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("request failed");
            bail!("{msg} (HTTP {})", status.as_u16());
        }
        Ok(v)
    }

    /// Sends to the controller that answered last, then to the others given, following a
    /// standby's answer to the leader it names; remembers the one that answered. A 503 that
    /// says when to retry (a controller starting, a takeover under way: the request was not
    /// acted on) is retried for up to [`RETRY_FOR`].
    fn send(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let end = std::time::Instant::now() + RETRY_FOR;
        loop {
            let (base, resp) = self.send_once(method, path, body.clone())?;
            let wait = match &resp {
                Ok(r) if r.status() == 503 => r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .filter(|s| *s <= 2)
                    .map(std::time::Duration::from_secs),
                _ => None,
            };
            match wait {
                Some(w) if std::time::Instant::now() + w < end => std::thread::sleep(w),
                _ => return Self::answer(&base, resp),
            }
        }
    }

    /// One round of [`send`](Self::send): the last controller tried, and its answer.
    #[allow(clippy::type_complexity)]
    fn send_once(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(
        String,
        Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    )> {
        let first = self.base();
        let mut todo: std::collections::VecDeque<String> = std::iter::once(first.clone())
            .chain(self.bases.iter().filter(|b| **b != first).cloned())
            .collect();
        let mut tried = Vec::new();
        let mut last = None;
        while let Some(base) = todo.pop_front() {
            if tried.contains(&base) {
                continue;
            }
            tried.push(base.clone());
            let resp = self.send_to(&base, method, path, body.clone());
            match &resp {
                Err(_) if !todo.is_empty() => {}
                Ok(r) if r.status() == 503 => {
                    let leader = r
                        .headers()
                        .get("x-outpost-leader")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                        .filter(|l| may_follow(&base, l));
                    match leader {
                        Some(l) if !tried.contains(&l) => todo.push_front(l),
                        _ if !todo.is_empty() => {}
                        _ => return Ok((base, resp)),
                    }
                }
                _ => {
                    base.clone_into(&mut self.current.lock().unwrap_or_else(|e| e.into_inner()));
                    return Ok((base, resp));
                }
            }
            last = Some((base, resp));
        }
        match last {
            Some(l) => Ok(l),
            None => bail!("no controller API given"),
        }
    }

    fn send_to(
        &self,
        base: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let url = format!("{}{path}", base.trim_end_matches('/'));
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        match (method, body) {
            ("GET", _) => {
                let mut r = self.agent.get(&url).header(CLIENT_HEADER, "cli");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            ("DELETE", _) => {
                let mut r = self.agent.delete(&url).header(CLIENT_HEADER, "cli");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            (_, body) => {
                let mut r = self.agent.post(&url).header(CLIENT_HEADER, "cli");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                match body {
                    Some(b) => r.send_json(&b),
                    None => r.send_empty(),
                }
            }
        }
    }
}

/// Whether the CLI follows a standby's word from `base` to the leader at `leader`: never from
/// TLS to plain HTTP (the token would cross in clear).
fn may_follow(base: &str, leader: &str) -> bool {
    !base.starts_with("https://") || leader.starts_with("https://")
}

/// An instance phase as `--phase` takes it: one the controller has (or `held`, a foreign
/// node's), else the list of them.
fn phase_name(s: &str) -> Result<String, String> {
    let known: Vec<&str> = outpost_controller::fleet::Phase::ALL
        .iter()
        .map(|p| p.as_str())
        .chain(["held"])
        .collect();
    if known.contains(&s) {
        Ok(s.to_owned())
    } else {
        Err(format!("no phase {s:?}: one of {}", known.join(", ")))
    }
}

/// The header that says a request is from Outpost's own client (see the controller's `origin`).
const CLIENT_HEADER: &str = outpost_controller::origin::CLIENT_HEADER;

/// How long the CLI retries a 503 that says when to retry.
const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// Bytes in a short human form.
fn size(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn image_rows(v: &Value) -> anyhow::Result<()> {
    let list: Vec<ImageView> = match v {
        Value::Array(_) => serde_json::from_value(v.clone())?,
        other => vec![serde_json::from_value(other.clone())?],
    };
    table(
        &[
            "NAME", "VERSION", "FORMAT", "ARCH", "SIZE", "SHA256", "SOURCE", "USED BY",
        ],
        list.into_iter()
            .map(|i| {
                vec![
                    i.name,
                    i.version,
                    i.format,
                    i.arch.unwrap_or_else(|| "any".into()),
                    size(i.size),
                    i.sha256[..12].to_owned(),
                    i.source,
                    i.used_by.len().to_string(),
                ]
            })
            .collect(),
    );
    Ok(())
}

fn image_detail(v: &Value) -> anyhow::Result<()> {
    let i: ImageView = serde_json::from_value(v.clone())?;
    say!("image         {}:{}", i.name, i.version);
    say!("format        {}", i.format);
    say!("arch          {}", i.arch.as_deref().unwrap_or("any"));
    say!("size          {} ({} bytes)", size(i.size), i.size);
    say!("sha256        {}", i.sha256);
    say!("source        {}", i.source);
    say!("used by       {}", i.used_by.join(", "));
    say!("cached on     {}", i.cached_on.join(", "));
    for d in &i.downloads {
        say!(
            "download      {}: {} of {} ({}/s) {}{}",
            d.node,
            size(d.done),
            size(d.total),
            size(u64::from(d.rate)),
            d.state,
            if d.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", d.reason)
            }
        );
    }
    Ok(())
}

/// Percent-encodes one path segment: a name or id typed by a user never changes the path
/// (`x#y` stays one segment, and is refused by the API as a name, rather than becoming `x`).
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        say!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        line(r);
    }
}

fn node_rows(v: &Value) -> anyhow::Result<()> {
    let nodes: Vec<NodeView> = match v {
        Value::Array(_) => serde_json::from_value(v.clone())?,
        other => vec![serde_json::from_value(other.clone())?],
    };
    let notes: Vec<String> = nodes
        .iter()
        .flat_map(|n| {
            let id = &n.id;
            n.bound_to
                .iter()
                .map(move |f| format!("{id}: bound to another fleet ({f}); its instances are kept. Adopt it: outpost nodes adopt {id}"))
                .chain(n.notice.iter().map(move |x| format!("{id}: {x}")))
                .chain((!n.unaccounted.is_empty()).then(|| {
                    format!("{id}: runs instances this controller does not know (kept, not deleted): {}", n.unaccounted.join(", "))
                }))
        })
        .collect();
    table(
        &[
            "NODE",
            "STATE",
            "ARCH",
            "HYPERVISOR",
            "VCPUS",
            "MEMORY MIB",
            "DISK GIB",
            "INSTANCES",
            "LABELS",
        ],
        nodes
            .into_iter()
            .map(|n| {
                vec![
                    n.id,
                    n.state,
                    n.arch.unwrap_or_default(),
                    n.hypervisor.unwrap_or_default(),
                    format!("{}/{}", n.claimed.vcpus, n.allocatable.vcpus),
                    format!("{}/{}", n.claimed.memory_mib, n.allocatable.memory_mib),
                    format!("{}/{}", n.claimed.disk_gib, n.allocatable.disk_gib),
                    n.instances.to_string(),
                    n.labels.join(","),
                ]
            })
            .collect(),
    );
    for note in notes {
        say!("{note}");
    }
    Ok(())
}

/// The whole of one node, and the instances on it.
fn node_detail(v: &Value, instances: &[&Value]) -> anyhow::Result<()> {
    let n: NodeView = serde_json::from_value(v.clone())?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let ago = now_ms.saturating_sub(n.last_seen_ms) / 1000;
    let res = |r: &outpost_controller::views::ResourcesView| {
        format!(
            "{} vCPUs, {} MiB, {} GiB",
            r.vcpus, r.memory_mib, r.disk_gib
        )
    };
    say!("node          {}", n.id);
    if n.connected_since_ms > 0 && n.state != "down" {
        let since = now_ms.saturating_sub(n.connected_since_ms) / 1000;
        say!("state         {} (connected {since} s ago)", n.state);
    } else {
        say!("state         {}", n.state);
    }
    say!("last seen     {ago} s ago");
    say!(
        "agent         {}",
        n.agent_version.as_deref().unwrap_or("-")
    );
    say!("arch          {}", n.arch.as_deref().unwrap_or("-"));
    say!("hypervisor    {}", n.hypervisor.as_deref().unwrap_or("-"));
    say!(
        "allocatable   {} (total minus reservations)",
        res(&n.allocatable)
    );
    say!(
        "ratios        cpu {}, memory {}, disk {} (virtual per physical)",
        n.ratios.cpu,
        n.ratios.memory,
        n.ratios.disk
    );
    say!("capacity      {} (after ratios)", res(&n.capacity));
    say!("claimed       {}", res(&n.claimed));
    say!("used          {} (as last reported)", res(&n.used));
    say!("labels        {}", n.labels.join(", "));
    if !n.label_overrides.is_empty() {
        say!("  set here    {}", n.label_overrides.join(", "));
    }
    say!("images        {}", n.images.join(", "));
    say!(
        "generation    {} desired, {} reported",
        n.generation.desired,
        n.generation.reported
    );
    if let Some(f) = &n.bound_to {
        say!(
            "bound to      fleet {f} (another fleet): outpost nodes adopt {}",
            n.id
        );
    }
    if let Some(x) = &n.install {
        say!("install       {x}");
    }
    if !n.conflict.is_empty() {
        say!(
            "conflict      also {} (the same identity on another box): outpost nodes resolve {} --keep BOOT-ID",
            n.conflict.join(", "),
            n.id
        );
    }
    if let Some(x) = &n.notice {
        say!("notice        {x}");
    }
    if !n.unaccounted.is_empty() {
        say!(
            "unaccounted   {} (kept, not deleted)",
            n.unaccounted.join(", ")
        );
    }
    say!("instances     {}", n.instances);
    for i in instances {
        say!(
            "  {}  {}  {}  {}",
            i["id"].as_str().unwrap_or_default(),
            i["name"].as_str().unwrap_or_default(),
            i["phase"].as_str().unwrap_or_default(),
            i["reason"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}

/// Everything an instance was created with, where it is and why.
fn instance_detail(v: &Value) -> anyhow::Result<()> {
    let i: InstanceView = serde_json::from_value(v.clone())?;
    say!("instance      {} ({})", i.name, i.id);
    say!("phase         {}", i.phase);
    say!(
        "power         {} (asked{}), reboots asked {}",
        i.power,
        i.power_mode
            .as_deref()
            .map(|m| format!(", {m}"))
            .unwrap_or_default(),
        i.reboot_count
    );
    say!("node          {}", i.node.as_deref().unwrap_or("-"));
    if i.adopted {
        say!(
            "adopted       from its node, unknown to the store: pinned there (never moved or rebuilt elsewhere)"
        );
    }
    if !i.placement.is_empty() {
        say!("placed        {}", i.placement);
    }
    say!(
        "resources     {} vCPUs, {} MiB, {} GiB, {}{}",
        i.vcpus,
        i.memory_mib,
        i.disk_gib,
        i.arch,
        if i.require_kvm { ", KVM required" } else { "" }
    );
    say!("boot          {}", i.boot);
    say!("network       {}", i.network);
    for nic in &i.addresses {
        let ips = if nic.ips.is_empty() {
            "no IP address yet".to_owned()
        } else {
            nic.ips.join(", ")
        };
        say!("  interface   {}  {ips}", nic.mac);
    }
    say!("restart       {}", i.restart);
    say!("labels        {}", i.labels.join(", "));
    say!("selector      {}", i.selector.join(", "));
    say!("group         {}", i.group.as_deref().unwrap_or("-"));
    if !i.reason.is_empty() {
        say!("reason        {}", i.reason);
    }
    for d in &i.downloads {
        let eta = match (d.rate, d.total.saturating_sub(d.done)) {
            (0, _) => String::new(),
            (r, left) => format!(", ETA {} s", left / u64::from(r)),
        };
        say!(
            "download      {}: {} of {} ({}/s{eta}) {}{}",
            d.blob,
            size(d.done),
            size(d.total),
            size(u64::from(d.rate)),
            d.state,
            if d.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", d.reason)
            }
        );
    }
    for f in &i.failures {
        say!("failed on     {f}");
    }
    Ok(())
}

/// `HH:MM:SS.mmm` (UTC) of a time in ms since the epoch.
fn clock(ms: u64) -> String {
    let d = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        d / 3_600_000,
        d / 60_000 % 60,
        d / 1000 % 60,
        d % 1000
    )
}

fn event_row(e: &EventView) -> Vec<String> {
    vec![
        e.seq.to_string(),
        clock(e.at_ms),
        e.instance.clone().unwrap_or_else(|| "-".into()),
        e.node.clone().unwrap_or_else(|| "-".into()),
        e.kind.clone(),
        e.actor.clone(),
        e.detail.clone(),
    ]
}

const EVENT_HEADERS: [&str; 7] = [
    "SEQ",
    "TIME (UTC)",
    "INSTANCE",
    "NODE",
    "EVENT",
    "BY",
    "DETAIL",
];

fn event_rows(v: &Value) -> anyhow::Result<()> {
    let list: Vec<EventView> = serde_json::from_value(v.clone())?;
    table(&EVENT_HEADERS, list.iter().map(event_row).collect());
    Ok(())
}

impl Client {
    /// Opens a Server-Sent Events stream at `path` (no overall timeout: it lasts until
    /// interrupted), calls `opened` once it is, and hands each message's event name and data to
    /// `on`; `what` names the stream in errors.
    fn stream(
        &self,
        path: &str,
        what: &str,
        opened: impl FnOnce(),
        mut on: impl FnMut(&str, &str) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        use std::io::BufRead as _;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(self.tls.clone())
            .build()
            .into();
        let url = format!("{}{path}", self.base().trim_end_matches('/'));
        let mut r = agent
            .get(&url)
            .header(CLIENT_HEADER, "cli")
            .header("Accept", "text/event-stream");
        if let Some(t) = &self.token {
            r = r.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = r.call().with_context(|| unreachable(&self.base()))?;
        if !resp.status().is_success() {
            let v: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
            bail!(
                "{} (HTTP {})",
                v["error"].as_str().unwrap_or("request failed"),
                resp.status().as_u16()
            );
        }
        opened();
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        let mut event = String::new();
        for line in reader.lines() {
            let line = line.with_context(|| format!("the {what} stream broke"))?;
            if let Some(e) = line.strip_prefix("event:") {
                event = e.trim().to_owned();
            } else if let Some(data) = line.strip_prefix("data:") {
                on(&event, data.strip_prefix(' ').unwrap_or(data))?;
            }
        }
        bail!("the controller closed the {what} stream")
    }

    /// Prints an instance's console as it comes (Server-Sent Events), until interrupted or its
    /// node stops answering (then a non-zero exit with the reason).
    fn follow_console(&self, key: &str, lines: u16, json: bool) -> anyhow::Result<()> {
        let path = format!(
            "/v1/instances/{}/console?lines={lines}&follow=true",
            seg(key)
        );
        self.stream(
            &path,
            "console",
            || {},
            |event, data| {
                if event == "end" {
                    bail!("{data}");
                }
                let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
                if json {
                    say!("{v}");
                } else {
                    emit_raw(v["text"].as_str().unwrap_or_default());
                }
                Ok(())
            },
        )
    }

    /// Prints the fleet's events as they come (Server-Sent Events), until interrupted or the
    /// controller goes away.
    fn follow_events(&self, query: &str, json: bool) -> anyhow::Result<()> {
        let header = || {
            if !json {
                say!("{}", EVENT_HEADERS.join("  "));
            }
        };
        self.stream(
            &format!("/v1/events?follow=true{query}"),
            "event",
            header,
            |_, data| {
                let Ok(e) = serde_json::from_str::<EventView>(data.trim()) else {
                    say!("{}", data.trim());
                    return Ok(());
                };
                if json {
                    say!("{}", serde_json::to_string(&e)?);
                } else {
                    say!("{}", event_row(&e).join("  "));
                }
                Ok(())
            },
        )
    }
}

/// `outpost status` as text.
fn status_text(v: &Value) {
    let yes = |b: &Value, good: &str, bad: &str| {
        if b.as_bool() == Some(true) {
            good.to_owned()
        } else {
            bad.to_owned()
        }
    };
    let counts = |m: &Value| {
        m.as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, n)| format!("{n} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "none".into())
    };
    say!(
        "controller    {} ({}), up {} s",
        v["version"].as_str().unwrap_or("?"),
        yes(&v["ready"], "ready", "NOT READY"),
        v["uptime_secs"]
    );
    say!(
        "broker        {}",
        yes(
            &v["broker_connected"],
            "connected",
            "DISCONNECTED: nodes cannot be reached, their states below are as last seen"
        )
    );
    say!(
        "store         {}",
        yes(
            &v["store_writable"],
            "writable",
            "NOT WRITABLE: changes are refused"
        )
    );
    say!("nodes         {}", counts(&v["nodes"]));
    say!("instances     {}", counts(&v["instances"]));
    let s = &v["scheduler"];
    say!(
        "scheduler     {} placed, {} refused since start",
        s["placements"],
        s["failures"]
    );
    if let Some(last) = s["last_refusals"].as_array().and_then(|a| a.last()) {
        say!("last refusal  {}", last["why"].as_str().unwrap_or_default());
    }
}

fn instance_rows(v: &Value) -> anyhow::Result<()> {
    let list: Vec<InstanceView> = match v {
        Value::Array(_) => serde_json::from_value(v.clone())?,
        other => vec![serde_json::from_value(other.clone())?],
    };
    table(
        &[
            "ID",
            "NAME",
            "PHASE",
            "NODE",
            "IP",
            "VCPUS",
            "MEMORY MIB",
            "IMAGE",
            "REASON",
        ],
        list.into_iter()
            .map(|i| {
                let phase = if i.adopted {
                    format!("{} (adopted)", i.phase)
                } else {
                    i.phase
                };
                vec![
                    i.id,
                    i.name,
                    phase,
                    i.node.unwrap_or_else(|| "-".into()),
                    i.ip.unwrap_or_else(|| "-".into()),
                    i.vcpus.to_string(),
                    i.memory_mib.to_string(),
                    i.image,
                    i.reason,
                ]
            })
            .collect(),
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if json {
                let e = format!("{e:#}");
                eprintln!("{}", serde_json::json!({ "error": clean::clean(&e) }));
            } else {
                eprintln!("error: {}", clean::clean(&format!("{e:#}")));
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let tls = tls_config(&cli)?;
    let several = cli.api.split(',').filter(|b| !b.trim().is_empty()).count() > 1;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        // A controller that accepts but does not answer (a frozen one, say a standby's stale
        // idea of the leader) is given up on sooner, and the next --api URL tried: within
        // 1.5 s when there is another to try.
        .timeout_connect(Some(std::time::Duration::from_millis(if several {
            1500
        } else {
            5000
        })))
        .timeout_recv_response(Some(std::time::Duration::from_millis(if several {
            1500
        } else {
            12_000
        })))
        .tls_config(tls.clone())
        .build()
        .into();
    let token = match &cli.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the token file {}", f.display()))?
                .trim()
                .to_owned(),
        ),
        None => cli.token.clone(),
    };
    let bases: Vec<String> = cli
        .api
        .split(',')
        .map(|b| b.trim().to_owned())
        .filter(|b| !b.is_empty())
        .collect();
    let c = Client {
        agent,
        current: std::sync::Arc::new(std::sync::Mutex::new(
            bases.first().cloned().unwrap_or_default(),
        )),
        bases,
        token,
        tls,
    };
    let (v, kind) = match cli.what {
        What::Nodes(cmd) => {
            let v = match cmd {
                NodeCmd::List => {
                    let v = c.send("GET", "/v1/nodes", None)?;
                    // A controller cut off from its broker shows nodes as last seen: say so.
                    if let Ok(s) = c.send("GET", "/v1/status", None)
                        && s["broker_connected"] == false
                    {
                        eprintln!(
                            "warning: the controller is not connected to its broker: node states are as last seen (outpost status)"
                        );
                    }
                    v
                }
                NodeCmd::Show { id, w } => {
                    let v = if w.wait {
                        c.wait_up(&id, w)?
                    } else {
                        c.send("GET", &format!("/v1/nodes/{}", seg(&id)), None)?
                    };
                    if !cli.json {
                        let all = c.send("GET", "/v1/instances", None)?;
                        let on: Vec<&Value> = all
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|i| i["node"] == id.as_str())
                            .collect();
                        node_detail(&v, &on)?;
                        return Ok(());
                    }
                    v
                }
                NodeCmd::Cordon { id } => {
                    c.send("POST", &format!("/v1/nodes/{}/cordon", seg(&id)), None)?
                }
                NodeCmd::Uncordon { id } => {
                    c.send("POST", &format!("/v1/nodes/{}/uncordon", seg(&id)), None)?
                }
                NodeCmd::Label { id, changes } => c.send(
                    "POST",
                    &format!("/v1/nodes/{}/labels", seg(&id)),
                    Some(serde_json::json!({ "labels": changes })),
                )?,
                NodeCmd::Remove { id, force } => {
                    let q = if force { "?force=true" } else { "" };
                    let v = c.send("DELETE", &format!("/v1/nodes/{}{q}", seg(&id)), None)?;
                    if !cli.json {
                        let deleted: Vec<&str> = v["deleted"]
                            .as_array()
                            .map(|a| a.iter().filter_map(Value::as_str).collect())
                            .unwrap_or_default();
                        if deleted.is_empty() {
                            say!("removed {id} (moved {} instance(s))", v["moved"]);
                        } else {
                            say!(
                                "removed {id} (moved {} instance(s); deleted with it, as they could not move: {})",
                                v["moved"],
                                deleted.join(", ")
                            );
                        }
                        return Ok(());
                    }
                    v
                }
                NodeCmd::Adopt { id } => {
                    c.send("POST", &format!("/v1/nodes/{}/adopt", seg(&id)), None)?
                }
                NodeCmd::Resolve { id, keep } => c.send(
                    "POST",
                    &format!("/v1/nodes/{}/resolve", seg(&id)),
                    Some(serde_json::json!({ "keep": keep })),
                )?,
                NodeCmd::ApproveCapacity { id } => c.send(
                    "POST",
                    &format!("/v1/nodes/{}/approve-capacity", seg(&id)),
                    None,
                )?,
                NodeCmd::Drain { id } => {
                    let v = c.send("POST", &format!("/v1/nodes/{}/drain", seg(&id)), None)?;
                    let stuck: Vec<&str> = v["stuck"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    if cli.json {
                        say!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        say!("moved {} instance(s)", v["moved"]);
                        for s in &stuck {
                            say!("could not move {s}");
                        }
                    }
                    // A drain that leaves instances behind has not drained the node.
                    if !stuck.is_empty() {
                        bail!(
                            "{id} is not drained: {} instance(s) could not move ({})",
                            stuck.len(),
                            stuck.join("; ")
                        );
                    }
                    return Ok(());
                }
            };
            (v, Kind::Nodes)
        }
        What::Instances(cmd) => {
            let v = match cmd {
                InstanceCmd::Create { args: a, w } => {
                    let a = *a;
                    let name = a.name.clone();
                    let body = CreateBody {
                        name: Some(a.name),
                        vcpus: Some(a.vcpus),
                        memory_mib: Some(a.memory),
                        disk_gib: a.disk,
                        arch: a.arch,
                        require_kvm: a.require_kvm,
                        image: a.image,
                        kernel: a.kernel,
                        initrd: a.initrd,
                        cmdline: a.cmdline,
                        network: a.network,
                        bridge: a.bridge,
                        restart: a.restart,
                        labels: pairs(&a.labels)?,
                        selector: pairs(&a.selectors)?,
                        group: a.group,
                        group_policy: a.affinity.then(|| "affinity".to_owned()),
                        user_data: a
                            .user_data
                            .as_deref()
                            .map(|p| seed_text(p, "user-data"))
                            .transpose()?,
                        network_config: a
                            .network_config
                            .as_deref()
                            .map(|p| seed_text(p, "network-config"))
                            .transpose()?,
                        ssh_keys: {
                            let mut keys = Vec::new();
                            for p in &a.ssh_keys {
                                keys.extend(
                                    seed_text(p, "ssh key file")?
                                        .lines()
                                        .map(str::trim)
                                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                                        .map(str::to_owned),
                                );
                            }
                            keys
                        },
                        hostname: a.hostname,
                        seed: None,
                    };
                    let v = c.send("POST", "/v1/instances", Some(serde_json::to_value(body)?))?;
                    if w.wait {
                        c.wait_for(&name, Until::Phase("running"), w)?
                    } else {
                        v
                    }
                }
                InstanceCmd::List {
                    node,
                    phase,
                    group,
                    selector,
                } => {
                    // A node that does not exist is an error, not an empty list.
                    if let Some(n) = &node {
                        c.send("GET", &format!("/v1/nodes/{}", seg(n)), None)?;
                    }
                    let v = c.send("GET", "/v1/instances", None)?;
                    let keep = |i: &Value| {
                        node.as_ref().is_none_or(|n| i["node"] == n.as_str())
                            && phase.as_ref().is_none_or(|p| i["phase"] == p.as_str())
                            && group.as_ref().is_none_or(|g| i["group"] == g.as_str())
                            && selected(i, &selector)
                    };
                    Value::Array(
                        v.as_array()
                            .into_iter()
                            .flatten()
                            .filter(|i| keep(i))
                            .cloned()
                            .collect(),
                    )
                }
                InstanceCmd::Console { key, lines, follow } => {
                    if follow {
                        return c.follow_console(&key, lines, cli.json);
                    }
                    let v = c.send(
                        "GET",
                        &format!("/v1/instances/{}/console?lines={lines}", seg(&key)),
                        None,
                    )?;
                    if !cli.json {
                        emit_raw(v["text"].as_str().unwrap_or_default());
                        return Ok(());
                    }
                    v
                }
                InstanceCmd::Events { key } => {
                    let v = c.send("GET", &format!("/v1/instances/{}/events", seg(&key)), None)?;
                    if !cli.json {
                        event_rows(&v)?;
                        return Ok(());
                    }
                    v
                }
                InstanceCmd::Show { key } => {
                    let v = c.send("GET", &format!("/v1/instances/{}", seg(&key)), None)?;
                    if !cli.json {
                        instance_detail(&v)?;
                        return Ok(());
                    }
                    v
                }
                InstanceCmd::Stop { key, p, w } => {
                    let v = c.send(
                        "POST",
                        &format!("/v1/instances/{}/stop", seg(&key)),
                        p.body(),
                    )?;
                    if w.wait {
                        c.wait_for(&key, Until::Phase("stopped"), w)?
                    } else {
                        v
                    }
                }
                InstanceCmd::Start { key, w } => {
                    let v = c.send("POST", &format!("/v1/instances/{}/start", seg(&key)), None)?;
                    if w.wait {
                        c.wait_for(&key, Until::Phase("running"), w)?
                    } else {
                        v
                    }
                }
                InstanceCmd::Reboot { key, p, w } => {
                    let v = c.send(
                        "POST",
                        &format!("/v1/instances/{}/reboot", seg(&key)),
                        p.body(),
                    )?;
                    if w.wait {
                        c.wait_for(&key, Until::Phase("running"), w)?
                    } else {
                        v
                    }
                }
                InstanceCmd::Delete { key, force, w } => {
                    let q = if force { "?force=true" } else { "" };
                    let mut v =
                        c.send("DELETE", &format!("/v1/instances/{}{q}", seg(&key)), None)?;
                    if w.wait {
                        let id = v["id"].clone();
                        v = c.wait_for(&key, Until::Gone, w)?;
                        v["id"] = id;
                    }
                    if !cli.json {
                        say!(
                            "{} {}",
                            v["id"].as_str().unwrap_or_default(),
                            v["phase"].as_str().unwrap_or_default()
                        );
                        return Ok(());
                    }
                    v
                }
            };
            (v, Kind::Instances)
        }
        What::Status => {
            let v = c.send("GET", "/v1/status", None)?;
            if !cli.json {
                status_text(&v);
                return Ok(());
            }
            (v, Kind::Events)
        }
        What::Events {
            node,
            since,
            actor,
            follow,
        } => {
            let mut q = format!("&since={since}");
            if let Some(n) = &node {
                q.push_str(&format!("&node={}", seg(n)));
            }
            if let Some(a) = &actor {
                q.push_str(&format!("&actor={}", seg(a)));
            }
            if follow {
                return c.follow_events(&q, cli.json);
            }
            let v = c.send("GET", &format!("/v1/events?{}", &q[1..]), None)?;
            if !cli.json {
                event_rows(&v)?;
                return Ok(());
            }
            (v, Kind::Events)
        }
        What::Images(cmd) => {
            let v = match cmd {
                ImageCmd::Upload {
                    file,
                    name,
                    version,
                    arch,
                    format,
                } => {
                    let mut q = format!("name={}", seg(&name));
                    for (k, v) in [("version", version), ("arch", arch), ("format", format)] {
                        if let Some(v) = v {
                            q.push_str(&format!("&{k}={}", seg(&v)));
                        }
                    }
                    c.upload(&format!("/v1/images?{q}"), &file)?
                }
                ImageCmd::Add {
                    name,
                    version,
                    url,
                    sha256,
                    size,
                    format,
                    arch,
                } => c.send(
                    "POST",
                    "/v1/images",
                    Some(serde_json::json!({
                        "name": name, "version": version, "url": url, "sha256": sha256,
                        "size": size, "format": format, "arch": arch,
                    })),
                )?,
                ImageCmd::List => c.send("GET", "/v1/images", None)?,
                ImageCmd::Show { key } => {
                    let v = c.send("GET", &format!("/v1/images/{}", seg(&key)), None)?;
                    if !cli.json {
                        image_detail(&v)?;
                        return Ok(());
                    }
                    v
                }
                ImageCmd::Prefetch {
                    key,
                    selectors,
                    concurrency,
                    w,
                } => {
                    let v = c.send(
                        "POST",
                        &format!("/v1/images/{}/prefetch", seg(&key)),
                        Some(serde_json::json!({
                            "selector": pairs(&selectors)?,
                            "concurrency": concurrency,
                        })),
                    )?;
                    let v = if w.wait {
                        c.wait_cached(&key, &v, w)?
                    } else {
                        v
                    };
                    if !cli.json {
                        say!(
                            "{}: {} node(s) to fetch it, {} already hold it",
                            v["image"].as_str().unwrap_or_default(),
                            v["queued"].as_array().map_or(0, Vec::len),
                            v["cached"].as_array().map_or(0, Vec::len)
                        );
                        return Ok(());
                    }
                    v
                }
                ImageCmd::Delete { key } => {
                    let v = c.send("DELETE", &format!("/v1/images/{}", seg(&key)), None)?;
                    if !cli.json {
                        say!("deleted {}", v["image"].as_str().unwrap_or_default());
                        return Ok(());
                    }
                    v
                }
            };
            (v, Kind::Images)
        }
    };
    match (cli.json, kind) {
        (true, _) => say!("{}", serde_json::to_string_pretty(&v)?),
        (false, Kind::Nodes) => node_rows(&v)?,
        (false, Kind::Instances) => instance_rows(&v)?,
        (false, Kind::Images) => image_rows(&v)?,
        (false, Kind::Events) => event_rows(&v)?,
    }
    Ok(())
}

/// What a command's answer lists.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Nodes,
    Instances,
    Images,
    Events,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn unknown_phases_are_refused_with_the_known_ones() {
        assert_eq!(phase_name("running").unwrap(), "running");
        assert_eq!(phase_name("held").unwrap(), "held");
        let e = phase_name("runing").unwrap_err();
        assert!(e.contains("one of pending, scheduled"), "{e}");
    }

    #[test]
    fn a_leader_is_never_followed_from_tls_to_plain_http() {
        assert!(may_follow("https://a:8443", "https://b:8443"));
        assert!(!may_follow("https://a:8443", "http://b:8080"));
        assert!(may_follow("http://127.0.0.1:8080", "http://127.0.0.1:8081"));
        assert!(may_follow("http://127.0.0.1:8080", "https://b:8443"));
    }
}

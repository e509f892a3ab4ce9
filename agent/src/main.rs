//! `outpost-agent`: reads its config, opens the hypervisor, and runs the agent.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use outpost_agent::config::{Backend, BackendName, Config, DeviceConfig, KindChoice};
use outpost_agent::hypervisor::Hypervisor;
use outpost_agent::hypervisor::fake::FakeHypervisor;
use outpost_protocol::{Arch, NodeId, Resources};

/// Outpost's edge agent: reports this host over MQTT and converges its VMs (libvirt/KVM) to the
/// node's desired state. VMs keep running while the controller or the broker is away.
#[derive(Debug, Parser)]
#[command(name = "outpost-agent", version)]
struct Cli {
    /// Config file: the flashed form made by outpost-provision, or its TOML form (see
    /// agent/agent.example.toml). Flags below override it. Default: /etc/outpost/device.bin
    /// (where `outpost-provision install` puts it), else /etc/outpost/agent.toml.
    #[arg(short, long, env = "OUTPOST_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Node id (also the MQTT username); lets the agent run without a config file.
    #[arg(long)]
    node_id: Option<String>,
    /// Broker address, `mqtt://HOST:PORT`; repeat for fallbacks.
    #[arg(long = "broker")]
    brokers: Vec<String>,
    /// Directory for the desired state and instance files.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Image cache directory (default: STATE_DIR/images).
    #[arg(long)]
    image_dir: Option<PathBuf>,
    /// Hypervisor backend.
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// libvirt connection URI (default qemu:///system).
    #[arg(long)]
    libvirt_uri: Option<String>,
    /// KVM or software emulation (default: probe).
    #[arg(long, value_enum)]
    hypervisor_kind: Option<KindArg>,
    /// Seconds between usage reports.
    #[arg(long)]
    report_interval: Option<u16>,
    /// Serve Prometheus metrics on this address (`GET /metrics`; loopback only, e.g.
    /// 127.0.0.1:9465).
    #[arg(long, env = "OUTPOST_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "OUTPOST_LOG", default_value = "info")]
    log_level: tracing::Level,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Print this host's inventory as the agent would report it, and exit.
    Fingerprint {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check the config and print it (secrets masked), and exit.
    CheckConfig {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackendArg {
    Libvirt,
    Fake,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KindArg {
    Auto,
    Kvm,
    Emulated,
}

/// Where the config is read from: `--config`, else the flashed config where
/// `outpost-provision install` puts it, else the TOML form beside it.
fn config_path(cli: &Cli) -> PathBuf {
    cli.config.clone().unwrap_or_else(|| {
        let flashed = PathBuf::from(DEFAULT_FLASHED);
        if flashed.exists() || !std::path::Path::new(DEFAULT_TOML).exists() {
            flashed
        } else {
            PathBuf::from(DEFAULT_TOML)
        }
    })
}

/// The flashed config, as installed.
const DEFAULT_FLASHED: &str = "/etc/outpost/device.bin";
/// The TOML form, for a hand-written config.
const DEFAULT_TOML: &str = "/etc/outpost/agent.toml";

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    use outpost_firmware_config::human::{self, ConfigError, text};
    let path = config_path(cli);
    let mut d = match human::load(&path) {
        Ok(d) => d,
        Err(ConfigError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound && cli.node_id.is_some() =>
        {
            DeviceConfig::new(NodeId::new("x")?)
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("config {} (or give --node-id)", path.display()));
        }
    };
    if let Some(n) = &cli.node_id {
        d.node_id = NodeId::new(n).context("--node-id")?;
    }
    if !cli.brokers.is_empty() {
        d.brokers.clear();
        for b in &cli.brokers {
            d.brokers
                .push(text(b, "--broker")?)
                .map_err(|_| anyhow::anyhow!("too many --broker addresses"))?;
        }
    }
    if let Some(p) = &cli.state_dir {
        d.state_dir = Some(text(&p.to_string_lossy(), "--state-dir")?);
    }
    if let Some(p) = &cli.image_dir {
        d.image_dir = Some(text(&p.to_string_lossy(), "--image-dir")?);
    }
    if let Some(b) = cli.backend {
        d.hypervisor.backend = match b {
            BackendArg::Libvirt => BackendName::Libvirt,
            BackendArg::Fake => BackendName::Fake,
        };
    }
    if let Some(u) = &cli.libvirt_uri {
        d.hypervisor.uri = Some(text(u, "--libvirt-uri")?);
    }
    if let Some(k) = cli.hypervisor_kind {
        d.hypervisor.kind = match k {
            KindArg::Auto => KindChoice::Auto,
            KindArg::Kvm => KindChoice::Kvm,
            KindArg::Emulated => KindChoice::Emulated,
        };
    }
    if let Some(r) = cli.report_interval {
        d.report_interval_secs = Some(r);
    }
    tracing::info!("config: {}", human::summary(&d));
    let mut cfg = Config::from_device(&d)?;
    cfg.metrics_listen = cli.metrics_listen;
    Ok(cfg)
}

fn open_hypervisor(cfg: &Config) -> anyhow::Result<Arc<dyn Hypervisor>> {
    match &cfg.backend {
        Backend::Fake {
            kind,
            vcpus,
            memory_mib,
        } => {
            let arch = Arch::native().context("unsupported host architecture")?;
            Ok(Arc::new(FakeHypervisor::new(
                arch,
                *kind,
                *vcpus,
                *memory_mib,
            )))
        }
        #[cfg(feature = "libvirt")]
        Backend::Libvirt { uri, kind } => {
            use outpost_agent::hypervisor::libvirt::{LibvirtConfig, LibvirtHypervisor};
            let hv = LibvirtHypervisor::open(LibvirtConfig {
                node: cfg.node_id.clone(),
                uri: uri.clone(),
                kind: *kind,
                image_dir: cfg.image_dir.clone(),
                instance_dir: cfg.instance_dir.clone(),
                stop_timeout: cfg.stop_timeout,
            })
            .with_context(|| format!("opening libvirt at {uri}"))?;
            Ok(Arc::new(hv))
        }
        #[cfg(not(feature = "libvirt"))]
        Backend::Libvirt { .. } => {
            anyhow::bail!("this build has no libvirt backend; use --backend fake")
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Resources in words.
fn resources(r: Resources) -> String {
    format!(
        "{} vCPUs, {} MiB, {} GiB",
        r.vcpus, r.memory_mib, r.disk_gib
    )
}

fn joined<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The config, field by field, secrets masked.
fn config_fields(c: &Config) -> Vec<(&'static str, String)> {
    let backend = match &c.backend {
        Backend::Libvirt { uri, kind } => format!("libvirt {uri} ({kind:?})").to_lowercase(),
        Backend::Fake {
            kind,
            vcpus,
            memory_mib,
        } => format!("fake ({kind}, {vcpus} vCPUs, {memory_mib} MiB)"),
    };
    vec![
        ("node", c.node_id.to_string()),
        (
            "brokers",
            joined(c.brokers.iter().map(|b| {
                format!(
                    "{}://{}:{}",
                    if b.tls { "mqtts" } else { "mqtt" },
                    b.host,
                    b.port
                )
            })),
        ),
        (
            "login",
            c.credentials.as_ref().map_or("none".into(), |cr| {
                format!("{} (password set)", cr.username)
            }),
        ),
        (
            "tls",
            c.tls.as_ref().map_or("no".into(), |t| {
                format!(
                    "CA pinned{}",
                    if t.client.is_some() {
                        ", client certificate"
                    } else {
                        ""
                    }
                )
            }),
        ),
        ("labels", joined(c.labels.iter())),
        ("reserved", resources(c.reserved)),
        ("hypervisor", backend),
        ("state dir", c.state_dir.display().to_string()),
        ("image dir", c.image_dir.display().to_string()),
        ("instance dir", c.instance_dir.display().to_string()),
        ("report every", format!("{} s", c.report_interval.as_secs())),
        (
            "reconcile every",
            format!("{} s", c.reconcile_interval.as_secs()),
        ),
        ("stop timeout", format!("{} s", c.stop_timeout.as_secs())),
        (
            "downloads",
            format!(
                "{} at once, {}, {} MiB kept free, stall {} s, {} attempts, unused kept {} h",
                c.downloads.concurrent,
                match c.downloads.rate {
                    0 => "no rate limit".to_owned(),
                    r => format!("at most {} KiB/s", r / 1024),
                },
                c.downloads.reserve >> 20,
                c.downloads.stall.as_secs(),
                c.downloads.attempts,
                c.downloads.ttl.as_secs() / 3600
            ),
        ),
    ]
}

/// The inventory, field by field.
fn inventory_fields(i: &outpost_protocol::Inventory) -> Vec<(&'static str, String)> {
    vec![
        ("arch", i.arch.to_string()),
        ("hypervisor", i.hypervisor.to_string()),
        ("total", resources(i.total)),
        ("reserved", resources(i.reserved)),
        ("allocatable", resources(i.allocatable())),
        ("labels", joined(i.labels.iter())),
        ("images", joined(i.images.iter())),
    ]
}

/// Prints `name  value` lines, or one JSON object.
fn print_fields(fields: &[(&'static str, String)], json: bool) {
    if json {
        let map: serde_json::Map<String, serde_json::Value> = fields
            .iter()
            .map(|(k, v)| (k.replace(' ', "_"), serde_json::Value::String(v.clone())))
            .collect();
        println!("{}", serde_json::Value::Object(map));
    } else {
        for (k, v) in fields {
            println!("{k:<16}{v}");
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // MQTT over TLS uses ring: the process's one rustls provider, chosen here.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_max_level(cli.log_level)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cfg = load_config(&cli)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig { json } => {
            print_fields(&config_fields(&cfg), json);
            Ok(())
        }
        Command::Fingerprint { json } => {
            let hv = open_hypervisor(&cfg)?;
            let host = hv.host()?;
            let images = outpost_agent::fingerprint::scan_images(&cfg.image_dir);
            let disk = outpost_agent::fingerprint::disk_free_gib(&cfg.state_dir);
            let cached = outpost_agent::images::Cache::new(&cfg.image_dir).reported();
            let (inv, _) = outpost_agent::fingerprint::describe(
                host,
                disk,
                cfg.reserved,
                &cfg.labels,
                images,
                cached,
            );
            print_fields(&inventory_fields(&inv), json);
            Ok(())
        }
        Command::Run => {
            // libvirtd may start after the agent, or be restarting: wait for it with back-off.
            let mut backoff = outpost_protocol::Backoff::new(
                std::time::Duration::from_secs(1),
                outpost_agent::shell::RECONNECT_MAX,
            );
            let hv = loop {
                match open_hypervisor(&cfg) {
                    Ok(hv) => break hv,
                    Err(e) if matches!(cfg.backend, Backend::Libvirt { .. }) => {
                        let wait = backoff.next_delay();
                        tracing::warn!(
                            error = format!("{e:#}"),
                            retry_in_s = wait.as_secs(),
                            "hypervisor not available yet; VMs keep running"
                        );
                        std::thread::sleep(wait);
                    }
                    Err(e) => return Err(e),
                }
            };
            let counters = rt.block_on(outpost_agent::shell::run(cfg, hv, shutdown_signal()))?;
            if counters.malformed > 0 {
                tracing::info!(
                    malformed = counters.malformed,
                    "malformed messages were dropped"
                );
            }
            Ok(())
        }
    }
}

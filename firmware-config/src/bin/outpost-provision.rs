//! `outpost-provision`: onboard edge devices. Creates each device's identity and secret, the
//! broker's password file and ACL, installs the agent onto a target root, and inspects flashed
//! configs.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use outpost_firmware_config::enrolled::{self, Enrolled};
use outpost_firmware_config::human::{HumanConfig, text};
use outpost_firmware_config::provision::{self, Registry};

/// The systemd unit installed with the agent.
const UNIT: &str = include_str!("../../../agent/outpost-agent.service");

/// Onboard Outpost edge devices: identities, secrets, broker ACLs, installation.
#[derive(Debug, Parser)]
#[command(name = "outpost-provision", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a device: a fresh secret, its flashed config, and its broker entry and ACL.
    Device(DeviceArgs),
    /// Create (once) and print the controller's broker credentials.
    Controller {
        /// The registry directory.
        #[arg(long, default_value = "outpost-registry")]
        registry: PathBuf,
        /// A further controller of the same fleet (high availability): its own broker login,
        /// outpost-controller-NAME, with the controller's rights.
        #[arg(long)]
        name: Option<String>,
    },
    /// Print a mosquitto configuration that uses the registry's password file and ACL.
    MosquittoConf {
        /// The registry directory.
        #[arg(long, default_value = "outpost-registry")]
        registry: PathBuf,
        /// Listener address, HOST:PORT.
        #[arg(long, default_value = "0.0.0.0:1883")]
        listen: String,
    },
    /// Install the agent, a device's flashed config and the systemd unit into a target root.
    Install {
        /// The target root (an SD card's mounted root partition, or a directory image).
        #[arg(long)]
        root: PathBuf,
        /// The device's flashed config (REGISTRY/devices/NODE/device.bin).
        #[arg(long)]
        device: PathBuf,
        /// The agent binary for the device's architecture.
        #[arg(long)]
        agent_bin: PathBuf,
        /// Replace another device's identity already installed there.
        #[arg(long)]
        force: bool,
    },
    /// Revoke a device: remove its broker entry, so it can no longer log in (reload mosquitto
    /// afterwards; the embedded broker's gate applies it at the device's next connect).
    Revoke {
        /// The node id.
        node_id: String,
        /// The registry directory.
        #[arg(long, default_value = "outpost-registry")]
        registry: PathBuf,
    },
    /// Decode a flashed config, verify its CRC, and print it with secrets masked.
    Inspect {
        /// The flashed config.
        file: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct DeviceArgs {
    /// The node id (lowercase letters, digits, - _ .); a fresh one (edge-<12 hex>) if omitted.
    node_id: Option<String>,
    /// The registry directory.
    #[arg(long, default_value = "outpost-registry")]
    registry: PathBuf,
    /// Broker URL, mqtt:// or mqtts:// (repeat for fallbacks).
    #[arg(long = "broker", required = true)]
    brokers: Vec<String>,
    /// CA certificate (PEM) for mqtts:// brokers.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// A label, key=value (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// vCPUs kept for the host.
    #[arg(long, default_value_t = 0)]
    reserve_vcpus: u16,
    /// Memory (MiB) kept for the host.
    #[arg(long, default_value_t = 0)]
    reserve_memory: u32,
    /// Disk (GiB) kept for the host.
    #[arg(long, default_value_t = 0)]
    reserve_disk: u32,
    /// The most vCPUs the device may ever offer (kept in the registry, not on the device; the
    /// controller started with `--registry` counts no more until `outpost nodes
    /// approve-capacity`). Unset: its first report is trusted.
    #[arg(long)]
    max_vcpus: Option<u16>,
    /// The most memory (MiB) the device may ever offer (see --max-vcpus).
    #[arg(long)]
    max_memory: Option<u32>,
    /// The most disk (GiB) the device may ever offer (see --max-vcpus).
    #[arg(long)]
    max_disk: Option<u32>,
    /// The agent's state directory on the device.
    #[arg(long)]
    state_dir: Option<String>,
    /// libvirt URI on the device.
    #[arg(long)]
    libvirt_uri: Option<String>,
    /// Replace an existing identity (a new secret: the old one stops working).
    #[arg(long)]
    force: bool,
}

fn device(a: DeviceArgs) -> anyhow::Result<()> {
    let labels: BTreeMap<String, String> = a
        .labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .context("labels are key=value")
        })
        .collect::<anyhow::Result<_>>()?;
    let human = HumanConfig {
        node_id: match &a.node_id {
            Some(n) => n.clone(),
            None => provision::new_node_id()?.to_string(),
        },
        brokers: a.brokers,
        username: None,
        password: None,
        ca_file: a.ca_file,
        client_cert_file: None,
        client_key_file: None,
        labels,
        reserved: outpost_firmware_config::human::ReservedToml {
            vcpus: a.reserve_vcpus,
            memory_mib: a.reserve_memory,
            disk_gib: a.reserve_disk,
        },
        hypervisor: Default::default(),
        state_dir: a.state_dir,
        image_dir: None,
        report_interval_secs: None,
        reconcile_interval_secs: None,
        downloads: None,
    };
    let mut cfg = human.resolve(&std::env::current_dir()?)?;
    if let Some(u) = &a.libvirt_uri {
        cfg.hypervisor.uri = Some(text(u, "--libvirt-uri")?);
    }
    let reg = Registry::new(&a.registry);
    let cfg = reg.create_device(cfg, a.force)?;
    let ceiling = Enrolled {
        vcpus: a.max_vcpus,
        memory_mib: a.max_memory,
        disk_gib: a.max_disk,
    };
    let ceiling_file = enrolled::path(&a.registry, &cfg.node_id);
    enrolled::write(&a.registry, &cfg.node_id, &ceiling)
        .with_context(|| format!("writing {}", ceiling_file.display()))?;
    println!("device {} created", cfg.node_id);
    if !ceiling.is_empty() {
        println!(
            "  capacity limit  {} (read by outpost-controller serve --registry {})",
            ceiling_file.display(),
            a.registry.display()
        );
    }
    println!(
        "  flashed config  {}",
        reg.device_path(&cfg.node_id).display()
    );
    println!(
        "  broker entry    {} (and ACL {})",
        reg.passwd_path().display(),
        reg.acl_path().display()
    );
    println!(
        "  a running mosquitto reads it on reload: kill -HUP $(pidof mosquitto); the embedded broker's gate reads it at every connect"
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Device(a) => device(a),
        Command::Controller { registry, name } => {
            let reg = Registry::new(&registry);
            let pw = reg.controller_password_for(name.as_deref())?;
            println!(
                "username {}\npassword {pw}",
                provision::controller_user(name.as_deref())
            );
            Ok(())
        }
        Command::MosquittoConf { registry, listen } => {
            let reg = Registry::new(&registry);
            // The ACL of this build (a registry made by an older one gains the new topics).
            reg.write_acl()?;
            print!("{}", reg.mosquitto_conf(&listen));
            Ok(())
        }
        Command::Install {
            root,
            device,
            agent_bin,
            force,
        } => {
            if !root.is_dir() {
                bail!(
                    "{} is not a directory (mount the device's root partition first)",
                    root.display()
                );
            }
            // Progress on a terminal; one line in a log.
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let mut last = 0;
            let done = provision::install(&root, &device, &agent_bin, UNIT, force, |n, total| {
                let pct = (n * 100).checked_div(total).unwrap_or(100);
                if tty && (pct >= last + 10 || n == total) {
                    last = pct;
                    eprint!("\rcopying the agent: {pct:>3}% ({n} of {total} bytes)");
                    let _ = std::io::stderr().flush();
                } else if !tty && n == total {
                    eprint!("copied the agent ({total} bytes)");
                }
            })?;
            eprintln!();
            println!("installed device {} into {}", done.node, root.display());
            for f in done.files {
                println!("  /{}", f.display());
            }
            Ok(())
        }
        Command::Revoke { node_id, registry } => {
            let node = outpost_protocol::NodeId::new(&node_id)
                .with_context(|| format!("{node_id:?} is not a node id"))?;
            Registry::new(&registry).revoke(&node)?;
            println!("revoked {node}: it can no longer log in to the broker");
            println!("  a running mosquitto applies it on reload: kill -HUP $(pidof mosquitto)");
            Ok(())
        }
        Command::Inspect { file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            print!("{}", provision::inspect(&bytes)?);
            Ok(())
        }
    }
}

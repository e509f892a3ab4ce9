//! The agent's configuration: a serde file form, validated into a typed [`Config`].
//! Files are read by `main.rs`; everything here is pure.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use outpost_protocol::{HypervisorKind, IdError, Label, Labels, NodeId, Resources};
use serde::Deserialize;

/// Default MQTT broker when none is configured: the controller's embedded broker on loopback.
pub const DEFAULT_BROKER: &str = "mqtt://127.0.0.1:1883";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/outpost";
/// Default libvirt URI.
pub const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";
/// Default interval between usage reports.
pub const DEFAULT_REPORT_INTERVAL_SECS: u64 = 10;
/// Default interval between reconciliation passes (they also run after every change).
pub const DEFAULT_RECONCILE_INTERVAL_SECS: u64 = 5;
/// Default time a guest gets to shut down on ACPI power-off before it is forced off.
pub const DEFAULT_STOP_TIMEOUT_SECS: u64 = 20;

/// Why a configuration is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not valid TOML for this schema.
    #[error("invalid config file: {0}")]
    Parse(#[from] toml::de::Error),
    /// The node id is invalid.
    #[error("invalid node_id: {0}")]
    NodeId(IdError),
    /// A label is invalid.
    #[error("invalid label {key:?}: {source}")]
    Label {
        /// The label's key.
        key: String,
        /// What is wrong with it.
        source: IdError,
    },
    /// More labels than the wire allows.
    #[error("at most {} labels are allowed", outpost_protocol::limits::MAX_LABELS)]
    TooManyLabels,
    /// A broker address is not `mqtt://HOST:PORT` or `HOST:PORT`.
    #[error("invalid broker address {0:?}: expected mqtt://HOST:PORT")]
    Broker(String),
    /// An interval is zero.
    #[error("{0} must be at least 1 second")]
    ZeroInterval(&'static str),
    /// A username without a password, or the reverse.
    #[error("username and password must be given together")]
    HalfCredentials,
}

/// The config file, as written by people or by `outpost-firmware-config`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The node's identity; also its MQTT username.
    pub node_id: String,
    /// Broker addresses, tried in order (`mqtt://HOST:PORT`).
    #[serde(default)]
    pub brokers: Vec<String>,
    /// MQTT username (normally the node id).
    pub username: Option<String>,
    /// MQTT password (the device's own secret).
    pub password: Option<String>,
    /// Labels such as `zone` and `site`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Resources kept for the host itself.
    #[serde(default)]
    pub reserved: ReservedFile,
    /// The hypervisor backend.
    #[serde(default)]
    pub hypervisor: HypervisorFile,
    /// Where the agent keeps its desired state and instance files.
    pub state_dir: Option<PathBuf>,
    /// Where base images, kernels and initrds are cached (default: `STATE_DIR/images`).
    pub image_dir: Option<PathBuf>,
    /// Seconds between usage reports.
    pub report_interval_secs: Option<u64>,
    /// Seconds between reconciliation passes.
    pub reconcile_interval_secs: Option<u64>,
}

/// Host reservations in the file form.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservedFile {
    /// vCPUs kept for the host.
    #[serde(default)]
    pub vcpus: u16,
    /// Memory (MiB) kept for the host.
    #[serde(default)]
    pub memory_mib: u32,
    /// Disk (GiB) kept for the host.
    #[serde(default)]
    pub disk_gib: u32,
}

/// The hypervisor section of the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HypervisorFile {
    /// `libvirt` (default) or `fake`.
    #[serde(default)]
    pub backend: BackendName,
    /// libvirt connection URI (default `qemu:///system`).
    pub uri: Option<String>,
    /// `auto` (default: probe), `kvm` or `emulated`. For the fake backend: what it claims.
    #[serde(default)]
    pub kind: KindChoice,
    /// Seconds a guest gets to power off cleanly before it is forced off.
    pub stop_timeout_secs: Option<u64>,
    /// Fake backend only: vCPUs it reports.
    pub fake_vcpus: Option<u16>,
    /// Fake backend only: memory (MiB) it reports.
    pub fake_memory_mib: Option<u32>,
}

/// Which backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendName {
    /// libvirt (the real one).
    #[default]
    Libvirt,
    /// In-memory fake, for simulation and tests.
    Fake,
}

/// KVM or emulation: probed, or forced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KindChoice {
    /// Probe: KVM if the host offers it and a KVM guest actually starts.
    #[default]
    Auto,
    /// Use KVM without probing.
    Kvm,
    /// Use software emulation (QEMU TCG).
    Emulated,
}

/// A broker endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Broker {
    /// Parses `mqtt://HOST:PORT`, `HOST:PORT` or `[V6]:PORT`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::Broker(s.to_owned());
        let rest = s.strip_prefix("mqtt://").unwrap_or(s);
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port.parse().map_err(|_| bad())?;
        if host.is_empty() || host.contains('/') {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

/// The validated backend choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// libvirt at `uri`.
    Libvirt {
        /// Connection URI.
        uri: String,
        /// KVM probing or forcing.
        kind: KindChoice,
    },
    /// The fake backend, claiming these host facts.
    Fake {
        /// What it claims to be.
        kind: HypervisorKind,
        /// vCPUs it reports.
        vcpus: u16,
        /// Memory it reports.
        memory_mib: u32,
    },
}

/// The validated, typed configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node's identity.
    pub node_id: NodeId,
    /// Brokers, tried in order.
    pub brokers: Vec<Broker>,
    /// MQTT credentials.
    pub credentials: Option<(String, String)>,
    /// The node's labels.
    pub labels: Labels,
    /// Resources kept for the host.
    pub reserved: Resources,
    /// The hypervisor backend.
    pub backend: Backend,
    /// State directory (desired state, instances).
    pub state_dir: PathBuf,
    /// Image cache.
    pub image_dir: PathBuf,
    /// Per-instance files (overlay disk, console log).
    pub instance_dir: PathBuf,
    /// Between usage reports.
    pub report_interval: Duration,
    /// Between reconciliation passes.
    pub reconcile_interval: Duration,
    /// Clean shutdown allowance before a forced stop.
    pub stop_timeout: Duration,
}

fn seconds(v: Option<u64>, default: u64, what: &'static str) -> Result<Duration, ConfigError> {
    match v.unwrap_or(default) {
        0 => Err(ConfigError::ZeroInterval(what)),
        s => Ok(Duration::from_secs(s)),
    }
}

impl FileConfig {
    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Checks everything and produces the typed config.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let node_id = NodeId::new(&self.node_id).map_err(ConfigError::NodeId)?;
        let brokers = if self.brokers.is_empty() {
            vec![Broker::parse(DEFAULT_BROKER)?]
        } else {
            self.brokers
                .iter()
                .map(|b| Broker::parse(b))
                .collect::<Result<_, _>>()?
        };
        let credentials = match (self.username, self.password) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            _ => return Err(ConfigError::HalfCredentials),
        };
        let mut labels = Labels::new();
        for (k, v) in &self.labels {
            let label = Label::parse(&format!("{k}={v}")).map_err(|source| ConfigError::Label {
                key: k.clone(),
                source,
            })?;
            labels.push(label).map_err(|_| ConfigError::TooManyLabels)?;
        }
        let hv = self.hypervisor;
        let backend = match hv.backend {
            BackendName::Libvirt => Backend::Libvirt {
                uri: hv.uri.unwrap_or_else(|| DEFAULT_LIBVIRT_URI.to_owned()),
                kind: hv.kind,
            },
            BackendName::Fake => Backend::Fake {
                kind: match hv.kind {
                    KindChoice::Auto => HypervisorKind::Fake,
                    KindChoice::Kvm => HypervisorKind::Kvm,
                    KindChoice::Emulated => HypervisorKind::Emulated,
                },
                vcpus: hv.fake_vcpus.unwrap_or(8),
                memory_mib: hv.fake_memory_mib.unwrap_or(16 * 1024),
            },
        };
        let state_dir = self
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        Ok(Config {
            image_dir: self.image_dir.unwrap_or_else(|| state_dir.join("images")),
            instance_dir: state_dir.join("instances"),
            state_dir,
            node_id,
            brokers,
            credentials,
            labels,
            reserved: Resources {
                vcpus: self.reserved.vcpus,
                memory_mib: self.reserved.memory_mib,
                disk_gib: self.reserved.disk_gib,
            },
            backend,
            report_interval: seconds(
                self.report_interval_secs,
                DEFAULT_REPORT_INTERVAL_SECS,
                "report_interval_secs",
            )?,
            reconcile_interval: seconds(
                self.reconcile_interval_secs,
                DEFAULT_RECONCILE_INTERVAL_SECS,
                "reconcile_interval_secs",
            )?,
            stop_timeout: Duration::from_secs(
                hv.stop_timeout_secs.unwrap_or(DEFAULT_STOP_TIMEOUT_SECS),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = FileConfig::from_toml("node_id = \"edge-1\"")
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.node_id.as_str(), "edge-1");
        assert_eq!(
            c.brokers,
            vec![Broker {
                host: "127.0.0.1".into(),
                port: 1883
            }]
        );
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/outpost"));
        assert_eq!(c.image_dir, PathBuf::from("/var/lib/outpost/images"));
        assert_eq!(
            c.backend,
            Backend::Libvirt {
                uri: "qemu:///system".into(),
                kind: KindChoice::Auto
            }
        );
    }

    #[test]
    fn full_config_parses() {
        let text = r#"
            node_id = "edge-2"
            brokers = ["mqtt://10.0.0.1:1883", "broker.local:8883"]
            username = "edge-2"
            password = "s3cret"
            state_dir = "/srv/outpost"
            report_interval_secs = 30
            [labels]
            zone = "north"
            [reserved]
            vcpus = 1
            memory_mib = 512
            [hypervisor]
            backend = "fake"
            kind = "kvm"
            fake_vcpus = 4
        "#;
        let c = FileConfig::from_toml(text).unwrap().validate().unwrap();
        assert_eq!(c.brokers.len(), 2);
        assert_eq!(c.brokers[1].port, 8883);
        assert_eq!(c.labels[0].to_string(), "zone=north");
        assert_eq!(c.reserved.memory_mib, 512);
        assert_eq!(c.report_interval, Duration::from_secs(30));
        assert!(matches!(
            c.backend,
            Backend::Fake {
                kind: HypervisorKind::Kvm,
                vcpus: 4,
                ..
            }
        ));
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let c = FileConfig::from_toml(include_str!("../agent.example.toml"))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.node_id.as_str(), "edge-01");
        assert_eq!(c.labels.len(), 2);
    }

    #[test]
    fn bad_configs_get_clear_errors() {
        let err = |t: &str| {
            FileConfig::from_toml(t)
                .and_then(FileConfig::validate)
                .unwrap_err()
                .to_string()
        };
        assert!(err("node_id = \"Bad/Id\"").starts_with("invalid node_id"));
        assert!(err("node_id = \"a\"\nbogus = 1").contains("unknown field"));
        assert!(err("node_id = \"a\"\nbrokers = [\"nope\"]").contains("invalid broker address"));
        assert!(err("node_id = \"a\"\nusername = \"a\"").contains("together"));
        assert!(err("node_id = \"a\"\nreport_interval_secs = 0").contains("at least 1 second"));
        assert!(err("node_id = \"a\"\n[labels]\nzone = \"a b\"").contains("invalid label"));
    }
}

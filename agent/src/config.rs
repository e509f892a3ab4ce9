//! The agent's typed runtime configuration, made from a [`DeviceConfig`] (the flashed form or
//! its TOML human form, both owned by `outpost-firmware-config`). Pure: files are read in
//! `main.rs`.

use std::path::PathBuf;
use std::time::Duration;

pub use outpost_firmware_config::{BackendName, DeviceConfig, KindChoice};
use outpost_protocol::{HypervisorKind, Labels, NodeId, Resources};

/// Default MQTT broker when none is configured: the controller's embedded broker on loopback.
pub const DEFAULT_BROKER: &str = "mqtt://127.0.0.1:1883";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/outpost";
/// Default libvirt URI.
pub const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";
/// Default interval between usage reports.
pub const DEFAULT_REPORT_INTERVAL_SECS: u16 = 10;
/// Default interval between reconciliation passes (they also run after every change).
pub const DEFAULT_RECONCILE_INTERVAL_SECS: u16 = 5;
/// Default time a guest gets to shut down on ACPI power-off before it is forced off.
pub const DEFAULT_STOP_TIMEOUT_SECS: u16 = 20;
/// Default vCPUs the fake backend reports.
pub const DEFAULT_FAKE_VCPUS: u16 = 8;
/// Default memory the fake backend reports.
pub const DEFAULT_FAKE_MEMORY_MIB: u32 = 16 * 1024;

/// Why a device config cannot run an agent.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A broker URL is not `mqtt://HOST:PORT` or `mqtts://HOST:PORT`.
    #[error("invalid broker address {0:?}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")]
    Broker(String),
    /// A TLS broker without a CA certificate to verify it against.
    #[error("broker {0} uses TLS but no CA certificate (ca_file) is configured")]
    NoCa(String),
    /// An interval is zero.
    #[error("{0} must be at least 1 second")]
    ZeroInterval(&'static str),
    /// The device config itself is invalid.
    #[error(transparent)]
    Device(#[from] outpost_firmware_config::human::ConfigError),
}

/// A broker endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// MQTT over TLS.
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// TLS material, PEM-encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct Tls {
    /// The CA the broker's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// Client certificate and key, for mutual TLS.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("client_cert", &self.client.is_some())
            .finish()
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

/// Username and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The MQTT username.
    pub username: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, ********)", self.username)
    }
}

/// The validated, typed configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node's identity.
    pub node_id: NodeId,
    /// Brokers, tried in order.
    pub brokers: Vec<Broker>,
    /// MQTT credentials.
    pub credentials: Option<Credentials>,
    /// TLS material (needed by `mqtts://` brokers).
    pub tls: Option<Tls>,
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
    /// How images are downloaded and cached.
    pub downloads: Downloads,
    /// Where to serve Prometheus metrics (loopback only; `--metrics-listen`).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// How images are downloaded and cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloads {
    /// At most this many downloads at once.
    pub concurrent: usize,
    /// At most this many bytes per second in all (0: no limit).
    pub rate: u64,
    /// Bytes kept free on the image directory's file system.
    pub reserve: u64,
    /// No byte for this long: the transfer is resumed on a new connection.
    pub stall: Duration,
    /// Cached images no instance uses are removed after this long unused.
    pub ttl: Duration,
    /// Transfer attempts before a download fails.
    pub attempts: u32,
}

impl Default for Downloads {
    fn default() -> Self {
        Self {
            concurrent: 2,
            rate: 0,
            reserve: 256 << 20,
            stall: Duration::from_secs(30),
            ttl: Duration::from_secs(24 * 3600),
            attempts: 10,
        }
    }
}

fn seconds(v: Option<u16>, default: u16, what: &'static str) -> Result<Duration, ConfigError> {
    match v.unwrap_or(default) {
        0 => Err(ConfigError::ZeroInterval(what)),
        s => Ok(Duration::from_secs(u64::from(s))),
    }
}

impl Config {
    /// The runtime config of a device.
    pub fn from_device(d: &DeviceConfig) -> Result<Self, ConfigError> {
        let urls: Vec<&str> = if d.brokers.is_empty() {
            vec![DEFAULT_BROKER]
        } else {
            d.brokers.iter().map(|b| b.as_str()).collect()
        };
        let brokers = urls
            .into_iter()
            .map(|u| {
                outpost_firmware_config::parse_broker(u)
                    .map(|b| Broker {
                        tls: b.tls,
                        host: b.host.to_owned(),
                        port: b.port,
                    })
                    .ok_or_else(|| ConfigError::Broker(u.to_owned()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tls = d.ca_cert.as_ref().map(|ca| Tls {
            ca_pem: ca.as_bytes().to_vec(),
            client: d
                .client_cert
                .as_ref()
                .zip(d.client_key.as_ref())
                .map(|(c, k)| (c.as_bytes().to_vec(), k.expose().as_bytes().to_vec())),
        });
        if let Some(b) = brokers.iter().find(|b| b.tls && tls.is_none()) {
            return Err(ConfigError::NoCa(format!("{}:{}", b.host, b.port)));
        }
        let hv = &d.hypervisor;
        let backend = match hv.backend {
            BackendName::Libvirt => Backend::Libvirt {
                uri: hv
                    .uri
                    .as_ref()
                    .map_or(DEFAULT_LIBVIRT_URI, |u| u.as_str())
                    .to_owned(),
                kind: hv.kind,
            },
            BackendName::Fake => Backend::Fake {
                kind: match hv.kind {
                    KindChoice::Auto => HypervisorKind::Fake,
                    KindChoice::Kvm => HypervisorKind::Kvm,
                    KindChoice::Emulated => HypervisorKind::Emulated,
                },
                vcpus: hv.fake_vcpus.unwrap_or(DEFAULT_FAKE_VCPUS),
                memory_mib: hv.fake_memory_mib.unwrap_or(DEFAULT_FAKE_MEMORY_MIB),
            },
        };
        let state_dir = PathBuf::from(
            d.state_dir
                .as_ref()
                .map_or(DEFAULT_STATE_DIR, |s| s.as_str()),
        );
        Ok(Self {
            node_id: d.node_id.clone(),
            brokers,
            credentials: d
                .username
                .as_ref()
                .zip(d.password.as_ref())
                .map(|(u, p)| Credentials {
                    username: u.to_string(),
                    password: p.expose().to_owned(),
                }),
            tls,
            labels: d.labels.clone(),
            reserved: d.reserved,
            backend,
            image_dir: d
                .image_dir
                .as_ref()
                .map_or_else(|| state_dir.join("images"), |p| PathBuf::from(p.as_str())),
            instance_dir: state_dir.join("instances"),
            state_dir,
            report_interval: seconds(
                d.report_interval_secs,
                DEFAULT_REPORT_INTERVAL_SECS,
                "report_interval_secs",
            )?,
            reconcile_interval: seconds(
                d.reconcile_interval_secs,
                DEFAULT_RECONCILE_INTERVAL_SECS,
                "reconcile_interval_secs",
            )?,
            stop_timeout: Duration::from_secs(u64::from(
                hv.stop_timeout_secs.unwrap_or(DEFAULT_STOP_TIMEOUT_SECS),
            )),
            downloads: {
                let def = Downloads::default();
                let dl = d.downloads.clone().unwrap_or_default();
                Downloads {
                    concurrent: dl.max_downloads.map_or(def.concurrent, usize::from),
                    rate: dl.max_download_rate.unwrap_or(def.rate),
                    reserve: dl.reserve_mib.map_or(def.reserve, |m| u64::from(m) << 20),
                    stall: dl
                        .stall_timeout_secs
                        .map_or(def.stall, |s| Duration::from_secs(u64::from(s))),
                    ttl: dl
                        .cache_ttl_hours
                        .map_or(def.ttl, |h| Duration::from_secs(u64::from(h) * 3600)),
                    attempts: dl.attempts.map_or(def.attempts, u32::from),
                }
            },
            metrics_listen: None,
        })
    }

    /// Parses a TOML human-form config (certificate paths relative to the current directory).
    /// For tests and tools; the agent itself loads files through `outpost_firmware_config`.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let d = outpost_firmware_config::human::HumanConfig::from_toml(text)?
            .resolve(std::path::Path::new("."))?;
        Self::from_device(&d)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml("node_id = \"edge-1\"").unwrap();
        assert_eq!(c.node_id.as_str(), "edge-1");
        assert_eq!(
            c.brokers,
            vec![Broker {
                tls: false,
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
        assert_eq!(c.stop_timeout, Duration::from_secs(20));
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
        let c = Config::from_toml(text).unwrap();
        assert_eq!(c.brokers.len(), 2);
        assert_eq!(c.brokers[1].port, 8883);
        assert_eq!(c.labels[0].to_string(), "zone=north");
        assert_eq!(c.reserved.memory_mib, 512);
        assert_eq!(c.report_interval, Duration::from_secs(30));
        assert!(!format!("{c:?}").contains("s3cret"));
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
        let c = Config::from_toml(include_str!("../agent.example.toml")).unwrap();
        assert_eq!(c.node_id.as_str(), "edge-01");
        assert_eq!(c.labels.len(), 2);
    }

    #[test]
    fn tls_broker_needs_a_ca() {
        let err = Config::from_toml("node_id = \"a\"\nbrokers = [\"mqtts://b:8883\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no CA certificate"), "{err}");
    }
}

//! The device config schema: bounded, `no_std`, the same in memory and on flash.

use core::fmt;

use outpost_protocol::{Labels, NodeId, Resources};
use serde::{Deserialize, Serialize};

/// Most broker endpoints (the primary and its fallbacks).
pub const MAX_BROKERS: usize = 4;
/// Longest broker URL (`mqtt://HOST:PORT` or `mqtts://HOST:PORT`).
pub const MAX_URL_LEN: usize = 128;
/// Longest MQTT username.
pub const MAX_USERNAME_LEN: usize = 64;
/// Longest password.
pub const MAX_PASSWORD_LEN: usize = 128;
/// Longest PEM document (a certificate or a key).
pub const MAX_PEM_LEN: usize = 4096;
/// Longest path or libvirt URI.
pub const MAX_PATH_LEN: usize = 128;

/// A bounded string.
pub type Text<const N: usize> = heapless::String<N>;

/// A secret (a password or a private key): never printed.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret<const N: usize>(pub Text<N>);

impl<const N: usize> Secret<N> {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }
}

impl<const N: usize> fmt::Debug for Secret<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"********\"")
    }
}

/// Which hypervisor backend the agent uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendName {
    /// libvirt (the real one).
    #[default]
    Libvirt,
    /// In-memory fake, for simulation and tests.
    Fake,
}

/// KVM or software emulation: probed, or forced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KindChoice {
    /// Probe: KVM if the host offers it and a KVM guest actually starts.
    #[default]
    Auto,
    /// KVM, without probing.
    Kvm,
    /// Software emulation (QEMU TCG).
    Emulated,
}

/// The hypervisor section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HypervisorConfig {
    /// `libvirt` (default) or `fake`.
    #[serde(default)]
    pub backend: BackendName,
    /// libvirt connection URI (default `qemu:///system`).
    #[serde(default)]
    pub uri: Option<Text<MAX_PATH_LEN>>,
    /// `auto` (default), `kvm` or `emulated`; for the fake backend, what it claims to be.
    #[serde(default)]
    pub kind: KindChoice,
    /// Seconds a guest gets to power off cleanly before it is forced off.
    #[serde(default)]
    pub stop_timeout_secs: Option<u16>,
    /// Fake backend only: vCPUs it reports.
    #[serde(default)]
    pub fake_vcpus: Option<u16>,
    /// Fake backend only: memory (MiB) it reports.
    #[serde(default)]
    pub fake_memory_mib: Option<u32>,
}

/// How the agent downloads and caches images (every field optional: defaults in the agent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadsConfig {
    /// At most this many bytes per second over all downloads (absent or 0: no limit).
    #[serde(default)]
    pub max_download_rate: Option<u64>,
    /// At most this many downloads at once (default 2).
    #[serde(default)]
    pub max_downloads: Option<u8>,
    /// MiB kept free on the image directory's file system (default 256).
    #[serde(default)]
    pub reserve_mib: Option<u32>,
    /// Seconds without a byte before a transfer is resumed on a new connection (default 30).
    #[serde(default)]
    pub stall_timeout_secs: Option<u16>,
    /// Transfer attempts before a download fails (default 10).
    #[serde(default)]
    pub attempts: Option<u16>,
    /// Hours an unused cached image is kept (default 24).
    #[serde(default)]
    pub cache_ttl_hours: Option<u16>,
}

/// Everything one device needs to join a fleet: its identity, where and how to reach the
/// broker, its labels and reservations, and where it keeps its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// The node's identity; also its MQTT username and topic namespace.
    pub node_id: NodeId,
    /// Broker URLs, tried in order: `mqtt://HOST:PORT` or `mqtts://HOST:PORT` (TLS).
    pub brokers: heapless::Vec<Text<MAX_URL_LEN>, MAX_BROKERS>,
    /// MQTT username (the node id, for a provisioned device).
    pub username: Option<Text<MAX_USERNAME_LEN>>,
    /// MQTT password: the device's own secret.
    pub password: Option<Secret<MAX_PASSWORD_LEN>>,
    /// CA certificate (PEM) that the broker's TLS certificate must chain to.
    pub ca_cert: Option<Text<MAX_PEM_LEN>>,
    /// Client certificate (PEM) for mutual TLS.
    pub client_cert: Option<Text<MAX_PEM_LEN>>,
    /// The client certificate's private key (PEM).
    pub client_key: Option<Secret<MAX_PEM_LEN>>,
    /// The node's labels (`zone`, `site`...).
    pub labels: Labels,
    /// Resources kept for the host itself.
    pub reserved: Resources,
    /// The hypervisor.
    pub hypervisor: HypervisorConfig,
    /// State directory (default `/var/lib/outpost`).
    pub state_dir: Option<Text<MAX_PATH_LEN>>,
    /// Image cache (default `STATE_DIR/images`).
    pub image_dir: Option<Text<MAX_PATH_LEN>>,
    /// Seconds between usage reports.
    pub report_interval_secs: Option<u16>,
    /// Seconds between reconciliation passes.
    pub reconcile_interval_secs: Option<u16>,
    /// Image downloads (since flashed format version 2; its last field, so that a version 1
    /// body reads as this one with `None` here).
    pub downloads: Option<DownloadsConfig>,
}

impl DeviceConfig {
    /// A config with only a node id and defaults everywhere else.
    pub fn new(node_id: NodeId) -> Self {
        Self {
            node_id,
            brokers: heapless::Vec::new(),
            username: None,
            password: None,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            labels: Labels::new(),
            reserved: Resources::default(),
            hypervisor: HypervisorConfig::default(),
            state_dir: None,
            image_dir: None,
            report_interval_secs: None,
            reconcile_interval_secs: None,
            downloads: None,
        }
    }
}

/// A parsed broker URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerAddr<'a> {
    /// `mqtts://`: TLS.
    pub tls: bool,
    /// Host name or address (IPv6 without brackets).
    pub host: &'a str,
    /// TCP port.
    pub port: u16,
}

/// Parses `mqtt://HOST:PORT`, `mqtts://HOST:PORT` or a bare `HOST:PORT` (plain MQTT).
pub fn parse_broker(url: &str) -> Option<BrokerAddr<'_>> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else {
        (false, url.strip_prefix("mqtt://").unwrap_or(url))
    };
    let (host, port) = rest.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = port.parse().ok()?;
    if host.is_empty() || host.contains(['/', ' ', '[', ']']) {
        return None;
    }
    Some(BrokerAddr { tls, host, port })
}

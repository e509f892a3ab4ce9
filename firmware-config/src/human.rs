//! The human form of the device config: TOML, with certificates referenced by file. Resolving
//! it reads those files and checks every bound, producing the same [`DeviceConfig`] the flashed
//! form holds.

use std::borrow::ToOwned;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::vec::Vec;

use outpost_protocol::{IdError, Label, Labels, NodeId, Resources};
use serde::Deserialize;

use crate::flash::{self, FlashError};
use crate::schema::*;

/// Why a config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not valid TOML for this schema.
    #[error("invalid config: {0}")]
    Toml(#[from] toml::de::Error),
    /// The file is empty (an interrupted flash or copy).
    #[error(
        "{0} is empty (0 bytes): flash the device again (outpost-provision install) or write a TOML config there"
    )]
    Empty(PathBuf),
    /// The flashed form is damaged or foreign.
    #[error("invalid flashed config: {0}")]
    Flash(#[from] FlashError),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The node id is invalid.
    #[error("invalid node_id: {0}")]
    NodeId(IdError),
    /// A label is invalid.
    #[error("invalid label {key:?}: {source}")]
    Label {
        /// Its key.
        key: String,
        /// Why.
        source: IdError,
    },
    /// A value is longer than its bound.
    #[error("{field} is longer than {max} bytes")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its bound.
        max: usize,
    },
    /// A list has more entries than its bound.
    #[error("at most {max} {field} are allowed")]
    TooMany {
        /// Which list.
        field: &'static str,
        /// Its bound.
        max: usize,
    },
    /// A broker URL is not `mqtt://HOST:PORT` or `mqtts://HOST:PORT`.
    #[error("invalid broker address {0:?}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")]
    Broker(String),
    /// Only one of a pair was given.
    #[error("{0} must be given together")]
    Pair(&'static str),
    /// An interval of zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

/// Host reservations.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservedToml {
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

/// The TOML file, as written by people (see `agent/agent.example.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HumanConfig {
    /// The node id.
    pub node_id: String,
    /// Broker URLs, in order.
    #[serde(default)]
    pub brokers: Vec<String>,
    /// MQTT username.
    pub username: Option<String>,
    /// MQTT password.
    pub password: Option<String>,
    /// CA certificate file (PEM).
    pub ca_file: Option<PathBuf>,
    /// Client certificate file (PEM).
    pub client_cert_file: Option<PathBuf>,
    /// Client key file (PEM).
    pub client_key_file: Option<PathBuf>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Reservations.
    #[serde(default)]
    pub reserved: ReservedToml,
    /// The hypervisor.
    #[serde(default)]
    pub hypervisor: HypervisorConfig,
    /// State directory.
    pub state_dir: Option<String>,
    /// Image cache.
    pub image_dir: Option<String>,
    /// Seconds between reports.
    pub report_interval_secs: Option<u16>,
    /// Seconds between reconciliation passes.
    pub reconcile_interval_secs: Option<u16>,
    /// `[downloads]`: image download and cache settings.
    #[serde(default)]
    pub downloads: Option<crate::schema::DownloadsConfig>,
}

/// Copies `s` into a bounded string.
pub fn text<const N: usize>(s: &str, field: &'static str) -> Result<Text<N>, ConfigError> {
    let mut t = Text::new();
    t.push_str(s)
        .map_err(|_| ConfigError::TooLong { field, max: N })?;
    Ok(t)
}

fn opt_text<const N: usize>(
    s: Option<&str>,
    field: &'static str,
) -> Result<Option<Text<N>>, ConfigError> {
    s.map(|s| text(s, field)).transpose()
}

fn read_pem<const N: usize>(
    path: Option<&Path>,
    base: &Path,
    field: &'static str,
) -> Result<Option<Text<N>>, ConfigError> {
    let Some(path) = path else { return Ok(None) };
    let path = base.join(path);
    let pem =
        std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path, source })?;
    text(&pem, field).map(Some)
}

impl HumanConfig {
    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Checks every bound and reads the certificate files (relative to `base`).
    pub fn resolve(self, base: &Path) -> Result<DeviceConfig, ConfigError> {
        let mut d = DeviceConfig::new(NodeId::new(&self.node_id).map_err(ConfigError::NodeId)?);
        for b in &self.brokers {
            if parse_broker(b).is_none() {
                return Err(ConfigError::Broker(b.clone()));
            }
            d.brokers
                .push(text(b, "broker URL")?)
                .map_err(|_| ConfigError::TooMany {
                    field: "brokers",
                    max: MAX_BROKERS,
                })?;
        }
        if self.username.is_some() != self.password.is_some() {
            return Err(ConfigError::Pair("username and password"));
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err(ConfigError::Pair("client_cert_file and client_key_file"));
        }
        d.username = opt_text(self.username.as_deref(), "username")?;
        d.password = opt_text(self.password.as_deref(), "password")?.map(Secret);
        d.ca_cert = read_pem(self.ca_file.as_deref(), base, "ca_file")?;
        d.client_cert = read_pem(self.client_cert_file.as_deref(), base, "client_cert_file")?;
        d.client_key =
            read_pem(self.client_key_file.as_deref(), base, "client_key_file")?.map(Secret);
        let mut labels = Labels::new();
        for (k, v) in &self.labels {
            let l =
                Label::parse(&std::format!("{k}={v}")).map_err(|source| ConfigError::Label {
                    key: k.clone(),
                    source,
                })?;
            labels.push(l).map_err(|_| ConfigError::TooMany {
                field: "labels",
                max: outpost_protocol::limits::MAX_LABELS,
            })?;
        }
        d.labels = labels;
        d.reserved = Resources {
            vcpus: self.reserved.vcpus,
            memory_mib: self.reserved.memory_mib,
            disk_gib: self.reserved.disk_gib,
        };
        d.hypervisor = self.hypervisor;
        d.state_dir = opt_text(self.state_dir.as_deref(), "state_dir")?;
        d.image_dir = opt_text(self.image_dir.as_deref(), "image_dir")?;
        if self.report_interval_secs == Some(0) {
            return Err(ConfigError::Zero("report_interval_secs"));
        }
        if self.reconcile_interval_secs == Some(0) {
            return Err(ConfigError::Zero("reconcile_interval_secs"));
        }
        d.report_interval_secs = self.report_interval_secs;
        d.reconcile_interval_secs = self.reconcile_interval_secs;
        if let Some(dl) = &self.downloads {
            for (v, name) in [
                (dl.max_downloads.map(u64::from), "downloads.max_downloads"),
                (
                    dl.stall_timeout_secs.map(u64::from),
                    "downloads.stall_timeout_secs",
                ),
                (dl.attempts.map(u64::from), "downloads.attempts"),
            ] {
                if v == Some(0) {
                    return Err(ConfigError::Zero(name));
                }
            }
        }
        d.downloads = self.downloads;
        Ok(d)
    }
}

/// Reads a device config from `path`, flashed or TOML (told apart by the flashed magic).
pub fn load(path: &Path) -> Result<DeviceConfig, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(ConfigError::Empty(path.to_owned()));
    }
    if flash::is_flashed(&bytes) {
        return Ok(flash::decode(&bytes)?);
    }
    let text = String::from_utf8(bytes).map_err(|_| ConfigError::Flash(FlashError::BadMagic))?;
    let base = path.parent().unwrap_or(Path::new("."));
    HumanConfig::from_toml(&text)?.resolve(base)
}

/// A one-line summary of a secret-free view, for logs: `node edge-1 via mqtts://...`.
pub fn summary(d: &DeviceConfig) -> String {
    let brokers: Vec<&str> = d.brokers.iter().map(|b| b.as_str()).collect();
    std::format!(
        "node {} via {}{}",
        d.node_id,
        if brokers.is_empty() {
            "(default broker)".to_string()
        } else {
            brokers.join(", ")
        },
        if d.ca_cert.is_some() {
            " (TLS CA pinned)"
        } else {
            ""
        }
    )
}

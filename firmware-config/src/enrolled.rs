//! The capacity a device was enrolled with: the most it may ever offer, set by the operator at
//! provisioning (`outpost-provision device --max-vcpus --max-memory --max-disk`) and kept in
//! the registry beside the device's flashed config as `devices/NODE/ceiling.toml`. Never on the
//! device: a device's own word about its size is what the ceiling guards against. The
//! controller (`serve --registry DIR`) reads it as the node's first ceiling; a dimension left
//! out is taken from the node's first report.

use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::vec::Vec;

use outpost_protocol::{NodeId, Resources};
use serde::Deserialize;

/// The file name, inside a device's registry directory.
pub const CEILING_FILE: &str = "ceiling.toml";

/// The most a device may offer; `None`: whatever its first report says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrolled {
    /// vCPUs.
    pub vcpus: Option<u16>,
    /// Memory (MiB).
    pub memory_mib: Option<u32>,
    /// Disk (GiB).
    pub disk_gib: Option<u32>,
}

impl Enrolled {
    /// Nothing set.
    pub const fn is_empty(&self) -> bool {
        self.vcpus.is_none() && self.memory_mib.is_none() && self.disk_gib.is_none()
    }

    /// The ceiling for a node whose first report offers `first`.
    pub fn ceiling(&self, first: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.unwrap_or(first.vcpus),
            memory_mib: self.memory_mib.unwrap_or(first.memory_mib),
            disk_gib: self.disk_gib.unwrap_or(first.disk_gib),
        }
    }

    /// The TOML form.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let fields = [
            ("vcpus", self.vcpus.map(u32::from)),
            ("memory_mib", self.memory_mib),
            ("disk_gib", self.disk_gib),
        ];
        for (k, v) in fields {
            if let Some(v) = v {
                out.push_str(&std::format!("{k} = {v}\n"));
            }
        }
        out
    }

    /// Parses the TOML form.
    pub fn from_toml(s: &str) -> Result<Self, String> {
        toml::from_str(s).map_err(|e| e.to_string())
    }
}

/// A registry's devices directory.
fn devices(registry: &Path) -> PathBuf {
    registry.join("devices")
}

/// Where device `node`'s enrolled capacity lives in `registry`.
pub fn path(registry: &Path, node: &NodeId) -> PathBuf {
    devices(registry).join(node.as_str()).join(CEILING_FILE)
}

/// The enrolled capacities found in a registry, and the files that could not be read (path
/// and why): those devices fall back to trusting their first report.
pub type Found = (Vec<(NodeId, Enrolled)>, Vec<(PathBuf, String)>);

/// Every enrolled capacity in `registry` (see [`Found`]).
pub fn read_all(registry: &Path) -> Found {
    let (mut found, mut bad) = (Vec::new(), Vec::new());
    let Ok(dir) = std::fs::read_dir(devices(registry)) else {
        return (found, bad);
    };
    for entry in dir.flatten() {
        let Some(node) = entry.file_name().to_str().and_then(|n| NodeId::new(n).ok()) else {
            continue;
        };
        let file = entry.path().join(CEILING_FILE);
        match std::fs::read_to_string(&file) {
            Ok(text) => match Enrolled::from_toml(&text) {
                Ok(e) => found.push((node, e)),
                Err(why) => bad.push((file, why)),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bad.push((file, e.to_string())),
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    (found, bad)
}

/// Records device `node`'s enrolled capacity in `registry` (an empty one removes the file).
pub fn write(registry: &Path, node: &NodeId, e: &Enrolled) -> std::io::Result<()> {
    let file = path(registry, node);
    if e.is_empty() {
        return match std::fs::remove_file(&file) {
            Err(x) if x.kind() != std::io::ErrorKind::NotFound => Err(x),
            _ => Ok(()),
        };
    }
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension("toml.tmp");
    std::fs::write(&tmp, e.to_toml())?;
    std::fs::rename(&tmp, &file)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn written_ceilings_read_back_and_fill_in_from_the_first_report() {
        let dir = tempfile::tempdir().unwrap();
        let a = NodeId::new("edge-a").unwrap();
        let e = Enrolled {
            vcpus: Some(4),
            memory_mib: Some(8192),
            disk_gib: None,
        };
        write(dir.path(), &a, &e).unwrap();
        std::fs::create_dir_all(dir.path().join("devices/edge-b")).unwrap();
        std::fs::create_dir_all(dir.path().join("devices/edge-c")).unwrap();
        std::fs::write(
            path(dir.path(), &NodeId::new("edge-c").unwrap()),
            "vcpus = -1",
        )
        .unwrap();
        let (found, bad) = read_all(dir.path());
        assert_eq!(found, std::vec![(a.clone(), e)]);
        assert_eq!(bad.len(), 1, "{bad:?}");
        let first = Resources {
            vcpus: 64,
            memory_mib: 1 << 20,
            disk_gib: 500,
        };
        assert_eq!(
            e.ceiling(first),
            Resources {
                vcpus: 4,
                memory_mib: 8192,
                disk_gib: 500
            }
        );
        write(dir.path(), &a, &Enrolled::default()).unwrap();
        assert!(read_all(dir.path()).0.is_empty());
    }
}

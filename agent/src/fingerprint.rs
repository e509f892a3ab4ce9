//! What the host is: its architecture, CPUs and memory (from the hypervisor), the free disk
//! under the state directory (statvfs), and the images in the image directory.

use std::collections::BTreeSet;
use std::path::Path;

use outpost_protocol::limits::{MAX_CACHED, MAX_IMAGES};
use outpost_protocol::{AgentVersion, Digest, ImageName, Inventory, Labels, Resources};

use crate::hypervisor::HostInfo;
use crate::reconcile::HostFacts;

/// Image names found in `dir`: regular files whose names are valid image names, sorted, at most
/// [`MAX_IMAGES`]. A missing directory has no images.
pub fn scan_images(dir: &Path) -> BTreeSet<ImageName> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    let mut names: BTreeSet<ImageName> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
        .filter_map(|e| ImageName::new(e.file_name().to_str()?).ok())
        .collect();
    while names.len() > MAX_IMAGES {
        names.pop_last();
    }
    names
}

/// Free space (for unprivileged users) of the file system holding `dir`, in GiB.
pub fn disk_free_gib(dir: &Path) -> u32 {
    u32::try_from(crate::images::cache::free_bytes(dir) >> 30).unwrap_or(u32::MAX)
}

/// The inventory and the admission facts of a host.
pub fn describe(
    host: HostInfo,
    disk_gib: u32,
    reserved: Resources,
    labels: &Labels,
    images: BTreeSet<ImageName>,
    cached: heapless::Vec<Digest, MAX_CACHED>,
) -> (Inventory, HostFacts) {
    let total = Resources {
        vcpus: host.vcpus,
        memory_mib: host.memory_mib,
        disk_gib,
    };
    let inventory = Inventory {
        arch: host.arch,
        hypervisor: host.kind,
        total,
        reserved,
        labels: labels.clone(),
        images: images.iter().cloned().collect(),
        agent_version: AgentVersion::new(env!("CARGO_PKG_VERSION")).unwrap_or_default(),
        cached: cached.clone(),
    };
    let facts = HostFacts {
        arch: host.arch,
        kind: host.kind,
        allocatable: inventory.allocatable(),
        images,
        cached: cached.into_iter().collect(),
    };
    (inventory, facts)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn images_are_valid_file_names_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("debian.qcow2"), b"x").unwrap();
        std::fs::write(dir.path().join(".hidden"), b"x").unwrap();
        std::fs::write(dir.path().join("has space"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("subdir")).unwrap();
        let names: Vec<String> = scan_images(dir.path())
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, vec!["debian.qcow2"]);
        assert!(scan_images(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn disk_free_is_measured() {
        let dir = tempfile::tempdir().unwrap();
        // Any machine running the tests has some free space; the call must not fail silently.
        assert!(nix::sys::statvfs::statvfs(dir.path()).is_ok());
        let _ = disk_free_gib(dir.path());
    }
}

//! Admission: whether this host can take an instance that does not exist yet (architecture,
//! KVM, images, memory and disk after reservations). Pure: the reconciler asks it before every
//! build.

use std::collections::BTreeSet;

use outpost_protocol::{
    Arch, Digest, ErrorKind, HypervisorKind, ImageName, InstanceSpec, Resources,
};

/// What the host offers, as the reconciler needs it for admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// Host architecture.
    pub arch: Arch,
    /// KVM, emulation or fake.
    pub kind: HypervisorKind,
    /// Total minus reserved.
    pub allocatable: Resources,
    /// Files in the image directory.
    pub images: BTreeSet<ImageName>,
    /// Blobs in the image cache.
    pub cached: BTreeSet<Digest>,
}

/// Checks an instance that does not exist yet against the host. `used` is what the instances
/// before it in the desired state already hold.
pub(crate) fn admit(
    spec: &InstanceSpec,
    used: Resources,
    host: &HostFacts,
) -> Result<(), (ErrorKind, String)> {
    spec.validate()
        .map_err(|e| (ErrorKind::InvalidSpec, e.to_string()))?;
    if spec.arch != host.arch {
        return Err((
            ErrorKind::ArchMismatch,
            format!("instance is {}, host is {}", spec.arch, host.arch),
        ));
    }
    if spec.require_kvm && host.kind != HypervisorKind::Kvm {
        return Err((
            ErrorKind::KvmUnavailable,
            format!("instance requires KVM, host has {}", host.kind),
        ));
    }
    if let Some(missing) = spec.boot.files().find(|i| !host.images.contains(*i)) {
        return Err((
            ErrorKind::UnknownImage,
            format!("image {missing} is not in the image directory"),
        ));
    }
    // Memory and disk are hard limits on the host. vCPUs are time-shared: how far to
    // over-subscribe them is the scheduler's policy (its allocation ratio), not the agent's.
    let want = used.saturating_add(spec.resources());
    let fits = want.memory_mib <= host.allocatable.memory_mib
        && want.disk_gib <= host.allocatable.disk_gib;
    if !fits {
        let free = host.allocatable.saturating_sub(used);
        return Err((
            ErrorKind::InsufficientResources,
            format!(
                "needs {} MiB/{} GiB, host has {} MiB/{} GiB free",
                spec.memory_mib, spec.disk_gib, free.memory_mib, free.disk_gib
            ),
        ));
    }
    Ok(())
}

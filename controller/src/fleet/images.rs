//! The image catalogue: named, versioned content (by SHA-256) that instances boot from, and who
//! may fetch what. Pure: the bytes live in the shell's blob store (or at a URL).

use hmac::{KeyInit as _, Mac as _};
use std::collections::BTreeMap;

use outpost_protocol::{Arch, BlobRef, Digest, Image, ImageName, NodeId};

use super::Fleet;
use super::error::FleetError;

/// What kind of content an image is (checked against its first bytes on upload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// A qcow2 disk image.
    Qcow2,
    /// A raw disk image.
    Raw,
    /// A Linux kernel (x86 bzImage or arm64 Image).
    Kernel,
    /// An initrd (a compressed or plain cpio archive).
    Initrd,
}

impl ImageFormat {
    /// Lowercase name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
            Self::Kernel => "kernel",
            Self::Initrd => "initrd",
        }
    }

    /// Parses [`ImageFormat::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Qcow2, Self::Raw, Self::Kernel, Self::Initrd]
            .into_iter()
            .find(|f| f.as_str() == s)
    }

    /// Whether it is a disk (booted with `--image`) rather than a kernel or an initrd.
    pub const fn is_disk(self) -> bool {
        matches!(self, Self::Qcow2 | Self::Raw)
    }
}

/// What the first bytes of a file say it is, and for a kernel its architecture. `None`: no
/// image format Outpost knows (a raw disk has no signature: only `--format raw` says so).
pub fn sniff(head: &[u8]) -> Option<(ImageFormat, Option<Arch>)> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, b"QFI\xfb") {
        Some((ImageFormat::Qcow2, None))
    } else if at(0x202, b"HdrS") {
        Some((ImageFormat::Kernel, Some(Arch::X86_64)))
    } else if at(0x38, b"ARM\x64") {
        Some((ImageFormat::Kernel, Some(Arch::Aarch64)))
    } else if at(0, b"\x1f\x8b")
        || at(0, b"070701")
        || at(0, b"070702")
        || at(0, b"\x28\xb5\x2f\xfd")
        || at(0, b"\xfd7zXZ\x00")
        || at(0, b"\x02\x21\x4c\x18")
        || at(0, b"BZh")
    {
        Some((ImageFormat::Initrd, None))
    } else {
        None
    }
}

/// One image of the catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// Its name (`debian-12`).
    pub name: String,
    /// Its version (`2026.11`, or a number given in order of upload).
    pub version: String,
    /// Its content.
    pub blob: BlobRef,
    /// The architecture it runs on, when known.
    pub arch: Option<Arch>,
    /// What it is.
    pub format: ImageFormat,
    /// Where it is served from: `None` for content the controller stores, else a URL (an
    /// HTTP(S) server or an object store) that nodes are redirected to.
    pub url: Option<String>,
    /// When it was added (ms since the epoch).
    pub created_ms: u64,
}

impl ImageRecord {
    /// `name:version`.
    pub fn key(&self) -> String {
        format!("{}:{}", self.name, self.version)
    }
}

/// Checks a catalogue name or version: 1 to 63 bytes of ASCII letters, digits, `.`, `_` and
/// `-`, starting with a letter or digit (lowercase for names).
pub fn check_part(what: &'static str, s: &str, lower: bool) -> Result<(), FleetError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars().all(|c| {
            (c.is_ascii_alphanumeric() && !(lower && c.is_ascii_uppercase()))
                || matches!(c, '.' | '_' | '-')
        });
    if ok {
        Ok(())
    } else {
        Err(FleetError::BadImageName(format!(
            "{what} {s:?}: 1 to 63 {}letters, digits, '.', '_' or '-', a letter or digit first",
            if lower { "lowercase " } else { "" }
        )))
    }
}

/// The token a node shows to fetch blobs: HMAC-SHA256, under the fleet's blob key, of its id,
/// the agent install it is bound to, and (when the controller knows the broker's password
/// file) a hash of the device's credential entry. Only that node's desired state carries it,
/// and it changes when the device is provisioned again or another install is kept.
pub fn node_token(
    key: &[u8; 32],
    node: &NodeId,
    boot: Option<outpost_protocol::BootId>,
    credential: Option<&[u8; 32]>,
) -> [u8; 32] {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    mac.update(node.as_str().as_bytes());
    if let Some(b) = boot {
        mac.update(b"\0boot");
        mac.update(&b.0.to_le_bytes());
    }
    if let Some(c) = credential {
        mac.update(b"\0credential");
        mac.update(c);
    }
    mac.finalize().into_bytes().into()
}

/// A boot file's name resolved: the image, and for catalogue content its architecture (when
/// known) and format.
pub type Resolved = (Image, Option<(Option<Arch>, ImageFormat)>);

/// Seeding a group of nodes with an image ahead of any instance, a few nodes at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchJob {
    /// The image's content.
    pub blob: BlobRef,
    /// Nodes still to be asked, in order.
    pub pending: std::collections::VecDeque<NodeId>,
    /// At most this many nodes fetch at once (fleet-wide for this job).
    pub concurrency: usize,
}

/// What a prefetch request started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchStarted {
    /// Nodes that will fetch it (the first `concurrency` at once).
    pub queued: Vec<NodeId>,
    /// Nodes that hold it already.
    pub cached: Vec<NodeId>,
}

/// Where a node gets a blob it may fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobSource {
    /// The controller's own blob store.
    Local(Digest),
    /// Redirect to this URL.
    Url(String),
}

impl Fleet {
    /// Every image, by name then version.
    pub fn images(&self) -> impl Iterator<Item = &ImageRecord> {
        self.images.values()
    }

    /// An image by `name:version`, or by `name` (its newest version).
    pub fn image(&self, key: &str) -> Option<&ImageRecord> {
        match key.split_once(':') {
            Some((n, v)) => self.images.get(&(n.to_owned(), v.to_owned())),
            None => self
                .images
                .values()
                .filter(|i| i.name == key)
                .max_by_key(|i| (i.created_ms, i.version.clone())),
        }
    }

    /// The catalogue name of a digest, for views (`name:version`, the newest if several).
    pub fn image_name(&self, digest: &Digest) -> Option<String> {
        self.images
            .values()
            .filter(|i| i.blob.digest == *digest)
            .max_by_key(|i| i.created_ms)
            .map(ImageRecord::key)
    }

    /// The version the next upload of `name` gets when none is given: one more than the
    /// largest numeric version so far.
    pub fn next_version(&self, name: &str) -> String {
        let n = self
            .images
            .values()
            .filter(|i| i.name == name)
            .filter_map(|i| i.version.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        (n + 1).to_string()
    }

    /// Adds an image (refused if its `name:version` exists).
    pub fn add_image(&mut self, rec: ImageRecord) -> Result<(), FleetError> {
        check_part("name", &rec.name, true)?;
        check_part("version", &rec.version, false)?;
        let key = (rec.name.clone(), rec.version.clone());
        if self.images.contains_key(&key) {
            return Err(FleetError::ImageExists(rec.key()));
        }
        self.journal.images.insert(key.clone());
        self.images.insert(key, rec);
        Ok(())
    }

    /// Removes an image, refused while an instance boots from its content. Returns it, and
    /// whether its content is now unreferenced (the shell may delete the bytes).
    pub fn delete_image(&mut self, key: &str) -> Result<(ImageRecord, bool), FleetError> {
        let rec = self
            .image(key)
            .cloned()
            .ok_or_else(|| FleetError::NoImage(key.to_owned()))?;
        let users: Vec<String> = self
            .instances
            .values()
            .filter(|i| i.spec.boot.blobs().any(|b| b.digest == rec.blob.digest))
            .map(|i| i.name.clone())
            .collect();
        let same_content = self
            .images
            .values()
            .filter(|i| i.blob.digest == rec.blob.digest)
            .count();
        if !users.is_empty() && same_content == 1 {
            return Err(FleetError::ImageInUse {
                image: rec.key(),
                users,
            });
        }
        let k = (rec.name.clone(), rec.version.clone());
        self.images.remove(&k);
        self.journal.images.remove(&k);
        self.journal.removed_images.insert(k);
        Ok((rec, same_content == 1))
    }

    /// What an instance's boot file named `key` is: catalogue content (with its architecture
    /// and format) if the catalogue has that name, else a file in the node's image directory.
    pub fn resolve_image(&self, key: &str) -> Result<Resolved, outpost_protocol::IdError> {
        match self.image(key) {
            Some(r) => Ok((Image::Blob(r.blob), Some((r.arch, r.format)))),
            None => Ok((Image::File(ImageName::new(key)?), None)),
        }
    }

    /// Seeds the nodes carrying every label of `selector` with image `key`, at most
    /// `concurrency` nodes fetching at a time. Nodes that cache it already are skipped.
    pub fn prefetch(
        &mut self,
        key: &str,
        selector: &[outpost_protocol::Label],
        concurrency: usize,
    ) -> Result<PrefetchStarted, FleetError> {
        let rec = self
            .image(key)
            .cloned()
            .ok_or_else(|| FleetError::NoImage(key.to_owned()))?;
        let mut started = PrefetchStarted {
            queued: Vec::new(),
            cached: Vec::new(),
        };
        for n in self.nodes.values() {
            let Some(inv) = &n.inventory else { continue };
            let labels = n.labels();
            if n.foreign.is_some()
                || rec.arch.is_some_and(|a| a != inv.arch)
                || !selector.iter().all(|l| labels.contains(l))
            {
                continue;
            }
            if inv.cached.contains(&rec.blob.digest) {
                started.cached.push(n.id.clone());
            } else {
                started.queued.push(n.id.clone());
            }
        }
        if started.queued.is_empty() && started.cached.is_empty() {
            let sel: Vec<String> = selector.iter().map(ToString::to_string).collect();
            return Err(FleetError::NoNodeMatches(if sel.is_empty() {
                "(any)".to_owned()
            } else {
                sel.join(",")
            }));
        }
        self.prefetches.push(PrefetchJob {
            blob: rec.blob,
            pending: started.queued.iter().cloned().collect(),
            concurrency: concurrency.max(1),
        });
        self.advance_prefetches();
        Ok(started)
    }

    /// Hands each prefetch job's next nodes their blob while fewer than its concurrency fetch
    /// it; drops jobs with nothing left.
    pub(super) fn advance_prefetches(&mut self) {
        let mut jobs = std::mem::take(&mut self.prefetches);
        for job in &mut jobs {
            let d = job.blob.digest;
            let mut active = self
                .nodes
                .values()
                .filter(|n| n.prefetch.iter().any(|b| b.digest == d))
                .count();
            while active < job.concurrency {
                let Some(node) = job.pending.pop_front() else {
                    break;
                };
                let Some(n) = self.nodes.get_mut(&node) else {
                    continue;
                };
                let cached = n.inventory.as_ref().is_some_and(|i| i.cached.contains(&d));
                if cached || n.prefetch.len() >= outpost_protocol::limits::MAX_PREFETCH {
                    continue;
                }
                n.prefetch.push(job.blob);
                self.bump(&node);
                active += 1;
            }
        }
        jobs.retain(|j| {
            !j.pending.is_empty()
                || self
                    .nodes
                    .values()
                    .any(|n| n.prefetch.iter().any(|b| b.digest == j.blob.digest))
        });
        self.prefetches = jobs;
    }

    /// A node holds (or failed to fetch) a blob it was asked to prefetch: its slot frees.
    pub(super) fn prefetch_ended(&mut self, node: &NodeId, digest: &Digest) {
        if let Some(n) = self.nodes.get_mut(node)
            && n.prefetch.iter().any(|b| b.digest == *digest)
        {
            n.prefetch.retain(|b| b.digest != *digest);
            self.advance_prefetches();
        }
    }

    /// Whether this fleet asks `node` for blob `digest`: one of its instances boots from it (or
    /// takes it as a cloud-init part), or the node is asked to prefetch it.
    pub(super) fn asks_for(&self, node: &NodeId, digest: &Digest) -> bool {
        self.on_node(node)
            .any(|i| i.spec.blobs().any(|b| b.digest == *digest))
            || self
                .nodes
                .get(node)
                .is_some_and(|n| n.prefetch.iter().any(|b| b.digest == *digest))
    }

    /// The blob token of `node` now; `None` when the controller knows the devices'
    /// credentials and this one has none (revoked).
    pub(super) fn blob_token(&self, node: &NodeId) -> Option<[u8; 32]> {
        let boot = self.nodes.get(node).and_then(|n| n.boot);
        let credential = match &self.credentials {
            Some(c) => Some(c.get(node)?),
            None => None,
        };
        Some(node_token(&self.blob_key, node, boot, credential))
    }

    /// The devices' broker credentials (a hash of each one's entry in the password file),
    /// or `None` when the controller does not read that file. A node whose entry changed (a
    /// device provisioned again) gets a new blob token in a new desired state; one whose
    /// entry is gone (revoked) fetches nothing.
    pub fn set_credentials(&mut self, creds: Option<BTreeMap<NodeId, [u8; 32]>>) {
        if creds == self.credentials {
            return;
        }
        let old = std::mem::replace(&mut self.credentials, creds);
        // The first reading (a controller starting) is the view the last leader had.
        let Some(old) = old else {
            return;
        };
        let old = Some(old);
        let nodes: Vec<NodeId> = self.nodes.keys().cloned().collect();
        for n in nodes {
            let before = old.as_ref().map(|c| c.get(&n));
            let after = self.credentials.as_ref().map(|c| c.get(&n));
            if before != after {
                self.bump(&n);
            }
        }
    }

    /// Whether `node` showing `token` may fetch `digest`, and from where: only a blob that
    /// one of its instances boots from (or that it is asked to prefetch).
    pub fn blob_access(
        &self,
        node: &NodeId,
        token: &[u8],
        digest: &Digest,
    ) -> Result<BlobSource, FleetError> {
        // A device whose broker entry is gone (`outpost-provision revoke`) fetches nothing.
        let Some(good) = self.blob_token(node) else {
            return Err(FleetError::BlobDenied);
        };
        // Constant time: a wrong token says nothing about the right one.
        let same = crate::secret::same_secret(token, &good);
        if !same || !self.nodes.contains_key(node) {
            return Err(FleetError::BlobDenied);
        }
        if !self.asks_for(node, digest) {
            return Err(FleetError::BlobDenied);
        }
        // The controller's own copy first; a seed part has no catalogue entry: its own.
        let rec = self
            .images
            .values()
            .filter(|i| i.blob.digest == *digest)
            .min_by_key(|i| i.url.is_some());
        Ok(match rec.and_then(|r| r.url.as_ref()) {
            None => BlobSource::Local(*digest),
            Some(u) => BlobSource::Url(u.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn formats_are_told_by_their_first_bytes() {
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(sniff(&bz), Some((ImageFormat::Kernel, Some(Arch::X86_64))));
        let mut arm = vec![0u8; 0x40];
        arm[0x38..0x3c].copy_from_slice(b"ARM\x64");
        assert_eq!(
            sniff(&arm),
            Some((ImageFormat::Kernel, Some(Arch::Aarch64)))
        );
        assert_eq!(
            sniff(b"QFI\xfb\0\0\0\x03"),
            Some((ImageFormat::Qcow2, None))
        );
        assert_eq!(sniff(b"\x1f\x8b\x08\0"), Some((ImageFormat::Initrd, None)));
        assert_eq!(sniff(b"hello, world\n"), None);
        assert_eq!(sniff(b""), None);
    }

    #[test]
    fn tokens_differ_per_node_and_key() {
        let a = NodeId::new("edge-1").unwrap();
        let b = NodeId::new("edge-2").unwrap();
        let t = |k: u8, n: &NodeId| node_token(&[k; 32], n, None, None);
        assert_ne!(t(1, &a), t(1, &b));
        assert_ne!(t(1, &a), t(2, &a));
        assert_eq!(t(1, &a), t(1, &a));
        let boot = Some(outpost_protocol::BootId(7));
        assert_ne!(
            t(1, &a),
            node_token(&[1; 32], &a, boot, None),
            "another install"
        );
        assert_ne!(
            node_token(&[1; 32], &a, boot, Some(&[3; 32])),
            node_token(&[1; 32], &a, boot, Some(&[4; 32])),
            "provisioned again"
        );
    }

    #[test]
    fn names_and_versions_follow_the_rule() {
        assert!(check_part("name", "debian-12", true).is_ok());
        assert!(check_part("version", "2026.11-RC1", false).is_ok());
        assert!(check_part("name", "Debian", true).is_err());
        assert!(check_part("name", "", true).is_err());
        assert!(check_part("name", "a/b", true).is_err());
        assert!(check_part("version", "-1", false).is_err());
    }
}

//! What the agent keeps on disk, in its state directory (mode 0711: nobody else may list or
//! read it, but QEMU, running unprivileged as libvirt's `libvirt-qemu` user, must reach the
//! image and instance directories beneath it):
//!
//! - `desired.bin`: what it holds ([`Held`]: the desired state and the instances it keeps),
//!   framed like the flashed config: `OPST` magic, a format version, the body length (u32 LE),
//!   the postcard body, and a CRC-32 over everything before it. Replaced atomically (write,
//!   fsync, rename, fsync dir), mode 0600. A file that fails any check is never guessed at: the
//!   agent touches nothing until the controller sends a desired state.
//! - `boot-id`: this install's identity ([`BootId`], 16 hex digits), made on the first start and
//!   kept: a copy of the node's flashed config on another box has another one.
//! - `heard`: when the agent last heard from its controller (ms since the epoch, with a
//!   CRC-32), which bounds how long it may start instances on its own after a restart.
//! - `floor`: the fleet and generation of the last desired state taken (with a CRC-32), kept
//!   apart from `desired.bin`: a state older than it is refused even if `desired.bin` is lost.
//! - `session`: this run's first MQTT session number (with a CRC-32); each run starts one
//!   block past the last, so session numbers never depend on the device's clock.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use outpost_protocol::{BootId, FleetId, Version, legacy};

use crate::reconcile::Held;

/// The file name of what the agent holds, inside the state directory.
pub const DESIRED_FILE: &str = "desired.bin";
/// The file name of the last time the agent heard from its controller.
pub const HEARD_FILE: &str = "heard";
/// The file name of the version of the last desired state taken.
pub const FLOOR_FILE: &str = "floor";
/// The file name of the last run's first session number.
pub const SESSION_FILE: &str = "session";
/// Session numbers each run may use before the next run's first.
pub const SESSION_BLOCK: u64 = 1 << 20;
/// The file name of this install's identity ([`BootId`]), inside the state directory.
pub const BOOT_FILE: &str = "boot-id";
/// The first four bytes of the held-state file.
pub const MAGIC: [u8; 4] = *b"OPST";
/// The held-state file's format version (4: the agent install a desired state is for; 3:
/// power modes, images by digest, fetch sources).
pub const FORMAT: u8 = 4;
/// The largest held-state file: a full desired state and a full list of kept instances.
pub const MAX_FILE_LEN: usize = 256 * 1024;
/// The state directory's mode: private listing, traversable by QEMU's unprivileged user.
pub const STATE_DIR_MODE: u32 = 0o711;
const HEADER_LEN: usize = 4 + 1 + 4;
const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// Why the held state could not be stored or loaded.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file exists but fails a check.
    #[error(
        "{path} is corrupt ({why}): keeping every domain as it is until the controller sends a desired state"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Which check failed.
        why: &'static str,
    },
    /// The state cannot be encoded (cannot happen for a decoded state).
    #[error("the held state does not encode")]
    Encode,
}

/// The state files of one agent.
#[derive(Debug, Clone)]
pub struct DesiredStore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + use<> {
    let path = path.to_owned();
    move |source| StoreError::Io { path, source }
}

/// The framed form of `held`.
pub fn frame(held: &Held) -> Result<Vec<u8>, StoreError> {
    let body = postcard::to_stdvec(held).map_err(|_| StoreError::Encode)?;
    let len = u32::try_from(body.len()).map_err(|_| StoreError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + 4);
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    let crc = CRC32.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    if out.len() > MAX_FILE_LEN {
        return Err(StoreError::Encode);
    }
    Ok(out)
}

/// Checks and decodes the framed form; the error names the check that failed.
pub fn unframe(bytes: &[u8]) -> Result<Held, &'static str> {
    if bytes.len() > MAX_FILE_LEN {
        return Err("too large");
    }
    if bytes.len() < HEADER_LEN + 4 {
        return Err("too short");
    }
    let (data, crc) = bytes.split_at(bytes.len() - 4);
    if data[..4] != MAGIC {
        return Err("bad magic");
    }
    if !(2..=FORMAT).contains(&data[4]) {
        return Err("unknown format version");
    }
    let mut stored = [0u8; 4];
    stored.copy_from_slice(crc);
    if CRC32.checksum(data) != u32::from_le_bytes(stored) {
        return Err("checksum mismatch");
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&data[5..9]);
    let body = &data[HEADER_LEN..];
    if u32::from_le_bytes(len) as usize != body.len() {
        return Err("length mismatch");
    }
    match data[4] {
        2 => whole::<HeldV2>(body).map(Into::into),
        3 => whole::<HeldV3>(body).map(Into::into),
        _ => whole::<Held>(body),
    }
}

/// Decodes all of `body` as a `T`.
fn whole<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, &'static str> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((t, [])) => Ok(t),
        Ok(_) => Err("trailing bytes"),
        Err(_) => Err("malformed body"),
    }
}

/// Format 3, written by the release before agent installs had identities.
#[derive(serde::Deserialize, serde::Serialize)]
struct HeldV3 {
    desired: Box<legacy::DesiredStateV4>,
    kept: Vec<outpost_protocol::DesiredInstance>,
}

impl From<HeldV3> for Held {
    fn from(h: HeldV3) -> Self {
        Self {
            desired: Box::new((*h.desired).into()),
            kept: h.kept,
        }
    }
}

/// Format 2, written by the release before power modes and images by digest: read after an
/// upgrade (converted, written back as the current format), so an upgraded agent keeps its
/// fleet binding and its instances.
#[derive(serde::Deserialize, serde::Serialize)]
struct HeldV2 {
    desired: Box<legacy::DesiredStateV2>,
    kept: Vec<legacy::DesiredInstanceV2>,
}

impl From<HeldV2> for Held {
    fn from(h: HeldV2) -> Self {
        Self {
            desired: Box::new((*h.desired).into()),
            kept: h.kept.into_iter().map(Into::into).collect(),
        }
    }
}

/// Writes `bytes` to `path` atomically with mode 0600, and syncs the directory.
fn replace(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let name = path
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

impl DesiredStore {
    /// The store in `state_dir`, created 0700 if missing (an existing directory is narrowed to
    /// 0700: it holds instance specs).
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(STATE_DIR_MODE)
            .create(state_dir)
            .map_err(io(state_dir))?;
        fs::set_permissions(state_dir, fs::Permissions::from_mode(STATE_DIR_MODE))
            .map_err(io(state_dir))?;
        Ok(Self {
            dir: state_dir.to_owned(),
        })
    }

    /// The held-state file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(DESIRED_FILE)
    }

    /// What is held; `None` if nothing was ever stored.
    pub fn load(&self) -> Result<Option<Held>, StoreError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        unframe(&bytes)
            .map(Some)
            .map_err(|why| StoreError::Corrupt { path, why })
    }

    /// Replaces what is held atomically: after a crash the file holds the old state or the
    /// new one, never a mix.
    pub fn save(&self, held: &Held) -> Result<(), StoreError> {
        replace(&self.dir, &self.path(), &frame(held)?)
    }

    /// When the agent last heard from its controller (ms since the epoch); `None` if never, or
    /// if the file is damaged (which counts as long ago).
    pub fn heard_ms(&self) -> Option<u64> {
        let [ms] = read_words(&self.dir.join(HEARD_FILE))?;
        Some(ms)
    }

    /// The version of the last desired state taken (kept apart from `desired.bin`): a state
    /// of that fleet older than it is refused even after `desired.bin` is lost, so a
    /// controller that no longer leads cannot send the node back.
    pub fn floor(&self) -> Option<Version> {
        let [fleet, generation] = read_words(&self.dir.join(FLOOR_FILE))?;
        Some(Version {
            fleet: FleetId(fleet),
            generation,
        })
    }

    /// Records the version of the desired state just taken.
    pub fn save_floor(&self, v: Version) -> Result<(), StoreError> {
        write_words(
            &self.dir,
            &self.dir.join(FLOOR_FILE),
            &[v.fleet.0, v.generation],
        )
    }

    /// The first session number of this run: one block past the last run's (kept in the
    /// state directory), so every connection of every run has its own number whatever the
    /// device's clock says. Without the file (first start, or lost), the wall clock seeds it.
    pub fn session_base(&self, wall_ms: u64) -> Result<u64, StoreError> {
        let path = self.dir.join(SESSION_FILE);
        let base = match read_words(&path) {
            Some([last]) => last.saturating_add(SESSION_BLOCK),
            None => wall_ms.max(1),
        };
        write_words(&self.dir, &path, &[base])?;
        Ok(base)
    }

    /// This install's identity: the one kept in the state directory, or (first start, or a
    /// damaged file) a fresh random one, stored 0600 before it is used.
    pub fn boot_id(&self) -> Result<BootId, StoreError> {
        let path = self.dir.join(BOOT_FILE);
        let kept = fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<BootId>().ok())
            .filter(|b| b.0 != 0);
        if let Some(b) = kept {
            return Ok(b);
        }
        let fresh = BootId(fastrand::u64(1..));
        replace(&self.dir, &path, format!("{fresh}\n").as_bytes())?;
        Ok(fresh)
    }

    /// Records that the agent heard from its controller at `ms` (since the epoch).
    pub fn save_heard(&self, ms: u64) -> Result<(), StoreError> {
        write_words(&self.dir, &self.dir.join(HEARD_FILE), &[ms])
    }
}

/// `N` little-endian u64 words and a CRC-32 over them; `None` if missing or damaged.
fn read_words<const N: usize>(path: &Path) -> Option<[u64; N]> {
    let b = fs::read(path).ok()?;
    if b.len() != 8 * N + 4 {
        return None;
    }
    let (body, crc) = b.split_at(8 * N);
    let crc = u32::from_le_bytes(crc.try_into().ok()?);
    if CRC32.checksum(body) != crc {
        return None;
    }
    let mut out = [0u64; N];
    for (w, c) in out.iter_mut().zip(body.chunks_exact(8)) {
        *w = u64::from_le_bytes(c.try_into().ok()?);
    }
    Some(out)
}

/// Replaces `path` (in `dir`) with `words` in the form [`read_words`] reads.
fn write_words(dir: &Path, path: &Path, words: &[u64]) -> Result<(), StoreError> {
    let mut b: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let crc = CRC32.checksum(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    replace(dir, path, &b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use outpost_protocol::{DesiredState, FleetId};

    #[test]
    fn floor_and_sessions_survive_restarts_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = DesiredStore::open(dir.path()).unwrap();
        assert_eq!(store.floor(), None);
        let v = Version {
            fleet: FleetId(5),
            generation: 77,
        };
        store.save_floor(v).unwrap();
        assert_eq!(DesiredStore::open(dir.path()).unwrap().floor(), Some(v));
        let mode = fs::metadata(dir.path().join(FLOOR_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Sessions: seeded by the clock once, then one block further each run, whatever the
        // clock says later (a device a day behind, or in 1970).
        let first = store.session_base(1_700_000_000_000).unwrap();
        assert_eq!(first, 1_700_000_000_000);
        let second = store.session_base(0).unwrap();
        assert_eq!(second, first + SESSION_BLOCK);
        assert!(store.session_base(5).unwrap() > second);
        // A damaged file is never trusted.
        fs::write(dir.path().join(FLOOR_FILE), b"garbage").unwrap();
        assert_eq!(store.floor(), None);
    }

    fn held() -> Held {
        Held {
            desired: Box::new(DesiredState {
                fleet: FleetId(7),
                generation: 3,
                ..Default::default()
            }),
            kept: Vec::new(),
        }
    }

    #[test]
    fn save_then_load_round_trips_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let store = DesiredStore::open(&state).unwrap();
        assert!(store.load().unwrap().is_none());
        store.save(&held()).unwrap();
        assert_eq!(store.load().unwrap(), Some(held()));
        assert!(!state.join("desired.bin.tmp").exists());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&store.path()), 0o600);
        assert_eq!(mode(&state), STATE_DIR_MODE);
        store.save_heard(1_700_000_000_123).unwrap();
        assert_eq!(store.heard_ms(), Some(1_700_000_000_123));
        assert_eq!(mode(&state.join(HEARD_FILE)), 0o600);
    }

    #[test]
    fn a_format_2_file_from_the_previous_release_loads() {
        use outpost_protocol::legacy::*;
        use outpost_protocol::*;
        let old_spec = SpecV2 {
            vcpus: 1,
            memory_mib: 64,
            disk_gib: 0,
            arch: Arch::X86_64,
            require_kvm: false,
            boot: BootV2::Kernel {
                kernel: ImageName::new("vmlinuz").unwrap(),
                initrd: None,
                cmdline: Cmdline::new("console=ttyS0").unwrap(),
            },
            network: Network::None,
            restart: RestartPolicy::Always,
            labels: Labels::new(),
        };
        let old = HeldV2 {
            desired: Box::new(DesiredStateV2 {
                fleet: FleetId(7),
                generation: 3,
                replaces: None,
                lease_secs: 300,
                instances: [DesiredInstanceV2 {
                    id: InstanceId::from_u64(0xabc),
                    name: InstanceName::new("web-1").unwrap(),
                    power: PowerState::Stopped,
                    reboot_count: 3,
                    spec: old_spec,
                }]
                .into_iter()
                .collect(),
                gone: [InstanceId::from_u64(0xdef)].into_iter().collect(),
            }),
            kept: Vec::new(),
        };
        let body = postcard::to_stdvec(&old).unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.push(2);
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&body);
        let crc = CRC32.checksum(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let loaded = unframe(&bytes).unwrap();
        let d = &loaded.desired;
        assert_eq!((d.fleet, d.generation, d.lease_secs), (FleetId(7), 3, 300));
        assert_eq!(d.gone.as_slice(), &[InstanceId::from_u64(0xdef)]);
        let i = &d.instances[0];
        assert_eq!(
            (i.id, i.power, i.reboot_count),
            (InstanceId::from_u64(0xabc), PowerState::Stopped, 3)
        );
        assert_eq!(i.power_mode, PowerMode::default());
        assert_eq!(
            i.spec.boot.files().map(|f| f.as_str()).collect::<Vec<_>>(),
            ["vmlinuz"]
        );
        // Written back in the current format.
        assert_eq!(frame(&loaded).unwrap()[4], FORMAT);
    }

    #[test]
    fn a_format_3_file_from_the_previous_release_loads() {
        let d = *held().desired;
        let old = HeldV3 {
            desired: Box::new(legacy::DesiredStateV4 {
                fleet: d.fleet,
                generation: d.generation,
                replaces: d.replaces,
                lease_secs: d.lease_secs,
                instances: d.instances.clone(),
                gone: d.gone.clone(),
                fetch: d.fetch.clone(),
                prefetch: d.prefetch.clone(),
            }),
            kept: Vec::new(),
        };
        let body = postcard::to_stdvec(&old).unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.push(3);
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&body);
        let crc = CRC32.checksum(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let loaded = unframe(&bytes).unwrap();
        assert_eq!(*loaded.desired, d);
        assert_eq!(loaded.desired.boot, None);
    }

    #[test]
    fn the_boot_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = DesiredStore::open(dir.path()).unwrap();
        let a = store.boot_id().unwrap();
        assert_ne!(a.0, 0);
        assert_eq!(store.boot_id().unwrap(), a);
        let mode = fs::metadata(dir.path().join(BOOT_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let elsewhere = tempfile::tempdir().unwrap();
        let other = DesiredStore::open(elsewhere.path()).unwrap();
        assert_ne!(
            other.boot_id().unwrap(),
            a,
            "another install, another identity"
        );
        fs::write(dir.path().join(BOOT_FILE), "garbage").unwrap();
        assert_ne!(store.boot_id().unwrap(), a);
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let bytes = frame(&held()).unwrap();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(unframe(&b).is_err(), "bit {i} flipped went unnoticed");
        }
        assert!(unframe(&bytes[..bytes.len() - 1]).is_err());
        assert!(unframe(&[]).is_err());
    }

    #[test]
    fn corrupt_file_is_reported_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = DesiredStore::open(dir.path()).unwrap();
        fs::write(store.path(), [9, 9, 9]).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
        fs::write(dir.path().join(HEARD_FILE), [1, 2, 3]).unwrap();
        assert_eq!(store.heard_ms(), None);
    }
}

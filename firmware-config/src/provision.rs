//! Provisioning: per-device identities and secrets, the broker side (a mosquitto password file
//! and ACL that confine each device to its own topics), installing onto a target root, and
//! inspecting a flashed config.
//!
//! A registry directory holds what the provisioning side knows:
//!
//! ```text
//! REGISTRY/devices/<node>/device.bin   the flashed config (0600)
//! REGISTRY/mosquitto/passwd            one PBKDF2-SHA512 entry per device, and the controller's
//! REGISTRY/mosquitto/acl               %u patterns: each node only its own topics
//! REGISTRY/controller.secret           the controller's broker password (0600)
//! ```

use std::borrow::ToOwned;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::vec::Vec;

use base64::Engine as _;
use outpost_protocol::NodeId;
use outpost_protocol::topics::{Channel, Side};

use crate::flash;
use crate::human::ConfigError;
use crate::schema::DeviceConfig;

/// The controller's MQTT username.
pub const CONTROLLER_USER: &str = "outpost-controller";
/// PBKDF2 iterations, as mosquitto_passwd writes them (`$7$101$...`).
pub const MOSQUITTO_ITERATIONS: u32 = 101;

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The device already has an identity.
    #[error("{0} already exists: refusing to overwrite a device identity (use --force)")]
    Exists(PathBuf),
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The system random source failed.
    #[error("no randomness available: {0}")]
    Random(String),
    /// A device may not take a controller's broker name.
    #[error("{0}: names starting with outpost-controller are the controllers' broker logins")]
    Reserved(String),
    /// Revoke was asked for a device the registry has no broker entry for.
    #[error("no broker entry for {0} in the password file")]
    NoSuchDevice(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError + '_ {
    move |source| ProvisionError::Io {
        path: path.to_owned(),
        source,
    }
}

fn random<const N: usize>() -> Result<[u8; N], ProvisionError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| ProvisionError::Random(e.to_string()))?;
    Ok(b)
}

/// A fresh per-device secret: 24 random bytes, base64url.
pub fn new_secret() -> Result<String, ProvisionError> {
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random::<24>()?))
}

/// A fresh node id: `edge-` and 12 random hex digits.
pub fn new_node_id() -> Result<NodeId, ProvisionError> {
    let b = random::<6>()?;
    let hex: String = b.iter().map(|x| std::format!("{x:02x}")).collect();
    NodeId::new(&std::format!("edge-{hex}")).map_err(|e| ProvisionError::Random(e.to_string()))
}

/// One mosquitto password-file line (mosquitto 2 format, `$7$`: PBKDF2-HMAC-SHA512).
pub fn mosquitto_password_line(user: &str, password: &str, salt: [u8; 12]) -> String {
    let mut hash = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(
        password.as_bytes(),
        &salt,
        MOSQUITTO_ITERATIONS,
        &mut hash,
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    std::format!(
        "{user}:$7${MOSQUITTO_ITERATIONS}${}${}",
        b64.encode(salt),
        b64.encode(hash)
    )
}

/// Whether `password` is `user`'s password in a mosquitto password file (`$7$` PBKDF2-SHA512
/// entries, as written by `mosquitto_passwd` and by this module).
pub fn verify_mosquitto_password(file: &str, user: &str, password: &str) -> bool {
    let Some(entry) = file
        .lines()
        .find_map(|l| l.strip_prefix(user).and_then(|r| r.strip_prefix(':')))
    else {
        return false;
    };
    let mut parts = entry.split('$');
    let (Some(""), Some("7"), Some(iter), Some(salt), Some(hash)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let (Ok(iter), Ok(salt), Ok(want)) = (iter.parse::<u32>(), b64.decode(salt), b64.decode(hash))
    else {
        return false;
    };
    let mut got = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password.as_bytes(), &salt, iter, &mut got);
    // Compare without an early exit.
    want.len() == got.len() && want.iter().zip(got).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// The broker login of a controller: `outpost-controller`, or `outpost-controller-NAME` for
/// each further controller sharing the fleet (each needs its own: the broker takes the
/// username as the MQTT client id, and two clients with one id throw each other off).
pub fn controller_user(name: Option<&str>) -> String {
    match name {
        Some(n) => std::format!("{CONTROLLER_USER}-{n}"),
        None => CONTROLLER_USER.to_owned(),
    }
}

/// The mosquitto ACL with the one controller login [`CONTROLLER_USER`].
pub fn mosquitto_acl() -> String {
    mosquitto_acl_for(&[CONTROLLER_USER.to_owned()])
}

/// The mosquitto ACL: each controller login may use every node topic; a device (username =
/// node id) may publish on its own agent channels and read its own controller channels (see
/// `Channel`).
pub fn mosquitto_acl_for(controllers: &[String]) -> String {
    let mut s = String::from("# Outpost broker ACL (generated by outpost-provision).\n");
    for user in controllers {
        let _ = writeln!(s, "user {user}\ntopic readwrite outpost/#\n");
    }
    s.push_str("# every device: only its own namespace (%u = the MQTT username = the node id)\n");
    for ch in Channel::ALL {
        let access = match ch.publisher() {
            Side::Agent => "write",
            Side::Controller => "read",
        };
        let _ = writeln!(s, "pattern {access} outpost/node/%u/{}", ch.name());
    }
    s
}

/// Writes `bytes` to `path` atomically with `mode`.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ProvisionError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// The id of the group named `name`, from `/etc/group`.
fn group_id(name: &str) -> Option<u32> {
    let groups = fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(name)).then(|| f.nth(1)?.parse().ok())?
    })
}

/// The provisioning registry.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    /// A registry in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// Where a device's flashed config lives.
    pub fn device_path(&self, node: &NodeId) -> PathBuf {
        self.dir
            .join("devices")
            .join(node.as_str())
            .join("device.bin")
    }

    /// The mosquitto password file.
    pub fn passwd_path(&self) -> PathBuf {
        self.dir.join("mosquitto").join("passwd")
    }

    /// The mosquitto ACL file.
    pub fn acl_path(&self) -> PathBuf {
        self.dir.join("mosquitto").join("acl")
    }

    /// Sets `user`'s entry in the password file (replacing an old one) and rewrites the ACL.
    fn set_broker_user(&self, user: &str, password: &str) -> Result<(), ProvisionError> {
        let line = mosquitto_password_line(user, password, random::<12>()?);
        self.rewrite_passwd(user, Some(line)).map(|_| ())
    }

    /// Revokes a device: its broker entry is removed, so it can log in nowhere any more (its
    /// flashed config stays in the registry, useless). A running mosquitto applies it on reload
    /// (`kill -HUP`); the embedded broker's gate at the device's next connect.
    pub fn revoke(&self, node: &NodeId) -> Result<(), ProvisionError> {
        if self.rewrite_passwd(node.as_str(), None)? {
            Ok(())
        } else {
            Err(ProvisionError::NoSuchDevice(node.to_string()))
        }
    }

    /// Rewrites the password file without `user`'s entry, plus `line` if given, and the ACL.
    /// Returns whether `user` had an entry.
    fn rewrite_passwd(&self, user: &str, line: Option<String>) -> Result<bool, ProvisionError> {
        let path = self.passwd_path();
        let old = fs::read_to_string(&path).unwrap_or_default();
        let had = old.lines().any(|l| l.split(':').next() == Some(user));
        let mut lines: Vec<String> = old
            .lines()
            .filter(|l| l.split(':').next() != Some(user))
            .map(str::to_owned)
            .collect();
        lines.extend(line);
        let mut text = lines.join("\n");
        text.push('\n');
        // Debian's mosquitto runs as the `mosquitto` user: it must read the password file, and
        // nobody else may (root:mosquitto 0640). Without that group, 0600.
        match group_id("mosquitto") {
            Some(gid) => {
                write_file(&path, text.as_bytes(), 0o640)?;
                std::os::unix::fs::chown(&path, None, Some(gid)).map_err(io(&path))?;
            }
            None => write_file(&path, text.as_bytes(), 0o600)?,
        }
        write_file(&self.acl_path(), self.acl().as_bytes(), 0o644)?;
        Ok(had)
    }

    /// Creates a device: a fresh secret, its flashed config (from `cfg`, with the node id as
    /// username), and its broker entry. Refuses to replace an existing identity unless `force`.
    /// Returns the config written.
    pub fn create_device(
        &self,
        mut cfg: DeviceConfig,
        force: bool,
    ) -> Result<DeviceConfig, ProvisionError> {
        if cfg.node_id.as_str().starts_with(CONTROLLER_USER) {
            return Err(ProvisionError::Reserved(cfg.node_id.to_string()));
        }
        let path = self.device_path(&cfg.node_id);
        if path.exists() && !force {
            return Err(ProvisionError::Exists(path));
        }
        let secret = new_secret()?;
        cfg.username = Some(crate::human::text(cfg.node_id.as_str(), "username")?);
        cfg.password = Some(crate::Secret(crate::human::text(&secret, "password")?));
        let bytes = flash::to_vec(&cfg).map_err(ConfigError::from)?;
        write_file(&path, &bytes, 0o600)?;
        self.set_broker_user(cfg.node_id.as_str(), &secret)?;
        Ok(cfg)
    }

    /// The controller's broker password, created on first use.
    pub fn controller_password(&self) -> Result<String, ProvisionError> {
        self.controller_password_for(None)
    }

    /// The broker password of controller `name` ([`controller_user`]), created on first use.
    pub fn controller_password_for(&self, name: Option<&str>) -> Result<String, ProvisionError> {
        let file = match name {
            Some(n) => {
                NodeId::new(n)
                    .map_err(|e| ProvisionError::Reserved(std::format!("--name {n}: {e}")))?;
                std::format!("controller-{n}.secret")
            }
            None => "controller.secret".to_owned(),
        };
        let path = self.dir.join(file);
        if let Ok(s) = fs::read_to_string(&path) {
            return Ok(s.trim().to_owned());
        }
        let secret = new_secret()?;
        // The secret file first: the ACL is made from the controller secrets present.
        write_file(&path, secret.as_bytes(), 0o600)?;
        self.set_broker_user(&controller_user(name), &secret)?;
        Ok(secret)
    }

    /// Writes the ACL of this build (every device: its own topics only).
    pub fn write_acl(&self) -> Result<(), ProvisionError> {
        write_file(&self.acl_path(), self.acl().as_bytes(), 0o644)
    }

    /// The ACL for this registry's controller logins.
    fn acl(&self) -> String {
        let mut users = std::vec![CONTROLLER_USER.to_owned()];
        if let Ok(dir) = fs::read_dir(&self.dir) {
            for e in dir.flatten() {
                let f = e.file_name().to_string_lossy().into_owned();
                if let Some(name) = f
                    .strip_prefix("controller-")
                    .and_then(|f| f.strip_suffix(".secret"))
                {
                    users.push(controller_user(Some(name)));
                }
            }
        }
        users.sort();
        mosquitto_acl_for(&users)
    }

    /// A mosquitto configuration using this registry's password file and ACL; `listen` is
    /// `HOST:PORT`.
    pub fn mosquitto_conf(&self, listen: &str) -> String {
        let (host, port) = listen.rsplit_once(':').unwrap_or(("0.0.0.0", listen));
        let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        std::format!(
            "# Outpost broker (generated by outpost-provision). After adding a device, reload:\n\
             #   kill -HUP $(pidof mosquitto)    (or: systemctl reload mosquitto)\n\
             per_listener_settings false\nallow_anonymous false\n\
             password_file {}\nacl_file {}\nlistener {port} {host}\n\
             # A device logs in as its node id and may only use that id as its client id: no\n\
             # device can take over another's session. (A listener setting: after `listener`.)\n\
             use_username_as_clientid true\n",
            abs(self.passwd_path()).display(),
            abs(self.acl_path()).display(),
        )
    }
}

/// Where `install` puts things inside the target root.
pub const AGENT_BIN: &str = "usr/local/bin/outpost-agent";
/// The flashed config inside the target root.
pub const DEVICE_CONFIG: &str = "etc/outpost/device.bin";
/// The systemd unit inside the target root.
pub const UNIT: &str = "etc/systemd/system/outpost-agent.service";
/// The unit's enablement link.
pub const UNIT_WANTS: &str = "etc/systemd/system/multi-user.target.wants/outpost-agent.service";

/// What `install` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The node installed.
    pub node: NodeId,
    /// Files written (inside the root).
    pub files: Vec<PathBuf>,
}

/// Installs the agent binary, the device's flashed config and the systemd unit (enabled) into
/// `root` (an SD card's mounted root partition, or a directory image). Refuses to replace the
/// identity of a different device already installed there unless `force`. `progress` is called
/// with (bytes copied, total) while the binary is copied.
pub fn install(
    root: &Path,
    device_bin: &Path,
    agent_bin: &Path,
    unit: &str,
    force: bool,
    mut progress: impl FnMut(u64, u64),
) -> Result<Installed, ProvisionError> {
    let bytes = fs::read(device_bin).map_err(io(device_bin))?;
    let cfg = flash::decode(&bytes).map_err(ConfigError::from)?;
    let target_cfg = root.join(DEVICE_CONFIG);
    if let Ok(existing) = fs::read(&target_cfg)
        && !force
    {
        let same = flash::decode(&existing).is_ok_and(|e| e.node_id == cfg.node_id);
        if !same {
            return Err(ProvisionError::Exists(target_cfg));
        }
    }
    // The binary, with progress.
    let target_bin = root.join(AGENT_BIN);
    let mut src = fs::File::open(agent_bin).map_err(io(agent_bin))?;
    let total = src.metadata().map_err(io(agent_bin))?.len();
    let mut data = Vec::with_capacity(total as usize);
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = src.read(&mut buf).map_err(io(agent_bin))?;
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
        progress(data.len() as u64, total);
    }
    write_file(&target_bin, &data, 0o755)?;
    write_file(&target_cfg, &bytes, 0o600)?;
    let unit_path = root.join(UNIT);
    write_file(&unit_path, unit.as_bytes(), 0o644)?;
    let wants = root.join(UNIT_WANTS);
    if let Some(d) = wants.parent() {
        fs::create_dir_all(d).map_err(io(d))?;
    }
    let _ = fs::remove_file(&wants);
    std::os::unix::fs::symlink("/etc/systemd/system/outpost-agent.service", &wants)
        .map_err(io(&wants))?;
    Ok(Installed {
        node: cfg.node_id,
        files: [AGENT_BIN, DEVICE_CONFIG, UNIT, UNIT_WANTS]
            .iter()
            .map(PathBuf::from)
            .collect(),
    })
}

/// A readable description of a flashed config, secrets masked, after its CRC was verified.
pub fn inspect(bytes: &[u8]) -> Result<String, ProvisionError> {
    let cfg = flash::decode(bytes).map_err(ConfigError::from)?;
    let mut s = std::format!(
        "flashed config: {} bytes, format version {}, CRC-32 ok\n",
        bytes.len(),
        flash::VERSION
    );
    let _ = writeln!(s, "node_id      {}", cfg.node_id);
    for b in &cfg.brokers {
        let _ = writeln!(s, "broker       {b}");
    }
    let _ = writeln!(s, "username     {}", cfg.username.as_deref().unwrap_or("-"));
    let _ = writeln!(
        s,
        "password     {}",
        if cfg.password.is_some() {
            "******** (set)"
        } else {
            "-"
        }
    );
    let _ = writeln!(
        s,
        "ca_cert      {}",
        if cfg.ca_cert.is_some() { "pinned" } else { "-" }
    );
    let _ = writeln!(
        s,
        "client_cert  {}",
        if cfg.client_cert.is_some() {
            "set (key ********)"
        } else {
            "-"
        }
    );
    for l in &cfg.labels {
        let _ = writeln!(s, "label        {l}");
    }
    let r = cfg.reserved;
    let _ = writeln!(
        s,
        "reserved     {} vCPU, {} MiB, {} GiB",
        r.vcpus, r.memory_mib, r.disk_gib
    );
    let _ = writeln!(
        s,
        "hypervisor   {:?} {}",
        cfg.hypervisor.backend,
        cfg.hypervisor.uri.as_deref().unwrap_or("(default uri)")
    );
    let _ = writeln!(
        s,
        "state_dir    {}",
        cfg.state_dir.as_deref().unwrap_or("(default)")
    );
    Ok(s)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fresh_node_ids_are_valid_and_distinct() {
        let a = new_node_id().unwrap();
        let b = new_node_id().unwrap();
        assert!(a.as_str().starts_with("edge-") && a.as_str().len() == 17);
        assert_ne!(a, b);
    }

    #[test]
    fn password_lines_match_mosquitto_passwd() {
        // Produced by `mosquitto_passwd -b FILE user pass` (mosquitto 2.0.11).
        let line = "user:$7$101$YgbOn+FFdrGAl4XL$RwTagvxq43lONnJ9y7w6YB7dhi2zybEeWGdCHuXnQY2rz1AyusxnrlPoXuIIWkgKpsJa1715eEKhuKtvi8I8tQ==";
        let salt = base64::engine::general_purpose::STANDARD
            .decode("YgbOn+FFdrGAl4XL")
            .unwrap();
        assert_eq!(
            mosquitto_password_line("user", "pass", salt.try_into().unwrap()),
            line
        );
    }

    #[test]
    fn passwords_verify_against_mosquitto_entries() {
        let file = "other:$7$101$abc$def\nuser:$7$101$YgbOn+FFdrGAl4XL$RwTagvxq43lONnJ9y7w6YB7dhi2zybEeWGdCHuXnQY2rz1AyusxnrlPoXuIIWkgKpsJa1715eEKhuKtvi8I8tQ==\n";
        assert!(verify_mosquitto_password(file, "user", "pass"));
        assert!(!verify_mosquitto_password(file, "user", "wrong"));
        assert!(!verify_mosquitto_password(file, "other", "pass"));
        assert!(!verify_mosquitto_password(file, "nobody", "pass"));
        assert!(!verify_mosquitto_password(file, "use", "pass"));
    }

    #[test]
    fn each_controller_has_its_own_login_and_devices_cannot_take_one() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(dir.path());
        let a = reg.controller_password().unwrap();
        let b = reg.controller_password_for(Some("b")).unwrap();
        assert_ne!(a, b);
        assert_eq!(
            reg.controller_password_for(Some("b")).unwrap(),
            b,
            "made once"
        );
        let acl = std::fs::read_to_string(reg.acl_path()).unwrap();
        assert!(acl.contains("user outpost-controller\ntopic readwrite outpost/#"));
        assert!(acl.contains("user outpost-controller-b\ntopic readwrite outpost/#"));
        let passwd = reg.passwd_path();
        assert!(verify_mosquitto_password(
            &std::fs::read_to_string(&passwd).unwrap(),
            "outpost-controller-b",
            &b
        ));
        assert!(reg.controller_password_for(Some("bad name")).is_err());
        let cfg = DeviceConfig::new(NodeId::new("outpost-controller-c").unwrap());
        assert!(matches!(
            reg.create_device(cfg, true),
            Err(ProvisionError::Reserved(_))
        ));
    }

    #[test]
    fn acl_confines_devices_to_their_namespace() {
        let acl = mosquitto_acl();
        assert!(acl.contains("pattern write outpost/node/%u/status"));
        assert!(acl.contains("pattern read outpost/node/%u/desired"));
        assert!(!acl.contains("pattern readwrite"));
    }
}

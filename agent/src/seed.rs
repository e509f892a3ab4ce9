//! The cloud-init NoCloud seed: a small FAT volume labelled `CIDATA` (cloud-init looks for
//! `cidata` in either case) holding `user-data`, `meta-data` and, if given, `network-config`,
//! written with the `fatfs` crate (no tool on the device) and attached read-only.

use std::io::Write as _;
use std::path::Path;

/// The seed volume's size: room for 64 KiB of user-data and the rest, as FAT12.
const SIZE: u64 = 2 << 20;

/// What goes onto the seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    /// `instance-id`: stable across reboots and agent restarts, another one where the instance
    /// is rebuilt on another node (so cloud-init runs again there).
    pub instance_id: String,
    /// `local-hostname`.
    pub hostname: String,
    /// SSH public keys, one per line.
    pub ssh_keys: String,
    /// `user-data` (empty: an empty cloud-config).
    pub user_data: Vec<u8>,
    /// `network-config`, if any.
    pub network_config: Option<Vec<u8>>,
}

/// `meta-data`, as NoCloud reads it (YAML).
pub fn meta_data(s: &SeedFiles) -> String {
    let mut m = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        s.instance_id, s.hostname
    );
    let keys: Vec<&str> = s
        .ssh_keys
        .lines()
        .map(str::trim)
        // One key a line, printable: nothing that could end the quoted YAML string.
        .filter(|l| !l.is_empty() && !l.chars().any(char::is_control))
        .collect();
    if !keys.is_empty() {
        m.push_str("public-keys:\n");
        for k in keys {
            // Quoted: a key's comment may hold YAML's special characters.
            m.push_str(&format!(
                "  - \"{}\"\n",
                k.replace('\\', "\\\\").replace('"', "\\\"")
            ));
        }
    }
    m
}

/// Writes the seed volume to `path` (replacing it).
pub fn write(path: &Path, s: &SeedFiles) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.set_len(SIZE)?;
        fatfs::format_volume(
            &mut f,
            fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     "),
        )?;
        let fs = fatfs::FileSystem::new(&mut f, fatfs::FsOptions::new())?;
        let root = fs.root_dir();
        let user_data: &[u8] = if s.user_data.is_empty() {
            b"#cloud-config\n"
        } else {
            &s.user_data
        };
        for (name, bytes) in [
            ("meta-data", meta_data(s).into_bytes()),
            ("user-data", user_data.to_vec()),
        ]
        .into_iter()
        .chain(s.network_config.clone().map(|n| ("network-config", n)))
        {
            let mut file = root.create_file(name)?;
            file.truncate()?;
            file.write_all(&bytes)?;
            file.flush()?;
        }
        drop(root);
        fs.unmount()?;
        f.sync_all()?;
    }
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Read as _;

    #[test]
    fn the_seed_reads_back_with_its_label_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seed.img");
        let s = SeedFiles {
            instance_id: "0123456789abcdef-edge-1".into(),
            hostname: "web-1".into(),
            ssh_keys: "ssh-ed25519 AAAAC3Nza test@\"host\"\n".into(),
            user_data: b"#cloud-config\nruncmd: [echo hi]\n".to_vec(),
            network_config: None,
        };
        write(&p, &s).unwrap();
        let mut f = std::fs::File::open(&p).unwrap();
        let fs = fatfs::FileSystem::new(&mut f, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim(), "CIDATA");
        let mut text = String::new();
        fs.root_dir()
            .open_file("meta-data")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert!(
            text.contains("instance-id: 0123456789abcdef-edge-1"),
            "{text}"
        );
        assert!(text.contains("local-hostname: web-1"), "{text}");
        assert!(
            text.contains("  - \"ssh-ed25519 AAAAC3Nza test@\\\"host\\\"\""),
            "{text}"
        );
        let mut ud = Vec::new();
        fs.root_dir()
            .open_file("user-data")
            .unwrap()
            .read_to_end(&mut ud)
            .unwrap();
        assert_eq!(ud, s.user_data);
        assert!(fs.root_dir().open_file("network-config").is_err());
    }
}

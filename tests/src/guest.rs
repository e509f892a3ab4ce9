//! Real guests and libvirt: libvirtd started as shared/PLATFORM.md says, the tiny test
//! guest, virsh, and a test PKI.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Starts libvirtd (and virtlogd) as `shared/PLATFORM.md` describes, unless one answers.
/// Returns false (and says why) when libvirtd cannot be had on this machine.
pub fn ensure_libvirtd() -> bool {
    let answers = || {
        Command::new("virsh")
            .args(["-c", "qemu:///system", "version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if answers() {
        return true;
    }
    // scripts/setup configures QEMU to run as root, so guests can read the test's files.
    for d in ["/var/log/libvirt", "/var/run/libvirt"] {
        let _ = std::fs::create_dir_all(d);
    }
    for daemon in ["virtlogd", "libvirtd"] {
        let _ = Command::new(daemon)
            .arg("-d")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let mut ok = false;
    for _ in 0..100 {
        if answers() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ok
}

/// The libvirt network the guest-access tests attach to: isolated (no forwarding), DHCP from
/// libvirt's dnsmasq on 192.168.177.0/24. Created (transient) unless it is there.
pub const TEST_NETWORK: &str = "outpost-test";

/// Makes sure [`TEST_NETWORK`] exists and is active; panics with libvirt's answer if not.
pub fn ensure_test_network() {
    let active = Command::new("virsh")
        .args(["-c", "qemu:///system", "net-info", TEST_NETWORK])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("yes"));
    if active {
        return;
    }
    let xml = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        xml.path(),
        format!(
            "<network><name>{TEST_NETWORK}</name><bridge name='opbr0' stp='off'/>\
             <ip address='192.168.177.1' netmask='255.255.255.0'>\
             <dhcp><range start='192.168.177.10' end='192.168.177.99'/></dhcp></ip></network>"
        ),
    )
    .unwrap();
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system", "net-create"])
        .arg(xml.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "creating the test network failed (scripts/setup installs dnsmasq-base and iptables; \
         restart libvirtd after installing them): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `cp -a FROM TO`.
pub fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// `virsh -c qemu:///system ARGS`, its output trimmed.
pub fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A test PKI made with openssl: a CA, a server certificate for `localhost`/127.0.0.1 and a
/// client certificate, all in `dir` (`ca.pem`, `server.pem`, `server.key`, `client.pem`,
/// `client.key`).
pub fn make_pki(dir: &Path, ca_name: &str) {
    let run = |args: &str| {
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!("openssl {args} 2>/dev/null"))
            .current_dir(dir)
            .status()
            .unwrap();
        assert!(st.success(), "openssl {args}");
    };
    // Version-3 certificates with the usual extensions: rustls (webpki) accepts nothing else.
    std::fs::write(dir.join("ca.ext"), "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n").unwrap();
    std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n").unwrap();
    std::fs::write(dir.join("client.ext"), "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n").unwrap();
    run(&format!(
        "req -new -newkey rsa:2048 -nodes -subj '/CN={ca_name}' -keyout ca.key -out ca.csr"
    ));
    run("x509 -req -in ca.csr -signkey ca.key -days 2 -extfile ca.ext -out ca.pem");
    for who in ["server", "client"] {
        let cn = if who == "server" {
            "localhost"
        } else {
            "client"
        };
        run(&format!(
            "req -newkey rsa:2048 -nodes -subj /CN={cn} -keyout {who}.key -out {who}.csr"
        ));
        run(&format!(
            "x509 -req -in {who}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile {who}.ext -out {who}.pem"
        ));
    }
}

/// The marker the test guest prints on its serial console.
pub const GUEST_MARKER: &str = "OUTPOST-GUEST-BOOTED";

/// Puts the tiny test guest (Debian's cloud kernel and a busybox initramfs whose init prints
/// [`GUEST_MARKER`]) into `image_dir` as `vmlinuz` and `initrd.img`.
pub fn install_test_guest(image_dir: &Path) {
    let kernel = std::fs::read_dir("/boot")
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
                && p.to_string_lossy().ends_with("-cloud-amd64")
        })
        .expect("Debian's cloud kernel (linux-image-cloud-amd64) is installed by scripts/setup");
    std::fs::copy(&kernel, image_dir.join("vmlinuz")).unwrap();

    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in ["bin", "dev", "proc", "sys"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", r.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", r.join("bin/sh")).unwrap();
    let init = format!(
        "#!/bin/sh\n/bin/busybox mount -t proc proc /proc\n/bin/busybox mount -t devtmpfs dev /dev\n\
         echo {GUEST_MARKER} > /dev/ttyS0\nwhile true; do /bin/busybox sleep 3600; done\n"
    );
    std::fs::write(r.join("init"), init).unwrap();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "chmod +x init && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
            image_dir.join("initrd.img").display()
        ))
        .current_dir(r)
        .status()
        .unwrap();
    assert!(st.success(), "building the test initramfs failed");
}

/// A bootable disk image of the tiny test guest, as a qcow2 file in `dir`: a FAT file system
/// with SYSLINUX in its boot sector (no partition table, as a "superfloppy"), the kernel and
/// the initrd whose init prints [`GUEST_MARKER`]. Booted by SeaBIOS from the disk, it proves a
/// guest came up from that image.
pub fn make_boot_disk(dir: &Path) -> std::path::PathBuf {
    let files = dir.join("boot-files");
    std::fs::create_dir_all(&files).unwrap();
    install_test_guest(&files);
    std::fs::write(
        files.join("syslinux.cfg"),
        "SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 1\nLABEL linux\n  KERNEL vmlinuz\n  APPEND initrd=initrd.img console=ttyS0 quiet panic=-1\n",
    )
    .unwrap();
    let raw = dir.join("boot.img");
    let out = dir.join("boot.qcow2");
    let script = format!(
        "set -e; rm -f '{raw}'; mkfs.fat -C -n OUTPOST '{raw}' 32768 >/dev/null; syslinux --install '{raw}'; \
         mcopy -i '{raw}' '{f}/vmlinuz' '{f}/initrd.img' '{f}/syslinux.cfg' ::/; \
         qemu-img convert -O qcow2 '{raw}' '{out}'; rm -f '{raw}'",
        raw = raw.display(),
        f = files.display(),
        out = out.display()
    );
    let st = Command::new("sh").arg("-c").arg(&script).status().unwrap();
    assert!(
        st.success(),
        "making the boot disk failed (scripts/setup installs syslinux, mtools, dosfstools)"
    );
    out
}

/// The test guest's kernel and an initrd (`initrd-seed.img`) whose init loads the virtio disk and
/// FAT modules of that kernel, finds the volume labelled `CIDATA` (the cloud-init seed), mounts
/// it and prints to its console the seed's device, the SHA-256 of its `user-data`, and its
/// `meta-data` lines with the instance id and the SSH keys, each prefixed `SEED:`. With a
/// network interface it also asks for a DHCP lease, configures it and prints `NET: bound IP`.
pub fn install_seed_guest(image_dir: &Path) {
    install_test_guest(image_dir);
    let kernel = std::fs::read_dir("/boot")
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        .unwrap();
    let version = kernel.trim_start_matches("vmlinuz-");
    let mods = Path::new("/lib/modules").join(version).join("kernel");
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in ["bin", "dev", "proc", "sys", "mnt", "lib/modules"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", r.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", r.join("bin/sh")).unwrap();
    let order = [
        "drivers/virtio/virtio_ring.ko",
        "drivers/virtio/virtio.ko",
        "drivers/virtio/virtio_pci_legacy_dev.ko",
        "drivers/virtio/virtio_pci_modern_dev.ko",
        "drivers/virtio/virtio_pci.ko",
        "drivers/block/virtio_blk.ko",
        "fs/fat/fat.ko",
        "fs/fat/vfat.ko",
        "fs/nls/nls_cp437.ko",
        "fs/nls/nls_ascii.ko",
        "net/core/failover.ko",
        "drivers/net/net_failover.ko",
        "drivers/net/virtio_net.ko",
    ];
    let mut load = String::new();
    for m in order {
        let name = Path::new(m)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if std::fs::copy(mods.join(m), r.join("lib/modules").join(&name)).is_ok() {
            load.push_str(&format!(
                "/bin/busybox insmod /lib/modules/{name} 2>/dev/null\n"
            ));
        }
    }
    let init = format!(
        "#!/bin/sh\n/bin/busybox mount -t proc proc /proc\n/bin/busybox mount -t devtmpfs dev /dev\n\
         /bin/busybox mount -t sysfs sys /sys\n{load}\
         echo {GUEST_MARKER} > /dev/ttyS0\n\
         for i in 1 2 3 4 5 6 7 8 9 10; do D=$(/bin/busybox findfs LABEL=CIDATA 2>/dev/null) && break; /bin/busybox sleep 1; done\n\
         if [ -n \"$D\" ] && /bin/busybox mount -t vfat -o ro \"$D\" /mnt; then\n\
           echo \"SEED: device $D\" > /dev/ttyS0\n\
           echo \"SEED: user-data $(/bin/busybox sha256sum /mnt/user-data)\" > /dev/ttyS0\n\
           /bin/busybox sed 's/^/SEED: /' /mnt/meta-data > /dev/ttyS0\n\
         else echo \"SEED: none; disks: $(/bin/busybox ls /dev/vd* 2>&1); $(/bin/busybox blkid 2>&1); modules: $(/bin/busybox cat /proc/modules | /bin/busybox cut -d' ' -f1 | /bin/busybox tr '\\n' ' ')\" > /dev/ttyS0; fi\n\
         if [ -e /sys/class/net/eth0 ]; then /bin/busybox ip link set eth0 up; /bin/busybox udhcpc -i eth0 -q -t 30 -s /bin/dhcp-bound >/dev/null 2>&1 & \
         else echo \"NET: no eth0: $(/bin/busybox ls /sys/class/net)\" > /dev/ttyS0; fi\n\
         while true; do /bin/busybox sleep 3600; done\n"
    );
    std::fs::write(r.join("init"), init).unwrap();
    // udhcpc's script: configures the lease it got and says so on the console.
    std::fs::write(
        r.join("bin/dhcp-bound"),
        "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\n/bin/busybox ip link set \"$interface\" up\n\
         /bin/busybox ip addr add \"$ip/$mask\" dev \"$interface\"\necho \"NET: bound $ip\" > /dev/ttyS0\n",
    )
    .unwrap();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "chmod +x init bin/dhcp-bound && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
            image_dir.join("initrd-seed.img").display()
        ))
        .current_dir(r)
        .status()
        .unwrap();
    assert!(st.success(), "building the seed test initramfs failed");
}

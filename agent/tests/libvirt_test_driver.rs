//! The libvirt backend against libvirt's own in-memory `test:///default` driver: the real
//! libvirt API, no daemon, no VM.
#![cfg(feature = "libvirt")]
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost_agent::config::KindChoice;
use outpost_agent::hypervisor::libvirt::{LibvirtConfig, LibvirtHypervisor};
use outpost_agent::hypervisor::{DomainState, Hypervisor, HypervisorError, Outcome};
use outpost_protocol::*;
use virt::connect::Connect;

fn spec(boot: Boot, disk_gib: u32) -> InstanceSpec {
    InstanceSpec {
        vcpus: 1,
        memory_mib: 64,
        disk_gib,
        arch: Arch::native().unwrap(),
        require_kvm: false,
        boot,
        network: Network::None,
        restart: RestartPolicy::OnFailure,
        labels: Labels::new(),
        seed: None,
    }
}

fn kernel_boot() -> Boot {
    Boot::Kernel {
        kernel: ImageName::new("vmlinuz").unwrap().into(),
        initrd: Some(ImageName::new("initrd.img").unwrap().into()),
        cmdline: Cmdline::new("console=ttyS0").unwrap(),
    }
}

fn backing_file(disk: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(disk)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn libvirt_backend_lifecycle_on_the_test_driver() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let instances = dir.path().join("instances");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::write(images.join("vmlinuz"), b"kernel").unwrap();
    std::fs::write(images.join("initrd.img"), b"initrd").unwrap();
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(images.join("base.qcow2"))
        .arg("1G")
        .status()
        .unwrap();
    assert!(st.success());

    let hv = LibvirtHypervisor::open(LibvirtConfig {
        node: NodeId::new("edge-1").unwrap(),
        uri: "test:///default".into(),
        kind: KindChoice::Auto,
        image_dir: images.clone(),
        instance_dir: instances.clone(),
        stop_timeout: Duration::ZERO,
    })
    .unwrap();

    // The test driver offers no KVM: the probe says emulated.
    let host = hv.host().unwrap();
    assert_eq!(host.kind, HypervisorKind::Emulated);
    assert!(host.vcpus > 0 && host.memory_mib > 0);

    // The driver's own domain ("test") is not Outpost's: never listed.
    assert!(hv.list().unwrap().is_empty());

    let a = InstanceId::from_u64(1);
    let b = InstanceId::from_u64(2);
    hv.create(a, &spec(kernel_boot(), 0), true).unwrap();
    hv.create(
        b,
        &spec(
            Boot::Disk {
                image: ImageName::new("base.qcow2").unwrap().into(),
            },
            2,
        ),
        false,
    )
    .unwrap();
    // Create is idempotent.
    hv.create(a, &spec(kernel_boot(), 0), true).unwrap();

    let mut listed = hv.list().unwrap();
    listed.sort_by_key(|d| d.id);
    assert_eq!(listed.len(), 2);

    // Another agent (another node) on the same libvirt neither sees nor touches them.
    let other = LibvirtHypervisor::open(LibvirtConfig {
        node: NodeId::new("edge-2").unwrap(),
        uri: "test:///default".into(),
        kind: KindChoice::Auto,
        image_dir: images.clone(),
        instance_dir: dir.path().join("other"),
        stop_timeout: Duration::ZERO,
    })
    .unwrap();
    assert!(other.list().unwrap().is_empty());
    assert_eq!(listed[0].state, DomainState::Running);
    assert_eq!(listed[1].state, DomainState::Off { crashed: false });

    // The disk-booted instance got a copy-on-write overlay on the base image.
    let overlay = instances.join(b.to_string()).join("disk.qcow2");
    let info = backing_file(&overlay);
    assert!(info.contains("base.qcow2"), "{info}");
    assert!(info.contains("\"virtual-size\": 2147483648"), "{info}");

    // A stop and a reboot that press the power button: the test driver's guests act on it
    // at once, so both are clean; a forced stop pulls the plug.
    let polite = PowerMode {
        force: false,
        stop_timeout_secs: 5,
    };
    let forced = PowerMode {
        force: true,
        stop_timeout_secs: 0,
    };
    assert_eq!(hv.stop(a, polite).unwrap(), Outcome::Done);
    hv.start(a).unwrap();
    assert_eq!(hv.stop(a, forced).unwrap(), Outcome::Done);
    hv.start(b).unwrap();
    assert_eq!(hv.reboot(b, polite).unwrap(), Outcome::Done);
    assert_eq!(hv.reboot(b, forced).unwrap(), Outcome::Done);
    let states: Vec<_> = {
        let mut l = hv.list().unwrap();
        l.sort_by_key(|d| d.id);
        l.into_iter().map(|d| d.state).collect()
    };
    assert_eq!(
        states,
        vec![DomainState::Off { crashed: false }, DomainState::Running]
    );

    // A missing image is a clear, typed error.
    let missing = spec(
        Boot::Disk {
            image: ImageName::new("nope.qcow2").unwrap().into(),
        },
        1,
    );
    let err = hv
        .create(InstanceId::from_u64(3), &missing, true)
        .unwrap_err();
    assert!(matches!(err, HypervisorError::MissingImage(_)), "{err}");
    assert_eq!(err.kind(), ErrorKind::UnknownImage);

    hv.delete(a).unwrap();
    hv.delete(b).unwrap();
    hv.delete(b).unwrap(); // idempotent
    assert!(hv.list().unwrap().is_empty());
    assert!(!instances.join(b.to_string()).exists());

    // The driver's own domain was left alone.
    let conn = Connect::open(Some("test:///default")).unwrap();
    assert!(conn.lookup_domain_by_name("test").is_ok());
}

//! QEMU stays unprivileged: `scripts/qemu-user` (run by `scripts/setup`) leaves libvirt's
//! qemu.conf alone on an ordinary host, and only in a container sandbox makes QEMU run as root,
//! saying so and marking its lines.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn run(conf: &std::path::Path, container: &str) -> std::process::Output {
    Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/qemu-user"))
        .env("QEMU_CONF", conf)
        .env("OUTPOST_CONTAINER", container)
        .output()
        .unwrap()
}

#[test]
fn qemu_runs_as_root_only_in_a_container_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("qemu.conf");
    // Debian's stock file: the user line is commented out.
    let stock = "#user = \"libvirt-qemu\"\n#group = \"libvirt-qemu\"\n";
    std::fs::write(&conf, stock).unwrap();

    let out = run(&conf, "0");
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        stock,
        "an ordinary host is untouched"
    );

    let out = run(&conf, "1");
    assert!(out.status.success());
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(
        text.contains("# added by outpost scripts/qemu-user: container sandbox\nuser = \"root\"")
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("WARNING"));

    // Run again: nothing more is added.
    run(&conf, "1");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), text);
}

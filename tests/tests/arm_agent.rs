//! The agent cross-compiled for aarch64 runs under qemu-aarch64 against the native controller:
//! it registers with its aarch64 architecture and launches an instance through libvirt's test
//! driver; a second ARM agent drives the real (x86_64) libvirtd over its unix socket and boots
//! a real guest.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outpost_tests::*;

const T: Duration = Duration::from_secs(120);

#[test]
fn aarch64_agent_registers_and_launches_instances() {
    assert!(
        ensure_libvirtd(),
        "libvirtd could not be started (see shared/PLATFORM.md)"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();

    // ARM agent 1: libvirt's test driver (the arm64 libvirt library under qemu-user).
    let mut arm = Agent::configure(
        dir.path(),
        "edge-arm",
        ctl.mqtt_port,
        "[hypervisor]\nbackend = \"libvirt\"\nuri = \"test:///default\"\n",
    );
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::write(arm.state_dir.join("images").join(f), b"x").unwrap();
    }
    arm.start_aarch64();
    ctl.wait_nodes_up(1);
    let node = ctl.cli(&["nodes", "show", "edge-arm"]).unwrap();
    assert_eq!(node["arch"], "aarch64", "{node}");

    // An x86_64 instance has nowhere to go, and the refusal says the architecture is why.
    let e = ctl
        .cli(&[
            "instances",
            "create",
            "x86-1",
            "--arch",
            "x86_64",
            "--kernel",
            "vmlinuz",
        ])
        .unwrap_err();
    assert!(e.contains("architecture removed 1"), "{e}");
    // Without --arch, an instance goes to any architecture the fleet has (here only aarch64,
    // though the controller itself is x86_64).
    let v = ctl
        .cli(&[
            "instances",
            "create",
            "arm-1",
            "--kernel",
            "vmlinuz",
            "--initrd",
            "initrd.img",
            "--memory",
            "128",
        ])
        .unwrap();
    assert_eq!(v["node"], "edge-arm");
    assert_eq!(v["arch"], "aarch64");
    ctl.wait_phase("arm-1", "running", T);

    // ARM agent 2: the real libvirtd (x86_64, QEMU) over its socket, booting a real guest.
    let mut real = Agent::configure(
        dir.path(),
        "edge-arm-real",
        ctl.mqtt_port,
        "[hypervisor]\nbackend = \"libvirt\"\nuri = \"qemu:///system\"\nstop_timeout_secs = 1\n",
    );
    install_test_guest(&real.state_dir.join("images"));
    real.start_aarch64();
    ctl.wait_nodes_up(2);
    let v = ctl
        .cli(&[
            "instances",
            "create",
            "guest-1",
            "--arch",
            "x86_64",
            "--kernel",
            "vmlinuz",
            "--initrd",
            "initrd.img",
            "--memory",
            "256",
            "--cmdline",
            "console=ttyS0 quiet",
        ])
        .unwrap();
    assert_eq!(v["node"], "edge-arm-real");
    ctl.wait_phase("guest-1", "running", T);
    let id = v["id"].as_str().unwrap();
    let console = real
        .state_dir
        .join("instances")
        .join(id)
        .join("console.log");
    wait_for(T, "the guest's console line", || {
        std::fs::read_to_string(&console)
            .ok()
            .filter(|t| t.contains(GUEST_MARKER))
    });
    ctl.cli(&["instances", "delete", "guest-1"]).unwrap();
    wait_for(T, "guest-1 deleted", || {
        ctl.phase("guest-1").is_none().then_some(())
    });
    assert!(arm.proc().alive() && real.proc().alive());
}

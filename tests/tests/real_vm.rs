//! The agent boots a real guest through a real libvirtd (QEMU; TCG where KVM is unusable):
//! Debian's cloud kernel with a busybox initramfs, direct kernel boot, serial console to a file.
//! Then it stops and deletes it, and libvirt holds nothing left of it.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use outpost_protocol::*;
use outpost_tests::*;

const BOOT: Duration = Duration::from_secs(120);

fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn agent_boots_stops_and_deletes_a_real_guest() {
    assert!(
        ensure_libvirtd(),
        "libvirtd could not be started (see shared/PLATFORM.md)"
    );
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let ctl = TestController::connect(broker.port);
    let mut agent = Agent::configure(
        dir.path(),
        "edge-vm",
        broker.port,
        "[hypervisor]\nbackend = \"libvirt\"\nuri = \"qemu:///system\"\nstop_timeout_secs = 2\n",
    );
    install_test_guest(&agent.state_dir.join("images"));
    agent.start();
    let node = agent.node.clone();

    let inv = ctl.wait(BOOT, "inventory", |s| s.inventory_of(&node));
    assert_eq!(Some(inv.arch), Arch::native());
    assert!(inv.images.iter().any(|i| i.as_str() == "vmlinuz"));
    eprintln!("hypervisor detected: {}", inv.hypervisor);

    // A fresh id per run, so that nothing left by an earlier run can satisfy the checks.
    let id = InstanceId::from_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let domain = format!("outpost-{id}");
    let mut inst = instance(
        id.as_u64(),
        kernel_boot("console=ttyS0 panic=-1 quiet"),
        256,
    );
    ctl.publish_desired(&node, &desired(1, vec![inst.clone()]));

    ctl.wait(BOOT, "the instance running", |s| {
        s.states(&node, id)
            .contains(&InstanceState::Running)
            .then_some(())
    });
    assert!(virsh(&["domstate", &domain]).contains("running"));

    // The guest's own words, from its serial console log.
    let console = agent
        .state_dir
        .join("instances")
        .join(id.to_string())
        .join("console.log");
    wait_for(BOOT, "the guest's console line", || {
        std::fs::read_to_string(&console)
            .ok()
            .filter(|t| t.contains(GUEST_MARKER))
    });

    // A clean reboot: busybox has no ACPI handler, so after the 2 s stop timeout the agent
    // resets it, and says so in the instance's reason; the guest boots again.
    let booted = |t: &str| t.matches(GUEST_MARKER).count();
    let before = booted(&std::fs::read_to_string(&console).unwrap());
    inst.reboot_count = 1;
    ctl.publish_desired(&node, &desired(2, vec![inst.clone()]));
    let why = ctl.wait(BOOT, "the ignored reboot's reason", |s| {
        s.reasons(&node, id)
            .into_iter()
            .find(|r| r.contains("ignored the power button"))
    });
    assert!(why.contains("for 2 s: reset"), "{why}");
    wait_for(BOOT, "the guest booting again", || {
        std::fs::read_to_string(&console)
            .ok()
            .filter(|t| booted(t) > before)
    });

    // Stop: forced off after 2 s, said so.
    inst.power = PowerState::Stopped;
    ctl.publish_desired(&node, &desired(3, vec![inst.clone()]));
    ctl.wait(BOOT, "the instance stopped", |s| {
        s.states(&node, id)
            .contains(&InstanceState::Stopped)
            .then_some(())
    });
    assert!(virsh(&["domstate", &domain]).contains("shut off"));
    assert!(
        ctl.seen()
            .reasons(&node, id)
            .iter()
            .any(|r| r.contains("for 2 s: forced off")),
        "{:?}",
        ctl.seen().reasons(&node, id)
    );

    // A forced start-and-stop: off at once, nothing to say.
    inst.power = PowerState::Running;
    ctl.publish_desired(&node, &desired(4, vec![inst.clone()]));
    ctl.wait(BOOT, "running again", |s| {
        (s.states(&node, id).last() == Some(&InstanceState::Running)).then_some(())
    });
    inst.power = PowerState::Stopped;
    inst.power_mode.force = true;
    ctl.publish_desired(&node, &desired(5, vec![inst.clone()]));
    ctl.wait(BOOT, "force-stopped", |s| {
        (s.states(&node, id).last() == Some(&InstanceState::Stopped)).then_some(())
    });
    assert_eq!(
        ctl.seen().reasons(&node, id).last().map(String::as_str),
        Some("")
    );

    // Delete: nothing of it is left in libvirt or on disk.
    ctl.publish_desired(&node, &desired_gone(6, vec![], &[inst.id.as_u64()]));
    ctl.wait(BOOT, "the instance deleted", |s| {
        s.states(&node, id)
            .contains(&InstanceState::Deleted)
            .then_some(())
    });
    let all = virsh(&["list", "--all", "--name"]);
    assert!(!all.contains(&domain), "libvirt still has {domain}: {all}");
    assert!(!console.parent().unwrap().exists());
    assert!(agent.proc().alive());
}

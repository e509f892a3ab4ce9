//! A device's identity copied onto a second box (the same flashed config, its own agent
//! install): on the real libvirtd, the copy builds nothing, the node goes into `conflict` with
//! a loud event, the guest already running is untouched (same QEMU process), and an operator
//! ends it with `outpost nodes resolve NODE --keep BOOT-ID`.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use outpost_tests::*;
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(180);
const T: Duration = Duration::from_secs(60);

fn qemu_pid(domain: &str) -> Option<String> {
    let out = Command::new("pgrep")
        .args(["-f", &format!("guest={domain}")])
        .output()
        .ok()?;
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!pid.is_empty()).then_some(pid)
}

fn boot_id(a: &Agent) -> Option<String> {
    std::fs::read_to_string(a.state_dir.join("boot-id"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| s.len() == 16)
}

fn node(ctl: &Controller) -> Value {
    ctl.cli(&["nodes", "show", "edge-twin"]).unwrap()
}

#[test]
fn a_copied_identity_builds_nothing_and_puts_the_node_in_conflict() {
    assert!(ensure_libvirtd(), "libvirtd could not be started");
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let mut ctl = Controller::external(dir.path(), broker.port);
    ctl.start();
    let mut original = Agent::real(dir.path(), "edge-twin", broker.port, "twin");
    original.start();
    ctl.wait_nodes_up(1);
    let v = ctl.create("twin-vm", &[]).unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    ctl.wait_phase("twin-vm", "running", BOOT);
    let domain = format!("outpost-{id}");
    let pid = wait_for(T, "the guest's QEMU", || qemu_pid(&domain));
    let bound = boot_id(&original).unwrap();
    assert_eq!(
        node(&ctl)["install"],
        bound.as_str(),
        "the first install is bound"
    );

    // The copy: the same node id and flashed settings, another box (its own state directory),
    // on the same hypervisor so that anything it built would show.
    let copy_dir = dir.path().join("copy");
    std::fs::create_dir_all(&copy_dir).unwrap();
    let mut copy = Agent::real(&copy_dir, "edge-twin", broker.port, "twin");
    copy.start();
    let other = wait_for(T, "the copy's install id", || boot_id(&copy));
    assert_ne!(other, bound);
    let n = wait_for(T, "the node in conflict", || {
        let n = node(&ctl);
        (n["state"] == "conflict").then_some(n)
    });
    assert_eq!(n["install"], bound.as_str(), "{n}");
    assert!(
        n["conflict"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b == other.as_str()),
        "{n}"
    );
    let events = ctl.cli(&["events", "--node", "edge-twin"]).unwrap();
    let conflict = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "identity-conflict")
        .cloned()
        .unwrap_or_else(|| panic!("no identity-conflict event: {events}"));
    assert!(
        conflict["detail"].as_str().unwrap().contains(&other),
        "{conflict}"
    );
    // Nothing new is placed on it.
    let e = ctl.create("twin-vm-2", &[]).unwrap_err();
    assert!(e.contains("no host fits"), "{e}");

    // While both fight over the connection, the copy builds nothing and the guest runs on.
    std::thread::sleep(Duration::from_secs(8));
    for op in ["create", "start", "delete", "stop", "reboot"] {
        assert_eq!(copy.ops(op, None), 0, "the copy ran {op}");
        assert_eq!(original.ops("delete", None), 0, "the original deleted");
    }
    assert!(
        copy.proc().log_text().contains("another agent install"),
        "the copy says why it builds nothing"
    );
    assert_eq!(qemu_pid(&domain).as_deref(), Some(pid.as_str()));
    assert_eq!(ctl.phase("twin-vm").as_deref(), Some("running"));
    assert!(ctl.proc().alive(), "the controller lives on");

    // An operator finds the copy, switches it off and keeps the original.
    copy.proc().kill();
    let e = ctl
        .cli(&[
            "nodes",
            "resolve",
            "edge-twin",
            "--keep",
            "00000000000000ff",
        ])
        .unwrap_err();
    assert!(e.contains("no agent install"), "{e}");
    let n = ctl
        .cli(&["nodes", "resolve", "edge-twin", "--keep", &bound])
        .unwrap();
    assert_eq!(n["install"], bound.as_str(), "{n}");
    ctl.wait_nodes_up(1);
    assert_eq!(qemu_pid(&domain).as_deref(), Some(pid.as_str()));
    ctl.cli(&["instances", "delete", "twin-vm"]).unwrap();
    wait_for(T, "the guest deleted", || {
        qemu_pid(&domain).is_none().then_some(())
    });
}

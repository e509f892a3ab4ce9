//! The controller process with its embedded broker (and with mosquitto), fake-backend agents,
//! and the `outpost` CLI: placement, anti-affinity, clear refusals, stop/start, delete, and a
//! kill -9 of the controller with nothing lost and nothing launched twice.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outpost_tests::*;

const T: Duration = Duration::from_secs(30);

fn fake_agent(dir: &std::path::Path, node: &str, port: u16, memory_mib: u32, zone: &str) -> Agent {
    Agent::fake(dir, node, port, memory_mib, zone)
}

fn create(c: &Controller, name: &str, extra: &[&str]) -> Result<serde_json::Value, String> {
    c.create(name, extra)
}

#[test]
fn controller_schedules_dispatches_and_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let mut a = fake_agent(dir.path(), "edge-a", ctl.mqtt_port, 2048, "north");
    let mut b = fake_agent(dir.path(), "edge-b", ctl.mqtt_port, 1024, "south");
    a.start();
    b.start();
    ctl.wait_nodes_up(2);

    // Two members of an anti-affinity group land on different nodes; a third fits nowhere.
    let w1 = create(&ctl, "web-1", &["--group", "web"]).unwrap();
    let w2 = create(&ctl, "web-2", &["--group", "web"]).unwrap();
    assert_ne!(w1["node"], w2["node"]);
    let err = create(&ctl, "web-3", &["--group", "web"]).unwrap_err();
    assert!(
        err.contains("no host fits (2 hosts): anti-affinity removed 2"),
        "{err}"
    );
    // A selector and an impossible size get clear answers too.
    let db = create(&ctl, "db-1", &["--selector", "zone=south"]).unwrap();
    assert_eq!(db["node"], "edge-b");
    let err = create(&ctl, "huge", &["--memory", "999999"]).unwrap_err();
    assert!(err.contains("memory removed 2"), "{err}");
    assert!(
        ctl.phase("huge").is_none(),
        "a refused request stores nothing"
    );
    for n in ["web-1", "web-2", "db-1"] {
        ctl.wait_phase(n, "running", T);
    }

    // Stop and start are level-triggered through the node's desired state.
    ctl.cli(&["instances", "stop", "db-1"]).unwrap();
    ctl.wait_phase("db-1", "stopped", T);
    ctl.cli(&["instances", "start", "db-1"]).unwrap();
    ctl.wait_phase("db-1", "running", T);

    // kill -9 the controller in the middle of a burst of creates, then restart it.
    for i in 0..4 {
        create(&ctl, &format!("burst-{i}"), &["--memory", "64"]).unwrap();
    }
    ctl.proc().kill();
    ctl.start();
    let list = ctl.cli(&["instances", "list"]).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 7, "{names:?}");
    for i in 0..4 {
        ctl.wait_phase(&format!("burst-{i}"), "running", T);
    }
    ctl.wait_nodes_up(2);
    // Nothing was launched twice: each agent built each of its instances exactly once, and
    // every instance was built (7 creates in all).
    let mut creates = 0;
    for agent in [&mut a, &mut b] {
        let log = agent.proc().log_text();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("op=\"create\""))
            .collect();
        for line in &lines {
            let id = line
                .split("id=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap();
            let n = lines.iter().filter(|l| l.contains(id)).count();
            assert_eq!(n, 1, "{id} created {n} times");
        }
        creates += lines.len();
    }
    assert_eq!(creates, 7);

    // Delete: gone once the node confirms.
    ctl.cli(&["instances", "delete", "web-1"]).unwrap();
    wait_for(T, "web-1 gone", || {
        ctl.phase("web-1").is_none().then_some(())
    });

    // Drain moves what can move; db-1 must stay in zone south, and says so.
    let on_b = |ctl: &Controller| -> Vec<String> {
        let v = ctl.cli(&["instances", "list"]).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter(|i| i["node"] == "edge-b")
            .map(|i| i["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let before = on_b(&ctl);
    // A drain that leaves an instance behind is a failure (exit 1, JSON error on stderr) that
    // names it; the JSON answer on stdout still counts what moved.
    let out = std::process::Command::new(bin("outpost"))
        .args(["--api", &ctl.api, "--json", "nodes", "drain", "edge-b"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let drained: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        drained["moved"].as_u64().unwrap() as usize,
        before.len() - 1,
        "{drained} {before:?}"
    );
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    let err = err["error"].as_str().unwrap();
    assert!(
        err.contains("not drained") && err.contains("labels removed"),
        "{err}"
    );
    // `--json | head`: a reader that goes away early is no panic.
    let piped = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{} --api {} --json instances list | true; echo ${{PIPESTATUS[0]}}",
            bin("outpost").display(),
            ctl.api
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&piped.stdout).trim(),
        "0",
        "{stderr}"
    );
    assert_eq!(on_b(&ctl), vec!["db-1".to_owned()]);
    let nodes = ctl.cli(&["nodes", "show", "edge-b"]).unwrap();
    assert_eq!(nodes["state"], "draining");

    // A restarted controller gives nodes the liveness timeout to report again: with both
    // agents frozen, edge-a is still up at once and a create is placed, not refused.
    let signal = |sig: &str, p: u32| {
        std::process::Command::new("kill")
            .args([sig, &p.to_string()])
            .status()
            .unwrap();
    };
    let (pa, pb) = (a.proc().pid(), b.proc().pid());
    signal("-STOP", pa);
    signal("-STOP", pb);
    ctl.proc().kill();
    ctl.start();
    let shown = ctl.cli(&["nodes", "show", "edge-a"]).unwrap();
    assert_eq!(shown["state"], "up", "{shown}");
    let placed = create(&ctl, "after-restart", &["--memory", "64"]).unwrap();
    assert_eq!(placed["node"], "edge-a");
    signal("-CONT", pa);
    signal("-CONT", pb);
    ctl.wait_phase("after-restart", "running", T);
}

#[test]
fn controller_works_with_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let mut ctl = Controller::external(dir.path(), broker.port);
    ctl.start();
    let mut a = fake_agent(dir.path(), "edge-m", broker.port, 2048, "north");
    a.start();
    ctl.wait_nodes_up(1);
    create(&ctl, "m-1", &[]).unwrap();
    ctl.wait_phase("m-1", "running", T);
    // Bad API input is a clear 4xx, not a crash.
    let err = ctl
        .cli(&["instances", "create", "bad", "--kernel", "../etc/passwd"])
        .unwrap_err();
    assert!(err.contains("kernel") && err.contains("HTTP 400"), "{err}");
    assert!(ctl.proc().alive());
}

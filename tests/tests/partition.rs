//! A node cut off from the fleet (its agent frozen with SIGSTOP, so it neither reports nor
//! answers the broker): the node goes down within the liveness window and its VMs are left
//! alone; after a short cut it converges without duplicates; after a cut longer than the
//! lost-after delay its instances are rebuilt elsewhere, and when it returns it deletes its
//! stale copies (fencing by generation).
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use outpost_tests::*;

const T: Duration = Duration::from_secs(60);

fn signal(agent: &mut Agent, sig: &str) {
    let pid = agent.proc().pid();
    assert!(
        Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success()
    );
}

fn node_of(ctl: &Controller, name: &str) -> String {
    ctl.cli(&["instances", "show", name]).unwrap()["node"]
        .as_str()
        .unwrap_or("-")
        .to_owned()
}

fn state_of(ctl: &Controller, node: &str) -> String {
    ctl.cli(&["nodes", "show", node]).unwrap()["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn ops(agent: &mut Agent, op: &str, id: &str) -> usize {
    agent
        .proc()
        .log_text()
        .lines()
        .filter(|l| l.contains(&format!("op=\"{op}\"")) || l.contains(&format!("op={op}")))
        .filter(|l| l.contains(id))
        .count()
}

#[test]
fn partitioned_node_goes_down_then_is_fenced_after_lost_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.args
        .extend(["--lost-after".to_owned(), "12".to_owned()]);
    ctl.start();
    let mut agents: Vec<Agent> = ["edge-a", "edge-b"]
        .iter()
        .map(|n| {
            let a = Agent::configure(
                dir.path(),
                n,
                ctl.mqtt_port,
                "[hypervisor]\nbackend = \"fake\"\n",
            );
            std::fs::write(a.state_dir.join("images/vmlinuz"), b"x").unwrap();
            a
        })
        .collect();
    for a in &mut agents {
        a.start();
    }
    ctl.wait_nodes_up(2);
    let v = ctl
        .cli(&[
            "instances",
            "create",
            "p-1",
            "--kernel",
            "vmlinuz",
            "--memory",
            "128",
        ])
        .unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    ctl.wait_phase("p-1", "running", T);
    let home = node_of(&ctl, "p-1");
    let (ai, bi) = if home == "edge-a" { (0, 1) } else { (1, 0) };

    // A short cut: down within the liveness window, nothing moved, back without duplicates.
    signal(&mut agents[ai], "-STOP");
    wait_for(T, "the cut node down", || {
        (state_of(&ctl, &home) == "down").then_some(())
    });
    assert_eq!(
        node_of(&ctl, "p-1"),
        home,
        "not moved before the lost-after delay"
    );
    signal(&mut agents[ai], "-CONT");
    wait_for(T, "the node up again", || {
        (state_of(&ctl, &home) == "up").then_some(())
    });
    ctl.wait_phase("p-1", "running", T);
    assert_eq!(ops(&mut agents[ai], "create", &id), 1, "built once");
    assert_eq!(ops(&mut agents[ai], "delete", &id), 0);

    // A long cut: moved to the other node after the lost-after delay...
    signal(&mut agents[ai], "-STOP");
    wait_for(T, "the instance moved", || {
        (node_of(&ctl, "p-1") != home).then_some(())
    });
    ctl.wait_phase("p-1", "running", T);
    assert_eq!(ops(&mut agents[bi], "create", &id), 1);
    // ...and the returning node deletes its stale copy.
    signal(&mut agents[ai], "-CONT");
    wait_for(T, "the stale copy deleted", || {
        (ops(&mut agents[ai], "delete", &id) == 1).then_some(())
    });
    wait_for(T, "the node up again", || {
        (state_of(&ctl, &home) == "up").then_some(())
    });
    assert_eq!(
        node_of(&ctl, "p-1"),
        if ai == 0 { "edge-b" } else { "edge-a" }
    );
    assert_eq!(
        ops(&mut agents[ai], "create", &id),
        1,
        "never rebuilt on the old node"
    );
}

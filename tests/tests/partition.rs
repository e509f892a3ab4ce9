//! A node cut off from the fleet (its link to the broker cut: connections dropped and refused,
//! while the agent keeps running): the node goes down within the liveness window and its VMs
//! are left alone; after a short cut it converges without duplicates; after a cut longer than the
//! lost-after delay its instances are rebuilt elsewhere, and when it returns it deletes its
//! stale copies (fencing by generation).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outpost_tests::*;

const T: Duration = Duration::from_secs(60);

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
    // Each agent reaches the broker through its own link, which the test can cut.
    let links = [Link::new(ctl.mqtt_port), Link::new(ctl.mqtt_port)];
    let mut agents: Vec<Agent> = ["edge-a", "edge-b"]
        .iter()
        .zip(&links)
        .map(|(n, link)| {
            let a = Agent::configure(
                dir.path(),
                n,
                link.port,
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
    let home = ctl.node_of("p-1");
    let (ai, bi) = if home == "edge-a" { (0, 1) } else { (1, 0) };

    // A short cut: down within the liveness window, nothing moved, back without duplicates.
    links[ai].cut();
    wait_for(T, "the cut node down", || {
        (state_of(&ctl, &home) == "down").then_some(())
    });
    assert_eq!(
        ctl.node_of("p-1"),
        home,
        "not moved before the lost-after delay"
    );
    assert!(agents[ai].proc().alive());
    links[ai].restore();
    wait_for(T, "the node up again", || {
        (state_of(&ctl, &home) == "up").then_some(())
    });
    ctl.wait_phase("p-1", "running", T);
    assert_eq!(ops(&mut agents[ai], "create", &id), 1, "built once");
    assert_eq!(ops(&mut agents[ai], "delete", &id), 0);

    // A long cut: moved to the other node after the lost-after delay...
    links[ai].cut();
    wait_for(T, "the instance moved", || {
        (ctl.node_of("p-1") != home).then_some(())
    });
    ctl.wait_phase("p-1", "running", T);
    assert_eq!(ops(&mut agents[bi], "create", &id), 1);
    // Cut off, the old node kept its copy running: it deletes nothing on its own.
    assert_eq!(ops(&mut agents[ai], "delete", &id), 0);
    // ...and once back, it deletes its stale copy.
    links[ai].restore();
    wait_for(T, "the stale copy deleted", || {
        (ops(&mut agents[ai], "delete", &id) == 1).then_some(())
    });
    wait_for(T, "the node up again", || {
        (state_of(&ctl, &home) == "up").then_some(())
    });
    assert_eq!(
        ctl.node_of("p-1"),
        if ai == 0 { "edge-b" } else { "edge-a" }
    );
    assert_eq!(
        ops(&mut agents[ai], "create", &id),
        1,
        "never rebuilt on the old node"
    );
}

#[test]
fn agent_cold_boots_offline_from_its_stored_desired_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let link = Link::new(ctl.mqtt_port);
    let mut agent = Agent::configure(
        dir.path(),
        "edge-cold",
        link.port,
        "[hypervisor]\nbackend = \"fake\"\n",
    );
    std::fs::write(agent.state_dir.join("images/vmlinuz"), b"x").unwrap();
    agent.start();
    ctl.wait_nodes_up(1);
    let v = ctl
        .cli(&[
            "instances",
            "create",
            "cold-1",
            "--kernel",
            "vmlinuz",
            "--memory",
            "128",
        ])
        .unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    ctl.wait_phase("cold-1", "running", T);

    // The host reboots with no network: the fake hypervisor's domains are gone with the agent
    // process, and the broker is unreachable when the agent starts again.
    link.cut();
    agent.proc().kill();
    agent.start();
    wait_for(T, "the instance restored offline", || {
        let log = agent.proc().log_text();
        (log.contains("restored the desired state from disk")
            && ops(&mut agent, "create", &id) == 2)
            .then_some(())
    });
    assert!(
        agent
            .proc()
            .log_text()
            .contains("broker unreachable; VMs keep running")
    );

    // The link returns: the node converges with the controller, and nothing is built again.
    link.restore();
    wait_for(T, "the node up again", || {
        (state_of(&ctl, "edge-cold") == "up").then_some(())
    });
    ctl.wait_phase("cold-1", "running", T);
    holds_for(
        Duration::from_secs(2),
        "built once before and once at the offline cold boot",
        || ops(&mut agent, "create", &id) == 2,
    );
}

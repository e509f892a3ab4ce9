//! The agent process (fake hypervisor) against a real mosquitto, with a test controller:
//! announce, desired state, duplicates, stale generations, garbage, kill -9, broker restart,
//! a link slower than the agent's timers.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outpost_protocol::topics::Channel;
use outpost_protocol::*;
use outpost_tests::*;

const T: Duration = Duration::from_secs(20);

fn fake_agent(dir: &std::path::Path, node: &str, port: u16) -> Agent {
    let a = Agent::configure(
        dir,
        node,
        port,
        "[hypervisor]\nbackend = \"fake\"\nfake_memory_mib = 2048\n",
    );
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::write(a.state_dir.join("images").join(f), b"x").unwrap();
    }
    a
}

fn running(seen: &Seen, node: &NodeId, id: u64) -> bool {
    seen.report_of(node).is_some_and(|r| {
        r.instances
            .iter()
            .any(|i| i.id == InstanceId::from_u64(id) && i.state == InstanceState::Running)
    })
}

#[test]
fn agent_announces_converges_and_survives_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let ctl = TestController::connect(broker.port);
    let mut agent = fake_agent(dir.path(), "edge-1", broker.port);
    agent.start();
    let node = agent.node.clone();

    // Announce: online (retained), inventory with the images, a report.
    let status = ctl.wait(T, "online status", |s| {
        s.status_of(&node)
            .filter(|st| st.presence == Presence::Online)
    });
    let inv = ctl.wait(T, "inventory", |s| s.inventory_of(&node));
    assert_eq!(inv.hypervisor, HypervisorKind::Fake);
    assert_eq!(inv.total.memory_mib, 2048);
    assert_eq!(inv.images.len(), 2);
    ctl.wait(T, "first report", |s| s.report_of(&node));

    // Desired state with two instances: accepted, built, running.
    let boot = kernel_boot("console=ttyS0");
    let mut networked = instance(2, boot.clone(), 256);
    networked.spec.network = Network::Libvirt {
        network: NetName::new("default").unwrap(),
    };
    let d1 = desired(1, vec![instance(1, boot.clone(), 256), networked.clone()]);
    ctl.publish_desired(&node, &d1);
    ctl.wait(T, "both running", |s| {
        (running(s, &node, 1) && running(s, &node, 2)).then_some(())
    });
    // The networked one's interface is published (retained): the fake backend's made-up MAC
    // and address; the one without a network has none.
    let addrs = ctl.wait(T, "addresses", |s| {
        s.addresses
            .iter()
            .find(|(n, a)| *n == node && !a.instances.is_empty())
            .map(|(_, a)| a.clone())
    });
    assert_eq!(addrs.instances.len(), 1, "{addrs:?}");
    assert_eq!(addrs.instances[0].id, InstanceId::from_u64(2));
    assert_eq!(
        addrs.instances[0].nics[0].mac.to_string(),
        "52:54:00:00:00:02"
    );
    assert_eq!(addrs.instances[0].nics[0].ips[0].to_string(), "10.0.0.2/8");
    let seen = ctl.seen();
    assert_eq!(seen.acks(&node), vec![(1, AckResult::Accepted)]);
    assert_eq!(
        seen.states(&node, InstanceId::from_u64(1)),
        vec![InstanceState::Building, InstanceState::Running]
    );

    // A replay of the same generation is acknowledged and changes nothing.
    ctl.publish_desired(&node, &d1);
    ctl.wait(T, "second ack", |s| {
        (s.acks(&node).len() == 2).then_some(())
    });
    // A stale generation is refused.
    ctl.publish_desired(&node, &desired(0, vec![]));
    ctl.wait(T, "stale ack", |s| {
        s.acks(&node)
            .contains(&(0, AckResult::Stale { current: 1 }))
            .then_some(())
    });

    // Garbage on the desired topic: random, truncated, wrong version, oversized, empty.
    let good = d1.to_vec().unwrap();
    let mut wrong_version = good.clone();
    wrong_version[0] = 99;
    for junk in [
        vec![0xde, 0xad, 0xbe, 0xef],
        good[..good.len() / 2].to_vec(),
        wrong_version,
        vec![1; DesiredState::MAX_SIZE + 10],
        vec![],
    ] {
        ctl.publish_raw(&node, Channel::Desired, junk, false);
    }
    // The agent is alive, still holds generation 1, still running both, and takes a new state.
    let d2 = desired_gone(2, vec![networked, instance(3, boot.clone(), 256)], &[1]);
    ctl.publish_desired(&node, &d2);
    ctl.wait(T, "instance 3 running", |s| {
        running(s, &node, 3).then_some(())
    });
    ctl.wait(T, "instance 1 deleted", |s| {
        s.states(&node, InstanceId::from_u64(1))
            .contains(&InstanceState::Deleted)
            .then_some(())
    });
    assert!(agent.proc().alive());
    let states2 = ctl.seen().states(&node, InstanceId::from_u64(2));
    assert_eq!(
        states2,
        vec![InstanceState::Building, InstanceState::Running],
        "instance 2 was never rebuilt"
    );
    assert_eq!(ctl.seen().malformed, 0);
    let log = agent.proc().log_text();
    assert!(
        log.contains("dropped a desired state that does not decode"),
        "{log}"
    );

    // kill -9: the broker publishes the Last Will (offline, retained).
    agent.proc().kill();
    ctl.wait(T, "offline last will", |s| {
        s.status_of(&node)
            .filter(|st| st.presence == Presence::Offline && st.session == status.session)
    });

    // Restart: the desired state comes back from disk (generation 2), the node announces a
    // newer session, and converges (the fake hypervisor lost its domains with the process).
    agent.start();
    let again = ctl.wait(T, "online again", |s| {
        s.status_of(&node)
            .filter(|st| st.presence == Presence::Online)
    });
    assert!(again.session > status.session);
    ctl.wait(T, "report at generation 2 after restart", |s| {
        s.report_of(&node)
            .filter(|r| r.generation == 2 && running(s, &node, 2) && running(s, &node, 3))
    });
}

#[test]
fn agent_rides_out_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path());
    let mut agent = fake_agent(dir.path(), "edge-2", broker.port);
    agent.start();
    {
        let ctl = TestController::connect(broker.port);
        let node = agent.node.clone();
        ctl.wait(T, "online", |s| s.status_of(&node));
        ctl.publish_desired(&node, &desired(5, vec![instance(7, kernel_boot(""), 128)]));
        ctl.wait(T, "running", |s| running(s, &node, 7).then_some(()));
    }
    // The broker dies and comes back empty (no persistence): retained messages are gone.
    broker.proc.kill();
    wait_for(T, "the agent to notice the broker is gone", || {
        agent
            .proc()
            .log_text()
            .contains("broker unreachable")
            .then_some(())
    });
    holds_for(
        Duration::from_secs(1),
        "the agent alive without its broker",
        || agent.proc().alive(),
    );
    broker.restart();
    let ctl = TestController::connect(broker.port);
    let node = agent.node.clone();
    // The agent reconnects by itself and republishes its full state.
    ctl.wait(
        Duration::from_secs(60),
        "online after broker restart",
        |s| {
            s.status_of(&node)
                .filter(|st| st.presence == Presence::Online)
        },
    );
    ctl.wait(T, "inventory after broker restart", |s| {
        s.inventory_of(&node)
    });
    // The restarted broker lost the retained desired state; a controller seeing the node online
    // again publishes it anew (as `outpost-controller` does). Until a desired state arrives on
    // the new connection the agent sends only the report of its announce, which may precede
    // this subscriber; from then on, its periodic reports.
    ctl.publish_desired(&node, &desired(5, vec![instance(7, kernel_boot(""), 128)]));
    ctl.wait(T, "report with the instance", |s| {
        s.report_of(&node).filter(|r| {
            r.generation == 5
                && r.instances
                    .iter()
                    .any(|x| x.id == InstanceId::from_u64(7) && x.state == InstanceState::Running)
        })
    });
    // A clean stop publishes offline at once.
    let st = agent.proc().terminate();
    assert!(st.success());
    ctl.wait(T, "offline after SIGTERM", |s| {
        s.status_of(&node)
            .filter(|st| st.presence == Presence::Offline)
    });
}

/// A slow link (a satellite hop): the MQTT handshake takes longer than the agent's 1 s timers.
/// The agent must finish it (one connection, not a new one per timer tick) and converge.
#[test]
fn agent_connects_over_a_link_slower_than_its_timers() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let link = Link::new(broker.port);
    link.set_latency(Duration::from_millis(1500));
    let mut agent = fake_agent(dir.path(), "edge-slow", link.port);
    agent.start();
    let ctl = TestController::connect(broker.port);
    let node = agent.node.clone();
    ctl.wait(Duration::from_secs(60), "online over the slow link", |s| {
        s.status_of(&node)
            .filter(|st| st.presence == Presence::Online)
    });
    ctl.publish_desired(&node, &desired(3, vec![instance(9, kernel_boot(""), 128)]));
    ctl.wait(Duration::from_secs(60), "running over the slow link", |s| {
        running(s, &node, 9).then_some(())
    });
    assert_eq!(
        link.connections(),
        1,
        "the agent connected once; agent log:\n{}",
        agent.proc().log_text()
    );
}

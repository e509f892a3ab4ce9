//! The agent never destroys what it cannot account for, on a real libvirtd with a real guest:
//! a corrupt state file touches nothing, and a node that comes back after its lease (its
//! instances rebuilt elsewhere meanwhile) starts nothing until it hears from the controller.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outpost_protocol::*;
use outpost_tests::*;

const T: Duration = Duration::from_secs(60);

fn guest(id: u64) -> DesiredInstance {
    instance(id, kernel_boot("console=ttyS0 quiet"), 256)
}

#[test]
fn a_corrupt_state_file_touches_nothing() {
    let mut b = RealBench::start("corrupt-1");
    let (ctl, node) = (&b.ctl, b.node.clone());
    let id = 0xc0_77a1_0001_u64;
    b.run(&desired(1, vec![guest(id)]), id);
    let agent = &mut b.agent;
    ctl.wait(T, "generation 1 stored", |s| {
        s.acks(&node)
            .contains(&(1, AckResult::Accepted))
            .then_some(())
    });
    let domain = format!("outpost-{}", InstanceId::from_u64(id));

    // kill -9, then one flipped bit in the stored instance id.
    agent.proc().kill();
    let file = agent.state_dir.join("desired.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes
        .windows(8)
        .position(|w| w == id.to_be_bytes())
        .expect("the id is in the file");
    bytes[at + 7] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let acks_before = ctl.seen().acks(&node).len();
    agent.start();

    // It says so, keeps the guest as it is, and takes the controller's state when it comes.
    ctl.wait(T, "a state-unreadable notice", |s| {
        s.events
            .iter()
            .any(|(n, e)| {
                n == &node
                    && matches!(
                        e,
                        AgentEvent::Notice {
                            kind: NoticeKind::StateUnreadable,
                            ..
                        }
                    )
            })
            .then_some(())
    });
    assert!(agent.proc().log_text().contains("corrupt"));
    ctl.wait(T, "the retained desired state accepted again", |s| {
        (s.acks(&node).len() > acks_before).then_some(())
    });
    wait_for(T, "the guest reported running again", || {
        (ctl.seen()
            .report_of(&node)?
            .instances
            .iter()
            .any(|r| r.id == InstanceId::from_u64(id) && r.state == InstanceState::Running))
        .then_some(())
    });
    assert_eq!(virsh(&["domstate", &domain]), "running");
    assert_eq!(agent.ops("delete", None), 0, "nothing deleted");
    assert_eq!(agent.ops("create", None), 1, "nothing built twice");
    assert_eq!(agent.ops("start", None), 0, "nothing restarted");

    ctl.publish_desired(&node, &desired_gone(2, vec![], &[id]));
    wait_for(T, "the guest deleted on request", || {
        (!virsh(&["list", "--all", "--name"]).contains(&domain)).then_some(())
    });
}

#[test]
fn past_its_lease_a_returning_node_starts_nothing_until_it_hears() {
    let mut b = RealBench::start("lease-1");
    let id = 0xc0_77a1_0002_u64;
    let leased = |d: DesiredState| DesiredState { lease_secs: 2, ..d };
    b.run(&leased(desired(1, vec![guest(id)])), id);
    let (ctl, node, link, agent) = (&b.ctl, b.node.clone(), &b.link, &mut b.agent);
    let domain = format!("outpost-{}", InstanceId::from_u64(id));

    // The node is cut off and its host reboots (the guest is off); past the lease the
    // controller has rebuilt the instance elsewhere and says it is gone here.
    link.cut();
    agent.proc().kill();
    virsh(&["destroy", &domain]);
    ctl.publish_desired(&node, &leased(desired_gone(2, vec![], &[id])));
    std::thread::sleep(Duration::from_secs(3));

    // Back up, still cut off: it starts nothing, and says why.
    agent.start();
    wait_for(T, "the lease notice in the log", || {
        agent.proc().log_text().contains("lease").then_some(())
    });
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            virsh(&["domstate", &domain]),
            "shut off",
            "started a stale copy"
        );
    }
    // Link back: the newer state arrives and the stale copy goes without ever starting.
    link.restore();
    wait_for(T, "the stale copy deleted", || {
        (!virsh(&["list", "--all", "--name"]).contains(&domain)).then_some(())
    });
    assert_eq!(agent.ops("start", None), 0);
}

/// A retained desired state is the broker's copy, not the controller speaking: it may predate
/// what the controller decided while the node was away (a frozen leader's last publish, a
/// store behind). An agent past its lease that finds one on reconnect converges deletes to it
/// but starts nothing until the controller publishes after the reconnect.
#[test]
fn past_its_lease_a_retained_state_is_not_contact() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let ctl = TestController::connect(broker.port);
    let mut agent = Agent::fake(dir.path(), "lease-2", broker.port, 4096, "fake");
    let node = agent.node.clone();
    agent.start();
    ctl.wait(T, "inventory", |s| s.inventory_of(&node));
    let id = 0xc0_77a1_0003_u64;
    let vm = instance(id, kernel_boot("console=ttyS0"), 256);
    let leased = |d: DesiredState| DesiredState { lease_secs: 2, ..d };
    ctl.publish_desired(&node, &leased(desired(1, vec![vm.clone()])));
    let running = |s: &Seen| {
        (s.states(&node, InstanceId::from_u64(id)).last() == Some(&InstanceState::Running))
            .then_some(())
    };
    ctl.wait(T, "the instance running", running);
    assert_eq!(agent.ops("create", None), 1);

    // The agent is gone past its lease (its host rebooted: the fake backend forgets its VMs);
    // meanwhile the broker keeps a state that still lists the instance.
    agent.proc().kill();
    ctl.publish_desired(&node, &leased(desired(2, vec![vm.clone()])));
    std::thread::sleep(Duration::from_secs(3));
    let log_before = agent.ops("create", None);
    agent.start();
    ctl.wait(T, "generation 2 taken from the retained copy", |s| {
        s.acks(&node)
            .contains(&(2, AckResult::Accepted))
            .then_some(())
    });
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        if agent.ops("create", None) != log_before {
            panic!(
                "built from a retained state past the lease:\n{}",
                agent.proc().log_text()
            );
        }
    }
    // The controller speaks on this connection: now it builds.
    ctl.publish_desired(&node, &leased(desired(3, vec![vm])));
    wait_for(T, "built after the controller's fresh state", || {
        (agent.ops("create", None) > log_before).then_some(())
    });
}

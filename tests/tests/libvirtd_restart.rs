//! libvirtd restarts under a running agent: the agent stays up, its guest keeps running, it
//! says the hypervisor is unavailable meanwhile, and reconnects with back-off. (Alone in its
//! test binary, and in nextest's `libvirtd` group: it restarts the machine's libvirtd.)
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use outpost_protocol::*;
use outpost_tests::*;

const T: Duration = Duration::from_secs(60);

fn notice(s: &Seen, node: &NodeId, kind: NoticeKind) -> bool {
    s.events
        .iter()
        .any(|(n, e)| n == node && matches!(e, AgentEvent::Notice { kind: k, .. } if *k == kind))
}

#[test]
fn the_agent_rides_out_a_libvirtd_restart() {
    assert!(ensure_libvirtd(), "libvirtd could not be started");
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let ctl = TestController::connect(broker.port);
    let mut agent = Agent::real(dir.path(), "lvr-1", broker.port, "real");
    let node = agent.node.clone();
    agent.start();
    ctl.wait(T, "inventory", |s| s.inventory_of(&node));
    let id = 0x11b7_0000_0001_u64;
    ctl.publish_desired(
        &node,
        &desired(
            1,
            vec![instance(id, kernel_boot("console=ttyS0 quiet"), 256)],
        ),
    );
    ctl.wait(T, "the guest running", |s| {
        (s.states(&node, InstanceId::from_u64(id)).last() == Some(&InstanceState::Running))
            .then_some(())
    });
    let domain = format!("outpost-{}", InstanceId::from_u64(id));
    let qemu_alive = || {
        Command::new("pgrep")
            .args(["-f", &format!("guest={domain}")])
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(qemu_alive());

    // libvirtd goes away.
    let _ = Command::new("pkill").args(["-x", "libvirtd"]).status();
    ctl.wait(T, "a hypervisor-unavailable notice", |s| {
        notice(s, &node, NoticeKind::HypervisorUnavailable).then_some(())
    });
    assert!(agent.proc().alive(), "the agent survived");
    assert!(qemu_alive(), "the guest kept running");

    // It comes back: the agent reconnects and reports the guest running, untouched.
    assert!(ensure_libvirtd());
    ctl.wait(T, "a hypervisor-back notice", |s| {
        notice(s, &node, NoticeKind::HypervisorBack).then_some(())
    });
    wait_for(T, "the guest reported running", || {
        ctl.seen()
            .report_of(&node)?
            .instances
            .iter()
            .any(|r| r.id == InstanceId::from_u64(id) && r.state == InstanceState::Running)
            .then_some(())
    });
    assert!(agent.proc().alive());
    assert_eq!(agent.ops("create", None), 1);
    assert_eq!(agent.ops("start", None), 0);
    assert_eq!(agent.ops("delete", None), 0);

    ctl.publish_desired(&node, &desired_gone(2, vec![], &[id]));
    ctl.wait(T, "the guest deleted on request", |s| {
        s.states(&node, InstanceId::from_u64(id))
            .contains(&InstanceState::Deleted)
            .then_some(())
    });
}

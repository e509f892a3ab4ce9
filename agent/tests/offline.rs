//! The agent's shell with no broker reachable, on tokio's paused clock: after a host reboot it
//! restores its VMs from the desired state on disk (cold boot offline), keeps them converging,
//! and keeps retrying the broker without ever giving up.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use outpost_agent::config::Config;
use outpost_agent::hypervisor::DomainState;
use outpost_agent::hypervisor::fake::{Call, FakeHypervisor};
use outpost_agent::reconcile::Held;
use outpost_agent::store::DesiredStore;
use outpost_protocol::*;

fn closed_port() -> u16 {
    // Bind, note the port, and close it: nothing listens there.
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(start_paused = true)]
async fn cold_boot_offline_restores_instances_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("images")).unwrap();
    std::fs::write(dir.path().join("images/vmlinuz"), b"k").unwrap();
    let cfg = Config::from_toml(&format!(
        "node_id = \"edge-offline\"\nbrokers = [\"mqtt://127.0.0.1:{}\"]\nstate_dir = \"{}\"\n\
         [hypervisor]\nbackend = \"fake\"\n",
        closed_port(),
        dir.path().display()
    ))
    .unwrap();

    // What the agent had stored before the host went down.
    let spec = InstanceSpec {
        vcpus: 1,
        memory_mib: 128,
        disk_gib: 0,
        arch: Arch::native().unwrap(),
        require_kvm: false,
        boot: Boot::Kernel {
            kernel: ImageName::new("vmlinuz").unwrap().into(),
            initrd: None,
            cmdline: Cmdline::default(),
        },
        network: Network::None,
        restart: RestartPolicy::Never,
        labels: Labels::new(),
        seed: None,
    };
    let ids = [InstanceId::from_u64(1), InstanceId::from_u64(2)];
    let desired = DesiredState {
        fleet: FleetId(9),
        generation: 4,
        instances: ids
            .iter()
            .map(|&id| DesiredInstance {
                id,
                name: InstanceName::new(&format!("vm-{id}x")).unwrap(),
                power: PowerState::Running,
                reboot_count: 0,
                power_mode: PowerMode::default(),
                spec: spec.clone(),
            })
            .collect(),
        ..Default::default()
    };
    DesiredStore::open(dir.path())
        .unwrap()
        .save(&Held {
            desired: Box::new(desired),
            kept: Vec::new(),
        })
        .unwrap();

    // The host rebooted: the domains exist but are off. A third, unwanted one is there too.
    let hv = Arc::new(FakeHypervisor::new(
        Arch::native().unwrap(),
        HypervisorKind::Fake,
        4,
        4096,
    ));
    for id in ids {
        hv.insert(id, DomainState::Off { crashed: false });
    }
    let stray = InstanceId::from_u64(3);
    hv.insert(stray, DomainState::Running);

    let counters = outpost_agent::shell::run(
        cfg,
        hv.clone(),
        tokio::time::sleep(Duration::from_secs(120)),
    )
    .await
    .unwrap();

    for id in ids {
        assert_eq!(hv.state_of(id), Some(DomainState::Running), "{id} restored");
        assert_eq!(hv.calls(Call::Start, id), 1, "{id} started once");
        assert_eq!(hv.calls(Call::Create, id), 0, "{id} not rebuilt");
    }
    // The stray domain is not wanted, but nobody said it is gone: it is kept as it is.
    assert_eq!(hv.state_of(stray), Some(DomainState::Running));
    assert_eq!(hv.calls(Call::Delete, stray), 0);
    // It kept trying the broker, with back-off (not thousands of attempts in 120 s).
    assert!(
        (3..200).contains(&counters.connect_failures),
        "{counters:?}"
    );
}

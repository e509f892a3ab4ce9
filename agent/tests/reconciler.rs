//! The reconciler core driven against the fake hypervisor, with time passed in by hand:
//! duplicates, stale generations, crashes and restart policies, deletes, admission errors,
//! injected failures, and restarts with the desired state restored from disk.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use outpost_agent::hypervisor::fake::{Call, FakeHypervisor};
use outpost_agent::hypervisor::{DomainState, Hypervisor, execute};
use outpost_agent::reconcile::{Effect, HostFacts, Offer, Reconciler};
use outpost_agent::store::DesiredStore;
use outpost_protocol::*;

fn id(n: u64) -> InstanceId {
    InstanceId::from_u64(n)
}

fn facts(kind: HypervisorKind) -> HostFacts {
    HostFacts {
        arch: Arch::X86_64,
        kind,
        allocatable: Resources {
            vcpus: 8,
            memory_mib: 4096,
            disk_gib: 100,
        },
        images: BTreeSet::from([ImageName::new("base.qcow2").unwrap()]),
        cached: BTreeSet::new(),
    }
}

fn spec(memory_mib: u32, restart: RestartPolicy) -> InstanceSpec {
    InstanceSpec {
        vcpus: 1,
        memory_mib,
        disk_gib: 2,
        arch: Arch::X86_64,
        require_kvm: false,
        boot: Boot::Disk {
            image: ImageName::new("base.qcow2").unwrap().into(),
        },
        network: Network::None,
        restart,
        labels: Labels::new(),
        seed: None,
    }
}

fn inst(n: u64, spec: InstanceSpec) -> DesiredInstance {
    DesiredInstance {
        id: id(n),
        name: InstanceName::new(&format!("vm-{n}")).unwrap(),
        power: PowerState::Running,
        reboot_count: 0,
        power_mode: PowerMode::default(),
        spec,
    }
}

const FLEET: FleetId = FleetId(0xf1ee7);

fn desired(generation: u64, instances: Vec<DesiredInstance>) -> DesiredState {
    DesiredState {
        fleet: FLEET,
        generation,
        instances: instances.into_iter().collect(),
        ..Default::default()
    }
}

/// A desired state that also lists `gone` (deleted or moved away by the controller).
fn desired_gone(generation: u64, instances: Vec<DesiredInstance>, gone: &[u64]) -> DesiredState {
    DesiredState {
        gone: gone.iter().map(|&n| id(n)).collect(),
        ..desired(generation, instances)
    }
}

/// The shell, synchronously: delivers desired states, runs passes, records events.
struct Sim {
    rec: Reconciler,
    hv: FakeHypervisor,
    store: DesiredStore,
    now: Instant,
    events: Vec<AgentEvent>,
    /// Downloads asked of the shell, in order.
    fetches: Vec<(BlobRef, Option<FetchFrom>)>,
    dir: tempfile::TempDir,
}

impl Sim {
    fn new(kind: HypervisorKind) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = DesiredStore::open(dir.path()).unwrap();
        Self {
            rec: Reconciler::new(facts(kind), None),
            hv: FakeHypervisor::new(Arch::X86_64, kind, 8, 4096),
            store,
            now: Instant::now(),
            events: Vec::new(),
            fetches: Vec::new(),
            dir,
        }
    }

    /// What the agent does after a restart: a new core from the file on disk, same host.
    fn restart_agent(&mut self) {
        let restored = self.store.load().unwrap();
        self.rec = Reconciler::new(facts(HypervisorKind::Emulated), restored);
    }

    fn deliver(&mut self, d: DesiredState) {
        match self.rec.offer(&d) {
            Offer::Newer => {
                let held = self.rec.next_held(Box::new(d));
                self.store.save(&held).unwrap();
                self.store.save_floor(held.desired.version()).unwrap();
                let effects = self.rec.accept(held);
                self.apply(effects);
            }
            Offer::Same => self.events.push(self.rec.ack_current()),
            Offer::Refused(ack) => self.events.push(*ack),
        }
    }

    fn apply(&mut self, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Publish(ev) => self.events.push(ev),
                Effect::Fetch(b, from) => self.fetches.push((b, from)),
                Effect::Run(id, op) => {
                    let r = execute(&self.hv, id, &op);
                    let more = self.rec.completed(self.now, id, &op, r);
                    self.apply(more);
                }
            }
        }
    }

    /// Reconciliation passes until nothing more happens.
    fn converge(&mut self) {
        for _ in 0..10 {
            let domains = self.hv.list().unwrap();
            let effects = self.rec.observe(self.now, &domains);
            let ran = effects.iter().any(|e| matches!(e, Effect::Run(..)));
            self.apply(effects);
            if !ran {
                return;
            }
        }
        panic!("did not converge in 10 passes");
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    fn state(&self, n: u64) -> Option<InstanceState> {
        self.rec
            .report()
            .instances
            .iter()
            .find(|r| r.id == id(n))
            .map(|r| r.state)
    }

    fn take_events(&mut self) -> Vec<AgentEvent> {
        std::mem::take(&mut self.events)
    }
}

fn states_of(events: &[AgentEvent], n: u64) -> Vec<InstanceState> {
    events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Instance { id: i, state, .. } if *i == id(n) => Some(*state),
            _ => None,
        })
        .collect()
}

fn acks(events: &[AgentEvent]) -> Vec<(u64, AckResult)> {
    events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Ack { generation, result } => Some((*generation, *result)),
            _ => None,
        })
        .collect()
}

#[test]
fn creates_what_is_missing_once() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    s.deliver(desired(
        1,
        vec![
            inst(1, spec(512, RestartPolicy::OnFailure)),
            inst(2, spec(512, RestartPolicy::OnFailure)),
        ],
    ));
    s.converge();
    let ev = s.take_events();
    assert_eq!(acks(&ev), vec![(1, AckResult::Accepted)]);
    assert_eq!(
        states_of(&ev, 1),
        vec![InstanceState::Building, InstanceState::Running]
    );
    assert_eq!(s.hv.calls(Call::Create, id(1)), 1);
    assert_eq!(s.hv.calls(Call::Create, id(2)), 1);
    let r = s.rec.report();
    assert_eq!(r.generation, 1);
    assert_eq!(r.usage.instances, 2);
    assert_eq!(r.usage.used.memory_mib, 1024);
    // More passes change nothing.
    s.converge();
    s.converge();
    assert!(s.take_events().is_empty());
    assert_eq!(s.hv.calls(Call::Create, id(1)), 1);
}

#[test]
fn duplicated_desired_state_changes_nothing() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    let d = desired(3, vec![inst(1, spec(512, RestartPolicy::OnFailure))]);
    s.deliver(d.clone());
    s.converge();
    s.take_events();
    s.deliver(d.clone());
    s.deliver(d);
    s.converge();
    let ev = s.take_events();
    assert_eq!(
        acks(&ev),
        vec![(3, AckResult::Accepted), (3, AckResult::Accepted)]
    );
    assert!(states_of(&ev, 1).is_empty());
    assert_eq!(s.hv.calls(Call::Create, id(1)), 1);
}

#[test]
fn stale_generation_is_refused_and_changes_nothing() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    s.deliver(desired(
        5,
        vec![inst(1, spec(512, RestartPolicy::OnFailure))],
    ));
    s.converge();
    s.take_events();
    // An older state that would delete 1 and create 2.
    s.deliver(desired(
        4,
        vec![inst(2, spec(512, RestartPolicy::OnFailure))],
    ));
    s.converge();
    let ev = s.take_events();
    assert_eq!(acks(&ev), vec![(4, AckResult::Stale { current: 5 })]);
    assert_eq!(s.hv.calls(Call::Delete, id(1)), 0);
    assert_eq!(s.hv.calls(Call::Create, id(2)), 0);
    assert_eq!(s.store.load().unwrap().unwrap().desired.generation, 5);
}

#[test]
fn removed_instances_are_deleted() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    s.deliver(desired(
        1,
        vec![
            inst(1, spec(512, RestartPolicy::OnFailure)),
            inst(2, spec(512, RestartPolicy::OnFailure)),
        ],
    ));
    s.converge();
    s.take_events();
    s.deliver(desired_gone(
        2,
        vec![inst(2, spec(512, RestartPolicy::OnFailure))],
        &[1],
    ));
    s.converge();
    let ev = s.take_events();
    assert_eq!(states_of(&ev, 1), vec![InstanceState::Deleted]);
    assert_eq!(s.hv.state_of(id(1)), None);
    assert_eq!(s.state(1), None);
    assert_eq!(s.hv.state_of(id(2)), Some(DomainState::Running));
}

#[test]
fn crashes_follow_the_restart_policy_with_backoff() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    s.deliver(desired(
        1,
        vec![
            inst(1, spec(256, RestartPolicy::OnFailure)),
            inst(2, spec(256, RestartPolicy::Never)),
            inst(3, spec(256, RestartPolicy::Always)),
            inst(4, spec(256, RestartPolicy::OnFailure)),
        ],
    ));
    s.converge();
    s.take_events();
    s.hv.crash(id(1));
    s.hv.crash(id(2));
    s.hv.guest_shutdown(id(3));
    s.hv.guest_shutdown(id(4));
    s.converge();
    let ev = s.take_events();
    // on-failure + crash: restarted; never: left crashed; always: restarted; on-failure + clean
    // shutdown: left stopped.
    assert_eq!(
        states_of(&ev, 1),
        vec![InstanceState::Crashed, InstanceState::Running]
    );
    assert_eq!(states_of(&ev, 2), vec![InstanceState::Crashed]);
    assert_eq!(
        states_of(&ev, 3),
        vec![InstanceState::Stopped, InstanceState::Running]
    );
    assert_eq!(states_of(&ev, 4), vec![InstanceState::Stopped]);
    assert_eq!(
        s.hv.state_of(id(2)),
        Some(DomainState::Off { crashed: true })
    );
    assert_eq!(
        s.hv.state_of(id(4)),
        Some(DomainState::Off { crashed: false })
    );

    // A crash loop backs off: the second crash right away is not restarted before 1 s...
    s.hv.crash(id(1));
    s.converge();
    assert_eq!(s.hv.calls(Call::Start, id(1)), 1);
    assert_eq!(s.state(1), Some(InstanceState::Crashed));
    // ...and the core says when it wants to look again (the shell wakes then).
    let wake = s
        .rec
        .next_pass(s.now)
        .expect("a pass is due after the back-off");
    assert!(wake > s.now && wake <= s.now + Duration::from_secs(1));
    s.advance(Duration::from_millis(1100));
    s.converge();
    assert_eq!(s.hv.calls(Call::Start, id(1)), 2);
    assert_eq!(s.state(1), Some(InstanceState::Running));
    // ...the third not before 2 s more.
    s.hv.crash(id(1));
    s.advance(Duration::from_millis(1500));
    s.converge();
    assert_eq!(s.hv.calls(Call::Start, id(1)), 2);
    s.advance(Duration::from_millis(600));
    s.converge();
    assert_eq!(s.hv.calls(Call::Start, id(1)), 3);
}

#[test]
fn restart_restores_desired_state_from_disk_without_duplicates() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    s.deliver(desired(
        7,
        vec![
            inst(1, spec(512, RestartPolicy::Never)),
            inst(2, spec(512, RestartPolicy::Never)),
        ],
    ));
    s.converge();
    // Agent restarts (kill -9): a new core from disk, the domains still there.
    s.restart_agent();
    assert_eq!(s.rec.generation(), 7);
    s.converge();
    assert_eq!(s.hv.calls(Call::Create, id(1)), 1);
    assert_eq!(s.hv.calls(Call::Start, id(1)), 0);
    assert_eq!(s.state(1), Some(InstanceState::Running));

    // Host reboot with no network: every domain is off; the agent restores them from disk,
    // even with restart policy `never` (that policy is about the guest stopping itself).
    s.hv.host_reboot();
    s.restart_agent();
    s.converge();
    assert_eq!(s.hv.calls(Call::Create, id(1)), 1);
    assert_eq!(s.hv.calls(Call::Start, id(1)), 1);
    assert_eq!(s.hv.calls(Call::Start, id(2)), 1);
    assert_eq!(s.hv.state_of(id(1)), Some(DomainState::Running));
    assert_eq!(s.rec.report().generation, 7);
}

#[test]
fn without_a_desired_state_nothing_is_deleted() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    s.hv.insert(id(9), DomainState::Running);
    s.converge();
    assert_eq!(s.hv.calls(Call::Delete, id(9)), 0);
    assert_eq!(s.state(9), Some(InstanceState::Running));
    // The controller speaks without accounting for it: it is kept, running.
    s.deliver(desired(1, vec![]));
    s.converge();
    assert_eq!(s.hv.state_of(id(9)), Some(DomainState::Running));
    assert_eq!(s.hv.calls(Call::Delete, id(9)), 0);
    // Only when the controller says it is gone does it go.
    s.deliver(desired_gone(2, vec![], &[9]));
    s.converge();
    assert_eq!(s.hv.state_of(id(9)), None);
}

#[test]
fn omission_alone_never_deletes_and_the_spec_is_kept_for_adoption() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    s.deliver(desired(
        5,
        vec![
            inst(1, spec(512, RestartPolicy::OnFailure)),
            inst(2, spec(512, RestartPolicy::OnFailure)),
        ],
    ));
    s.converge();
    // A controller with a rolled-back store: a newer generation that does not know 2.
    s.deliver(desired(
        6,
        vec![inst(1, spec(512, RestartPolicy::OnFailure))],
    ));
    s.converge();
    assert_eq!(s.hv.calls(Call::Delete, id(2)), 0);
    assert_eq!(s.hv.state_of(id(2)), Some(DomainState::Running));
    assert_eq!(s.state(2), Some(InstanceState::Running));
    // Its spec survives a restart and is handed back.
    s.restart_agent();
    s.converge();
    let h = s.rec.holding();
    assert_eq!(h.held.unwrap().generation, 6);
    assert_eq!(h.instances[0].id, id(2));
    assert_eq!(h.instances[0].name.as_str(), "vm-2");
    assert_eq!(s.hv.state_of(id(2)), Some(DomainState::Running));
    // The controller adopts it: wanted again, nothing rebuilt.
    s.deliver(desired(
        7,
        vec![
            inst(1, spec(512, RestartPolicy::OnFailure)),
            inst(2, spec(512, RestartPolicy::OnFailure)),
        ],
    ));
    s.converge();
    assert!(s.rec.held().unwrap().kept.is_empty());
    assert_eq!(s.hv.calls(Call::Create, id(2)), 1);
}

#[test]
fn another_fleet_is_refused_until_it_names_what_is_held() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    s.deliver(desired(
        40,
        vec![inst(1, spec(512, RestartPolicy::OnFailure))],
    ));
    s.converge();
    s.take_events();
    // A controller on an empty store: another fleet, generation 1, nothing in it.
    let foreign = DesiredState {
        fleet: FleetId(2),
        ..desired_gone(1, vec![], &[1])
    };
    s.deliver(foreign.clone());
    s.converge();
    let held = Version {
        fleet: FLEET,
        generation: 40,
    };
    assert_eq!(
        acks(&s.take_events()),
        vec![(1, AckResult::OtherFleet { held })]
    );
    assert_eq!(s.hv.state_of(id(1)), Some(DomainState::Running));
    // A far-future generation of it changes nothing either.
    s.deliver(DesiredState {
        generation: u64::MAX,
        ..foreign
    });
    assert_eq!(s.rec.generation(), 40);
    // The operator adopts the node: the new fleet names what is held, and keeps instance 1.
    s.deliver(DesiredState {
        fleet: FleetId(2),
        replaces: Some(held),
        ..desired(2, vec![inst(1, spec(512, RestartPolicy::OnFailure))])
    });
    s.converge();
    assert_eq!(s.rec.held().unwrap().desired.fleet, FleetId(2));
    assert_eq!(s.hv.calls(Call::Create, id(1)), 1);
    assert_eq!(s.hv.calls(Call::Delete, id(1)), 0);
    // Replaying the old fleet's state now is refused.
    s.deliver(desired(41, vec![]));
    assert_eq!(s.rec.held().unwrap().desired.fleet, FleetId(2));
}

#[test]
fn a_forged_far_future_generation_can_be_replaced() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    s.deliver(desired(
        3,
        vec![inst(1, spec(512, RestartPolicy::OnFailure))],
    ));
    s.converge();
    // Forged: generation 2^64-1, no instances, nothing gone: nothing is deleted.
    s.deliver(desired(u64::MAX, vec![]));
    s.converge();
    assert_eq!(s.hv.state_of(id(1)), Some(DomainState::Running));
    // Every later generation is "stale"...
    s.deliver(desired(
        4,
        vec![inst(1, spec(512, RestartPolicy::OnFailure))],
    ));
    assert_eq!(s.rec.generation(), u64::MAX);
    // ...until the controller re-establishes the generation by naming the held one.
    s.deliver(DesiredState {
        replaces: Some(Version {
            fleet: FLEET,
            generation: u64::MAX,
        }),
        ..desired(4, vec![inst(1, spec(512, RestartPolicy::OnFailure))])
    });
    assert_eq!(s.rec.generation(), 4);
    s.deliver(desired(
        5,
        vec![inst(1, spec(512, RestartPolicy::OnFailure))],
    ));
    assert_eq!(s.rec.generation(), 5);
    s.converge();
    assert_eq!(s.hv.calls(Call::Delete, id(1)), 0);
}

#[test]
fn after_the_lease_nothing_starts_until_the_controller_is_heard() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    s.deliver(DesiredState {
        lease_secs: 300,
        ..desired(1, vec![inst(1, spec(512, RestartPolicy::Never))])
    });
    s.rec.heard(s.now);
    s.converge();
    assert_eq!(s.hv.state_of(id(1)), Some(DomainState::Running));
    // The host reboots 10 minutes later, with no word from the controller since.
    s.advance(Duration::from_secs(600));
    let last = s.now - Duration::from_secs(600);
    s.hv.host_reboot();
    s.restart_agent();
    s.rec.heard(last);
    assert!(!s.rec.may_start(s.now));
    s.converge();
    assert_eq!(s.hv.calls(Call::Start, id(1)), 0);
    assert_eq!(s.hv.calls(Call::Delete, id(1)), 0);
    // Within the lease it cold-boots as before.
    s.rec.heard(s.now - Duration::from_secs(100));
    s.converge();
    assert_eq!(s.hv.calls(Call::Start, id(1)), 1);
}

#[test]
fn impossible_instances_end_in_error_with_a_reason() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    let mut kvm = spec(256, RestartPolicy::OnFailure);
    kvm.require_kvm = true;
    let mut unknown = spec(256, RestartPolicy::OnFailure);
    unknown.boot = Boot::Disk {
        image: ImageName::new("missing.qcow2").unwrap().into(),
    };
    let mut arm = spec(256, RestartPolicy::OnFailure);
    arm.arch = Arch::Aarch64;
    s.deliver(desired(
        1,
        vec![
            inst(1, kvm),
            inst(2, unknown),
            inst(3, arm),
            inst(4, spec(3000, RestartPolicy::OnFailure)),
            inst(5, spec(3000, RestartPolicy::OnFailure)), // fits alone, not after 4
            inst(6, spec(0, RestartPolicy::OnFailure)),
        ],
    ));
    s.converge();
    let ev = s.take_events();
    let reason_of = |n: u64| {
        ev.iter()
            .find_map(|e| match e {
                AgentEvent::Instance { id: i, reason, .. } if *i == id(n) => {
                    Some(reason.to_string())
                }
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(
        s.state(1),
        Some(InstanceState::Error(ErrorKind::KvmUnavailable))
    );
    assert_eq!(
        s.state(2),
        Some(InstanceState::Error(ErrorKind::UnknownImage))
    );
    assert_eq!(
        s.state(3),
        Some(InstanceState::Error(ErrorKind::ArchMismatch))
    );
    assert_eq!(s.state(4), Some(InstanceState::Running));
    assert_eq!(
        s.state(5),
        Some(InstanceState::Error(ErrorKind::InsufficientResources))
    );
    assert_eq!(
        s.state(6),
        Some(InstanceState::Error(ErrorKind::InvalidSpec))
    );
    assert_eq!(reason_of(1), "instance requires KVM, host has emulated");
    assert_eq!(
        reason_of(2),
        "image missing.qcow2 is not in the image directory"
    );
    assert!(
        reason_of(5).contains("needs 3000 MiB/2 GiB, host has 1096 MiB"),
        "{}",
        reason_of(5)
    );
    assert_eq!(s.hv.calls(Call::Create, id(5)), 0);
    assert_eq!(s.rec.report().usage.used.memory_mib, 3000);
}

#[test]
fn failed_builds_are_reported_and_retried_only_on_a_new_generation() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    s.hv.fail_next(Call::Create, 1);
    s.deliver(desired(
        1,
        vec![inst(1, spec(256, RestartPolicy::OnFailure))],
    ));
    s.converge();
    assert_eq!(
        s.state(1),
        Some(InstanceState::Error(ErrorKind::Hypervisor))
    );
    let ev = s.take_events();
    assert!(ev.iter().any(|e| matches!(e, AgentEvent::Instance { reason, .. } if reason.as_str() == "create failed: injected failure")));
    s.advance(Duration::from_secs(600));
    s.converge();
    assert_eq!(s.hv.calls(Call::Create, id(1)), 1);
    s.deliver(desired(
        2,
        vec![inst(1, spec(256, RestartPolicy::OnFailure))],
    ));
    s.converge();
    assert_eq!(s.hv.calls(Call::Create, id(1)), 2);
    assert_eq!(s.state(1), Some(InstanceState::Running));
}

#[test]
fn power_and_reboot_are_level_triggered() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    let mut i = inst(1, spec(256, RestartPolicy::Always));
    s.deliver(desired(1, vec![i.clone()]));
    s.converge();
    i.power = PowerState::Stopped;
    s.deliver(desired(2, vec![i.clone()]));
    s.converge();
    assert_eq!(
        s.hv.state_of(id(1)),
        Some(DomainState::Off { crashed: false })
    );
    assert_eq!(s.state(1), Some(InstanceState::Stopped));
    // Restart policy `always` does not fight a requested stop.
    s.advance(Duration::from_secs(10));
    s.converge();
    assert_eq!(s.hv.calls(Call::Start, id(1)), 0);

    i.power = PowerState::Running;
    i.reboot_count = 1;
    s.deliver(desired(3, vec![i.clone()]));
    s.converge();
    assert_eq!(s.hv.calls(Call::Start, id(1)), 1);
    // Starting a stopped instance satisfies a pending reboot.
    assert_eq!(s.hv.calls(Call::Reboot, id(1)), 0);

    i.reboot_count = 2;
    s.deliver(desired(4, vec![i.clone()]));
    s.converge();
    s.deliver(desired(4, vec![i.clone()]));
    s.restart_agent();
    s.converge();
    assert_eq!(s.hv.calls(Call::Reboot, id(1)), 1);
}

#[test]
fn images_are_fetched_once_then_built_and_failures_wait_for_the_next_state() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    let blob = BlobRef {
        digest: Digest([7; 32]),
        size: 1 << 20,
    };
    let from = FetchFrom {
        url: BaseUrl::new("http://ctl:8080").unwrap(),
        token: [1; 32],
    };
    let mut i = inst(1, spec(256, RestartPolicy::Always));
    i.spec.boot = Boot::Disk {
        image: Image::Blob(blob),
    };
    let mut d = desired(1, vec![i.clone()]);
    d.fetch = Some(from.clone());
    s.deliver(d.clone());
    s.converge();
    s.advance(Duration::from_secs(5));
    s.converge();
    // One download asked, however many passes; the instance says it is downloading.
    assert_eq!(s.fetches, vec![(blob, Some(from.clone()))]);
    assert_eq!(s.state(1), Some(InstanceState::Downloading));
    assert_eq!(s.hv.calls(Call::Create, id(1)), 0);
    assert!(s.rec.blobs_in_use().contains(&blob.digest));
    // Cached: built.
    s.rec.fetched(blob.digest, Ok(()));
    s.converge();
    assert_eq!(s.hv.calls(Call::Create, id(1)), 1);
    assert_eq!(s.state(1), Some(InstanceState::Running));

    // Another instance whose image cannot be fetched: an error with the reason, no retry
    // until the controller sends a new state.
    let other = BlobRef {
        digest: Digest([8; 32]),
        size: 10,
    };
    let mut j = inst(2, spec(256, RestartPolicy::Always));
    j.spec.boot = Boot::Disk {
        image: Image::Blob(other),
    };
    let mut d2 = desired(2, vec![i.clone(), j.clone()]);
    d2.fetch = Some(from.clone());
    s.deliver(d2.clone());
    s.converge();
    s.rec
        .fetched(other.digest, Err("the image did not verify 3 times".into()));
    s.converge();
    s.advance(Duration::from_secs(60));
    s.converge();
    assert_eq!(s.state(2), Some(InstanceState::Error(ErrorKind::Fetch)));
    assert!(
        last_reason(&s.take_events(), 2)
            .unwrap()
            .contains("did not verify")
    );
    assert_eq!(s.fetches.len(), 2);
    d2.generation = 3;
    s.deliver(d2);
    s.converge();
    assert_eq!(s.fetches.len(), 3, "a new state tries again");

    // Prefetch: cached ahead of any instance; no source: the failure says how to fix it.
    let ahead = BlobRef {
        digest: Digest([9; 32]),
        size: 10,
    };
    let mut d4 = desired(4, vec![i]);
    d4.prefetch.push(ahead).unwrap();
    s.deliver(d4);
    s.converge();
    assert_eq!(s.fetches.last(), Some(&(ahead, None)));
}

/// The last reason the agent gave for instance `n`.
fn last_reason(events: &[AgentEvent], n: u64) -> Option<String> {
    events.iter().rev().find_map(|e| match e {
        AgentEvent::Instance { id: i, reason, .. } if *i == id(n) => {
            Some(reason.as_str().to_owned())
        }
        _ => None,
    })
}

#[test]
fn a_guest_that_ignores_the_power_button_is_forced_and_says_so() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    s.hv.ignore_power_button(true);
    let mut i = inst(1, spec(256, RestartPolicy::Always));
    s.deliver(desired(1, vec![i.clone()]));
    s.converge();
    s.take_events();

    // A polite reboot the guest ignores: reset, and the reason says so, pass after pass.
    i.reboot_count = 1;
    i.power_mode = PowerMode {
        force: false,
        stop_timeout_secs: 30,
    };
    s.deliver(desired(2, vec![i.clone()]));
    s.converge();
    s.advance(Duration::from_secs(10));
    s.converge();
    assert_eq!(s.hv.calls(Call::Reboot, id(1)), 1);
    let events = s.take_events();
    let why = last_reason(&events, 1).unwrap();
    assert!(
        why.contains("ignored the power button for 30 s: reset"),
        "{why}"
    );
    assert_eq!(s.state(1), Some(InstanceState::Running));

    // A polite stop, ignored: forced off, said so; it stays said until the state changes.
    i.power = PowerState::Stopped;
    s.deliver(desired(3, vec![i.clone()]));
    s.converge();
    s.advance(Duration::from_secs(10));
    s.converge();
    let events = s.take_events();
    assert_eq!(states_of(&events, 1).last(), Some(&InstanceState::Stopped));
    let why = last_reason(&events, 1).unwrap();
    assert!(why.contains("forced off"), "{why}");

    // Started again: the reason is gone. A forced stop says nothing more (as asked).
    i.power = PowerState::Running;
    s.deliver(desired(4, vec![i.clone()]));
    s.converge();
    assert_eq!(last_reason(&s.take_events(), 1).as_deref(), Some(""));
    i.power = PowerState::Stopped;
    i.power_mode.force = true;
    s.deliver(desired(5, vec![i.clone()]));
    s.converge();
    assert_eq!(last_reason(&s.take_events(), 1).as_deref(), Some(""));
    assert_eq!(s.state(1), Some(InstanceState::Stopped));
}

#[test]
fn resync_lists_every_instance_with_its_reason() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    let mut kvm = spec(256, RestartPolicy::OnFailure);
    kvm.require_kvm = true;
    s.deliver(desired(
        1,
        vec![inst(1, spec(256, RestartPolicy::OnFailure)), inst(2, kvm)],
    ));
    s.converge();
    let all = s.rec.resync();
    assert_eq!(all.len(), 2);
    assert!(all.iter().any(|e| matches!(e, AgentEvent::Instance { state: InstanceState::Error(ErrorKind::KvmUnavailable), reason, .. } if !reason.as_str().is_empty())));
}

#[test]
fn vcpus_are_not_a_hard_limit_on_the_agent() {
    // 8 host vCPUs; the scheduler may over-subscribe them (its allocation ratio).
    let mut s = Sim::new(HypervisorKind::Emulated);
    let mut wide = spec(256, RestartPolicy::OnFailure);
    wide.vcpus = 12;
    s.deliver(desired(1, vec![inst(1, wide)]));
    s.converge();
    assert_eq!(s.state(1), Some(InstanceState::Running));
}

#[test]
fn a_boot_request_starts_an_instance_that_stopped_by_itself() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    let mut di = inst(1, spec(256, RestartPolicy::OnFailure));
    s.deliver(desired(1, vec![di.clone()]));
    s.converge();
    // The guest shuts itself down: on-failure leaves it stopped.
    s.hv.guest_shutdown(id(1));
    s.converge();
    assert_eq!(s.hv.calls(Call::Start, id(1)), 0);
    // The operator's start: the same power, one more boot request.
    di.reboot_count += 1;
    s.deliver(desired(2, vec![di]));
    s.converge();
    assert_eq!(s.hv.calls(Call::Start, id(1)), 1);
    assert_eq!(s.hv.state_of(id(1)), Some(DomainState::Running));
}

#[test]
fn a_state_for_another_install_builds_nothing_on_a_copy() {
    let (a, b) = (BootId(0xa), BootId(0xb));
    // A copy of the node's identity on a second box: install B, holding nothing of the node.
    let mut copy = Sim::new(HypervisorKind::Emulated);
    copy.rec = Reconciler::new(facts(HypervisorKind::Emulated), None).with_boot(b);
    let for_a = DesiredState {
        boot: Some(a),
        ..desired(5, vec![inst(1, spec(512, RestartPolicy::Always))])
    };
    copy.deliver(for_a.clone());
    copy.converge();
    assert_eq!(
        acks(&copy.take_events()),
        vec![(5, AckResult::OtherInstall { mine: b })]
    );
    assert_eq!(
        copy.hv.calls(Call::Create, id(1)),
        0,
        "the copy built nothing"
    );
    assert!(copy.rec.held().is_none());
    // Once an operator keeps B, it is B's.
    copy.deliver(DesiredState {
        boot: Some(b),
        ..desired(6, vec![inst(1, spec(512, RestartPolicy::Always))])
    });
    copy.converge();
    assert_eq!(copy.hv.calls(Call::Create, id(1)), 1);

    // Install A holds a state taken before installs had identities: it takes A's and B's
    // states (an upgrade must not strand it), but once it holds one naming A, only A's.
    let mut orig = Sim::new(HypervisorKind::Emulated);
    orig.rec = Reconciler::new(facts(HypervisorKind::Emulated), None).with_boot(a);
    orig.deliver(desired(4, vec![inst(1, spec(512, RestartPolicy::Always))]));
    orig.deliver(for_a);
    assert_eq!(orig.rec.generation(), 5);
    orig.take_events();
    orig.deliver(DesiredState {
        boot: Some(b),
        ..desired(6, vec![])
    });
    assert_eq!(
        acks(&orig.take_events()),
        vec![(6, AckResult::OtherInstall { mine: a })]
    );
    assert_eq!(orig.rec.generation(), 5, "a state kept for B is not A's");
}

#[test]
fn a_lost_state_file_does_not_let_an_older_leader_send_the_node_back() {
    let mut s = Sim::new(HypervisorKind::Emulated);
    let new_epoch = epoch_floor(3);
    s.deliver(desired(new_epoch + 2, vec![]));
    s.take_events();
    // desired.bin is lost (a damaged disk, an operator's rm); the floor is kept apart.
    std::fs::remove_file(s.dir.path().join(outpost_agent::store::DESIRED_FILE)).unwrap();
    s.rec = Reconciler::new(facts(HypervisorKind::Emulated), None).with_floor(s.store.floor());
    assert!(s.rec.held().is_none());
    // A frozen leader of epoch 2 wakes and publishes the deleted instance again: refused.
    s.deliver(desired(
        epoch_floor(2) + 9,
        vec![inst(1, spec(512, RestartPolicy::Always))],
    ));
    s.converge();
    assert_eq!(
        acks(&s.take_events()),
        vec![(
            epoch_floor(2) + 9,
            AckResult::Stale {
                current: new_epoch + 2
            }
        )]
    );
    assert_eq!(
        s.hv.calls(Call::Create, id(1)),
        0,
        "nothing deleted comes back"
    );
    // The current leader's answer (the same state, or one naming the floor) is taken.
    s.deliver(desired(new_epoch + 2, vec![]));
    assert_eq!(s.rec.generation(), new_epoch + 2);
    // Another fleet (a new store, adopting) is not held back by this one's floor.
    let mut t = Sim::new(HypervisorKind::Emulated);
    t.deliver(desired(new_epoch, vec![]));
    t.rec = Reconciler::new(facts(HypervisorKind::Emulated), None).with_floor(t.store.floor());
    t.deliver(DesiredState {
        fleet: FleetId(99),
        ..desired(1, vec![])
    });
    assert_eq!(t.rec.generation(), 1);
}

//! The fleet core: placement and dispatch, agent feedback, retries on other nodes, deletes,
//! fencing by generation, liveness.
#![allow(clippy::unwrap_used)]

use outpost_controller::fleet::*;
use outpost_controller::scheduler::{Availability, GroupPolicy, Scheduler};
use outpost_protocol::*;

fn node(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

fn inventory(memory_mib: u32) -> Inventory {
    Inventory {
        arch: Arch::X86_64,
        hypervisor: HypervisorKind::Kvm,
        total: Resources {
            vcpus: 4,
            memory_mib,
            disk_gib: 50,
        },
        reserved: Resources::default(),
        labels: Labels::new(),
        images: [ImageName::new("base.qcow2").unwrap()]
            .into_iter()
            .collect(),
        agent_version: AgentVersion::new("0.1.0").unwrap(),
        cached: Default::default(),
    }
}

fn spec(memory_mib: u32) -> InstanceSpec {
    InstanceSpec {
        vcpus: 1,
        memory_mib,
        disk_gib: 1,
        arch: Arch::X86_64,
        require_kvm: false,
        boot: Boot::Disk {
            image: ImageName::new("base.qcow2").unwrap().into(),
        },
        network: Network::None,
        restart: RestartPolicy::OnFailure,
        labels: Labels::new(),
        seed: None,
    }
}

fn online(f: &mut Fleet, n: &str, memory_mib: u32) {
    f.on_status(
        0,
        &node(n),
        NodeStatus {
            presence: Presence::Online,
            session: 1,
            boot: Default::default(),
        },
    );
    f.on_inventory(0, &node(n), inventory(memory_mib));
}

fn fleet() -> Fleet {
    let mut f = Fleet::new(
        Scheduler::default(),
        FleetConfig::default(),
        Snapshot::default(),
        0,
    );
    online(&mut f, "a", 4096);
    online(&mut f, "b", 2048);
    f.take_changes();
    f
}

fn create(f: &mut Fleet, n: u64, mem: u32) -> Result<InstanceId, FleetError> {
    f.create(
        10,
        CreateRequest {
            any_arch: false,
            id: InstanceId::from_u64(n),
            name: format!("vm{n}"),
            spec: spec(mem),
            selector: vec![],
            group: None,
        },
    )
}

fn ev(id: InstanceId, state: InstanceState, reason: &str) -> AgentEvent {
    AgentEvent::Instance {
        id,
        generation: 1,
        state,
        reason: Reason::lossy(reason),
    }
}

#[test]
fn create_places_stores_then_publishes() {
    let mut f = fleet();
    let id = create(&mut f, 1, 1024).unwrap();
    let ch = f.take_changes();
    assert_eq!(ch.instances.len(), 1);
    assert_eq!(ch.instances[0].phase, Phase::Scheduled);
    assert_eq!(ch.instances[0].node, Some(node("a"))); // spreads to the emptier node
    assert_eq!(ch.publish.len(), 1);
    let (n, d) = &ch.publish[0];
    assert_eq!(n, &node("a"));
    assert_eq!(d.generation, 1);
    assert_eq!(d.instances[0].id, id);
    // The node reports: building, then running.
    f.on_event(20, &node("a"), &ev(id, InstanceState::Building, ""));
    f.on_event(30, &node("a"), &ev(id, InstanceState::Running, ""));
    assert_eq!(f.instance("vm1").unwrap().phase, Phase::Running);
    // Duplicates change nothing.
    f.take_changes();
    f.on_event(31, &node("a"), &ev(id, InstanceState::Running, ""));
    assert!(f.take_changes().instances.is_empty());
}

#[test]
fn impossible_requests_are_refused_at_once_and_store_nothing() {
    let mut f = fleet();
    let err = create(&mut f, 1, 100_000).unwrap_err();
    assert_eq!(err.to_string(), "no host fits (2 hosts): memory removed 2");
    assert!(f.take_changes().is_empty());
    assert!(matches!(create(&mut f, 2, 0), Err(FleetError::Spec(_))));
}

#[test]
fn failed_builds_retry_elsewhere_then_error_with_every_reason() {
    let mut f = fleet();
    online(&mut f, "c", 1024);
    f.take_changes();
    let id = create(&mut f, 1, 512).unwrap();
    let first = f.instance("vm1").unwrap().node.clone().unwrap();
    f.on_event(
        20,
        &first,
        &ev(
            id,
            InstanceState::Error(ErrorKind::Hypervisor),
            "create failed: boom",
        ),
    );
    let second = f.instance("vm1").unwrap().node.clone().unwrap();
    assert_ne!(first, second);
    assert_eq!(f.instance("vm1").unwrap().phase, Phase::Scheduled);
    let ch = f.take_changes();
    // Both nodes get a new desired state: the old one without it, the new one with it.
    assert_eq!(ch.publish.len(), 2);
    // The same event again (QoS 1 redelivery) changes nothing.
    f.on_event(
        21,
        &first,
        &ev(
            id,
            InstanceState::Error(ErrorKind::Hypervisor),
            "create failed: boom",
        ),
    );
    assert!(f.take_changes().is_empty());
    f.on_event(
        30,
        &second,
        &ev(
            id,
            InstanceState::Error(ErrorKind::UnknownImage),
            "image gone",
        ),
    );
    let third = f.instance("vm1").unwrap().node.clone().unwrap();
    f.on_event(
        40,
        &third,
        &ev(id, InstanceState::Error(ErrorKind::Hypervisor), "again"),
    );
    let i = f.instance("vm1").unwrap();
    assert_eq!(i.phase, Phase::Error);
    assert_eq!(i.node, None);
    assert!(i.reason.contains("3 attempts failed"), "{}", i.reason);
    assert!(
        i.reason.contains("boom") && i.reason.contains("image gone"),
        "{}",
        i.reason
    );
    // A late event from an old node changes nothing.
    f.on_event(50, &first, &ev(id, InstanceState::Running, ""));
    assert_eq!(f.instance("vm1").unwrap().phase, Phase::Error);
}

#[test]
fn delete_waits_for_the_node_then_forgets() {
    let mut f = fleet();
    let id = create(&mut f, 1, 512).unwrap();
    let n = f.instance("vm1").unwrap().node.clone().unwrap();
    f.take_changes();
    f.delete("vm1", false).unwrap();
    assert_eq!(f.instance("vm1").unwrap().phase, Phase::Deleting);
    let ch = f.take_changes();
    assert!(ch.publish[0].1.instances.is_empty());
    assert_eq!(
        ch.publish[0].1.gone.as_slice(),
        &[id],
        "a delete is explicit"
    );
    let g = ch.publish[0].1.generation;
    // A report at an older generation still listing it: not yet.
    let mut r = NodeReport {
        generation: g - 1,
        ..Default::default()
    };
    r.instances
        .push(InstanceReport {
            id,
            state: InstanceState::Running,
        })
        .unwrap();
    f.on_report(60, &n, &r);
    assert!(f.instance("vm1").is_some());
    // Converged: gone.
    f.on_report(
        70,
        &n,
        &NodeReport {
            generation: g,
            ..Default::default()
        },
    );
    assert!(f.instance("vm1").is_none());
    let ch = f.take_changes();
    assert_eq!(ch.removed, vec![id]);
    assert_eq!(
        ch.tombstones,
        vec![id],
        "remembered as deleted by this store"
    );
    // A node that still reports it later is told it is gone.
    f.on_report(80, &n, &r);
    let ch = f.take_changes();
    assert_eq!(ch.publish[0].1.gone.as_slice(), &[id]);
}

#[test]
fn stale_ack_replaces_the_held_state_by_name() {
    let mut f = fleet();
    create(&mut f, 1, 512).unwrap();
    let n = f.instance("vm1").unwrap().node.clone().unwrap();
    f.take_changes();
    f.on_event(
        20,
        &n,
        &AgentEvent::Ack {
            generation: 1,
            result: AckResult::Stale { current: 9 },
        },
    );
    let ch = f.take_changes();
    let d = &ch.publish[0].1;
    assert_eq!(
        d.generation, 10,
        "past the held generation, never equal to it"
    );
    assert_eq!(
        d.replaces,
        Some(Version {
            fleet: f.id(),
            generation: 9
        })
    );
    assert!(d.gone.is_empty(), "nothing is deleted on a stale answer");
    // Once the node accepts it, later states no longer carry `replaces`.
    f.on_event(
        21,
        &n,
        &AgentEvent::Ack {
            generation: 10,
            result: AckResult::Accepted,
        },
    );
    f.reboot("vm1", PowerMode::default()).unwrap();
    assert_eq!(f.take_changes().publish[0].1.replaces, None);
}

fn holding(fleet: FleetId, generation: u64, ids: &[(u64, &str)]) -> Holding {
    Holding {
        held: Some(Version { fleet, generation }),
        instances: ids
            .iter()
            .map(|&(id, name)| DesiredInstance {
                id: InstanceId::from_u64(id),
                name: InstanceName::new(name).unwrap(),
                power: PowerState::Running,
                reboot_count: 0,
                power_mode: PowerMode::default(),
                spec: spec(256),
            })
            .collect(),
    }
}

#[test]
fn a_node_ahead_of_the_store_is_adopted_not_wiped() {
    let mut f = fleet();
    create(&mut f, 1, 512).unwrap();
    let n = f.instance("vm1").unwrap().node.clone().unwrap();
    f.take_changes();
    // The store was restored from an older backup: the node holds generation 40, with vm1 and
    // an instance created after the backup.
    f.on_holding(50, &n, holding(f.id(), 40, &[(99, "late"), (1, "vm1")]));
    let late = f.instance("late").expect("adopted under its name");
    assert_eq!(late.node.as_ref(), Some(&n));
    assert!(late.reason.contains("adopted"), "{}", late.reason);
    let ch = f.take_changes();
    assert!(ch.instances.iter().any(|i| i.name == "late"), "stored");
    let d = &ch.publish.iter().find(|(m, _)| m == &n).unwrap().1;
    assert_eq!(d.instances.len(), 2, "both kept");
    assert!(d.gone.is_empty());
    assert_eq!(d.replaces.map(|v| v.generation), Some(40));
    assert_eq!(f.claimed(&n).memory_mib, 512 + 256);
    // The same holding again adopts nothing twice.
    f.on_holding(
        60,
        &n,
        holding(f.id(), d.generation, &[(99, "late"), (1, "vm1")]),
    );
    assert_eq!(f.instances().count(), 2);
}

#[test]
fn a_node_of_another_fleet_is_held_for_an_operator() {
    let mut f = fleet();
    let other = FleetId(0xbad);
    f.on_holding(
        50,
        &node("a"),
        holding(other, 57, &[(5, "web-1"), (6, "db-1")]),
    );
    assert_eq!(
        f.node(&node("a")).unwrap().availability(),
        Availability::Down
    );
    let ch = f.take_changes();
    assert!(
        !ch.publish.iter().any(|(n, _)| n == &node("a")),
        "nothing is published to it"
    );
    assert_eq!(f.held_elsewhere().count(), 2);
    assert!(f.instance("web-1").is_none(), "not adopted by itself");
    // Placements go elsewhere.
    create(&mut f, 1, 256).unwrap();
    assert_eq!(f.instance("vm1").unwrap().node, Some(node("b")));
    // The operator adopts it.
    assert_eq!(f.adopt(70, &node("a")).unwrap(), 2);
    assert!(f.instance("web-1").is_some() && f.instance("db-1").is_some());
    let ch = f.take_changes();
    let d = &ch.publish.iter().find(|(n, _)| n == &node("a")).unwrap().1;
    assert_eq!(d.fleet, f.id());
    assert_eq!(
        d.replaces,
        Some(Version {
            fleet: other,
            generation: 57
        })
    );
    assert_eq!(d.instances.len(), 2);
    assert!(matches!(
        f.adopt(71, &node("a")),
        Err(FleetError::NotForeign(_))
    ));
}

#[test]
fn a_restarted_controller_gives_nodes_a_grace_period() {
    let mut f = fleet();
    create(&mut f, 1, 256).unwrap();
    f.take_changes();
    let nodes: Vec<NodeRecord> = f.nodes().cloned().collect();
    let instances: Vec<InstanceRecord> = f.instances().cloned().collect();
    let snap = Snapshot {
        fleet: f.id(),
        nodes,
        instances,
        ..Snapshot::default()
    };
    let mut g = Fleet::new(
        Scheduler::default(),
        FleetConfig::default(),
        snap,
        1_000_000,
    );
    // No agent has spoken yet: creates still place.
    create(&mut g, 2, 256).unwrap();
    // Past the liveness timeout without a word, they are down.
    g.tick(1_000_000 + FleetConfig::default().liveness_timeout_ms + 1);
    assert_eq!(
        g.node(&node("a")).unwrap().availability(),
        Availability::Down
    );
}

#[test]
fn liveness_and_late_last_wills() {
    let mut f = fleet();
    f.on_status(
        5,
        &node("a"),
        NodeStatus {
            presence: Presence::Online,
            session: 7,
            boot: Default::default(),
        },
    );
    // A Last Will from an older connection is ignored.
    f.on_status(
        6,
        &node("a"),
        NodeStatus {
            presence: Presence::Offline,
            session: 3,
            boot: Default::default(),
        },
    );
    assert!(f.node(&node("a")).unwrap().online);
    f.tick(100_000);
    assert!(
        !f.node(&node("a")).unwrap().online,
        "no report for longer than the timeout"
    );
    assert!(create(&mut f, 1, 512).is_err(), "no node is up");
}

#[test]
fn groups_keep_their_policy() {
    let mut f = fleet();
    let req = |n: u64, p| CreateRequest {
        any_arch: false,
        id: InstanceId::from_u64(n),
        name: format!("g{n}"),
        spec: spec(256),
        selector: vec![],
        group: Some(("web".into(), p)),
    };
    f.create(1, req(1, GroupPolicy::AntiAffinity)).unwrap();
    f.create(1, req(2, GroupPolicy::AntiAffinity)).unwrap();
    assert_ne!(
        f.instance("g1").unwrap().node,
        f.instance("g2").unwrap().node
    );
    let third = f.create(1, req(3, GroupPolicy::AntiAffinity)).unwrap_err();
    assert!(
        third.to_string().contains("anti-affinity removed 2"),
        "{third}"
    );
    assert!(matches!(
        f.create(1, req(4, GroupPolicy::Affinity)),
        Err(FleetError::GroupPolicy(_))
    ));
}

#[test]
fn drain_moves_instances_off_the_node() {
    let mut f = fleet();
    create(&mut f, 1, 256).unwrap();
    let from = f.instance("vm1").unwrap().node.clone().unwrap();
    let (moved, stuck) = f.drain(&from).unwrap();
    assert_eq!((moved, stuck.len()), (1, 0));
    assert_ne!(f.instance("vm1").unwrap().node.as_ref(), Some(&from));
    assert!(f.desired_for(&from).instances.is_empty());
}

#[test]
fn lost_nodes_are_evacuated_after_the_delay_and_fenced_by_generation() {
    let mut f = fleet();
    let id = create(&mut f, 1, 256).unwrap();
    let from = f.instance("vm1").unwrap().node.clone().unwrap();
    f.take_changes();
    // The node drops off (Last Will).
    f.on_status(
        1_000,
        &from,
        NodeStatus {
            presence: Presence::Offline,
            session: 1,
            boot: Default::default(),
        },
    );
    let other = if from == node("a") {
        node("b")
    } else {
        node("a")
    };
    let alive = |f: &mut Fleet, t: u64| f.on_report(t, &other, &NodeReport::default());
    alive(&mut f, 60_000);
    f.tick(60_000);
    assert_eq!(
        f.instance("vm1").unwrap().node.as_ref(),
        Some(&from),
        "not before lost-after"
    );
    assert!(f.take_changes().publish.is_empty());
    alive(&mut f, 400_000);
    f.tick(400_000);
    let to = f.instance("vm1").unwrap().node.clone().unwrap();
    assert_ne!(to, from);
    assert!(
        f.instance("vm1").unwrap().failures.is_empty(),
        "a lost node is not a build failure"
    );
    let ch = f.take_changes();
    let old = ch.publish.iter().find(|(n, _)| n == &from).unwrap();
    assert!(
        old.1.instances.is_empty(),
        "the lost node's desired state no longer has it"
    );
    // More ticks change nothing.
    alive(&mut f, 401_000);
    f.tick(401_000);
    assert!(!f.take_changes().publish.iter().any(|(n, _)| n == &from));
    assert_eq!(f.instance("vm1").unwrap().node.as_ref(), Some(&to));
    // The node returns and gets the newer generation: it will delete its stale copy. Its late
    // report of the old copy does not move the instance back.
    f.on_status(
        402_000,
        &from,
        NodeStatus {
            presence: Presence::Online,
            session: 2,
            boot: Default::default(),
        },
    );
    let ch = f.take_changes();
    assert!(
        ch.publish
            .iter()
            .any(|(n, d)| n == &from && d.instances.is_empty())
    );
    let mut r = NodeReport {
        generation: 1,
        ..Default::default()
    };
    r.instances
        .push(InstanceReport {
            id,
            state: InstanceState::Running,
        })
        .unwrap();
    f.on_report(402_500, &from, &r);
    assert_eq!(f.instance("vm1").unwrap().node.as_ref(), Some(&to));
    // It is told explicitly that its copy is gone (moved away by this store).
    let ch = f.take_changes();
    let d = &ch.publish.iter().find(|(n, _)| n == &from).unwrap().1;
    assert_eq!(d.gone.as_slice(), &[id]);
}

/// The scheduler's incremental claims always equal the sum over the instances, and the
/// fleet's indexes (by name, by node) agree with a scan of the instances.
fn assert_claims_consistent(f: &Fleet) {
    let summed = f.claims();
    let counts = f.instance_counts();
    for n in f.nodes() {
        assert_eq!(
            f.claimed(&n.id),
            summed.get(&n.id).copied().unwrap_or_default(),
            "claims of {} drifted",
            n.id
        );
        let held: Vec<_> = f
            .instances()
            .filter(|i| i.node.as_ref() == Some(&n.id))
            .collect();
        assert_eq!(counts.get(&n.id).copied().unwrap_or(0), held.len());
        let wanted: Vec<_> = held
            .iter()
            .filter(|i| i.phase != Phase::Deleting)
            .map(|i| i.id)
            .collect();
        let desired: Vec<_> = f
            .desired_for(&n.id)
            .instances
            .iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(desired, wanted, "desired state of {} drifted", n.id);
    }
    for i in f.instances() {
        assert_eq!(f.instance(&i.name).map(|j| j.id), Some(i.id));
    }
}

#[test]
fn incremental_claims_match_the_instances_through_every_change() {
    let mut f = fleet();
    online(&mut f, "c", 1024);
    let a = create(&mut f, 1, 512).unwrap();
    create(&mut f, 2, 256).unwrap();
    create(&mut f, 3, 256).unwrap();
    assert_claims_consistent(&f);
    let n1 = f.instance("vm1").unwrap().node.clone().unwrap();
    f.on_event(
        5,
        &n1,
        &ev(a, InstanceState::Error(ErrorKind::Hypervisor), "boom"),
    );
    assert_claims_consistent(&f);
    f.delete("vm2", false).unwrap();
    assert_claims_consistent(&f);
    let n2 = f
        .instances()
        .find(|i| i.name == "vm2")
        .and_then(|i| i.node.clone())
        .unwrap();
    let g = f.node(&n2).unwrap().generation;
    f.on_report(
        6,
        &n2,
        &NodeReport {
            generation: g,
            ..Default::default()
        },
    );
    assert!(f.instance("vm2").is_none());
    assert_claims_consistent(&f);
    let n3 = f.instance("vm3").unwrap().node.clone().unwrap();
    f.drain(&n3).unwrap();
    assert_claims_consistent(&f);
}

#[test]
fn an_instance_its_node_does_not_report_says_so_and_a_report_clears_it() {
    let mut f = fleet();
    let id = create(&mut f, 1, 256).unwrap();
    let n = f.instance("vm1").unwrap().node.clone().unwrap();
    let g = f.node(&n).unwrap().generation;
    f.on_event(1, &n, &ev(id, InstanceState::Running, ""));
    // A report at the current generation without it.
    f.on_report(
        2,
        &n,
        &NodeReport {
            generation: g,
            ..Default::default()
        },
    );
    assert!(
        f.instance("vm1")
            .unwrap()
            .reason
            .contains("does not report")
    );
    let mut r = NodeReport {
        generation: g,
        ..Default::default()
    };
    r.instances
        .push(InstanceReport {
            id,
            state: InstanceState::Running,
        })
        .unwrap();
    f.on_report(3, &n, &r);
    assert_eq!(f.instance("vm1").unwrap().reason, "");
}

/// One step of a random history: an operator's command or an agent's message.
#[derive(Debug, Clone)]
enum Step {
    Create(u64, u32, bool),
    Delete(u64),
    Stop(u64),
    Reboot(u64),
    Drain(usize),
    Uncordon(usize),
    Adopt(usize),
    Running(u64),
    Failed(u64),
    Report(usize),
    Offline(usize),
    Online(usize),
    Holding(usize, u64),
    Tick(u64),
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        (0..12u64, 1..6u32, any::<bool>()).prop_map(|(i, m, g)| Step::Create(i, m * 128, g)),
        (0..12u64).prop_map(Step::Delete),
        (0..12u64).prop_map(Step::Stop),
        (0..12u64).prop_map(Step::Reboot),
        (0..3usize).prop_map(Step::Drain),
        (0..3usize).prop_map(Step::Uncordon),
        (0..3usize).prop_map(Step::Adopt),
        (0..12u64).prop_map(Step::Running),
        (0..12u64).prop_map(Step::Failed),
        (0..3usize).prop_map(Step::Report),
        (0..3usize).prop_map(Step::Offline),
        (0..3usize).prop_map(Step::Online),
        (0..3usize, 100..104u64).prop_map(|(n, i)| Step::Holding(n, i)),
        (1..400u64).prop_map(Step::Tick),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Over any history of commands and agent messages, the scheduler's incremental claims,
    /// the per-node and per-name indexes and every desired state agree with a recount from the
    /// instances, and nothing is ever listed as gone that this store did not delete or move.
    #[test]
    fn indexes_and_claims_match_a_recount_over_any_history(steps in proptest::collection::vec(step(), 1..60)) {
        let mut f = fleet();
        online(&mut f, "c", 2048);
        let names = ["a", "b", "c"];
        let mut now = 100;
        let known = |f: &Fleet, i: u64| f.get(InstanceId::from_u64(i)).map(|r| (r.id, r.node.clone()));
        let mut ever_known = std::collections::BTreeSet::new();
        for s in steps {
            now += 10;
            match s {
                Step::Create(i, m, grouped) => {
                    let _ = f.create(now, CreateRequest {
                        any_arch: false,
                        id: InstanceId::from_u64(i),
                        name: format!("vm{i}"),
                        spec: spec(m),
                        selector: vec![],
                        group: grouped.then(|| ("g".to_owned(), GroupPolicy::AntiAffinity)),
                    });
                }
                Step::Delete(i) => { let _ = f.delete(&format!("vm{i}"), false); }
                Step::Stop(i) => { let _ = f.set_power(&format!("vm{i}"), PowerState::Stopped, PowerMode::default()); }
                Step::Reboot(i) => { let _ = f.reboot(&format!("vm{i}"), PowerMode::default()); }
                Step::Drain(n) => { let _ = f.drain(&node(names[n])); }
                Step::Uncordon(n) => { let _ = f.cordon(&node(names[n]), false); }
                Step::Adopt(n) => { let _ = f.adopt(now, &node(names[n])); }
                Step::Running(i) | Step::Failed(i) => {
                    if let Some((id, Some(n))) = known(&f, i) {
                        let state = if matches!(s, Step::Running(_)) {
                            InstanceState::Running
                        } else {
                            InstanceState::Error(ErrorKind::Hypervisor)
                        };
                        f.on_event(now, &n, &ev(id, state, ""));
                    }
                }
                Step::Report(n) => {
                    let n = node(names[n]);
                    let g = f.node(&n).map_or(0, |r| r.generation);
                    let mut r = NodeReport { generation: g, ..Default::default() };
                    for i in f.instances().filter(|i| i.node.as_ref() == Some(&n) && i.phase != Phase::Deleting) {
                        let _ = r.instances.push(InstanceReport { id: i.id, state: InstanceState::Running });
                    }
                    f.on_report(now, &n, &r);
                }
                Step::Offline(n) | Step::Online(n) => {
                    let presence = if matches!(s, Step::Online(_)) { Presence::Online } else { Presence::Offline };
                    f.on_status(now, &node(names[n]), NodeStatus { presence, session: now, boot: Default::default() });
                }
                Step::Holding(n, i) => {
                    let fleet_id = if i % 2 == 0 { f.id() } else { FleetId(0xbad) };
                    f.on_holding(now, &node(names[n]), holding(fleet_id, 500, &[(i, "held")]));
                }
                Step::Tick(dt) => {
                    now += dt * 1000;
                    f.tick(now);
                }
            }
            assert_claims_consistent(&f);
            ever_known.extend(f.instances().map(|i| i.id));
            for n in f.nodes() {
                for id in f.gone_for(&n.id) {
                    let owned_here = f.get(id).is_some_and(|i| i.node.as_ref() == Some(&n.id) && i.phase != Phase::Deleting);
                    proptest::prop_assert!(!owned_here, "{id} is both wanted on {} and gone", n.id);
                    proptest::prop_assert!(ever_known.contains(&id), "{id} listed as gone but never known to this store");
                }
            }
            let _ = f.take_changes();
        }
    }
}

#[test]
fn without_an_architecture_any_the_fleet_has_will_do() {
    let mut f = Fleet::new(
        Scheduler::default(),
        FleetConfig::default(),
        Snapshot::default(),
        0,
    );
    let arm = node("arm-1");
    f.on_status(
        0,
        &arm,
        NodeStatus {
            presence: Presence::Online,
            session: 1,
            boot: Default::default(),
        },
    );
    f.on_inventory(
        0,
        &arm,
        Inventory {
            arch: Arch::Aarch64,
            ..inventory(4096)
        },
    );
    let req = |n: u64, any_arch: bool| CreateRequest {
        id: InstanceId::from_u64(n),
        name: format!("vm{n}"),
        spec: spec(256), // x86_64 as the first choice
        selector: vec![],
        group: None,
        any_arch,
    };
    let e = f.create(1, req(1, false)).unwrap_err();
    assert!(e.to_string().contains("architecture"), "{e}");
    f.create(1, req(2, true)).unwrap();
    let i = f.instance("vm2").unwrap();
    assert_eq!(i.spec.arch, Arch::Aarch64);
    assert_eq!(i.node.as_ref(), Some(&arm));
}

#[test]
fn two_installs_of_one_identity_put_the_node_in_conflict_until_an_operator_keeps_one() {
    let mut f = fleet();
    let status = |boot: u64, session: u64| NodeStatus {
        presence: Presence::Online,
        session,
        boot: BootId(boot),
    };
    // The first install to connect is bound; its desired states name it.
    f.on_status(10, &node("a"), status(0xa, 10));
    let ch = f.take_changes();
    assert_eq!(f.node(&node("a")).unwrap().boot, Some(BootId(0xa)));
    assert!(
        ch.nodes.iter().any(|n| n.boot == Some(BootId(0xa))),
        "stored"
    );
    let (_, d) = ch.publish.iter().find(|(n, _)| n == &node("a")).unwrap();
    assert_eq!(d.boot, Some(BootId(0xa)));
    create(&mut f, 1, 1024).unwrap();
    f.take_changes();
    // A copy connects with an older session (its clock is behind): still seen.
    f.on_status(20, &node("a"), status(0xc, 5));
    let n = f.node(&node("a")).unwrap();
    assert_eq!(n.conflict, vec![BootId(0xc)]);
    assert_eq!(n.availability(), Availability::Down);
    assert!(n.notice.as_deref().unwrap().starts_with("conflict"));
    assert!(
        f.take_changes()
            .events
            .iter()
            .any(|e| e.kind == "identity-conflict")
    );
    // Nothing new is placed on it, and nothing on it moves.
    assert_eq!(
        create(&mut f, 2, 3000).unwrap_err().to_string(),
        "no host fits (2 hosts): availability (down/cordoned) removed 1, memory removed 1"
    );
    assert_eq!(f.instance_counts().get(&node("a")), Some(&1));
    // The copy refusing the bound install's state says the same.
    f.on_event(
        21,
        &node("a"),
        &AgentEvent::Ack {
            generation: 3,
            result: AckResult::OtherInstall { mine: BootId(0xd) },
        },
    );
    assert_eq!(f.node(&node("a")).unwrap().conflict.len(), 2);
    // An operator names an install the node never had: refused.
    assert!(matches!(
        f.resolve(&node("a"), BootId(0xe)),
        Err(FleetError::NoSuchInstall(..))
    ));
    // Keeping the copy: its states name it, a new generation.
    let before = f.node(&node("a")).unwrap().generation;
    f.resolve(&node("a"), BootId(0xc)).unwrap();
    let n = f.node(&node("a")).unwrap();
    assert_eq!((n.boot, n.conflict.len()), (Some(BootId(0xc)), 0));
    assert!(n.generation > before);
    assert_eq!(n.availability(), Availability::Up);
    assert_eq!(f.desired_for(&node("a")).boot, Some(BootId(0xc)));
    assert!(matches!(
        f.resolve(&node("a"), BootId(0xc)),
        Err(FleetError::NoConflict(_))
    ));
    // The old install still out there puts it back in conflict.
    f.on_status(30, &node("a"), status(0xa, 30));
    assert_eq!(f.node(&node("a")).unwrap().conflict, vec![BootId(0xa)]);
    // Agents of an earlier release (no install id) bind nothing and conflict with nothing.
    f.on_status(40, &node("b"), status(0, 40));
    assert_eq!(f.node(&node("b")).unwrap().boot, None);
}

#[test]
fn an_enrolled_capacity_is_the_first_ceiling() {
    let mut f = Fleet::new(
        Scheduler::default(),
        FleetConfig::default(),
        Snapshot::default(),
        0,
    );
    f.set_enrolled(
        [(
            node("small"),
            outpost_firmware_config::enrolled::Enrolled {
                vcpus: Some(2),
                memory_mib: Some(1024),
                disk_gib: None,
            },
        )]
        .into_iter()
        .collect(),
    );
    // Its first report claims more: counted at what it was enrolled with.
    online(&mut f, "small", 8192);
    let n = f.node(&node("small")).unwrap();
    let want = Resources {
        vcpus: 2,
        memory_mib: 1024,
        disk_gib: 50,
    };
    assert_eq!(n.ceiling, Some(want));
    assert_eq!(n.inventory.as_ref().unwrap().total, want);
    assert!(n.notice.as_deref().unwrap().contains("above its ceiling"));
    // Another node, not enrolled: its first report is trusted.
    online(&mut f, "other", 8192);
    assert_eq!(f.node(&node("other")).unwrap().over_ceiling, None);
}

/// Time the controller did not see (its broker away, the process frozen) is not counted
/// against any node: a node goes down, and is lost, only after the full delay observed.
#[test]
fn unobserved_time_does_not_count_against_nodes() {
    let mut f = fleet();
    create(&mut f, 1, 256).unwrap();
    let on = f.instance("vm1").unwrap().node.clone().unwrap();
    f.take_changes();
    let cfg = FleetConfig::default();
    // An hour passes unseen (a leader frozen, or cut from its broker): nothing goes down.
    let t = 3_600_000;
    f.unobserved(t, t);
    f.tick(t);
    assert!(f.node(&on).unwrap().online, "unseen time is no evidence");
    assert_eq!(f.instance("vm1").unwrap().node.as_ref(), Some(&on));
    // Seen time counts again: a liveness timeout later without a report, it is down...
    f.tick(t + cfg.liveness_timeout_ms + 1);
    assert!(!f.node(&on).unwrap().online);
    // ...and moved only after the lost-after delay, observed.
    f.unobserved(
        t + cfg.lost_after_ms,
        cfg.lost_after_ms - cfg.liveness_timeout_ms,
    );
    f.tick(t + cfg.lost_after_ms);
    assert_eq!(f.instance("vm1").unwrap().node.as_ref(), Some(&on));
}

/// Session numbers come from the device and are compared for equality only: a Last Will
/// counts for the connection that said online last, whatever its number (a clock a day
/// behind gives a smaller one), and a late one of an older connection says nothing.
#[test]
fn a_last_will_counts_only_for_the_current_connection() {
    let mut f = fleet();
    let n = node("a");
    let status = |presence, session| NodeStatus {
        presence,
        session,
        boot: Default::default(),
    };
    // The agent restarts with a clock a day behind: a smaller session than the last.
    f.on_status(10, &n, status(Presence::Online, 1_000));
    f.on_status(20, &n, status(Presence::Online, 500));
    // The older connection's Last Will arrives late: the node stays up.
    f.on_status(30, &n, status(Presence::Offline, 1_000));
    assert!(f.node(&n).unwrap().online, "a late Last Will says nothing");
    // The current connection's Last Will puts it down.
    f.on_status(40, &n, status(Presence::Offline, 500));
    assert!(!f.node(&n).unwrap().online);
}

/// A node's blob token follows its broker credentials: provisioned again, the old token is
/// refused and its next desired state carries the new one; revoked, it fetches nothing.
#[test]
fn blob_tokens_rotate_with_credentials_and_end_with_revocation() {
    let cfg = FleetConfig {
        image_url: Some(BaseUrl::new("http://127.0.0.1:8080").unwrap()),
        ..FleetConfig::default()
    };
    let mut f = Fleet::new(Scheduler::default(), cfg, Snapshot::default(), 0);
    online(&mut f, "a", 4096);
    let a = node("a");
    let blob = BlobRef {
        digest: Digest([9; 32]),
        size: 10,
    };
    f.add_image(outpost_controller::fleet::images::ImageRecord {
        name: "img".into(),
        version: "1".into(),
        blob,
        arch: None,
        format: outpost_controller::fleet::images::ImageFormat::Raw,
        url: None,
        created_ms: 0,
    })
    .unwrap();
    f.prefetch("img:1", &[], 1).unwrap();
    f.tick(1);
    let token = |f: &Fleet| f.desired_for(&a).fetch.unwrap().token;
    let creds = |k: u8| Some([(a.clone(), [k; 32])].into_iter().collect());
    f.set_credentials(creds(1));
    let t1 = token(&f);
    assert!(f.blob_access(&a, &t1, &blob.digest).is_ok());
    let g = f.desired_for(&a).generation;
    // Provisioned again: a new token, in a new generation; the old one is refused.
    f.set_credentials(creds(2));
    let t2 = token(&f);
    assert_ne!(t1, t2);
    assert!(
        f.desired_for(&a).generation > g,
        "the new token is published"
    );
    assert!(f.blob_access(&a, &t1, &blob.digest).is_err());
    assert!(f.blob_access(&a, &t2, &blob.digest).is_ok());
    // Revoked: nothing.
    f.set_credentials(Some(Default::default()));
    assert!(f.blob_access(&a, &t2, &blob.digest).is_err());
}

//! The scheduler core: concrete cases, and property tests of its invariants (never
//! over-commit, deterministic, anti-affinity never violated, every placement passes every
//! filter).
#![allow(clippy::unwrap_used)]

use outpost_controller::scheduler::*;
use outpost_protocol::*;
use proptest::prelude::*;

fn host(id: &str, vcpus: u16, memory_mib: u32) -> HostState {
    HostState {
        id: NodeId::new(id).unwrap(),
        availability: Availability::Up,
        arch: Arch::X86_64,
        hypervisor: HypervisorKind::Kvm,
        capacity: Resources {
            vcpus,
            memory_mib,
            disk_gib: 100,
        },
        claimed: Resources::default(),
        labels: vec![],
        images: vec![ImageName::new("base.qcow2").unwrap()],
        cached: vec![],
        recent_failures: 0,
        instances: 0,
    }
}

fn spec(vcpus: u16, memory_mib: u32) -> InstanceSpec {
    InstanceSpec {
        vcpus,
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

/// One decision over a fresh table of `hosts`.
fn place(s: &Scheduler, hosts: &[HostState], r: &Request<'_>) -> Result<Placement, NoValidHost> {
    s.place(&HostTable::from_hosts(s.ratios(), hosts), r)
}

fn req(spec: &InstanceSpec) -> Request<'_> {
    Request {
        spec,
        selector: &[],
        group: None,
        exclude: &[],
    }
}

#[test]
fn spreads_by_default_and_packs_with_negative_weights() {
    let mut hosts = vec![host("a", 4, 4096), host("b", 4, 8192)];
    hosts[0].claimed = Resources {
        vcpus: 1,
        memory_mib: 1024,
        disk_gib: 0,
    };
    let s = spec(1, 512);
    let spread = Scheduler::default();
    assert_eq!(place(&spread, &hosts, &req(&s)).unwrap().host, 1);
    let mut cfg = SchedulerConfig::default();
    cfg.weights.cpu = -1.0;
    cfg.weights.memory = -1.0;
    cfg.weights.disk = 0.0;
    let pack = Scheduler::new(cfg);
    assert_eq!(place(&pack, &hosts, &req(&s)).unwrap().host, 0);
}

#[test]
fn alternates_are_ranked_and_exclusive() {
    let hosts = vec![
        host("a", 8, 1024),
        host("b", 8, 4096),
        host("c", 8, 2048),
        host("d", 8, 512),
    ];
    let s = spec(1, 256);
    // The fleet retries by placing again, so by default none are computed; asked for, they
    // are ranked.
    assert!(
        place(&Scheduler::default(), &hosts, &req(&s))
            .unwrap()
            .alternates
            .is_empty()
    );
    let with_alternates = Scheduler::new(SchedulerConfig {
        alternates: 3,
        ..SchedulerConfig::default()
    });
    let p = place(&with_alternates, &hosts, &req(&s)).unwrap();
    assert_eq!(p.host, 1);
    assert_eq!(p.alternates, vec![2, 0, 3]);
    // A retry excludes what was tried.
    let exclude = [1];
    let p = place(
        &Scheduler::default(),
        &hosts,
        &Request {
            exclude: &exclude,
            ..req(&s)
        },
    )
    .unwrap();
    assert_eq!(p.host, 2);
}

#[test]
fn nothing_fits_names_each_filter() {
    let mut hosts = vec![
        host("a", 1, 512),
        host("b", 8, 8192),
        host("c", 8, 8192),
        host("d", 8, 8192),
        host("e", 8, 8192),
    ];
    hosts[1].availability = Availability::Cordoned;
    hosts[2].arch = Arch::Aarch64;
    hosts[3].images.clear();
    hosts[4].hypervisor = HypervisorKind::Emulated;
    let mut s = spec(1, 1024);
    s.require_kvm = true;
    let err = place(&Scheduler::default(), &hosts, &req(&s)).unwrap_err();
    assert_eq!(
        err.removed,
        vec![
            (Filter::Availability, 1),
            (Filter::Architecture, 1),
            (Filter::Kvm, 1),
            (Filter::Memory, 1),
            (Filter::Image, 1)
        ]
    );
    assert_eq!(
        err.to_string(),
        "no host fits (5 hosts): availability (down/cordoned) removed 1, architecture removed 1, kvm removed 1, memory removed 1, image removed 1"
    );
    let none = place(&Scheduler::default(), &[], &req(&s)).unwrap_err();
    assert_eq!(none.to_string(), "no host fits: the fleet has no nodes");
}

#[test]
fn vcpu_allocation_ratio_applies() {
    let hosts = vec![host("a", 2, 65536)];
    let s = spec(8, 64);
    assert!(place(&Scheduler::default(), &hosts, &req(&s)).is_ok()); // 2 x 4.0
    let s = spec(9, 64);
    assert_eq!(
        place(&Scheduler::default(), &hosts, &req(&s))
            .unwrap_err()
            .removed,
        vec![(Filter::Vcpus, 1)]
    );
}

#[test]
fn labels_and_groups_constrain() {
    let mut hosts = vec![host("a", 8, 8192), host("b", 8, 8192), host("c", 8, 8192)];
    hosts[2].labels.push(Label::parse("zone=north").unwrap());
    let s = spec(1, 256);
    let sel = [Label::parse("zone=north").unwrap()];
    let p = place(
        &Scheduler::default(),
        &hosts,
        &Request {
            selector: &sel,
            ..req(&s)
        },
    )
    .unwrap();
    assert_eq!(p.host, 2);

    let members = [0, 1];
    let anti = GroupConstraint {
        policy: GroupPolicy::AntiAffinity,
        members_on: &members,
    };
    let p = place(
        &Scheduler::default(),
        &hosts,
        &Request {
            group: Some(anti),
            ..req(&s)
        },
    )
    .unwrap();
    assert_eq!(p.host, 2);
    let aff = GroupConstraint {
        policy: GroupPolicy::Affinity,
        members_on: &members[1..],
    };
    let p = place(
        &Scheduler::default(),
        &hosts,
        &Request {
            group: Some(aff),
            ..req(&s)
        },
    )
    .unwrap();
    assert_eq!(p.host, 1);
}

#[test]
fn recent_failures_push_a_host_down() {
    let mut hosts = vec![host("a", 8, 8192), host("b", 8, 8192)];
    hosts[0].recent_failures = 1;
    let s = spec(1, 256);
    assert_eq!(
        place(&Scheduler::default(), &hosts, &req(&s)).unwrap().host,
        1
    );
}

// ---- properties ----

fn arb_host(i: usize) -> impl Strategy<Value = HostState> {
    (
        1u16..16,
        256u32..16384,
        1u32..200,
        prop::sample::select(vec![
            Availability::Up,
            Availability::Up,
            Availability::Up,
            Availability::Down,
            Availability::Cordoned,
        ]),
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec!["north", "south"]),
        0u32..3,
    )
        .prop_map(
            move |(vcpus, memory_mib, disk_gib, availability, arm, kvm, zone, failures)| {
                HostState {
                    id: NodeId::new(&format!("n{i:04}")).unwrap(),
                    availability,
                    arch: if arm { Arch::Aarch64 } else { Arch::X86_64 },
                    hypervisor: if kvm {
                        HypervisorKind::Kvm
                    } else {
                        HypervisorKind::Emulated
                    },
                    capacity: Resources {
                        vcpus,
                        memory_mib,
                        disk_gib,
                    },
                    claimed: Resources::default(),
                    labels: vec![Label::parse(&format!("zone={zone}")).unwrap()],
                    images: vec![ImageName::new("base.qcow2").unwrap()],
                    // Some hosts hold a cached blob: a weigher bonus for asks that boot it.
                    cached: if failures == 1 {
                        vec![Digest([1; 32])]
                    } else {
                        vec![]
                    },
                    recent_failures: failures,
                    instances: 0,
                }
            },
        )
}

fn arb_fleet() -> impl Strategy<Value = Vec<HostState>> {
    (1usize..40).prop_flat_map(|n| (0..n).map(arb_host).collect::<Vec<_>>())
}

#[derive(Debug, Clone)]
struct Ask {
    spec: InstanceSpec,
    zone: Option<&'static str>,
    anti: bool,
}

impl Ask {
    /// `zone=Z` when the ask names a zone.
    fn selector(&self) -> Vec<Label> {
        self.zone
            .map(|z| Label::parse(&format!("zone={z}")).unwrap())
            .into_iter()
            .collect()
    }
}

fn arb_asks() -> impl Strategy<Value = Vec<Ask>> {
    prop::collection::vec(
        (
            1u16..6,
            64u32..4096,
            0u32..20,
            any::<bool>(),
            any::<bool>(),
            prop::option::of(prop::sample::select(vec!["north", "south"])),
            any::<bool>(),
        ),
        1..60,
    )
    .prop_map(|v| {
        v.into_iter()
            .map(|(vcpus, mem, disk, arm, kvm, zone, anti)| {
                let mut s = spec(vcpus, mem);
                s.disk_gib = disk;
                if anti && kvm {
                    s.boot = Boot::Disk {
                        image: Image::Blob(BlobRef {
                            digest: Digest([1; 32]),
                            size: 1,
                        }),
                    };
                }
                s.arch = if arm { Arch::Aarch64 } else { Arch::X86_64 };
                s.require_kvm = kvm;
                Ask {
                    spec: s,
                    zone,
                    anti,
                }
            })
            .collect()
    })
}

/// Places every ask in order, claiming as it goes; returns the outcomes and the final hosts.
fn run(
    sched: &Scheduler,
    hosts: Vec<HostState>,
    asks: &[Ask],
) -> (Vec<Option<HostIdx>>, HostTable) {
    let mut table = HostTable::from_hosts(sched.ratios(), &hosts);
    let mut group: Vec<HostIdx> = Vec::new();
    let mut out = Vec::new();
    for a in asks {
        let sel = a.selector();
        let members = group.clone();
        let r = Request {
            spec: &a.spec,
            selector: &sel,
            group: a.anti.then_some(GroupConstraint {
                policy: GroupPolicy::AntiAffinity,
                members_on: &members,
            }),
            exclude: &[],
        };
        match sched.place(&table, &r) {
            Ok(p) => {
                assert!(
                    sched.reject(&table, p.host, &r).is_none(),
                    "placement passes every filter"
                );
                for &alt in &p.alternates {
                    assert!(
                        sched.reject(&table, alt, &r).is_none(),
                        "alternates pass every filter"
                    );
                    assert_ne!(alt, p.host);
                }
                table.claim(p.host, a.spec.resources());
                if a.anti {
                    group.push(p.host);
                }
                out.push(Some(p.host));
            }
            Err(e) => {
                assert_eq!(
                    e.removed.iter().map(|(_, n)| n).sum::<usize>(),
                    table.len(),
                    "every host is accounted for"
                );
                out.push(None);
            }
        }
    }
    (out, table)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn never_overcommits_and_is_deterministic(hosts in arb_fleet(), asks in arb_asks()) {
        // With alternates, so that they are checked against every filter too.
        let sched = Scheduler::new(SchedulerConfig { alternates: 3, ..SchedulerConfig::default() });
        let (first, after) = run(&sched, hosts.clone(), &asks);
        for i in 0..after.len() {
            let (eff, claimed) = (after.effective(i), after.claimed(i));
            prop_assert!(claimed.vcpus <= eff.vcpus);
            prop_assert!(claimed.memory_mib <= eff.memory_mib);
            prop_assert!(claimed.disk_gib <= eff.disk_gib);
        }
        let (second, _) = run(&sched, hosts, &asks);
        prop_assert_eq!(first, second);
    }

    #[test]
    fn anti_affinity_is_never_violated(hosts in arb_fleet(), asks in arb_asks()) {
        let asks: Vec<Ask> = asks.into_iter().map(|a| Ask { anti: true, ..a }).collect();
        let (placed, _) = run(&Scheduler::default(), hosts, &asks);
        let mut used: Vec<HostIdx> = placed.into_iter().flatten().collect();
        let n = used.len();
        used.sort_unstable();
        used.dedup();
        prop_assert_eq!(used.len(), n);
    }
}

fn arb_big_fleet() -> impl Strategy<Value = Vec<HostState>> {
    (1usize..300).prop_flat_map(|n| (0..n).map(arb_host).collect::<Vec<_>>())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// The bitset fast path and the host-by-host reference scan choose the same hosts in the
    /// same order, and refuse the same requests, whatever the constraints, weigher multipliers
    /// (packing ones included) and image policy.
    #[test]
    fn fast_path_agrees_with_the_reference_scan(
        hosts in arb_big_fleet(),
        asks in arb_asks(),
        exclude in prop::collection::vec(0usize..300, 0..20),
        members in prop::collection::vec(0usize..300, 0..20),
        affinity in any::<bool>(),
        claims in prop::collection::vec((0usize..300, 0u16..8, 0u32..8192), 0..100),
        weights in (-2.0f64..2.0, -2.0f64..2.0, -2.0f64..2.0, -3.0f64..3.0, -10.0f64..10.0),
        require_image in any::<bool>(),
    ) {
        let (cpu, memory, disk, image, failure) = weights;
        let mut sched = Scheduler::default();
        sched.config.weights = Weights { cpu, memory, disk, image, failure };
        sched.config.require_image = require_image;
        let mut table = HostTable::from_hosts(sched.ratios(), &hosts);
        for (i, vcpus, memory_mib) in claims {
            if i < table.len() {
                table.claim(i, Resources { vcpus, memory_mib, disk_gib: 0 });
            }
        }
        let exclude: Vec<HostIdx> = exclude.into_iter().filter(|&i| i < table.len()).collect();
        let members: Vec<HostIdx> = members.into_iter().filter(|&i| i < table.len()).collect();
        for a in &asks {
            let sel = a.selector();
            let r = Request {
                spec: &a.spec,
                selector: &sel,
                group: a.anti.then_some(GroupConstraint {
                    policy: if affinity { GroupPolicy::Affinity } else { GroupPolicy::AntiAffinity },
                    members_on: &members,
                }),
                exclude: &exclude,
            };
            prop_assert_eq!(sched.place(&table, &r), sched.place_by_scan(&table, &r));
        }
    }
}

/// Hosts of a few hardware models (capacity classes), as real fleets are: what lets a decision
/// walk the hosts ranked by weight instead of weighing every one.
fn arb_models_fleet() -> impl Strategy<Value = Vec<HostState>> {
    let models = [
        (4u16, 4096u32, 50u32),
        (8, 8192, 100),
        (16, 16384, 100),
        (16, 8192, 400),
    ];
    (1usize..400, prop::collection::vec(0usize..4, 400)).prop_flat_map(move |(n, pick)| {
        (0..n)
            .map(|i| {
                let (vcpus, memory_mib, disk_gib) = models[pick[i]];
                arb_host(i).prop_map(move |mut h| {
                    h.capacity = Resources {
                        vcpus,
                        memory_mib,
                        disk_gib,
                    };
                    h
                })
            })
            .collect::<Vec<_>>()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The ranked decision (request shapes tracked, hosts walked best bound first) chooses
    /// exactly what the reference scan chooses, with the same candidate count, as claims,
    /// releases and failures change the hosts one at a time, whatever the weights (packing
    /// ones included), alternates and image policy.
    #[test]
    fn ranked_decisions_agree_with_the_reference_scan(
        hosts in arb_models_fleet(),
        asks in arb_asks(),
        members in prop::collection::vec(0usize..400, 0..20),
        weights in (-2.0f64..2.0, -2.0f64..2.0, -2.0f64..2.0, -3.0f64..3.0, -10.0f64..10.0),
        changes in prop::collection::vec((0usize..400, 0u8..3, 0u32..4), 0..60),
        require_image in any::<bool>(),
        alternates in 0usize..3,
    ) {
        let (cpu, memory, disk, image, failure) = weights;
        let mut sched = Scheduler::default();
        sched.config.weights = Weights { cpu, memory, disk, image, failure };
        sched.config.require_image = require_image;
        sched.config.alternates = alternates;
        let mut table = HostTable::from_hosts(sched.ratios(), &hosts);
        table.weigh_by(sched.config.weights);
        let members: Vec<HostIdx> = members.into_iter().filter(|&i| i < table.len()).collect();
        let mut changes = changes.into_iter();
        for a in &asks {
            let sel = a.selector();
            let r = Request {
                spec: &a.spec,
                selector: &sel,
                group: a.anti.then_some(GroupConstraint {
                    policy: GroupPolicy::AntiAffinity,
                    members_on: &members,
                }),
                exclude: &[],
            };
            table.track(a.spec.resources()); // as the fleet does before deciding
            let placed = sched.place(&table, &r);
            prop_assert_eq!(&placed, &sched.place_by_scan(&table, &r));
            if let Ok(p) = placed {
                table.claim(p.host, a.spec.resources());
            }
            // Something else changes on some host meanwhile.
            if let Some((i, what, n)) = changes.next().filter(|c| c.0 < table.len()) {
                match what {
                    0 => table.set_failures(i, n),
                    1 => table.release(i, a.spec.resources()),
                    _ => table.set_availability(i, Availability::Cordoned),
                }
            }
        }
    }
}

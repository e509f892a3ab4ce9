//! Sample messages (typical and largest possible) and proptest strategies, shared by the
//! protocol's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use outpost_protocol::limits::*;
use outpost_protocol::*;
use proptest::prelude::*;

pub fn node(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

pub fn image(s: &str) -> ImageName {
    ImageName::new(s).unwrap()
}

pub fn labels(pairs: &[&str]) -> Labels {
    pairs.iter().map(|p| Label::parse(p).unwrap()).collect()
}

pub fn status() -> NodeStatus {
    NodeStatus {
        presence: Presence::Online,
        session: 1_764_000_000_000,
        boot: BootId(0x0123_4567_89ab_cdef),
    }
}

pub fn inventory() -> Inventory {
    Inventory {
        arch: Arch::Aarch64,
        hypervisor: HypervisorKind::Kvm,
        total: Resources {
            vcpus: 8,
            memory_mib: 16384,
            disk_gib: 200,
        },
        reserved: Resources {
            vcpus: 1,
            memory_mib: 1024,
            disk_gib: 10,
        },
        labels: labels(&["zone=north", "site=depot-4"]),
        images: [image("debian-12.qcow2"), image("vmlinuz")]
            .into_iter()
            .collect(),
        agent_version: AgentVersion::new("0.1.0").unwrap(),
        cached: [Digest([0x4b; 32])].into_iter().collect(),
    }
}

pub fn spec() -> InstanceSpec {
    InstanceSpec {
        vcpus: 2,
        memory_mib: 512,
        disk_gib: 4,
        arch: Arch::Aarch64,
        require_kvm: false,
        boot: Boot::Disk {
            image: image("debian-12.qcow2").into(),
        },
        network: Network::Libvirt {
            network: NetName::new("default").unwrap(),
        },
        restart: RestartPolicy::OnFailure,
        labels: labels(&["app=cam"]),
        seed: None,
    }
}

pub fn kernel_spec() -> InstanceSpec {
    InstanceSpec {
        vcpus: 1,
        memory_mib: 128,
        disk_gib: 0,
        arch: Arch::X86_64,
        require_kvm: false,
        boot: Boot::Kernel {
            kernel: Image::Blob(blob(0x4b)),
            initrd: Some(image("initrd.img").into()),
            cmdline: Cmdline::new("console=ttyS0").unwrap(),
        },
        network: Network::None,
        restart: RestartPolicy::Never,
        labels: Labels::new(),
        seed: Some(Seed {
            user_data: Some(blob(0x77)),
            network_config: None,
            ssh_keys: Some(blob(0x88)),
            hostname: Some(InstanceName::new("fw").unwrap()),
        }),
    }
}

/// A blob whose digest is 32 times `b`.
pub fn blob(b: u8) -> BlobRef {
    BlobRef {
        digest: Digest([b; 32]),
        size: 123_456_789,
    }
}

pub fn fetch_from() -> FetchFrom {
    FetchFrom {
        url: BaseUrl::new("http://ctl.example:8080").unwrap(),
        token: [7; 32],
    }
}

pub fn fetch_event() -> AgentEvent {
    AgentEvent::Fetch {
        digest: Digest([0x4b; 32]),
        done: 1 << 30,
        total: 2 << 30,
        rate: 12_500_000,
        state: FetchState::Running,
        reason: Reason::default(),
    }
}

pub fn desired() -> DesiredState {
    DesiredState {
        fleet: FleetId(0x0f1e_e71d),
        generation: 7,
        replaces: None,
        lease_secs: 300,
        gone: [InstanceId::from_u64(0x5555_6666_7777_8888)]
            .into_iter()
            .collect(),
        fetch: Some(fetch_from()),
        prefetch: [blob(0x5a)].into_iter().collect(),
        boot: Some(BootId(0x0123_4567_89ab_cdef)),
        instances: [
            DesiredInstance {
                id: InstanceId::from_u64(0x1111_2222_3333_4444),
                name: InstanceName::new("web-1").unwrap(),
                power: PowerState::Running,
                reboot_count: 0,
                power_mode: PowerMode::default(),
                spec: spec(),
            },
            DesiredInstance {
                id: InstanceId::from_u64(0xaaaa_bbbb_cccc_dddd),
                name: InstanceName::new("fw-1").unwrap(),
                power: PowerState::Stopped,
                reboot_count: 2,
                power_mode: PowerMode {
                    force: true,
                    stop_timeout_secs: 30,
                },
                spec: kernel_spec(),
            },
        ]
        .into_iter()
        .collect(),
    }
}

/// A report for a node with `n` instances.
pub fn report(n: u64) -> NodeReport {
    NodeReport {
        generation: 42,
        usage: Usage {
            used: Resources {
                vcpus: 8,
                memory_mib: 4096,
                disk_gib: 16,
            },
            instances: n as u16,
        },
        instances: (0..n)
            .map(|i| InstanceReport {
                id: InstanceId::from_u64(0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(i + 1)),
                state: if i == 3 {
                    InstanceState::Error(ErrorKind::UnknownImage)
                } else {
                    InstanceState::Running
                },
            })
            .collect(),
    }
}

pub fn ack() -> AgentEvent {
    AgentEvent::Ack {
        generation: 7,
        result: AckResult::Stale { current: 9 },
    }
}

pub fn instance_event() -> AgentEvent {
    AgentEvent::Instance {
        id: InstanceId::from_u64(0x1111_2222_3333_4444),
        generation: 7,
        state: InstanceState::Error(ErrorKind::KvmUnavailable),
        reason: Reason::lossy("spec requires KVM; node has only software emulation"),
    }
}

// ---- the largest value of each message: every bound filled, every integer at its maximum ----

fn max_str(c: char, n: usize) -> String {
    let mut s = String::from("a");
    s.extend(std::iter::repeat_n(c, n - 1));
    s
}

pub fn max_labels() -> Labels {
    (0..MAX_LABELS)
        .map(|_| Label {
            key: LabelKey::new(&max_str('k', MAX_LABEL_KEY_LEN)).unwrap(),
            value: LabelValue::new(&max_str('v', MAX_LABEL_VALUE_LEN)).unwrap(),
        })
        .collect()
}

pub fn max_image() -> ImageName {
    image(&max_str('i', MAX_IMAGE_NAME_LEN))
}

pub fn max_resources() -> Resources {
    Resources {
        vcpus: u16::MAX,
        memory_mib: u32::MAX,
        disk_gib: u32::MAX,
    }
}

pub fn max_inventory() -> Inventory {
    Inventory {
        arch: Arch::Aarch64,
        hypervisor: HypervisorKind::Fake,
        total: max_resources(),
        reserved: max_resources(),
        labels: max_labels(),
        images: (0..MAX_IMAGES).map(|_| max_image()).collect(),
        agent_version: AgentVersion::new(&"9".repeat(MAX_AGENT_VERSION_LEN)).unwrap(),
        cached: (0..MAX_CACHED).map(|i| Digest([i as u8; 32])).collect(),
    }
}

pub fn max_spec() -> InstanceSpec {
    InstanceSpec {
        vcpus: u16::MAX,
        memory_mib: u32::MAX,
        disk_gib: u32::MAX,
        arch: Arch::Aarch64,
        require_kvm: true,
        boot: Boot::Kernel {
            kernel: max_image().into(),
            initrd: Some(max_image().into()),
            cmdline: Cmdline::new(&max_str('c', MAX_CMDLINE_LEN)).unwrap(),
        },
        network: Network::Bridge {
            bridge: NetName::new(&max_str('b', MAX_NET_NAME_LEN)).unwrap(),
        },
        restart: RestartPolicy::Always,
        labels: max_labels(),
        seed: Some(Seed {
            user_data: Some(BlobRef {
                digest: Digest([0xff; 32]),
                size: u64::MAX,
            }),
            network_config: Some(BlobRef {
                digest: Digest([0xfe; 32]),
                size: u64::MAX,
            }),
            ssh_keys: Some(BlobRef {
                digest: Digest([0xfd; 32]),
                size: u64::MAX,
            }),
            hostname: Some(max_name()),
        }),
    }
}

pub fn max_name() -> InstanceName {
    InstanceName::new(&max_str('z', MAX_INSTANCE_NAME_LEN)).unwrap()
}

pub fn max_desired() -> DesiredState {
    DesiredState {
        fleet: FleetId(u64::MAX),
        generation: u64::MAX,
        replaces: Some(Version {
            fleet: FleetId(u64::MAX),
            generation: u64::MAX,
        }),
        lease_secs: u32::MAX,
        gone: (0..MAX_INSTANCES_PER_NODE as u64)
            .map(|i| InstanceId::from_u64(u64::MAX - i))
            .collect(),
        instances: (0..MAX_INSTANCES_PER_NODE as u64)
            .map(|i| DesiredInstance {
                id: InstanceId::from_u64(u64::MAX - i),
                name: max_name(),
                power: PowerState::Stopped,
                reboot_count: u32::MAX,
                power_mode: PowerMode {
                    force: true,
                    stop_timeout_secs: u16::MAX,
                },
                spec: max_spec(),
            })
            .collect(),
        fetch: Some(FetchFrom {
            url: BaseUrl::new(&format!("https://{}", max_str('u', MAX_URL_LEN - 8))).unwrap(),
            token: [0xff; 32],
        }),
        prefetch: (0..MAX_PREFETCH)
            .map(|i| BlobRef {
                digest: Digest([i as u8; 32]),
                size: u64::MAX,
            })
            .collect(),
        boot: Some(BootId(u64::MAX)),
    }
}

pub fn max_report() -> NodeReport {
    NodeReport {
        generation: u64::MAX,
        usage: Usage {
            used: max_resources(),
            instances: u16::MAX,
        },
        instances: (0..MAX_INSTANCES_PER_NODE as u64)
            .map(|i| InstanceReport {
                id: InstanceId::from_u64(u64::MAX - i),
                state: InstanceState::Error(ErrorKind::TooManyInstances),
            })
            .collect(),
    }
}

pub fn max_event() -> AgentEvent {
    AgentEvent::Instance {
        id: InstanceId::from_u64(u64::MAX),
        generation: u64::MAX,
        state: InstanceState::Error(ErrorKind::TooManyInstances),
        // Multi-byte characters still count in bytes.
        reason: Reason::lossy(&"é".repeat(MAX_REASON_LEN)),
    }
}

pub fn max_holding() -> Holding {
    let d = max_desired();
    Holding {
        held: d.replaces,
        instances: d.instances,
    }
}

pub fn max_status() -> NodeStatus {
    NodeStatus {
        presence: Presence::Offline,
        session: u64::MAX,
        boot: BootId(u64::MAX),
    }
}

// ---- proptest strategies ----

fn bounded(re: &str) -> impl Strategy<Value = String> {
    proptest::string::string_regex(re).unwrap()
}

pub fn arb_file() -> impl Strategy<Value = ImageName> {
    bounded("[A-Za-z0-9][A-Za-z0-9._-]{0,63}").prop_map(|s| image(&s))
}

pub fn arb_image() -> impl Strategy<Value = Image> {
    prop_oneof![
        arb_file().prop_map(Image::File),
        (any::<[u8; 32]>(), any::<u64>()).prop_map(|(d, size)| Image::Blob(BlobRef {
            digest: Digest(d),
            size
        })),
    ]
}

pub fn arb_labels() -> impl Strategy<Value = Labels> {
    proptest::collection::vec(
        (
            bounded("[a-z0-9][a-z0-9._/-]{0,31}"),
            bounded("([A-Za-z0-9][A-Za-z0-9._-]{0,63})?"),
        ),
        0..=MAX_LABELS,
    )
    .prop_map(|v| {
        v.into_iter()
            .map(|(k, v)| Label {
                key: LabelKey::new(&k).unwrap(),
                value: LabelValue::new(&v).unwrap(),
            })
            .collect()
    })
}

pub fn arb_resources() -> impl Strategy<Value = Resources> {
    (any::<u16>(), any::<u32>(), any::<u32>()).prop_map(|(vcpus, memory_mib, disk_gib)| Resources {
        vcpus,
        memory_mib,
        disk_gib,
    })
}

pub fn arb_arch() -> impl Strategy<Value = Arch> {
    prop_oneof![Just(Arch::X86_64), Just(Arch::Aarch64)]
}

pub fn arb_error_kind() -> impl Strategy<Value = ErrorKind> {
    prop_oneof![
        Just(ErrorKind::UnknownImage),
        Just(ErrorKind::KvmUnavailable),
        Just(ErrorKind::ArchMismatch),
        Just(ErrorKind::InsufficientResources),
        Just(ErrorKind::InvalidSpec),
        Just(ErrorKind::Hypervisor),
        Just(ErrorKind::TooManyInstances),
    ]
}

pub fn arb_state() -> impl Strategy<Value = InstanceState> {
    prop_oneof![
        Just(InstanceState::Building),
        Just(InstanceState::Running),
        Just(InstanceState::Stopped),
        Just(InstanceState::Crashed),
        Just(InstanceState::Deleted),
        arb_error_kind().prop_map(InstanceState::Error),
    ]
}

pub fn arb_inventory() -> impl Strategy<Value = Inventory> {
    (
        arb_arch(),
        prop_oneof![
            Just(HypervisorKind::Kvm),
            Just(HypervisorKind::Emulated),
            Just(HypervisorKind::Fake)
        ],
        arb_resources(),
        arb_resources(),
        arb_labels(),
        proptest::collection::vec(arb_file(), 0..=MAX_IMAGES),
        proptest::collection::vec(any::<[u8; 32]>(), 0..=MAX_CACHED),
    )
        .prop_map(
            |(arch, hypervisor, total, reserved, labels, images, cached)| Inventory {
                arch,
                hypervisor,
                total,
                reserved,
                labels,
                images: images.into_iter().collect(),
                agent_version: AgentVersion::new("0.1.0").unwrap(),
                cached: cached.into_iter().map(Digest).collect(),
            },
        )
}

pub fn arb_boot() -> impl Strategy<Value = Boot> {
    prop_oneof![
        arb_image().prop_map(|image| Boot::Disk { image }),
        (
            arb_image(),
            proptest::option::of(arb_image()),
            bounded("[ -~]{0,256}")
        )
            .prop_map(|(kernel, initrd, c)| Boot::Kernel {
                kernel,
                initrd,
                cmdline: Cmdline::new(&c).unwrap(),
            }),
    ]
}

pub fn arb_network() -> impl Strategy<Value = Network> {
    let name =
        || bounded("[A-Za-z0-9][A-Za-z0-9._-]{0,14}").prop_map(|s| NetName::new(&s).unwrap());
    prop_oneof![
        Just(Network::None),
        name().prop_map(|network| Network::Libvirt { network }),
        name().prop_map(|bridge| Network::Bridge { bridge }),
    ]
}

pub fn arb_spec() -> impl Strategy<Value = InstanceSpec> {
    (
        arb_resources(),
        arb_arch(),
        any::<bool>(),
        arb_boot(),
        arb_network(),
        prop_oneof![
            Just(RestartPolicy::Never),
            Just(RestartPolicy::OnFailure),
            Just(RestartPolicy::Always)
        ],
        arb_labels(),
    )
        .prop_map(
            |(r, arch, require_kvm, boot, network, restart, labels)| InstanceSpec {
                vcpus: r.vcpus,
                memory_mib: r.memory_mib,
                disk_gib: r.disk_gib,
                arch,
                require_kvm,
                boot,
                network,
                restart,
                labels,
                seed: None,
            },
        )
}

pub fn arb_desired() -> impl Strategy<Value = DesiredState> {
    let inst = (
        any::<u64>(),
        any::<bool>(),
        any::<u32>(),
        arb_spec(),
        "[a-z][a-z0-9-]{0,20}[a-z]",
        any::<bool>(),
        any::<u16>(),
    )
        .prop_map(
            |(id, stopped, reboot_count, spec, name, force, stop_timeout_secs)| DesiredInstance {
                id: InstanceId::from_u64(id),
                name: InstanceName::new(&name).unwrap(),
                power: if stopped {
                    PowerState::Stopped
                } else {
                    PowerState::Running
                },
                reboot_count,
                power_mode: PowerMode {
                    force,
                    stop_timeout_secs,
                },
                spec,
            },
        );
    (
        any::<u64>(),
        any::<u64>(),
        proptest::option::of((any::<u64>(), any::<u64>())),
        any::<u32>(),
        proptest::collection::vec(inst, 0..=MAX_INSTANCES_PER_NODE),
        proptest::collection::vec(any::<u64>(), 0..=MAX_INSTANCES_PER_NODE),
        any::<bool>(),
    )
        .prop_map(
            |(fleet, generation, replaces, lease_secs, v, gone, fetch)| DesiredState {
                fleet: FleetId(fleet),
                generation,
                replaces: replaces.map(|(f, g)| Version {
                    fleet: FleetId(f),
                    generation: g,
                }),
                lease_secs,
                instances: v.into_iter().collect(),
                gone: gone.into_iter().map(InstanceId::from_u64).collect(),
                fetch: fetch.then(fetch_from),
                prefetch: if fetch {
                    [blob(1), blob(2)].into_iter().collect()
                } else {
                    Default::default()
                },
                boot: fetch.then_some(BootId(generation)),
            },
        )
}

pub fn arb_report() -> impl Strategy<Value = NodeReport> {
    let inst = (any::<u64>(), arb_state()).prop_map(|(id, state)| InstanceReport {
        id: InstanceId::from_u64(id),
        state,
    });
    (
        any::<u64>(),
        arb_resources(),
        any::<u16>(),
        proptest::collection::vec(inst, 0..=MAX_INSTANCES_PER_NODE),
    )
        .prop_map(|(generation, used, instances, v)| NodeReport {
            generation,
            usage: Usage { used, instances },
            instances: v.into_iter().collect(),
        })
}

pub fn arb_event() -> impl Strategy<Value = AgentEvent> {
    prop_oneof![
        (
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            any::<bool>()
        )
            .prop_map(|(generation, stale, other)| AgentEvent::Ack {
                generation,
                result: match (stale, other) {
                    (Some(current), false) => AckResult::Stale { current },
                    (Some(g), true) => AckResult::OtherFleet {
                        held: Version {
                            fleet: FleetId(g ^ 1),
                            generation: g,
                        },
                    },
                    (None, _) => AckResult::Accepted,
                },
            }),
        ".{0,200}".prop_map(|reason| AgentEvent::Notice {
            kind: NoticeKind::StateUnreadable,
            reason: Reason::lossy(&reason),
        }),
        (
            any::<[u8; 32]>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            ".{0,200}"
        )
            .prop_map(|(d, done, total, rate, reason)| AgentEvent::Fetch {
                digest: Digest(d),
                done,
                total,
                rate,
                state: FetchState::Failed,
                reason: Reason::lossy(&reason),
            }),
        (any::<u64>(), any::<u64>(), arb_state(), ".{0,200}").prop_map(
            |(id, generation, state, reason)| AgentEvent::Instance {
                id: InstanceId::from_u64(id),
                generation,
                state,
                reason: Reason::lossy(&reason),
            }
        ),
    ]
}

pub fn arb_status() -> impl Strategy<Value = NodeStatus> {
    (any::<bool>(), any::<u64>(), any::<u64>()).prop_map(|(online, session, boot)| NodeStatus {
        presence: if online {
            Presence::Online
        } else {
            Presence::Offline
        },
        session,
        boot: BootId(boot),
    })
}

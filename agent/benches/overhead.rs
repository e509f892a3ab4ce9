//! The agent's overhead over a bare libvirt create of the same domain.
//!
//! Each round times two creates of one identical domain definition (the agent's own XML):
//! - bare: `virDomainDefineXML` + `virDomainCreate` on a libvirt connection, nothing else;
//! - agent: what `outpost-agent` does from a desired state's bytes to a running domain: decode
//!   and validate, store it durably (write, fsync, rename), plan (the reconciler), list the
//!   host's domains (libvirt), then the libvirt backend's create (instance directory, XML,
//!   define, start) and the reconciler taking the result back.
//!
//! The MQTT hop is not in either figure (the fleet bench measures it). Rounds alternate the two
//! so that drift hits both alike.
//!
//!     cargo bench -p outpost-agent --bench overhead                      # test:///default
//!     cargo bench -p outpost-agent --bench overhead -- --uri qemu:///system \
//!         --kernel /boot/vmlinuz-6.1.0-56-cloud-amd64 --rounds 20        # a real QEMU guest
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use outpost_agent::config::KindChoice;
use outpost_agent::hypervisor::libvirt::{LibvirtConfig, LibvirtHypervisor};
use outpost_agent::hypervisor::xml::{BootDef, DomainDef, domain_xml};
use outpost_agent::hypervisor::{Hypervisor, execute};
use outpost_agent::reconcile::{Effect, HostFacts, Offer, Reconciler};
use outpost_agent::store::DesiredStore;
use outpost_protocol::*;
use virt::connect::Connect;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn pct(v: &mut [Duration], q: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1e3
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // test runners: nothing to run; `cargo bench` passes --bench.
    }
    let uri = arg("--uri").unwrap_or_else(|| "test:///default".into());
    let real = !uri.starts_with("test:");
    let rounds: usize = arg("--rounds")
        .and_then(|r| r.parse().ok())
        .unwrap_or(if real { 20 } else { 300 });
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let instances = dir.path().join("instances");
    std::fs::create_dir_all(&images).unwrap();
    match arg("--kernel") {
        Some(k) => {
            std::fs::copy(k, images.join("vmlinuz")).unwrap();
        }
        None if real => panic!("--kernel PATH: a real guest needs a kernel"),
        None => std::fs::write(images.join("vmlinuz"), b"kernel").unwrap(),
    }
    let node = NodeId::new("bench").unwrap();
    let hv = LibvirtHypervisor::open(LibvirtConfig {
        node: node.clone(),
        uri: uri.clone(),
        kind: KindChoice::Auto,
        image_dir: images.clone(),
        instance_dir: instances.clone(),
        stop_timeout: Duration::ZERO,
    })
    .unwrap();
    let host = hv.host().unwrap();
    let conn = Connect::open(Some(&uri)).unwrap();
    let store = DesiredStore::open(&dir.path().join("state")).unwrap();
    let mut rec = Reconciler::new(
        HostFacts {
            arch: host.arch,
            kind: host.kind,
            allocatable: Resources {
                vcpus: host.vcpus,
                memory_mib: host.memory_mib,
                disk_gib: 100,
            },
            images: [ImageName::new("vmlinuz").unwrap()].into_iter().collect(),
            cached: Default::default(),
        },
        None,
    );
    let spec = InstanceSpec {
        vcpus: 1,
        memory_mib: 128,
        disk_gib: 0,
        arch: host.arch,
        require_kvm: false,
        boot: Boot::Kernel {
            kernel: ImageName::new("vmlinuz").unwrap().into(),
            initrd: None,
            cmdline: Cmdline::new("console=ttyS0 panic=-1").unwrap(),
        },
        network: Network::None,
        restart: RestartPolicy::Never,
        labels: Labels::new(),
        seed: None,
    };
    let kernel = std::path::absolute(images.join("vmlinuz")).unwrap();
    let bare_dir = std::path::absolute(dir.path().join("bare")).unwrap();
    std::fs::create_dir_all(&bare_dir).unwrap();

    let (mut bare, mut agent) = (Vec::new(), Vec::new());
    for round in 0..rounds as u64 {
        // Bare: the same definition, built before the clock starts.
        let id = InstanceId::from_u64(0xb000_0000 + round);
        let console: PathBuf = bare_dir.join(format!("{id}.log"));
        let xml = domain_xml(&DomainDef {
            id,
            node: &node,
            kvm: host.kind == HypervisorKind::Kvm,
            arch: host.arch,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            boot: BootDef::Kernel {
                kernel: &kernel,
                initrd: None,
                cmdline: "console=ttyS0 panic=-1",
            },
            disk: None,
            backing: None,
            seed: None,
            network: &spec.network,
            console_log: &console,
        });
        let t = Instant::now();
        let dom = conn.define_domain_xml(&xml).unwrap();
        dom.create().unwrap();
        bare.push(t.elapsed());
        dom.destroy().unwrap();
        dom.undefine().unwrap();

        // Agent: from the desired state's bytes to a running domain.
        let id = InstanceId::from_u64(0xa000_0000 + round);
        let bytes = DesiredState {
            fleet: FleetId(1),
            generation: round + 1,
            instances: [DesiredInstance {
                id,
                name: InstanceName::new("bench").unwrap(),
                power: PowerState::Running,
                reboot_count: 0,
                power_mode: PowerMode::default(),
                spec: spec.clone(),
            }]
            .into_iter()
            .collect(),
            ..Default::default()
        }
        .to_vec()
        .unwrap();
        let t = Instant::now();
        let d = DesiredState::decode(&bytes).unwrap();
        assert_eq!(rec.offer(&d), Offer::Newer);
        let held = rec.next_held(Box::new(d));
        store.save(&held).unwrap();
        let mut effects = rec.accept(held);
        effects.extend(rec.observe(Instant::now(), &hv.list().unwrap()));
        let mut created = false;
        for e in effects {
            if let Effect::Run(rid, op) = e {
                let r = execute(&hv, rid, &op);
                created |= rid == id && r.is_ok();
                rec.completed(Instant::now(), rid, &op, r);
            }
        }
        agent.push(t.elapsed());
        assert!(created, "the agent created the instance");
        hv.delete(id).unwrap();
    }
    let (b50, b99) = (pct(&mut bare, 0.5), pct(&mut bare, 0.99));
    let (a50, a99) = (pct(&mut agent, 0.5), pct(&mut agent, 0.99));
    println!("\nlibvirt {uri} ({}), {rounds} rounds\n", host.kind);
    println!("| path                             | p50 (ms) | p99 (ms) |");
    println!("|----------------------------------|----------|----------|");
    println!("| bare define + create             | {b50:>8.2} | {b99:>8.2} |");
    println!("| agent: desired state to running  | {a50:>8.2} | {a99:>8.2} |");
    println!(
        "| agent overhead                   | {:>8.2} |          |",
        a50 - b50
    );
}

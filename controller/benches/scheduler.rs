//! Scheduler core benchmark: one placement decision over 1,000 / 10,000 / 100,000 hosts,
//! scoring every host (no sampling), with a realistic mix of filters: architecture (10% arm),
//! KVM (80% of hosts), a zone selector (10 zones) on half the requests, an image requirement,
//! 5% of hosts down or cordoned, and an anti-affinity group with members on 20 hosts.
//!
//!     cargo bench -p outpost-controller --bench scheduler
//!
//! Criterion measures the mean decision time; a second pass prints p50/p99 over 20,000
//! decisions with claims applied, and placements per second on one core.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group};
use outpost_controller::scheduler::*;
use outpost_protocol::*;

fn fleet(n: usize) -> Vec<HostState> {
    let images = vec![
        ImageName::new("alpine.qcow2").unwrap(),
        ImageName::new("debian-12.qcow2").unwrap(),
        ImageName::new("vmlinuz").unwrap(),
    ];
    let zones: Vec<Label> = (0..10)
        .map(|z| Label::parse(&format!("zone=z{z}")).unwrap())
        .collect();
    (0..n)
        .map(|i| HostState {
            id: NodeId::new(&format!("node-{i:06}")).unwrap(),
            availability: match i % 20 {
                0 => Availability::Down,
                1 if i % 40 == 1 => Availability::Cordoned,
                _ => Availability::Up,
            },
            arch: if i % 10 == 3 {
                Arch::Aarch64
            } else {
                Arch::X86_64
            },
            hypervisor: if i % 5 == 4 {
                HypervisorKind::Emulated
            } else {
                HypervisorKind::Kvm
            },
            capacity: Resources {
                vcpus: 8 << (i % 3),
                memory_mib: 16384 << (i % 3),
                disk_gib: 200,
            },
            claimed: Resources {
                vcpus: (i % 7) as u16,
                memory_mib: (i % 11) as u32 * 512,
                disk_gib: (i % 13) as u32 * 4,
            },
            labels: vec![zones[i % 10].clone(), Label::parse("site=depot").unwrap()],
            images: images.clone(),
            cached: vec![],
            recent_failures: u32::from(i.is_multiple_of(97)),
            instances: 0,
        })
        .collect()
}

fn spec(k: usize) -> InstanceSpec {
    InstanceSpec {
        vcpus: 1 + (k % 4) as u16,
        memory_mib: 512 << (k % 3),
        disk_gib: 10,
        arch: Arch::X86_64,
        require_kvm: k.is_multiple_of(3),
        boot: Boot::Disk {
            image: ImageName::new("debian-12.qcow2").unwrap().into(),
        },
        network: Network::None,
        restart: RestartPolicy::OnFailure,
        labels: Labels::new(),
        seed: None,
    }
}

fn bench(c: &mut Criterion) {
    let sched = Scheduler::default();
    // zone z2: x86_64 KVM hosts, so the request below fits; zone z4 holds only emulated hosts,
    // so a KVM request there is refused (the slower path that explains every filter).
    let fits = [Label::parse("zone=z2").unwrap()];
    let refused = [Label::parse("zone=z4").unwrap()];
    for (name, zone) in [("place", &fits), ("refuse", &refused)] {
        let mut g = c.benchmark_group(name);
        g.sample_size(20)
            .measurement_time(Duration::from_secs(3))
            .warm_up_time(Duration::from_millis(500));
        for n in [1_000usize, 10_000, 100_000] {
            let mut hosts = HostTable::from_hosts(sched.ratios(), &fleet(n));
            let members: Vec<usize> = (0..20).map(|i| i * (n / 20)).collect();
            let s = spec(0);
            // As the controller does before each decision.
            hosts.track(s.resources());
            let req = Request {
                spec: &s,
                selector: zone,
                group: Some(GroupConstraint {
                    policy: GroupPolicy::AntiAffinity,
                    members_on: &members,
                }),
                exclude: &[],
            };
            assert_eq!(sched.place(&hosts, &req).is_ok(), name == "place");
            g.bench_with_input(BenchmarkId::from_parameter(n), &hosts, |b, hosts| {
                b.iter(|| black_box(sched.place(black_box(hosts), &req).ok()))
            });
        }
        g.finish();
    }
}

/// `ranked`: request shapes tracked and hosts walked best bound first (what the controller
/// does); otherwise every candidate is weighed (the table ranks for other weights, so the
/// scheduler cannot use its order): the same decisions, the path before the ranked one.
fn percentiles(ranked: bool) {
    let sched = Scheduler::default();
    let zones: Vec<Label> = (0..10)
        .map(|z| Label::parse(&format!("zone=z{z}")).unwrap())
        .collect();
    let how = if ranked {
        "ranked walk"
    } else {
        "weigh every candidate"
    };
    println!("\n{how}:\n");
    println!("| hosts   | decisions | placed | p50 (µs) | p99 (µs) | placements/s |");
    println!("|---------|-----------|--------|----------|----------|--------------|");
    for (n, rounds) in [
        (1_000usize, 20_000usize),
        (10_000, 20_000),
        (100_000, 2_000),
    ] {
        let mut hosts = HostTable::from_hosts(sched.ratios(), &fleet(n));
        if !ranked {
            hosts.weigh_by(Weights {
                cpu: 0.0,
                ..Weights::default()
            });
        }
        let members: Vec<usize> = (0..20).map(|i| i * (n / 20)).collect();
        let specs: Vec<InstanceSpec> = (0..rounds).map(spec).collect();
        let mut times = Vec::with_capacity(rounds);
        let mut placed = 0;
        let start = Instant::now();
        for (k, s) in specs.iter().enumerate() {
            let sel: &[Label] = if k.is_multiple_of(2) {
                std::slice::from_ref(&zones[k % 10])
            } else {
                &[]
            };
            let req = Request {
                spec: s,
                selector: sel,
                group: k.is_multiple_of(4).then_some(GroupConstraint {
                    policy: GroupPolicy::AntiAffinity,
                    members_on: &members,
                }),
                exclude: &[],
            };
            let t = Instant::now();
            hosts.track(s.resources());
            let r = sched.place(&hosts, &req);
            times.push(t.elapsed());
            if let Ok(p) = r {
                hosts.claim(p.host, s.resources());
                placed += 1;
            }
        }
        let total = start.elapsed();

        times.sort_unstable();
        let pct = |q: f64| {
            times[((times.len() as f64 * q) as usize).min(times.len() - 1)].as_secs_f64() * 1e6
        };
        println!(
            "| {n:>7} | {rounds:>9} | {placed:>6} | {:>8.1} | {:>8.1} | {:>12.0} |",
            pct(0.50),
            pct(0.99),
            rounds as f64 / total.as_secs_f64()
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // Only under `cargo bench`: test runners run (or list) this binary without `--bench`.
    if std::env::args().any(|a| a == "--bench") {
        percentiles(false);
        percentiles(true);
    }
}

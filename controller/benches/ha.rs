//! High availability, measured: what a new leader does at takeover (load the fleet from the
//! store and build its state) for 10,000 nodes and 50,000 instances, on PostgreSQL and SQLite
//! side by side; and the failover time of two real controller processes on a real PostgreSQL
//! (started here with initdb) and mosquitto, from the leader's end to the first create the new
//! leader accepts, for a kill -9, a frozen leader (SIGSTOP: its session stays open, so the
//! standby waits for the lease to run out) and a clean stop.
//!
//!     cargo bench -p outpost-controller --bench ha
//!     cargo bench -p outpost-controller --bench ha -- --nodes 10000 --instances 50000 --runs 3
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use outpost_controller::fleet::*;
use outpost_controller::scheduler::Scheduler;
use outpost_controller::store::{Candidate, PgConfig, PgStore, SqliteStore, Store};
use outpost_protocol::*;
use outpost_tests::{Agent, Controller, Mosquitto, PG_PASSWORD, Postgres, wait_for};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn spec() -> InstanceSpec {
    InstanceSpec {
        vcpus: 1,
        memory_mib: 64,
        disk_gib: 0,
        arch: Arch::X86_64,
        require_kvm: false,
        boot: Boot::Kernel {
            kernel: ImageName::new("vmlinuz").unwrap().into(),
            initrd: None,
            cmdline: Cmdline::new("console=ttyS0").unwrap(),
        },
        network: Network::None,
        restart: RestartPolicy::Always,
        labels: Labels::new(),
        seed: None,
    }
}

/// A fleet of `nodes` nodes and `instances` instances, as changes to store.
fn big_fleet(nodes: usize, instances: usize) -> Changes {
    let mut f = Fleet::new(
        Scheduler::default(),
        FleetConfig::default(),
        Snapshot {
            fleet: FleetId(7),
            ..Snapshot::default()
        },
        0,
    );
    for n in 0..nodes {
        let id = NodeId::new(&format!("edge-{n:05}")).unwrap();
        f.on_status(
            1,
            &id,
            NodeStatus {
                presence: Presence::Online,
                session: 1,
                boot: Default::default(),
            },
        );
        f.on_inventory(
            1,
            &id,
            Inventory {
                arch: Arch::X86_64,
                hypervisor: HypervisorKind::Kvm,
                total: Resources {
                    vcpus: 64,
                    memory_mib: 262_144,
                    disk_gib: 2000,
                },
                reserved: Resources::default(),
                labels: [Label::parse("zone=north").unwrap()].into_iter().collect(),
                images: [ImageName::new("vmlinuz").unwrap()].into_iter().collect(),
                agent_version: Default::default(),
                cached: Default::default(),
            },
        );
    }
    for i in 0..instances {
        f.create(
            2,
            CreateRequest {
                any_arch: false,
                id: InstanceId::from_u64(i as u64 + 1),
                name: format!("i{i}"),
                spec: spec(),
                selector: Vec::new(),
                group: None,
            },
        )
        .unwrap();
    }
    f.take_changes()
}

/// `n` batches as one loop turn of 8 creates makes them.
fn commit_batches(n: usize) -> Vec<Changes> {
    let mut f = Fleet::new(
        Scheduler::default(),
        FleetConfig::default(),
        Snapshot {
            fleet: FleetId(7),
            ..Snapshot::default()
        },
        0,
    );
    let seed = big_fleet(64, 0);
    for node in &seed.nodes {
        f.on_status(
            1,
            &node.id,
            NodeStatus {
                presence: Presence::Online,
                session: 1,
                boot: Default::default(),
            },
        );
        f.on_inventory(1, &node.id, node.inventory.clone().unwrap());
    }
    f.take_changes();
    (0..n)
        .map(|b| {
            for k in 0..8 {
                f.create(
                    2,
                    CreateRequest {
                        any_arch: false,
                        id: InstanceId::from_u64((b * 8 + k) as u64 + 1_000_000),
                        name: format!("b{b}-{k}"),
                        spec: spec(),
                        selector: Vec::new(),
                        group: None,
                    },
                )
                .unwrap();
            }
            f.take_changes()
        })
        .collect()
}

/// Load and build times (ms) of `runs` takeovers of the store `open` opens.
fn takeovers(open: &dyn Fn() -> Box<dyn Store>, runs: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut load, mut build) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut s = open();
        let t = Instant::now();
        let snap = s.load().unwrap();
        load.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let f = Fleet::new(Scheduler::default(), FleetConfig::default(), snap, 3);
        build.push(t.elapsed().as_secs_f64() * 1e3);
        drop(f);
    }
    (load, build)
}

/// This process's resident memory, in bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// The controller's memory for a fleet: what loading it from a SQLite store and building the
/// fleet (records, indexes, the scheduler's table, history) adds to a fresh process (this
/// bench run again with `--measure-memory DIR`, so that nothing freed earlier is reused), in
/// bytes, and the time it took.
fn fleet_memory(dir: &std::path::Path, nodes: usize, instances: usize) -> (u64, f64) {
    let path = dir.join(format!("mem-{nodes}-{instances}"));
    let mut s = SqliteStore::open(&path, FleetId(7)).unwrap();
    s.apply(&big_fleet(nodes, instances)).unwrap();
    drop(s);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--bench", "--measure-memory"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let bytes = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let secs = it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (bytes, secs)
}

/// In the fresh process: load and build the fleet in `path`; print the bytes added and the
/// seconds taken.
fn measure_memory(path: &std::path::Path) {
    let mut s = SqliteStore::open(path, FleetId(7)).unwrap();
    let before = rss();
    let t = Instant::now();
    let snap = s.load().unwrap();
    let f = Fleet::new(Scheduler::default(), FleetConfig::default(), snap, 3);
    let took = t.elapsed().as_secs_f64();
    let after = rss();
    println!("{} {took}", after.saturating_sub(before));
    drop(f);
}

fn range(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(0.0, f64::max);
    format!("{min:.0}–{max:.0}")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") || !args.iter().any(|a| a == "--bench") {
        return; // test runners: nothing to run; `cargo bench` passes --bench.
    }
    if let Some(i) = args.iter().position(|a| a == "--measure-memory") {
        measure_memory(std::path::Path::new(&args[i + 1]));
        return;
    }
    let nodes = arg("--nodes", 10_000);
    let instances = arg("--instances", 50_000);
    let runs = arg("--runs", 3);
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path());
    let cfg = PgConfig {
        url: pg.url(),
        password: Some(PG_PASSWORD.into()),
        ca_pem: None,
    };
    let me = Candidate {
        name: "bench".into(),
        api: "http://bench".into(),
        broker: true,
    };

    let t = Instant::now();
    let changes = big_fleet(nodes, instances);
    eprintln!(
        "fleet of {nodes} nodes and {instances} instances made in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut sqlite = SqliteStore::open(&dir.path().join("sqlite"), FleetId(7)).unwrap();
    let t = Instant::now();
    sqlite.apply(&changes).unwrap();
    let sqlite_write = t.elapsed();
    drop(sqlite);
    let mut postgres = PgStore::open(cfg.clone(), "bench", FleetId(7)).unwrap();
    postgres.lead(&me).unwrap();
    let t = Instant::now();
    postgres.apply(&changes).unwrap();
    let pg_write = t.elapsed();
    drop(postgres);

    let sdir = dir.path().join("sqlite");
    let (sl, sb) = takeovers(
        &|| Box::new(SqliteStore::open(&sdir, FleetId(7)).unwrap()),
        runs,
    );
    let (pl, pb) = takeovers(
        &|| Box::new(PgStore::open(cfg.clone(), "bench", FleetId(7)).unwrap()),
        runs,
    );
    println!(
        "\n| takeover of {nodes} nodes, {instances} instances ({runs} runs) | load from the store (ms) | build the fleet (ms) | first write of it all (s) |"
    );
    println!("|---|---|---|---|");
    println!(
        "| PostgreSQL | {} | {} | {:.1} |",
        range(&pl),
        range(&pb),
        pg_write.as_secs_f64()
    );
    println!(
        "| SQLite | {} | {} | {:.1} |",
        range(&sl),
        range(&sb),
        sqlite_write.as_secs_f64()
    );

    // Memory per node and per instance (5,000 nodes; then with 50,000 instances).
    let mem_nodes = arg("--mem-nodes", 5_000);
    let mem_instances = arg("--mem-instances", 50_000);
    let (n_only, t_nodes) = fleet_memory(dir.path(), mem_nodes, 0);
    let (full, t_full) = fleet_memory(dir.path(), mem_nodes, mem_instances);
    println!(
        "\n| controller memory (RSS added by loading and building the fleet) | MB | start-up load + build (s) | per node | per instance |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {mem_nodes} nodes | {:.1} | {t_nodes:.2} | {:.1} KB | |",
        n_only as f64 / 1e6,
        n_only as f64 / mem_nodes as f64 / 1e3
    );
    println!(
        "| {mem_nodes} nodes, {mem_instances} instances | {:.1} | {t_full:.2} | | {:.2} KB |",
        full as f64 / 1e6,
        full.saturating_sub(n_only) as f64 / mem_instances as f64 / 1e3
    );

    // One loop turn's commit: 8 creates on 8 nodes (their node rows, instance rows, events).
    let batches = commit_batches(200);
    let mut rows = Vec::new();
    for (what, mut store) in [
        (
            "PostgreSQL",
            Box::new(PgStore::open(cfg.clone(), "bench", FleetId(7)).unwrap()) as Box<dyn Store>,
        ),
        (
            "SQLite",
            Box::new(SqliteStore::open(&dir.path().join("commits"), FleetId(7)).unwrap()),
        ),
    ] {
        store.lead(&me).unwrap();
        let mut t: Vec<f64> = batches
            .iter()
            .map(|b| {
                let t0 = Instant::now();
                store.apply(b).unwrap();
                t0.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        t.sort_by(f64::total_cmp);
        rows.push(format!(
            "| {what} | {:.2} | {:.2} |",
            t[t.len() / 2],
            t[t.len() * 99 / 100]
        ));
    }
    println!("\n| one batch's commit: 8 creates on 8 nodes (200 batches) | p50 (ms) | p99 (ms) |");
    println!("|---|---|---|");
    for r in rows {
        println!("{r}");
    }

    // Failover with real processes.
    let mosquitto = Mosquitto::start(dir.path());
    let pw = dir.path().join("pw");
    std::fs::write(&pw, PG_PASSWORD).unwrap();
    // A fresh database for the processes: the bench's fleet above is not theirs.
    pg.sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public;");
    let mut agent = Agent::fake(dir.path(), "edge-ha", mosquitto.port, 65536, "north");
    agent.start();
    let mut ctls = [
        Controller::ha(dir.path(), "a", mosquitto.port, &pg.url(), &pw),
        Controller::ha(dir.path(), "b", mosquitto.port, &pg.url(), &pw),
    ];
    ctls[0].start();
    ctls[1].start_standby();
    ctls[0].wait_nodes_up(1);
    let leader = |ctls: &[Controller]| {
        wait_for(Duration::from_secs(60), "a leader", || {
            ctls.iter().position(|c| {
                let (code, body) = c.http("GET", "/v1/status", "");
                code == 200 && body.contains("\"role\":\"leader\"")
            })
        })
    };
    let mut k = 0;
    let mut rows = Vec::new();
    for (how, what) in [
        (
            "kill -9",
            "the killed leader's session ends: the standby takes over at once",
        ),
        (
            "SIGSTOP (frozen)",
            "its session stays open: the lease (10 s) runs out first",
        ),
        ("clean stop (SIGTERM)", "the lease is handed over"),
    ] {
        let mut times = Vec::new();
        for _ in 0..runs {
            let l = leader(&ctls);
            let other = 1 - l;
            let pid = ctls[l].proc().pid().to_string();
            let t0 = Instant::now();
            match how {
                "kill -9" => ctls[l].proc().kill(),
                "SIGSTOP (frozen)" => {
                    std::process::Command::new("kill")
                        .args(["-STOP", &pid])
                        .status()
                        .unwrap();
                }
                _ => {
                    ctls[l].proc().terminate();
                }
            }
            // Straight to the standby's API (a client following the old leader's address
            // would add its own timeout against a frozen process).
            let took = wait_for(
                Duration::from_secs(60),
                "a create on the new leader",
                || {
                    k += 1;
                    let body =
                        format!(r#"{{"name": "f{k}", "kernel": "vmlinuz", "memory_mib": 16}}"#);
                    let (code, _) = ctls[other].http("POST", "/v1/instances", &body);
                    (code == 201).then(|| t0.elapsed())
                },
            );
            times.push(took.as_secs_f64() * 1e3);
            if how == "SIGSTOP (frozen)" {
                // Thawed: it finds its lease taken and stands by (its writes are fenced).
                std::process::Command::new("kill")
                    .args(["-CONT", &pid])
                    .status()
                    .unwrap();
                wait_for(
                    Duration::from_secs(60),
                    "the old leader standing by",
                    || {
                        let (code, body) = ctls[l].http("GET", "/v1/status", "");
                        (code == 200 && body.contains("\"role\":\"standby\"")).then_some(())
                    },
                );
            } else {
                ctls[l].start_standby();
            }
        }
        rows.push((how, what, times));
    }
    println!(
        "\n| failover ({runs} runs): the leader's end to the first create the new leader accepts | ms | why |"
    );
    println!("|---|---|---|");
    for (how, what, times) in rows {
        println!("| {how} | {} | {what} |", range(&times));
    }
}

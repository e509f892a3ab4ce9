//! A randomized fault run: the real controller (embedded broker and store) and four agents
//! as separate processes (three with the fake hypervisor, one driving the real libvirtd and
//! booting real guests), with creates and deletes mixed with kill -9 of the controller, kill -9
//! of an agent, an agent cut off for a while, the controller's store lost (a new empty data
//! directory, its nodes adopted by the operator), the store rolled back to an older copy, and
//! an agent's state file corrupted, and a hostile device (floods, forged failures, holdings
//! and console answers, a capacity lie, a copy of its identity on a second box; always in the
//! second round). After every round the fleet must converge, and the
//! invariants must hold:
//! - no instance the store ever acknowledged is deleted without an operator's delete;
//! - every requested instance exists exactly once, running, on exactly one node, and that
//!   node's own report lists it while no other node's does;
//! - no node is over-committed; anti-affinity groups are never violated;
//! - a hostile device creates and moves nothing, the controller lives, honest nodes stay up;
//! - the controller's view matches what each agent reports, and for the libvirt agent what
//!   libvirt holds: exactly one running domain per wanted instance, none for deleted ones.
//!
//! The seed is printed and included in every failure; replay with OUTPOST_FAULT_SEED=N.
//! A longer soak: OUTPOST_FAULT_ROUNDS=200 (default 10) and OUTPOST_FAULT_AGENTS=8 fake agents
//! (default 3).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use outpost_protocol::topics::Channel;
use outpost_protocol::*;
use outpost_tests::*;

const CONVERGE: Duration = Duration::from_secs(90);
/// The fake agents' config.
const FAKE: &str =
    "[labels]\nzone = \"fake\"\n[hypervisor]\nbackend = \"fake\"\nfake_memory_mib = 4096\n";

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct World {
    seed: u64,
    ctl: Controller,
    agents: Vec<Agent>,
    observer: TestController,
    /// name -> anti-affinity group member?
    wanted: BTreeMap<String, bool>,
    /// Instances on the real libvirtd: wanted ones, and deleted ones (by id).
    real: BTreeMap<String, String>,
    real_deleted: BTreeSet<String>,
}

/// libvirt's Outpost domains and whether each runs.
fn domains() -> BTreeMap<String, bool> {
    let out = |args: &[&str]| {
        let o = Command::new("virsh")
            .args(["-c", "qemu:///system"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let running: BTreeSet<String> = out(&["list", "--name"])
        .lines()
        .map(str::to_owned)
        .collect();
    out(&["list", "--all", "--name"])
        .lines()
        .filter_map(|l| l.strip_prefix("outpost-"))
        .map(|id| (id.to_owned(), running.contains(&format!("outpost-{id}"))))
        .collect()
}

impl World {
    /// Creates a fake-zone instance (a third of them in an anti-affinity group).
    fn create_fake(&mut self, rng: &mut Rng, next: &mut usize) -> String {
        *next += 1;
        let name = format!("r{next}");
        let anti = rng.below(3) == 0;
        let mem = (64 + rng.below(8) * 64).to_string();
        let mut args = vec![
            "instances",
            "create",
            &name,
            "--kernel",
            "vmlinuz",
            "--memory",
            &mem,
            "--selector",
            "zone=fake",
        ];
        if anti {
            args.extend(["--group", "spread"]);
        }
        match self.ctl.cli(&args) {
            Ok(_) => {
                self.wanted.insert(name.clone(), anti);
            }
            // Refusals must be the scheduler's clear answer, never a failure.
            Err(e) => assert!(
                e.contains("no host fits"),
                "seed {}: create {name}: {e}",
                self.seed
            ),
        }
        format!("create {name} (anti-affinity: {anti})")
    }

    /// Deletes a wanted instance at random; true if there was one.
    fn delete_one(&mut self, rng: &mut Rng) -> Option<String> {
        let name = self
            .wanted
            .keys()
            .nth(rng.below(self.wanted.len().max(1) as u64) as usize)
            .cloned()?;
        self.ctl.cli(&["instances", "delete", &name]).unwrap();
        self.wanted.remove(&name);
        if let Some(id) = self.real.remove(&name) {
            self.real_deleted.insert(id);
        }
        Some(format!("delete {name}"))
    }

    /// Three small creates in a row (the faults that follow hit them in flight).
    fn burst(&mut self, next: &mut usize) {
        for _ in 0..3 {
            *next += 1;
            let name = format!("r{next}");
            if self
                .ctl
                .cli(&[
                    "instances",
                    "create",
                    &name,
                    "--kernel",
                    "vmlinuz",
                    "--memory",
                    "64",
                    "--selector",
                    "zone=fake",
                ])
                .is_ok()
            {
                self.wanted.insert(name, false);
            }
        }
    }

    /// kill -9 of an agent at random, restarted at once.
    fn kill_agent(&mut self, rng: &mut Rng) -> String {
        let i = rng.below(self.agents.len() as u64) as usize;
        self.agents[i].proc().kill();
        self.agents[i].start();
        format!("kill -9 of agent {}", self.agents[i].node)
    }

    /// An agent frozen (SIGSTOP) for up to 6.5 s.
    fn freeze_agent(&mut self, rng: &mut Rng) -> String {
        let i = rng.below(self.agents.len() as u64) as usize;
        self.agents[i].proc().signal("STOP");
        std::thread::sleep(Duration::from_millis(500 + rng.below(6000)));
        self.agents[i].proc().signal("CONT");
        format!("agent {} cut off for a while", self.agents[i].node)
    }

    /// A hostile device: one fake node's identity in an attacker's hands floods its topics,
    /// forges failures and a holding naming other nodes' instances, lies about its capacity,
    /// answers consoles it was never asked for, and runs a copy of the node's agent on a
    /// second "box" until the node is in conflict; the operator then switches the copy off
    /// and keeps the original. No instance may be created or moved, the controller must live,
    /// and every honest node stays up.
    fn hostile_device(&mut self, rng: &mut Rng, dir: &std::path::Path, round: usize) -> String {
        let fakes = self.agents.len() - 1; // the last agent drives the real libvirtd
        let i = rng.below(fakes as u64) as usize;
        let node = self.agents[i].node.clone();
        let before = self.placements();
        let evil = &self.observer;
        for _ in 0..3000 {
            evil.publish_raw(
                &node,
                Channel::Report,
                vec![WIRE_VERSION, 0xff, 0xff],
                false,
            );
        }
        let elsewhere: Vec<(InstanceId, String)> = before
            .iter()
            .filter(|(_, (n, _))| *n != node.as_str())
            .map(|(name, (_, id))| (id.parse().unwrap(), name.clone()))
            .collect();
        for (id, _) in &elsewhere {
            let ev = AgentEvent::Instance {
                id: *id,
                generation: u64::MAX >> 24,
                state: InstanceState::Error(ErrorKind::Hypervisor),
                reason: Reason::lossy("forged build failure"),
            };
            evil.publish_raw(&node, Channel::Event, ev.to_vec().unwrap(), false);
            let chunk = ConsoleChunk {
                request: rng.next() as u32,
                id: *id,
                start: 0,
                next: 5,
                data: b"\x1b]0;pwned\x07".iter().copied().collect(),
                error: None,
            };
            evil.publish_raw(&node, Channel::Console, chunk.to_vec().unwrap(), false);
        }
        let forged = Holding {
            held: Some(Version {
                fleet: FleetId(rng.next()),
                generation: u64::MAX >> 24,
            }),
            instances: elsewhere
                .iter()
                .take(limits::MAX_INSTANCES_PER_NODE)
                .map(|(id, name)| {
                    let mut di = instance(id.as_u64(), kernel_boot("init=/evil"), 64);
                    di.name = InstanceName::new(name).unwrap();
                    di
                })
                .collect(),
        };
        evil.publish_raw(&node, Channel::Holding, forged.to_vec().unwrap(), false);
        if let Some(mut inv) = evil.seen().inventory_of(&node) {
            inv.total.vcpus = u16::MAX;
            inv.total.memory_mib = u32::MAX;
            evil.publish_raw(&node, Channel::Inventory, inv.to_vec().unwrap(), false);
        }
        // The copy: the node's identity, another state directory.
        let copies = dir.join(format!("copy-{round}"));
        std::fs::create_dir_all(&copies).unwrap();
        let mut copy = Agent::configure(&copies, node.as_str(), self.ctl.mqtt_port, FAKE);
        std::fs::write(copy.state_dir.join("images/vmlinuz"), b"x").unwrap();
        copy.start();
        let conflict = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            self.ctl
                .cli(&["nodes", "show", node.as_str()])
                .is_ok_and(|n| n["state"] == "conflict")
        });
        copy.proc().kill();
        for op in ["create", "start", "delete"] {
            assert_eq!(
                copy.ops(op, None),
                0,
                "seed {}: the copy ran {op}",
                self.seed
            );
        }
        assert!(
            self.ctl.proc().is_running(),
            "seed {}: the controller died",
            self.seed
        );
        if conflict {
            let keep = std::fs::read_to_string(self.agents[i].state_dir.join("boot-id")).unwrap();
            self.ctl
                .cli(&["nodes", "resolve", node.as_str(), "--keep", keep.trim()])
                .unwrap();
        }
        let n = self.agents.len();
        wait_for(CONVERGE, "every node up after the hostile device", || {
            let v = self.ctl.cli(&["nodes", "list"]).ok()?;
            let up = v.as_array()?.iter().filter(|x| x["state"] == "up").count();
            (up == n).then_some(())
        });
        self.converged();
        assert_eq!(
            self.placements(),
            before,
            "seed {}: a device moved or made instances",
            self.seed
        );
        format!(
            "hostile device {node} (flood, forgeries, capacity lie, a copy{})",
            if conflict {
                " in conflict, resolved"
            } else {
                " kept out by the broker"
            }
        )
    }

    /// Each instance's node and id, by name.
    fn placements(&self) -> BTreeMap<String, (String, String)> {
        let list = self.ctl.cli(&["instances", "list"]).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["name"].as_str().unwrap().to_owned(),
                    (
                        i["node"].as_str().unwrap_or_default().to_owned(),
                        i["id"].as_str().unwrap().to_owned(),
                    ),
                )
            })
            .collect()
    }

    /// A store that lost its rows adopts instances from their nodes without their server
    /// group: from then on they count as ungrouped.
    fn forget_groups(&mut self) {
        for anti in self.wanted.values_mut() {
            *anti = false;
        }
    }

    fn check(&self, what: &str) {
        let seed = self.seed;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.converged()));
        if let Err(e) = result {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!("seed {seed}: after {what}: {msg}");
        }
    }

    fn converged(&self) {
        let end = std::time::Instant::now() + CONVERGE;
        loop {
            let Err(why) = self.invariants() else { return };
            assert!(
                std::time::Instant::now() < end,
                "not converged after {CONVERGE:?}: {why}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ok when the fleet has converged; otherwise what is not there yet.
    fn invariants(&self) -> Result<(), String> {
        let list = self.ctl.cli(&["instances", "list"])?;
        let list = list.as_array().ok_or("no list")?;
        let names: BTreeSet<String> = list
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_owned())
            .collect();
        let want: BTreeSet<String> = self.wanted.keys().cloned().collect();
        if names != want {
            return Err(format!("instances {names:?}, wanted {want:?}"));
        }
        let seen = self.observer.seen();
        let mut anti_nodes = BTreeSet::new();
        for i in list {
            let name = i["name"].as_str().unwrap();
            if i["phase"] != "running" {
                return Err(format!("{name} is {} ({})", i["phase"], i["reason"]));
            }
            let node =
                NodeId::new(i["node"].as_str().ok_or("no node")?).map_err(|e| e.to_string())?;
            let id: InstanceId = i["id"].as_str().unwrap().parse().map_err(|_| "bad id")?;
            // Its node reports it running; no other node reports it.
            for (n, r) in &seen.report {
                let listed = r.instances.iter().find(|x| x.id == id);
                if *n == node && listed.map(|x| x.state) != Some(InstanceState::Running) {
                    return Err(format!(
                        "{name}: its node {n} reports {:?}",
                        listed.map(|x| x.state)
                    ));
                }
                if *n != node && listed.is_some() {
                    return Err(format!("{name} on {node} is also reported by {n}"));
                }
            }
            if self.wanted[name] && !anti_nodes.insert(node.clone()) {
                panic!("anti-affinity violated on {node}");
            }
        }
        // libvirt holds exactly the real instances that are wanted, each running once.
        let doms = domains();
        for (name, id) in &self.real {
            if doms.get(id) != Some(&true) {
                return Err(format!("{name}: libvirt domain {id} is {:?}", doms.get(id)));
            }
        }
        if let Some(id) = self.real_deleted.iter().find(|id| doms.contains_key(*id)) {
            return Err(format!("deleted {id} still has a libvirt domain"));
        }
        // Nothing else runs anywhere, and no node is over-committed.
        let ids: BTreeSet<String> = list
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect();
        for (n, r) in &seen.report {
            if let Some(x) = r
                .instances
                .iter()
                .find(|x| !ids.contains(&x.id.to_string()))
            {
                return Err(format!("{n} still reports {} ({:?})", x.id, x.state));
            }
        }
        let nodes = self.ctl.cli(&["nodes", "list"])?;
        for n in nodes.as_array().ok_or("no nodes")? {
            // vCPUs are over-subscribed by the allocation ratio; memory and disk not.
            for k in ["memory_mib", "disk_gib"] {
                let (c, a) = (
                    n["claimed"][k].as_u64().unwrap(),
                    n["allocatable"][k].as_u64().unwrap(),
                );
                assert!(c <= a, "node {} over-committed: {n}", n["id"]);
            }
        }
        Ok(())
    }
}

#[test]
fn randomized_faults_converge_without_loss_or_duplicates() {
    fault_run(false);
}

/// The same with mosquitto as the broker, which is also restarted during bursts (it keeps no
/// state across restarts: retained messages are gone and everyone must re-announce).
#[test]
fn randomized_faults_on_mosquitto_converge_without_loss_or_duplicates() {
    fault_run(true);
}

/// The seed (OUTPOST_FAULT_SEED, or the clock) and the number of rounds
/// (OUTPOST_FAULT_ROUNDS, default 10).
fn seed_and_rounds() -> (u64, usize) {
    let seed: u64 = std::env::var("OUTPOST_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let rounds: usize = std::env::var("OUTPOST_FAULT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    eprintln!("fault run: seed {seed}, {rounds} rounds (replay with OUTPOST_FAULT_SEED={seed})");
    (seed, rounds)
}

/// `n` fake agents named `f{tag}-{i}` on the broker at `port` (not started).
fn fake_agents(dir: &std::path::Path, tag: &str, n: usize, port: u16) -> Vec<Agent> {
    (0..n)
        .map(|i| {
            let a = Agent::configure(dir, &format!("f{tag}-{i}"), port, FAKE);
            std::fs::write(a.state_dir.join("images/vmlinuz"), b"x").unwrap();
            a
        })
        .collect()
}

/// The same mix with two controllers on PostgreSQL and mosquitto (each reaching both through
/// links the test can cut or freeze, each on a wall clock the test can step): the faults are
/// kill -9 of the leader in a burst, a clean stop of the leader, the leader's link to
/// PostgreSQL cut or frozen for a while, its link to the broker cut for a while, the leader
/// frozen (SIGSTOP), its wall clock stepped an hour either way, an agent's clock stepped (a
/// day behind, 1970, a day ahead), PostgreSQL restarted in a burst, and the agents' faults.
/// The CLI is given both controllers. Besides the fleet's invariants: at most one controller
/// says it leads after every round.
#[test]
fn randomized_faults_with_two_controllers_converge_without_loss_or_duplicates() {
    let (seed, rounds) = seed_and_rounds();
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    // OUTPOST_FAULT_KEEP=1 keeps the run's directory (logs, stores) for a post-mortem.
    if std::env::var_os("OUTPOST_FAULT_KEEP").is_some() {
        let kept = tempfile::Builder::new()
            .disable_cleanup(true)
            .tempdir()
            .unwrap();
        eprintln!("fault run: keeping {}", kept.path().display());
        return randomized_two_controllers(seed, rounds, &mut rng, kept);
    }
    randomized_two_controllers(seed, rounds, &mut rng, dir);
}

fn randomized_two_controllers(seed: u64, rounds: usize, rng: &mut Rng, dir: tempfile::TempDir) {
    let mut pg = Postgres::start(dir.path());
    let broker = Mosquitto::start(dir.path());
    let pw = dir.path().join("store-password");
    std::fs::write(&pw, PG_PASSWORD).unwrap();
    let links = [Link::new(pg.port), Link::new(pg.port)];
    let broker_links = [Link::new(broker.port), Link::new(broker.port)];
    let clocks = [
        FakeClock::new(dir.path(), "ctl-a", "+0"),
        FakeClock::new(dir.path(), "ctl-b", "+0"),
    ];
    let mut ctls: Vec<Controller> = ["a", "b"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut c = Controller::ha(
                dir.path(),
                name,
                broker_links[i].port,
                &pg.url_via(links[i].port),
                &pw,
            );
            c.args
                .extend(["--lost-after".to_owned(), "3600".to_owned()]);
            c.env = clocks[i].env();
            c
        })
        .collect();
    ctls[0].start();
    ctls[1].start_standby();
    let leader = |ctls: &[Controller]| {
        wait_for(CONVERGE, "a leader", || {
            ctls.iter().position(|c| {
                let (code, body) = c.http("GET", "/v1/status", "");
                code == 200 && body.contains("\"role\":\"leader\"")
            })
        })
    };
    let fakes = 3;
    let mut w = World {
        seed,
        ctl: Controller::any_of(&[&ctls[0], &ctls[1]]),
        agents: fake_agents(dir.path(), "h", fakes, broker.port),
        observer: TestController::connect(broker.port),
        wanted: BTreeMap::new(),
        real: BTreeMap::new(),
        real_deleted: BTreeSet::new(),
    };
    let agent_clocks: Vec<FakeClock> = (0..fakes)
        .map(|i| FakeClock::new(dir.path(), &format!("agent-{i}"), "+0"))
        .collect();
    for (a, c) in w.agents.iter_mut().zip(&agent_clocks) {
        a.env = c.env();
        a.start();
    }
    w.ctl.wait_nodes_up(fakes);
    let leaders = |ctls: &[Controller]| {
        ctls.iter()
            .filter(|c| {
                let (code, body) = c.http("GET", "/v1/status", "");
                code == 200 && body.contains("\"role\":\"leader\"")
            })
            .count()
    };
    let mut next = 0;
    for round in 0..rounds {
        let what = match rng.below(18) {
            12 => {
                let l = leader(&ctls);
                let step = if rng.below(2) == 0 { "+3600" } else { "-3600" };
                clocks[l].set(step);
                std::thread::sleep(Duration::from_millis(2000 + rng.below(6000)));
                if rng.below(2) == 0 {
                    clocks[l].set("+0");
                }
                format!("the leader's wall clock stepped {step} s")
            }
            13 => {
                let i = rng.below(fakes as u64) as usize;
                let to = ["-1d", "@1970-01-01 00:00:01", "+1d", "+0"][rng.below(4) as usize];
                agent_clocks[i].set(to);
                if rng.below(2) == 0 {
                    w.agents[i].proc().kill();
                    w.agents[i].start();
                }
                format!("agent {}'s wall clock set to {to}", w.agents[i].node)
            }
            14 => {
                let l = leader(&ctls);
                broker_links[l].cut();
                std::thread::sleep(Duration::from_millis(2000 + rng.below(8000)));
                broker_links[l].restore();
                "the leader's link to the broker cut for a while".into()
            }
            15 => {
                let l = leader(&ctls);
                links[l].freeze();
                std::thread::sleep(Duration::from_millis(2000 + rng.below(6000)));
                links[l].thaw();
                "the leader's link to PostgreSQL frozen for a while".into()
            }
            16 => {
                let l = leader(&ctls);
                ctls[l].proc().signal("STOP");
                std::thread::sleep(Duration::from_millis(1000 + rng.below(7000)));
                ctls[l].proc().signal("CONT");
                "the leader frozen (SIGSTOP) for a while".into()
            }
            0..=3 => w.create_fake(rng, &mut next),
            4 => w
                .delete_one(rng)
                .unwrap_or_else(|| "nothing to delete".into()),
            5 | 6 => {
                w.burst(&mut next);
                let l = leader(&ctls);
                ctls[l].proc().kill();
                ctls[l].start_standby();
                "burst + kill -9 of the leader".into()
            }
            7 => {
                let l = leader(&ctls);
                ctls[l].proc().terminate();
                ctls[l].start_standby();
                "clean stop of the leader".into()
            }
            8 => {
                let l = leader(&ctls);
                links[l].cut();
                std::thread::sleep(Duration::from_millis(2000 + rng.below(8000)));
                links[l].restore();
                "the leader's link to PostgreSQL cut for a while".into()
            }
            9 => {
                w.burst(&mut next);
                pg.restart();
                "burst + restart of PostgreSQL".into()
            }
            10 => w.kill_agent(rng),
            _ => w.freeze_agent(rng),
        };
        eprintln!("round {round}: {what}");
        w.check(&what);
        let n = leaders(&ctls);
        assert!(
            n <= 1,
            "seed {seed}: after {what}: {n} controllers say they lead"
        );
    }
    eprintln!("fault run with two controllers: seed {seed}: converged after every round");
}

fn fault_run(on_mosquitto: bool) {
    let (seed, rounds) = seed_and_rounds();
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut broker = on_mosquitto.then(|| Mosquitto::start(dir.path()));
    let mut ctl = match &broker {
        Some(b) => Controller::external(dir.path(), b.port),
        None => Controller::embedded(dir.path()),
    };
    ctl.args
        .extend(["--lost-after".to_owned(), "3600".to_owned()]);
    ctl.start();
    assert!(
        ensure_libvirtd(),
        "libvirtd could not be started (see shared/PLATFORM.md)"
    );
    // Node ids unique to this run: the two variants run side by side on the same libvirtd.
    let tag = if on_mosquitto { "m" } else { "e" };
    let fakes: usize = std::env::var("OUTPOST_FAULT_AGENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut agents = fake_agents(dir.path(), tag, fakes, ctl.mqtt_port);
    let real = Agent::configure(
        dir.path(),
        &format!("f{tag}-real"),
        ctl.mqtt_port,
        "[labels]\nzone = \"real\"\n[hypervisor]\nbackend = \"libvirt\"\nuri = \"qemu:///system\"\nstop_timeout_secs = 1\n",
    );
    install_test_guest(&real.state_dir.join("images"));
    agents.push(real);
    let observer = TestController::connect(ctl.mqtt_port);
    let mut w = World {
        seed,
        ctl,
        agents,
        observer,
        wanted: BTreeMap::new(),
        real: BTreeMap::new(),
        real_deleted: BTreeSet::new(),
    };
    for a in &mut w.agents {
        a.start();
    }
    w.ctl.wait_nodes_up(fakes + 1);
    let mut next = 0;
    // A copy of the store, and whether anything was deleted since it was taken (a rollback
    // past a delete would bring the instance back: that is an older backup's nature, not
    // tested here).
    let snapshot = dir.path().join("store-snapshot");
    let mut snapshot_clean = false;
    let mut stores = 0;
    for round in 0..rounds {
        // The second round always has the hostile device, so that every run meets it.
        let pick = if round == 1 { 15 } else { rng.below(16) };
        let what = match pick {
            15 => w.hostile_device(&mut rng, dir.path(), round),
            12 => {
                // Store rollback to the snapshot, or take one.
                w.ctl.proc().kill();
                let data = w.ctl.data_dir.clone();
                let what = if snapshot_clean {
                    std::fs::remove_dir_all(&data).unwrap();
                    copy_dir(&snapshot, &data);
                    // Instances created since are adopted from their nodes, without their group.
                    w.forget_groups();
                    "store rolled back to an older copy"
                } else {
                    let _ = std::fs::remove_dir_all(&snapshot);
                    copy_dir(&data, &snapshot);
                    snapshot_clean = true;
                    "store copied (kill -9 of the controller)"
                };
                w.ctl.start();
                what.into()
            }
            13 => {
                // Store lost: the controller comes back on an empty data directory, and the
                // operator adopts every node.
                w.ctl.proc().kill();
                stores += 1;
                w.ctl.data_dir = dir.path().join(format!("lost-store-{stores}"));
                snapshot_clean = false;
                w.ctl.start();
                let n = w.agents.len();
                wait_for(CONVERGE, "every node bound to the old fleet", || {
                    let v = w.ctl.cli(&["nodes", "list"]).ok()?;
                    let foreign = v
                        .as_array()?
                        .iter()
                        .filter(|x| x["state"] == "foreign")
                        .count();
                    (foreign == n).then_some(())
                });
                for a in &w.agents {
                    w.ctl.cli(&["nodes", "adopt", a.node.as_str()]).unwrap();
                }
                w.forget_groups();
                "store lost; every node adopted".into()
            }
            14 => {
                // An agent's state file corrupted (a flipped byte) across a kill -9.
                let i = rng.below(w.agents.len() as u64) as usize;
                w.agents[i].proc().kill();
                let before = w.agents[i].proc.as_ref().map_or(0, |p| p.log_text().len());
                let file = w.agents[i].state_dir.join("desired.bin");
                if let Ok(mut b) = std::fs::read(&file) {
                    let at = rng.below(b.len() as u64) as usize;
                    b[at] ^= 0x10;
                    std::fs::write(&file, b).unwrap();
                }
                w.agents[i].start();
                // The round ends once the agent is bound again (it takes the controller's state
                // when it comes). A store lost while an agent's own state is unreadable leaves
                // that agent's instances running but unknown to both: kept, never deleted, and
                // not adoptable (README, Safety model); that double fault is not this mix's.
                let agent = &mut w.agents[i];
                wait_for(
                    CONVERGE,
                    "the agent bound again after its corrupt state",
                    || {
                        let log = agent.proc().log_text();
                        log[before.min(log.len())..]
                            .contains("desired state accepted")
                            .then_some(())
                    },
                );
                format!("state file of agent {} corrupted", w.agents[i].node)
            }
            10 | 11 if w.real.len() < 2 => {
                next += 1;
                let name = format!("real{next}");
                let r = w.ctl.cli(&[
                    "instances",
                    "create",
                    &name,
                    "--kernel",
                    "vmlinuz",
                    "--initrd",
                    "initrd.img",
                    "--memory",
                    "256",
                    "--selector",
                    "zone=real",
                    "--cmdline",
                    "console=ttyS0 quiet",
                ]);
                match r {
                    Ok(v) => {
                        w.real
                            .insert(name.clone(), v["id"].as_str().unwrap().to_owned());
                        w.wanted.insert(name.clone(), false);
                        format!("create {name} on the real libvirtd")
                    }
                    // The real node may be restarting: the scheduler's clear refusal is fine.
                    Err(e) => {
                        assert!(
                            e.contains("no host fits"),
                            "seed {seed}: create {name}: {e}"
                        );
                        format!("create {name} refused: {}", e.trim())
                    }
                }
            }
            0..=3 => w.create_fake(&mut rng, &mut next),
            4 => match w.delete_one(&mut rng) {
                Some(what) => {
                    snapshot_clean = false;
                    what
                }
                None => "nothing to delete".into(),
            },
            5 | 6 => {
                // A burst, then kill -9 the controller in the middle of it.
                w.burst(&mut next);
                match broker.as_mut() {
                    Some(b) if rng.below(2) == 0 => {
                        b.restart();
                        "burst + restart of mosquitto".into()
                    }
                    _ => {
                        w.ctl.proc().kill();
                        w.ctl.start();
                        "burst + kill -9 of the controller".into()
                    }
                }
            }
            7 | 8 => w.kill_agent(&mut rng),
            _ => w.freeze_agent(&mut rng),
        };
        eprintln!("round {round}: {what}");
        w.check(&what);
    }
    // Clean up the real guests.
    for name in w.real.keys().cloned().collect::<Vec<_>>() {
        w.ctl.cli(&["instances", "delete", &name]).unwrap();
        let id = w.real.remove(&name).unwrap();
        w.real_deleted.insert(id);
        w.wanted.remove(&name);
    }
    w.check("deleting the real guests");
    eprintln!("fault run: seed {seed}: converged after every round");
}

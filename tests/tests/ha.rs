//! Two controllers on one PostgreSQL store (started by the test with initdb) and one mosquitto:
//! one leads, the other stands by. A kill -9 of the leader in the middle of a burst of creates
//! from several clients loses no acknowledged create and duplicates none; a leader cut off from
//! PostgreSQL steps down, and a desired state from its epoch is refused by the agent;
//! PostgreSQL restarted mid-burst and both controllers restarted lose nothing.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_protocol::topics::Channel;
use outpost_protocol::{
    AckResult, DesiredState, FleetId, InstanceId, Message as _, NodeId, epoch_floor,
};
use outpost_tests::*;

const T: Duration = Duration::from_secs(60);

struct Fleet {
    _dir: tempfile::TempDir,
    pg: Postgres,
    mosquitto: Mosquitto,
    pw: std::path::PathBuf,
    agents: Vec<Agent>,
}

fn fleet(agents: usize) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path());
    let mosquitto = Mosquitto::start(dir.path());
    let pw = dir.path().join("store-password");
    std::fs::write(&pw, PG_PASSWORD).unwrap();
    let agents = (0..agents)
        .map(|i| {
            let mut a = Agent::fake(
                dir.path(),
                &format!("edge-{i}"),
                mosquitto.port,
                65536,
                "north",
            );
            a.start();
            a
        })
        .collect();
    Fleet {
        _dir: dir,
        pg,
        mosquitto,
        pw,
        agents,
    }
}

impl Fleet {
    fn controller(&self, name: &str, store_url: &str) -> Controller {
        Controller::ha(
            self._dir.path(),
            name,
            self.mosquitto.port,
            store_url,
            &self.pw,
        )
    }
}

fn role(c: &Controller) -> String {
    c.status()["role"].as_str().unwrap_or("?").to_owned()
}

/// Names of every instance, with how many times each appears.
fn names(c: &Controller) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for i in c.cli(&["instances", "list"]).unwrap().as_array().unwrap() {
        *m.entry(i["name"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    m
}

/// `clients` threads each create `per_client` instances through `api`, retrying a failed create
/// until it is acknowledged or found to exist; `during` runs once `trigger_after` creates are
/// acknowledged. Returns the acknowledged names and, for each acknowledged create, when.
fn burst(
    api: &Controller,
    clients: usize,
    per_client: usize,
    trigger_after: usize,
    during: impl FnOnce(),
) -> (Vec<String>, Vec<Instant>) {
    let acked = Arc::new(Mutex::new(Vec::<(String, Instant)>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|s| {
        for t in 0..clients {
            let (acked, count) = (Arc::clone(&acked), Arc::clone(&count));
            s.spawn(move || {
                for k in 0..per_client {
                    let name = format!("c{t}-{k}");
                    let deadline = Instant::now() + T;
                    loop {
                        match api.create(&name, &["--memory", "16"]) {
                            Ok(_) => {
                                acked.lock().unwrap().push((name.clone(), Instant::now()));
                                count.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            // Stored by an attempt whose answer was lost: it exists, once.
                            Err(e) if e.contains("exists") || e.contains("taken") => break,
                            Err(e) => {
                                assert!(Instant::now() < deadline, "create {name}: {e}");
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                    }
                }
            });
        }
        wait_for(T, "the first acknowledged creates", || {
            (count.load(Ordering::SeqCst) >= trigger_after).then_some(())
        });
        during();
    });
    let acked = acked.lock().unwrap().clone();
    (
        acked.iter().map(|(n, _)| n.clone()).collect(),
        acked.iter().map(|(_, t)| *t).collect(),
    )
}

fn assert_exactly_once(c: &Controller, acked: &[String], expected_total: usize) {
    let seen = names(c);
    for n in acked {
        assert_eq!(seen.get(n), Some(&1), "acknowledged create {n} exists once");
    }
    assert!(seen.values().all(|&k| k == 1), "no duplicates: {seen:?}");
    assert_eq!(seen.len(), expected_total, "{seen:?}");
}

#[test]
fn a_killed_leader_is_replaced_and_no_acknowledged_create_is_lost() {
    let f = fleet(2);
    let mut a = f.controller("a", &f.pg.url());
    a.start();
    assert_eq!(role(&a), "leader");
    let epoch_a = a.status()["epoch"].as_u64().unwrap();
    let mut b = f.controller("b", &f.pg.url());
    b.start_standby();
    a.wait_nodes_up(2);

    // Each controller has its own MQTT session: neither throws the other off the broker.
    holds_for(Duration::from_secs(2), "one broker connection each", || {
        a.proc()
            .log_text()
            .matches("connected to the broker")
            .count()
            == 1
            && b.proc()
                .log_text()
                .matches("connected to the broker")
                .count()
                == 1
    });
    // The standby says who leads; its readiness is 503 (not for a load balancer's traffic).
    let (code, body) = b.http("GET", "/readyz", "");
    assert_eq!(code, 503);
    assert!(body.contains("standby (the leader is a at"), "{body}");
    assert_eq!(b.status()["leader"][0], "a");
    // The CLI pointed at the standby alone follows it to the leader.
    assert_eq!(
        b.cli(&["nodes", "list"]).unwrap().as_array().unwrap().len(),
        2
    );
    let (code, body) = b.http("POST", "/v1/nodes/edge-0/cordon", "");
    assert_eq!(code, 503, "a standby takes no change: {body}");
    assert!(body.contains("the leader is a at"), "{body}");

    // kill -9 the leader in the middle of three clients' creates.
    let both = Controller::any_of(&[&a, &b]);
    let mut killed_at = None;
    let (acked, times) = burst(&both, 3, 12, 6, || {
        a.proc().kill();
        killed_at = Some(Instant::now());
    });
    let killed_at = killed_at.unwrap();
    let first_after = times.iter().filter(|t| **t > killed_at).min().unwrap();
    eprintln!(
        "failover: leader killed to the first create accepted by the new leader: {} ms",
        (*first_after - killed_at).as_millis()
    );
    assert_eq!(role(&b), "leader");
    assert!(b.status()["epoch"].as_u64().unwrap() > epoch_a);
    assert_exactly_once(&b, &acked, 36);
    // A takeover gives every node a fresh liveness grace: none is declared down.
    for n in b.cli(&["nodes", "list"]).unwrap().as_array().unwrap() {
        assert_eq!(n["state"], "up", "{n}");
    }
    // The new leader dispatches: every instance runs.
    wait_for(T, "every instance running", || {
        let list = b.cli(&["instances", "list"]).ok()?;
        list.as_array()?
            .iter()
            .all(|i| i["phase"] == "running")
            .then_some(())
    });

    // The old leader comes back as a standby; a clean stop of the leader hands over at once.
    a.start_standby();
    wait_for(T, "a standing by", || (role(&a) == "standby").then_some(()));
    let stopped = Instant::now();
    b.proc().terminate();
    wait_for(T, "a leading again", || {
        (role(&a) == "leader").then_some(())
    });
    let t = Instant::now();
    wait_for(T, "a create accepted by a", || {
        a.create("after-clean-stop", &["--memory", "16"]).ok()
    });
    eprintln!(
        "failover after a clean step-down: {} ms (leader stopped to a create accepted; {} ms of it the create)",
        stopped.elapsed().as_millis(),
        t.elapsed().as_millis()
    );
    drop(f);
}

#[test]
fn a_leader_cut_from_postgres_steps_down_and_agents_refuse_its_epoch() {
    let f = fleet(1);
    let node = NodeId::new("edge-0").unwrap();
    let link = Link::new(f.pg.port);
    let mut a = f.controller("a", &f.pg.url_via(link.port));
    a.start();
    let epoch_a = a.status()["epoch"].as_u64().unwrap();
    let mut b = f.controller("b", &f.pg.url());
    b.start_standby();
    a.wait_nodes_up(1);
    a.create("x", &["--memory", "16"]).unwrap();
    a.wait_phase("x", "running", T);
    let x: InstanceId = a.cli(&["instances", "show", "x"]).unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let watcher = TestController::connect(f.mosquitto.port);

    // Cut a's link to PostgreSQL (it keeps MQTT): it steps down within the lease, b leads.
    let cut = Instant::now();
    link.cut();
    wait_for(T, "b leading", || (role(&b) == "leader").then_some(()));
    wait_for(T, "a standing by", || (role(&a) == "standby").then_some(()));
    eprintln!(
        "leader cut from PostgreSQL: stood down after {} ms",
        cut.elapsed().as_millis()
    );
    assert!(
        cut.elapsed() < Duration::from_secs(12),
        "a leader that cannot renew stops within its lease"
    );
    let err = a.create("refused", &["--memory", "16"]).unwrap_err();
    assert!(err.contains("standby"), "{err}");
    let epoch_b = b.status()["epoch"].as_u64().unwrap();
    assert!(epoch_b > epoch_a);
    // b changes the node's desired state (a new instance): the agent now holds b's epoch.
    b.create("y", &["--memory", "16"]).unwrap();
    b.wait_phase("y", "running", T);

    // A desired state from a's epoch (what a stale leader would publish: x gone) is refused.
    let fleet_id = FleetId(
        f.pg.sql("SELECT value FROM meta WHERE key = 'fleet'")
            .parse::<i64>()
            .unwrap() as u64,
    );
    let stale_generation = epoch_floor(epoch_a) + 1_000;
    let stale = DesiredState {
        fleet: fleet_id,
        generation: stale_generation,
        gone: [x].into_iter().collect(),
        ..DesiredState::default()
    };
    watcher.publish_raw(&node, Channel::Desired, stale.to_vec().unwrap(), false);
    wait_for(T, "the agent to refuse the stale state", || {
        watcher
            .seen()
            .acks(&node)
            .iter()
            .any(|(g, r)| *g == stale_generation && matches!(r, AckResult::Stale { .. }))
            .then_some(())
    });
    holds_for(Duration::from_secs(3), "x and y still running", || {
        b.phase("x").as_deref() == Some("running") && b.phase("y").as_deref() == Some("running")
    });
    assert_eq!(f.agents[0].ops("delete", Some(&x.to_string())), 0);
    let log =
        std::fs::read_to_string(f.agents[0].state_dir.with_extension("log")).unwrap_or_default();
    assert!(
        log.contains("from a controller that no longer leads"),
        "{log}"
    );
    // b's next change to the node is accepted (the retained message a stale leader could
    // have left is superseded).
    b.cli(&["instances", "stop", "y"]).unwrap();
    b.wait_phase("y", "stopped", T);
    drop(f);
}

#[test]
fn postgres_restarted_mid_burst_and_both_controllers_restarted_lose_nothing() {
    let mut f = fleet(1);
    let mut a = f.controller("a", &f.pg.url());
    a.start();
    let mut b = f.controller("b", &f.pg.url());
    b.start_standby();
    a.wait_nodes_up(1);
    let both = Controller::any_of(&[&a, &b]);
    let pg = &mut f.pg;
    let (acked, _) = burst(&both, 2, 10, 4, || pg.restart());
    wait_for(T, "a leader after PostgreSQL's restart", || {
        (role(&a) == "leader" || role(&b) == "leader").then_some(())
    });
    assert_exactly_once(&both, &acked, 20);

    // Both controllers stopped and started again: the fleet is whole, the node still up.
    a.proc().terminate();
    b.proc().terminate();
    b.start_standby();
    a.start_standby();
    wait_for(T, "one leader", || {
        let roles = [role(&a), role(&b)];
        (roles.iter().filter(|r| *r == "leader").count() == 1).then_some(())
    });
    assert_exactly_once(&both, &acked, 20);
    both.wait_nodes_up(1);
    wait_for(T, "every instance running", || {
        let list = both.cli(&["instances", "list"]).ok()?;
        list.as_array()?
            .iter()
            .all(|i| i["phase"] == "running")
            .then_some(())
    });
    drop(f);
}

/// Named tokens live in the shared store: a token made once works on whichever controller
/// leads, before and after a failover, and a revocation reaches every controller.
#[test]
fn named_tokens_are_shared_by_every_controller() {
    let f = fleet(1);
    let tokens = |args: &[&str]| {
        let out = std::process::Command::new(bin("outpost-controller"))
            .arg("tokens")
            .args(args)
            .args(["--store", &f.pg.url(), "--store-password-file"])
            .arg(&f.pw)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let secret = tokens(&["create", "ops", "--role", "operator"]);
    assert!(tokens(&["list"]).contains("ops  operator"));
    let mut a = f.controller("a", &f.pg.url());
    a.token = Some(secret.clone());
    a.start();
    let mut b = f.controller("b", &f.pg.url());
    b.token = Some(secret);
    b.start_standby();
    let both = Controller::any_of(&[&a, &b]);
    both.wait_nodes_up(1);
    both.create("x", &["--memory", "16"]).unwrap();
    // No token: refused by either.
    assert_eq!(a.http("GET", "/v1/instances", "").0, 401);
    a.proc().kill();
    wait_for(T, "b leading", || (role(&b) == "leader").then_some(()));
    both.create("y", &["--memory", "16"]).unwrap();
    let events = both.cli(&["events", "--actor", "ops"]).unwrap();
    assert!(events.to_string().contains("\"y\""), "{events}");
    tokens(&["revoke", "ops"]);
    wait_for(Duration::from_secs(10), "the revocation on b", || {
        both.cli(&["instances", "list"])
            .err()
            .filter(|e| e.contains("revoked"))
    });
    drop(f);
}

/// The retained desired state of every agent's node: its generation.
fn retained_generations(f: &Fleet) -> BTreeMap<String, u64> {
    f.agents
        .iter()
        .map(|a| {
            let d: DesiredState = retained_as(f.mosquitto.port, &a.node, Channel::Desired);
            (a.node.to_string(), d.generation)
        })
        .collect()
}

/// Item 3: a leader frozen (SIGSTOP) past its lease is replaced within the lease, and when it
/// wakes it publishes nothing: no node's retained state goes back, nothing deleted returns.
#[test]
fn a_frozen_leader_is_replaced_and_wakes_without_a_word() {
    let f = fleet(2);
    let mut a = f.controller("a", &f.pg.url());
    a.start();
    let mut b = f.controller("b", &f.pg.url());
    b.start_standby();
    a.wait_nodes_up(2);
    for k in 0..4 {
        a.create(&format!("f-{k}"), &["--memory", "16"]).unwrap();
    }
    for k in 0..4 {
        a.wait_phase(&format!("f-{k}"), "running", T);
    }
    let doomed: InstanceId = a.cli(&["instances", "show", "f-0"]).unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // Keep a busy right up to the freeze, so that it is likely to hold a stored batch.
    let pid = a.proc().pid();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let a_ref = &a;
    let frozen_at = std::thread::scope(|s| {
        let stop = &stop;
        s.spawn(move || {
            for k in 0..20 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let _ = a_ref.create(&format!("busy-{k}"), &["--memory", "16"]);
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        signal(pid, "STOP");
        let frozen_at = Instant::now();
        wait_for(T, "b leading", || (role(&b) == "leader").then_some(()));
        frozen_at.elapsed()
    });
    let failover = frozen_at;
    eprintln!(
        "frozen leader: the standby led after {} ms",
        failover.as_millis()
    );
    assert!(failover < Duration::from_secs(8), "took {failover:?}");
    b.cli(&["instances", "delete", "f-0"]).unwrap();
    b.create("f-new", &["--memory", "16"]).unwrap();
    b.wait_phase("f-new", "running", T);
    wait_for(T, "f-0 gone", || b.phase("f-0").is_none().then_some(()));
    let after_b = retained_generations(&f);

    a.proc().signal("CONT");
    std::thread::sleep(Duration::from_secs(4));
    assert_ne!(role(&a), "leader", "the woken leader still says it leads");
    let now = retained_generations(&f);
    for (node, g) in &after_b {
        assert!(
            now[node] >= *g,
            "{node}'s retained state went back from {g} to {}",
            now[node]
        );
    }
    let creates: usize = f
        .agents
        .iter()
        .map(|ag| ag.ops("create", Some(&doomed.to_string())))
        .sum();
    assert_eq!(creates, 1, "the deleted instance was built again");
    assert_eq!(b.phase("f-0"), None);
    assert_eq!(b.phase("f-new").as_deref(), Some("running"));
}

/// Item 4: a leader cut from the broker refuses changes with a 503 that names the broker
/// (not "no host fits") and hands the lease to the standby that has the broker; what the
/// new leader acknowledges is dispatched at once.
#[test]
fn a_leader_cut_from_the_broker_hands_over_to_one_that_has_it() {
    let f = fleet(2);
    let link = Link::new(f.mosquitto.port);
    let mut a = Controller::ha(f._dir.path(), "a", link.port, &f.pg.url(), &f.pw);
    a.start();
    let mut b = f.controller("b", &f.pg.url());
    b.start_standby();
    a.wait_nodes_up(2);
    a.create("k-1", &["--memory", "16"]).unwrap();
    a.wait_phase("k-1", "running", T);
    let cut = Instant::now();
    link.cut();
    // While it still leads, a change through it is refused, naming the broker (one taken in
    // the first second, before the loss counts, is stored: the next leader dispatches it).
    let mut accepted = Vec::new();
    let err = wait_for(T, "a refusal naming the broker", || {
        let name = format!("k-cut-{}", accepted.len());
        match a.create(&name, &["--memory", "16"]) {
            Err(e) if e.contains("broker") || e.contains("standby") => Some(e),
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => {
                accepted.push(name);
                // (Not faster than a few a second: the fake nodes' vCPUs are few.)
                std::thread::sleep(Duration::from_millis(250));
                None
            }
        }
    });
    assert!(!err.contains("no host fits"), "{err}");
    wait_for(T, "b leading", || (role(&b) == "leader").then_some(()));
    let failover = cut.elapsed();
    eprintln!(
        "leader cut from the broker: the standby led after {} ms",
        failover.as_millis()
    );
    assert!(failover < Duration::from_secs(10), "took {failover:?}");
    wait_for(T, "a standing by", || (role(&a) != "leader").then_some(()));
    // Through either controller, a create is acknowledged by b and runs at once.
    let both = Controller::any_of(&[&a, &b]);
    let t = Instant::now();
    both.create("k-2", &["--memory", "16"]).unwrap();
    b.wait_phase("k-2", "running", T);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "dispatched after {:?}",
        t.elapsed()
    );
    assert_eq!(b.phase("k-1").as_deref(), Some("running"));
    for name in &accepted {
        b.wait_phase(name, "running", T);
    }
    link.restore();
}

/// Item 5: a leader whose PostgreSQL link hangs answers 503 at once and says why, the CLI
/// with both controllers moves on within 2 s, and a leader whose sessions are killed stops
/// saying `leader` at once.
#[test]
fn a_hung_store_link_answers_at_once_and_the_cli_moves_on() {
    let f = fleet(1);
    let link = Link::new(f.pg.port);
    let mut a = f.controller("a", &f.pg.url_via(link.port));
    a.start();
    let mut b = f.controller("b", &f.pg.url());
    b.start_standby();
    a.wait_nodes_up(1);
    let both = Controller::any_of(&[&a, &b]);
    link.freeze();
    let t = Instant::now();
    let failover = std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            wait_for(T, "b leading", || (role(&b) == "leader").then_some(()));
            t.elapsed()
        });
        // Calls to a come back (503) rather than hang, whatever a is doing with its store.
        for _ in 0..5 {
            let s = Instant::now();
            let _ = a.http("GET", "/v1/nodes", "");
            assert!(
                s.elapsed() < Duration::from_secs(3),
                "a call to a took {:?}",
                s.elapsed()
            );
        }
        // The CLI given both moves on from a within 2 s each time (the whole command, with its
        // start and the second controller's answer, within 3 s).
        for _ in 0..5 {
            let s = Instant::now();
            let _ = both.cli(&["nodes", "list"]);
            assert!(
                s.elapsed() < Duration::from_secs(3),
                "the CLI took {:?}",
                s.elapsed()
            );
        }
        waiter.join().unwrap()
    });
    eprintln!(
        "leader with a frozen PostgreSQL link: the standby led after {} ms",
        failover.as_millis()
    );
    assert!(failover < Duration::from_secs(8), "took {failover:?}");
    both.cli(&["nodes", "list"]).unwrap();
    link.thaw();
    wait_for(T, "a standing by", || (role(&a) == "standby").then_some(()));

    // b's sessions killed: it stops saying `leader` at once (not after its lease).
    let killed = Instant::now();
    f.pg.sql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'outpost-controller/b'",
    );
    wait_for(T, "b to stop saying leader", || {
        (role(&b) != "leader").then_some(())
    });
    let said = killed.elapsed();
    eprintln!(
        "leader whose sessions were killed: stopped saying leader after {} ms",
        said.as_millis()
    );
    assert!(said < Duration::from_secs(3), "took {said:?}");
    wait_for(T, "a leader again", || {
        (role(&a) == "leader" || role(&b) == "leader").then_some(())
    });
    both.cli(&["nodes", "list"]).unwrap();
}

/// Item 7: a single controller on SQLite, asked right after it starts, says it is starting
/// (never "standby"), and the CLI waits that out.
#[test]
fn a_controller_starting_up_says_so_and_the_cli_waits() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    ctl.proc().kill();
    ctl.start_standby(); // answers /healthz: the store may still be loading
    let v = ctl.cli(&["nodes", "list"]);
    assert!(v.is_ok(), "{v:?}");
    for _ in 0..20 {
        ctl.proc().kill();
        ctl.start_standby();
        let (code, body) = ctl.http("GET", "/v1/nodes", "");
        assert!(
            !body.contains("standby"),
            "a sole controller said standby: {code} {body}"
        );
        if code == 503 {
            assert!(body.contains("starting up"), "{body}");
        }
    }
}

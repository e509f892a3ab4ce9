//! Never destroy what cannot be accounted for: a controller on an older backup, a lost
//! write-ahead log, an empty data directory or a 0-byte database deletes nothing. Fake agents
//! and one agent on the real libvirtd with real guests; every case ends with every instance
//! still running, shown by the controller, and no delete in any agent's log.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use outpost_tests::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn instances(ctl: &Controller) -> Vec<Value> {
    ctl.cli(&["instances", "list"])
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Waits until every name in `names` is listed in `phase`.
fn wait_all(ctl: &Controller, names: &BTreeSet<String>, phase: &str) {
    wait_for(T, &format!("{names:?} all {phase}"), || {
        let list = instances(ctl);
        names
            .iter()
            .all(|n| {
                list.iter()
                    .any(|i| i["name"] == n.as_str() && i["phase"] == phase)
            })
            .then_some(())
    });
}

fn node_states(ctl: &Controller) -> Vec<String> {
    ctl.cli(&["nodes", "list"])
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|n| n["state"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn virsh_state(domain: &str) -> String {
    virsh(&["domstate", domain])
}

/// Restarts the controller (kill -9) after `change` is done to its data directory.
fn restart_with(ctl: &mut Controller, change: impl FnOnce(&Path)) {
    ctl.proc().kill();
    change(&ctl.data_dir);
    ctl.start();
}

/// Adopts every node once all of them show as bound to another fleet.
fn adopt_all(ctl: &Controller, nodes: &[&str], held: &BTreeSet<String>) {
    wait_for(T, "every node bound to another fleet", || {
        (node_states(ctl).iter().filter(|s| *s == "foreign").count() == nodes.len()).then_some(())
    });
    // Shown as held, with their names, before anything is adopted.
    wait_all(ctl, held, "held");
    let shown = ctl.cli(&["nodes", "show", nodes[0]]).unwrap();
    assert!(shown["bound_to"].is_string(), "{shown}");
    for n in nodes {
        let v = ctl.cli(&["nodes", "adopt", n]).unwrap();
        assert!(v["adopted"].as_u64().is_some(), "{v}");
    }
}

#[test]
fn store_loss_rollback_and_lost_log_delete_nothing() {
    assert!(
        ensure_libvirtd(),
        "libvirtd could not be started (see shared/PLATFORM.md)"
    );
    let dir = tempfile::tempdir().unwrap();
    // mosquitto as the broker: this is about the store; the embedded broker restarts with the
    // controller in the fault run and the controller tests.
    let broker = Mosquitto::start(dir.path());
    let mut ctl = Controller::external(dir.path(), broker.port);
    ctl.args
        .extend(["--lost-after".to_owned(), "3600".to_owned()]);
    ctl.start();
    let port = ctl.mqtt_port;
    let mut agents = vec![
        Agent::fake(dir.path(), "safe-f1", port, 4096, "fake"),
        Agent::fake(dir.path(), "safe-f2", port, 4096, "fake"),
        Agent::real(dir.path(), "safe-real", port, "real"),
    ];
    for a in &mut agents {
        a.start();
    }
    let nodes = ["safe-f1", "safe-f2", "safe-real"];
    ctl.wait_nodes_up(3);

    let mut names = BTreeSet::new();
    let mut real_ids = Vec::new();
    let mut make = |ctl: &Controller, name: &str, zone: &str, names: &mut BTreeSet<String>| {
        let v = ctl
            .create(name, &["--selector", &format!("zone={zone}")])
            .unwrap();
        names.insert(name.to_owned());
        if zone == "real" {
            real_ids.push(v["id"].as_str().unwrap().to_owned());
        }
    };
    make(&ctl, "f1", "fake", &mut names);
    make(&ctl, "f2", "fake", &mut names);
    make(&ctl, "r1", "real", &mut names);
    wait_all(&ctl, &names, "running");

    // A backup of the store, then more instances created after it.
    let backup = dir.path().join("backup");
    restart_with(&mut ctl, |d| copy_dir(d, &backup));
    make(&ctl, "f3", "fake", &mut names);
    make(&ctl, "r2", "real", &mut names);
    wait_all(&ctl, &names, "running");

    // 1. The backup is restored: the nodes hold newer states than the store. The instances
    //    created after the backup are adopted, not deleted.
    restart_with(&mut ctl, |d| {
        std::fs::remove_dir_all(d).unwrap();
        copy_dir(&backup, d);
    });
    wait_all(&ctl, &names, "running");
    let f3 = ctl.cli(&["instances", "show", "f3"]).unwrap();
    let log = ctl.proc().log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("adopting an instance") && l.contains(f3["id"].as_str().unwrap())),
        "{log}"
    );

    // 2. The write-ahead log holding the last create is lost (after its node got it: what only
    //    ever lived in a lost log cannot come back).
    make(&ctl, "f4", "fake", &mut names);
    ctl.wait_phase("f4", "running", T);
    restart_with(&mut ctl, |d| {
        for f in ["outpost.db-wal", "outpost.db-shm"] {
            let _ = std::fs::remove_file(d.join(f));
        }
    });
    wait_all(&ctl, &names, "running");

    // 3. An empty data directory (a volume not mounted, a wrong --data-dir): a new fleet. The
    //    agents refuse it and keep everything; the operator adopts them.
    let first = ctl.data_dir.clone();
    ctl.proc().kill();
    ctl.data_dir = dir.path().join("empty-data");
    ctl.start();
    adopt_all(&ctl, &nodes, &names);
    wait_all(&ctl, &names, "running");

    // 4. A 0-byte database.
    restart_with(&mut ctl, |d| {
        std::fs::write(d.join("outpost.db"), b"").unwrap();
        for f in ["outpost.db-wal", "outpost.db-shm"] {
            let _ = std::fs::remove_file(d.join(f));
        }
    });
    adopt_all(&ctl, &nodes, &names);
    wait_all(&ctl, &names, "running");

    // Nothing was ever deleted, nothing built twice, the real guests never stopped, and the
    // adopted fleet takes new work.
    for a in &agents {
        assert_eq!(a.ops("delete", None), 0, "{} deleted something", a.node);
    }
    for id in &real_ids {
        assert_eq!(agents[2].ops("create", Some(id)), 1, "{id} built once");
        assert_eq!(virsh_state(&format!("outpost-{id}")), "running");
    }
    ctl.create("f5", &["--selector", "zone=fake"]).unwrap();
    ctl.wait_phase("f5", "running", T);
    // The store files are private.
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&ctl.data_dir), 0o700);
    assert_eq!(mode(&ctl.data_dir.join("outpost.db")), 0o600);
    assert_eq!(mode(&first.join("outpost.db")), 0o600);
    assert_eq!(mode(&agents[0].state_dir), 0o711);
    assert_eq!(mode(&agents[0].state_dir.join("desired.bin")), 0o600);

    // Clean up the real guests (an operator's delete is the one way they go).
    for n in ["r1", "r2"] {
        ctl.cli(&["instances", "delete", n]).unwrap();
    }
    wait_for(T, "the real guests deleted", || {
        let list = instances(&ctl);
        (!list.iter().any(|i| i["name"] == "r1" || i["name"] == "r2")).then_some(())
    });
}

//! The operator's day two (issue 30), through the CLI: a node dies for good. Its instances are
//! deleted with `--force` or moved off with `nodes remove --force`, which deletes with the node
//! what cannot move and names it; a forced removal of a node that is up refuses and leaves it
//! as it was; a dead node that comes back is told what is gone and deletes it.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outpost_tests::*;

const T: Duration = Duration::from_secs(60);

#[test]
fn a_node_dead_for_good_is_removed_with_its_instances_accounted_for() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    // Never moved by time: the operator decides.
    ctl.args
        .extend(["--lost-after".to_owned(), "3600".to_owned()]);
    ctl.start();
    let mut a = Agent::fake(dir.path(), "dead-a", ctl.mqtt_port, 4096, "a");
    let mut b = Agent::fake(dir.path(), "live-b", ctl.mqtt_port, 4096, "b");
    a.start();
    b.start();
    ctl.wait_nodes_up(2);
    ctl.cli(&["nodes", "cordon", "live-b"]).unwrap();
    for (name, extra) in [
        ("pinned-1", vec!["--selector", "zone=a"]),
        ("pinned-2", vec!["--selector", "zone=a"]),
        ("mobile", vec![]),
    ] {
        let mut args = vec!["--memory", "128"];
        args.extend(extra);
        ctl.create(name, &args).unwrap();
        ctl.wait_phase(name, "running", T);
        assert_eq!(ctl.node_of(name), "dead-a");
    }
    ctl.cli(&["nodes", "uncordon", "live-b"]).unwrap();
    let (p1, p2) = (ctl.id_of("pinned-1"), ctl.id_of("pinned-2"));

    // A forced removal of a node that is up, with an instance that cannot move: refused,
    // naming it, and the node is left as it was (not draining).
    let e = ctl
        .cli(&["nodes", "remove", "dead-a", "--force"])
        .unwrap_err();
    assert!(e.contains("is up and still runs"), "{e}");
    assert!(
        e.contains("pinned-1") && e.contains("1 other instance(s) moved"),
        "{e}"
    );
    let n = ctl.cli(&["nodes", "show", "dead-a"]).unwrap();
    assert_eq!(n["state"], "up", "a refused removal left it {n}");
    ctl.wait_phase("mobile", "running", T);
    assert_eq!(ctl.node_of("mobile"), "live-b", "what could move, moved");
    // Another that can move, back on the node that will die.
    ctl.cli(&["nodes", "cordon", "live-b"]).unwrap();
    ctl.create("mobile-2", &["--memory", "128"]).unwrap();
    ctl.wait_phase("mobile-2", "running", T);
    assert_eq!(ctl.node_of("mobile-2"), "dead-a");
    ctl.cli(&["nodes", "uncordon", "live-b"]).unwrap();
    let mobile = ctl.id_of("mobile-2");

    // The node dies for good.
    a.proc().kill();
    wait_for(T, "dead-a down", || {
        (ctl.cli(&["nodes", "show", "dead-a"]).ok()?["state"] == "down").then_some(())
    });
    // A plain delete waits for the node, which will not answer; --force does not.
    let v = ctl.cli(&["instances", "delete", "pinned-1"]).unwrap();
    assert_eq!(v["phase"], "deleting");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ctl.phase("pinned-1").as_deref(), Some("deleting"));
    let v = ctl
        .cli(&["instances", "delete", "pinned-1", "--force", "--wait"])
        .unwrap();
    assert_eq!(v["phase"], "deleted", "{v}");
    assert_eq!(ctl.phase("pinned-1"), None);
    let h = ctl.cli(&["instances", "events", &p1]).unwrap().to_string();
    assert!(h.contains("forced while dead-a is down"), "{h}");

    // Removing it: refused without --force; with it, what can move moves and what cannot is
    // deleted with the node, named.
    let e = ctl.cli(&["nodes", "remove", "dead-a"]).unwrap_err();
    assert!(e.contains("--force"), "{e}");
    let text = ctl
        .cli_text(&["nodes", "remove", "dead-a", "--force"])
        .unwrap();
    assert!(text.contains("moved 1 instance(s)"), "{text}");
    assert!(
        text.contains("deleted with it") && text.contains("pinned-2"),
        "{text}"
    );
    ctl.wait_phase("mobile-2", "running", T);
    assert_eq!(ctl.node_of("mobile-2"), "live-b");
    assert_eq!(ctl.phase("pinned-2"), None);
    let nodes = ctl.cli(&["nodes", "list"]).unwrap().to_string();
    assert!(!nodes.contains("dead-a"), "{nodes}");
    let h = ctl.cli(&["instances", "events", &p2]).unwrap().to_string();
    assert!(h.contains("could not move off dead-a"), "{h}");

    // The dead node comes back after all (its state file still lists them): it is told
    // what is gone and deletes it, and nothing runs twice.
    a.start();
    wait_for(T, "the returned node to delete what is gone", || {
        (a.ops("delete", Some(&p2)) >= 1 && a.ops("delete", Some(&mobile)) >= 1).then_some(())
    });
    assert_eq!(ctl.node_of("mobile-2"), "live-b");
    assert_eq!(ctl.phase("mobile-2").as_deref(), Some("running"));
}

/// Filters that match nothing because they name nothing are errors, not empty answers with
/// exit 0 (issue 30, item 10).
#[test]
fn unknown_filters_are_errors_not_empty_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let mut a = Agent::fake(dir.path(), "edge-1", ctl.mqtt_port, 4096, "north");
    a.start();
    ctl.wait_nodes_up(1);
    let e = ctl
        .cli(&["instances", "list", "--phase", "runing"])
        .unwrap_err();
    assert!(
        e.contains("no phase \"runing\"") && e.contains("running"),
        "{e}"
    );
    let e = ctl
        .cli(&["instances", "list", "--node", "edge-9"])
        .unwrap_err();
    assert!(e.contains("edge-9"), "{e}");
    assert!(ctl.cli(&["instances", "list", "--node", "edge-1"]).is_ok());
    let file = dir.path().join("tiny.raw");
    std::fs::write(&file, vec![0u8; 4096]).unwrap();
    ctl.cli(&[
        "images",
        "upload",
        file.to_str().unwrap(),
        "--name",
        "tiny",
        "--format",
        "raw",
        "--arch",
        "x86_64",
    ])
    .unwrap();
    let e = ctl
        .cli(&["images", "prefetch", "tiny", "--selector", "zone=nowhere"])
        .unwrap_err();
    assert!(e.contains("no node matches selector zone=nowhere"), "{e}");
    assert!(
        ctl.cli(&["images", "prefetch", "tiny", "--selector", "zone=north"])
            .is_ok()
    );
}

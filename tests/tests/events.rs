//! The history: every instance's events with when and who, kept after it is deleted, and the
//! fleet's events streamed to `outpost events --follow` (Server-Sent Events) as they happen.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use outpost_tests::*;

const T: Duration = Duration::from_secs(60);

#[test]
fn instance_history_and_the_fleet_stream() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    // Follow the fleet from the start, as JSON lines.
    let out = dir.path().join("follow.jsonl");
    let mut follow = Command::new(bin("outpost"));
    follow.args(["--api", &ctl.api, "--json", "events", "--follow"]);
    let mut follower = Proc::spawn(follow, out.clone());
    let mut a = Agent::fake(dir.path(), "ev-1", ctl.mqtt_port, 2048, "north");
    a.start();
    ctl.wait_nodes_up(1);
    let wait = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--wait", "--timeout", "60"]);
        ctl.cli(&all).unwrap()
    };
    wait(&[
        "instances",
        "create",
        "web-1",
        "--kernel",
        "vmlinuz",
        "--memory",
        "64",
    ]);
    wait(&["instances", "stop", "web-1", "--force"]);
    wait(&["instances", "start", "web-1"]);
    wait(&["instances", "delete", "web-1"]);

    // Kept after the delete, in order, with who.
    let h = ctl.cli(&["instances", "events", "web-1"]).unwrap();
    let kinds: Vec<&str> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    let want = [
        "requested",
        "scheduled",
        "running",
        "stop-requested",
        "stopped",
        "start-requested",
        "running",
        "deleting",
        "deleted",
    ];
    let mut at = 0;
    for w in want {
        at += kinds[at..]
            .iter()
            .position(|k| *k == w)
            .unwrap_or_else(|| panic!("{w} missing in order: {kinds:?}"));
    }
    let by = |kind: &str| {
        h.as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == kind)
            .unwrap()
            .clone()
    };
    assert_eq!(by("requested")["actor"], "local");
    assert_eq!(by("running")["actor"], "node");
    assert_eq!(by("stop-requested")["detail"], "forced");
    assert!(
        by("scheduled")["detail"]
            .as_str()
            .unwrap()
            .starts_with("on ev-1: attempt 1: score"),
        "{h}"
    );
    let e = ctl.cli(&["instances", "events", "never-was"]).unwrap_err();
    assert!(e.contains("no instance never-was"), "{e}");

    // The stream saw the same events, each once, in order, and the node's own.
    let streamed = wait_for(T, "the stream caught up", || {
        let text = std::fs::read_to_string(&out).ok()?;
        let seqs: Vec<u64> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["seq"].as_u64())
            .collect();
        let last = h.as_array().unwrap().last().unwrap()["seq"]
            .as_u64()
            .unwrap();
        seqs.contains(&last).then_some((text, seqs))
    });
    let (text, seqs) = streamed;
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "no gap, no repeat: {seqs:?}"
    );
    assert!(text.contains("\"kind\":\"connected\""), "{text}");

    // What `--wait` listens to: one instance's events from now on (no backlog).
    let live_out = dir.path().join("live.sse");
    let mut live = Command::new("curl");
    live.args([
        "-sNi",
        &format!("{}/v1/events?follow=true&live=true&instance=web-2", ctl.api),
    ]);
    let _live = Proc::spawn(live, live_out.clone());
    wait_for(T, "the live stream open", || {
        std::fs::read_to_string(&live_out)
            .ok()?
            .contains("text/event-stream")
            .then_some(())
    });
    for name in ["web-2", "web-3"] {
        wait(&[
            "instances",
            "create",
            name,
            "--kernel",
            "vmlinuz",
            "--memory",
            "64",
        ]);
    }
    let sse = wait_for(T, "web-2 running in the live stream", || {
        let t = std::fs::read_to_string(&live_out).ok()?;
        t.contains("event: running").then_some(t)
    });
    assert!(sse.contains("event: requested"), "{sse}");
    assert!(!sse.contains("web-3") && !sse.contains("web-1"), "{sse}");
    assert!(!sse.contains("event: connected"), "no backlog: {sse}");
    let (status, body) = ctl.http("GET", "/v1/events?follow=true&bogus=1", "");
    assert_eq!(status, 400, "{body}");

    // A node that goes away: said in the stream.
    a.proc().kill();
    wait_for(T, "the node's disconnect in the stream", || {
        std::fs::read_to_string(&out)
            .ok()?
            .contains("\"kind\":\"disconnected\"")
            .then_some(())
    });
    // The fleet-wide list, filtered by node.
    let listed = ctl.cli(&["events", "--node", "ev-1"]).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["node"] == "ev-1"),
        "{listed}"
    );
    assert!(follower.alive(), "the follower keeps following");
}

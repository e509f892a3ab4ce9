//! Named API tokens with roles, from outside: made with `outpost-controller tokens create`,
//! each role against each kind of action (403 naming the role needed), the audit field in the
//! history and the log, `outpost events --actor`, revocation and expiry taking effect on a
//! running controller, and a per-address limit on failed authentications.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::time::Duration;

use outpost_tests::*;

/// A request to the controller's API with `token`: (status, body).
fn req(
    ctl: &Controller,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    curl(method, &format!("{}{path}", ctl.api), token, body)
}

#[test]
fn roles_audit_revocation_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    let data = ctl.data_dir.clone();
    let viewer = make_token(&data, "viewer", "read", &[]);
    let ops = make_token(&data, "ops", "operator", &[]);
    let boss = make_token(&data, "boss", "admin", &[]);
    let temp = make_token(&data, "temp", "operator", &["--expires", "3s"]);
    assert!(boss.starts_with("outpost_"), "{boss}");
    let mode = std::fs::metadata(data.join("tokens.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let raw = std::fs::read(data.join("tokens.db")).unwrap();
    assert!(
        !raw.windows(boss.len()).any(|w| w == boss.as_bytes()),
        "only hashes are kept"
    );
    // Bad input: an unknown role, a bad expiry, a taken name.
    for (args, want) in [
        (vec!["x", "--role", "root"], "read, operator or admin"),
        (vec!["x", "--role", "read", "--expires", "soon"], "30d"),
        (vec!["boss", "--role", "read"], "exists"),
    ] {
        let out = Command::new(bin("outpost-controller"))
            .args(["tokens", "create"])
            .args(&args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    ctl.token = Some(boss.clone());
    ctl.start();
    let mut a = Agent::fake(dir.path(), "tok-1", ctl.mqtt_port, 2048, "north");
    a.start();
    ctl.wait_nodes_up(1);

    // No token, a wrong one.
    let (s, b) = req(&ctl, None, "GET", "/v1/nodes", "");
    assert_eq!((s, b.contains("missing bearer token")), (401, true), "{b}");
    let (s, b) = req(&ctl, Some("outpost_nope"), "GET", "/v1/nodes", "");
    assert_eq!((s, b.contains("unknown or wrong")), (401, true), "{b}");

    // read: sees everything, changes nothing.
    let create = r#"{"name": "web-1", "kernel": "vmlinuz", "memory_mib": 64}"#;
    assert_eq!(req(&ctl, Some(&viewer), "GET", "/v1/nodes", "").0, 200);
    assert_eq!(req(&ctl, Some(&viewer), "GET", "/metrics", "").0, 200);
    let (s, b) = req(&ctl, Some(&viewer), "POST", "/v1/instances", create);
    assert_eq!(s, 403, "{b}");
    assert!(
        b.contains("this needs the operator role; token viewer has the read role"),
        "{b}"
    );
    let (s, _) = req(&ctl, Some(&viewer), "POST", "/v1/nodes/tok-1/cordon", "");
    assert_eq!(s, 403);

    // operator: instances, cordon; not images or removing nodes.
    let (s, b) = req(&ctl, Some(&ops), "POST", "/v1/instances", create);
    assert_eq!(s, 201, "{b}");
    assert_eq!(
        req(&ctl, Some(&ops), "POST", "/v1/nodes/tok-1/cordon", "").0,
        200
    );
    assert_eq!(
        req(&ctl, Some(&ops), "POST", "/v1/nodes/tok-1/uncordon", "").0,
        200
    );
    let image = r#"{"name": "remote", "url": "http://images.example/r.qcow2", "sha256": "0000000000000000000000000000000000000000000000000000000000000000", "size": 1, "format": "qcow2"}"#;
    let (s, b) = req(&ctl, Some(&ops), "POST", "/v1/images", image);
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("needs the admin role"), "{b}");
    let (s, _) = req(&ctl, Some(&ops), "DELETE", "/v1/nodes/tok-1", "");
    assert_eq!(s, 403);
    let (s, _) = req(&ctl, Some(&ops), "POST", "/v1/nodes/tok-1/adopt", "");
    assert_eq!(s, 403);

    // admin: images too.
    let (s, b) = req(&ctl, Some(&boss), "POST", "/v1/images", image);
    assert_eq!(s, 201, "{b}");

    // The audit trail: who asked, in the history, `events --actor`, and the log.
    let h = ctl.cli(&["instances", "events", "web-1"]).unwrap();
    let requested = h
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "requested")
        .unwrap();
    assert_eq!(requested["actor"], "ops", "{h}");
    let by_ops = ctl.cli(&["events", "--actor", "ops"]).unwrap();
    let kinds: Vec<&str> = by_ops
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"requested") && kinds.contains(&"cordoned"),
        "{kinds:?}"
    );
    assert!(
        by_ops
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] == "ops")
    );
    let log = ctl.proc.as_mut().unwrap().log_text();
    assert!(
        log.contains("actor=ops") && log.contains("change asked"),
        "{log}"
    );

    // Revocation and expiry, without a restart.
    let out = Command::new(bin("outpost-controller"))
        .args(["tokens", "revoke", "ops", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let (s, b) = wait_for(Duration::from_secs(5), "the revocation", || {
        let r = req(&ctl, Some(&ops), "GET", "/v1/nodes", "");
        (r.0 == 401).then_some(r)
    });
    assert_eq!(s, 401);
    assert!(b.contains("token ops was revoked"), "{b}");
    let (s, b) = wait_for(Duration::from_secs(10), "the expiry", || {
        let r = req(&ctl, Some(&temp), "GET", "/v1/nodes", "");
        (r.0 == 401).then_some(r)
    });
    assert_eq!(s, 401);
    assert!(b.contains("token temp has expired"), "{b}");
    let out = Command::new(bin("outpost-controller"))
        .args(["tokens", "list", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    for name in ["viewer", "ops", "boss", "temp"] {
        assert!(list.contains(name), "{list}");
    }
    assert!(!list.contains("outpost_"), "no secrets listed: {list}");
}

#[test]
fn failed_authentications_are_limited_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    let boss = make_token(&ctl.data_dir.clone(), "boss", "admin", &[]);
    ctl.token = Some(boss.clone());
    ctl.start();
    let mut last = 0;
    for _ in 0..12 {
        last = req(&ctl, Some("outpost_guess"), "GET", "/v1/nodes", "").0;
    }
    assert_eq!(last, 429);
    let (s, b) = req(&ctl, Some("outpost_guess2"), "GET", "/v1/nodes", "");
    assert_eq!(s, 429, "guesses are held off for the window: {b}");
    assert!(b.contains("too many failed authentications"), "{b}");
    // A good token still passes from that address (its operator is not locked out by
    // someone else's guesses), and health stays open.
    let (s, b) = req(&ctl, Some(&boss), "GET", "/v1/nodes", "");
    assert_eq!(s, 200, "{b}");
    assert_eq!(ctl.http("GET", "/healthz", "").0, 200);
}

/// Requests with no token at all (a browser opening the status page, again and again) are
/// not guesses: they never hold the address off.
#[test]
fn status_page_visits_do_not_lock_the_cli_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    let boss = make_token(&ctl.data_dir.clone(), "boss", "admin", &[]);
    ctl.token = Some(boss.clone());
    ctl.start();
    for _ in 0..30 {
        assert_eq!(req(&ctl, None, "GET", "/v1/overview", "").0, 401);
    }
    assert!(ctl.cli(&["nodes", "list"]).is_ok());
}

/// A controller started without tokens is locked the moment one is made (no restart), and
/// an event or console stream opened with a token ends when the token is revoked.
#[test]
fn a_token_made_while_running_locks_the_api_and_revocation_ends_streams() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    assert_eq!(
        req(&ctl, None, "GET", "/v1/nodes", "").0,
        200,
        "open on loopback"
    );
    let data = ctl.data_dir.clone();
    let boss = make_token(&data, "boss", "admin", &[]);
    let watcher = make_token(&data, "watcher", "read", &[]);
    wait_for(Duration::from_secs(5), "the API to need a token", || {
        (req(&ctl, None, "GET", "/v1/nodes", "").0 == 401).then_some(())
    });
    assert_eq!(req(&ctl, Some(&boss), "GET", "/v1/nodes", "").0, 200);

    // A follower of the event stream with the watcher's token.
    let mut follow = std::process::Command::new("curl")
        .args(["-s", "-N", "-H"])
        .arg(format!("Authorization: Bearer {watcher}"))
        .arg(format!("{}/v1/events?follow=true", ctl.api))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(follow.try_wait().unwrap().is_none(), "the stream is open");
    run_ok(
        Command::new(bin("outpost-controller"))
            .args(["tokens", "revoke", "watcher", "--data-dir"])
            .arg(&data),
    );
    let ended = wait_for(Duration::from_secs(10), "the revoked stream to end", || {
        follow.try_wait().unwrap()
    });
    assert!(ended.success(), "curl saw the stream end: {ended:?}");
    assert_eq!(req(&ctl, Some(&watcher), "GET", "/v1/nodes", "").0, 401);
}

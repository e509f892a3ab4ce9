//! Observability from outside: `/metrics` scraped and parsed with the official OpenMetrics
//! parser, counters moving with real work (a create, a refusal, a malformed message), the
//! fleet gauges, `/healthz` and `/readyz`, `outpost status`, the metrics-only listener, and the
//! token rules.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use outpost_tests::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn metrics_move_with_real_work() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    let metrics_port = free_port();
    ctl.args.extend([
        "--metrics-listen".into(),
        format!("127.0.0.1:{metrics_port}"),
    ]);
    ctl.start();
    let (status, body) = ctl.http("GET", "/healthz", "");
    assert_eq!((status, body.trim()), (200, "ok"));
    let mut a = Agent::fake(dir.path(), "obs-1", ctl.mqtt_port, 2048, "north");
    let agent_port = free_port();
    a.args = vec!["--metrics-listen".into(), format!("127.0.0.1:{agent_port}")];
    a.start();
    ctl.wait_nodes_up(1);
    wait_for(T, "ready", || {
        let (status, body) = ctl.http("GET", "/readyz", "");
        (status == 200 && body.trim() == "ready").then_some(())
    });
    let url = format!("{}/metrics", ctl.api);
    let before = scrape(&url, None).unwrap();
    assert!(before.has("outpost_build_info"), "{}", before.text);
    assert_eq!(before.value("outpost_broker_connected", &[]), 1.0);
    assert_eq!(before.value("outpost_store_writable", &[]), 1.0);
    assert_eq!(
        before.value("outpost_nodes", &[("state", "up"), ("arch", "x86_64")]),
        1.0,
        "{}",
        before.text
    );
    assert_eq!(
        before.value(
            "outpost_node_memory_bytes",
            &[("node", "obs-1"), ("kind", "allocatable")]
        ),
        2048.0 * 1024.0 * 1024.0
    );
    assert!(
        before.value(
            "outpost_mqtt_messages_received_total",
            &[("channel", "report")]
        ) >= 1.0
    );

    // A create moves the placements and the phase gauges, and the latency histograms.
    ctl.cli(&[
        "instances",
        "create",
        "m-1",
        "--kernel",
        "vmlinuz",
        "--memory",
        "64",
        "--wait",
    ])
    .unwrap();
    let after = scrape(&url, None).unwrap();
    assert_eq!(
        after.value("outpost_placements_total", &[])
            - before.value("outpost_placements_total", &[]),
        1.0
    );
    assert_eq!(
        after.value("outpost_instances", &[("phase", "running")]),
        1.0
    );
    assert_eq!(
        after.value(
            "outpost_node_memory_bytes",
            &[("node", "obs-1"), ("kind", "claimed")]
        ),
        64.0 * 1024.0 * 1024.0
    );
    for h in [
        "outpost_placement_decision_seconds_count",
        "outpost_request_durable_seconds_count",
        "outpost_request_dispatch_seconds_count",
        "outpost_store_commit_seconds_count",
    ] {
        assert!(after.value(h, &[]) >= 1.0, "{h}: {}", after.text);
    }
    assert!(
        after.value(
            "outpost_mqtt_messages_sent_total",
            &[("channel", "desired")]
        ) >= 1.0
    );

    // A request that fits nowhere moves the failures and the memory filter's refusals.
    let e = ctl
        .cli(&[
            "instances",
            "create",
            "huge",
            "--kernel",
            "vmlinuz",
            "--memory",
            "999999",
        ])
        .unwrap_err();
    assert!(e.contains("no host fits"), "{e}");
    let refused = scrape(&url, None).unwrap();
    assert_eq!(
        refused.value("outpost_placement_failures_total", &[])
            - after.value("outpost_placement_failures_total", &[]),
        1.0
    );
    assert_eq!(
        refused.value("outpost_placement_refusals_total", &[("filter", "memory")])
            - after.value("outpost_placement_refusals_total", &[("filter", "memory")]),
        1.0,
        "{}",
        refused.text
    );

    // A message that does not decode moves its channel's decode failures.
    let st = Command::new("mosquitto_pub")
        .args([
            "-p",
            &ctl.mqtt_port.to_string(),
            "-i",
            "obs-1",
            "-t",
            "outpost/node/obs-1/report",
            "-m",
            "not postcard",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    wait_for(T, "the decode failure counted", || {
        let s = scrape(&url, None).ok()?;
        (s.value(
            "outpost_mqtt_decode_failures_total",
            &[("channel", "report")],
        ) >= 1.0)
            .then_some(())
    });

    // The same on the metrics-only listener, which serves nothing else.
    let other = scrape(&format!("http://127.0.0.1:{metrics_port}/metrics"), None).unwrap();
    assert_eq!(
        other.value("outpost_instances", &[("phase", "running")]),
        1.0
    );
    let e = scrape(&format!("http://127.0.0.1:{metrics_port}/v1/nodes"), None).unwrap_err();
    assert!(e.starts_with("HTTP 404"), "{e}");

    // The agent's own metrics.
    let agent_url = format!("http://127.0.0.1:{agent_port}/metrics");
    let am = wait_for(T, "the agent counts its running instance", || {
        let s = scrape(&agent_url, None).ok()?;
        (s.value("outpost_agent_instances", &[("state", "running")]) == 1.0).then_some(s)
    });
    assert!(am.has("outpost_agent_build_info"), "{}", am.text);
    assert_eq!(am.value("outpost_agent_mqtt_connected", &[]), 1.0);
    assert!(am.value("outpost_agent_reconcile_passes_total", &[]) >= 1.0);
    assert!(
        am.value(
            "outpost_agent_hypervisor_call_seconds_count",
            &[("op", "create")]
        ) >= 1.0,
        "{}",
        am.text
    );
    assert!(
        am.value(
            "outpost_agent_hypervisor_call_seconds_count",
            &[("op", "list")]
        ) >= 1.0
    );

    // `outpost status`: the controller's own state and the fleet in numbers.
    let out = Command::new(bin("outpost"))
        .args(["--api", &ctl.api, "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "(ready)",
        "broker        connected",
        "store         writable",
        "nodes         1 up",
        "instances     1 running",
        "last refusal  no host fits (1 hosts): memory removed 1",
    ] {
        assert!(text.contains(want), "{want:?} missing in:\n{text}");
    }
    assert!(a.proc().alive());
}

#[test]
fn a_broker_outage_shows_in_status_readyz_and_nodes_list() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let mut ctl = Controller::external(dir.path(), broker.port);
    ctl.start();
    wait_for(T, "ready", || {
        (ctl.http("GET", "/readyz", "").0 == 200).then_some(())
    });
    drop(broker);
    let (status, body) = wait_for(T, "not ready", || {
        let r = ctl.http("GET", "/readyz", "");
        (r.0 == 503).then_some(r)
    });
    assert_eq!(status, 503);
    assert!(body.contains("broker not connected"), "{body}");
    let s = ctl.cli(&["status"]).unwrap();
    assert_eq!(s["broker_connected"], false, "{s}");
    assert_eq!(s["ready"], false, "{s}");
    let out = Command::new(bin("outpost"))
        .args(["--api", &ctl.api, "nodes", "list"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not connected to its broker"), "{err}");
    let m = scrape(&format!("{}/metrics", ctl.api), None).unwrap();
    assert_eq!(m.value("outpost_broker_connected", &[]), 0.0);
    assert!(m.value("outpost_broker_disconnects_total", &[]) >= 1.0);
}

#[test]
fn metrics_follow_the_api_token_and_health_needs_none() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    ctl.args
        .extend(["--api-token-file".into(), token_file.display().to_string()]);
    let token = "s3cret-token";
    // The harness's own CLI calls carry it.
    ctl.token = Some(token.into());
    ctl.start();
    let url = format!("{}/metrics", ctl.api);
    let e = scrape(&url, None).unwrap_err();
    assert!(e.starts_with("HTTP 401"), "{e}");
    let e = scrape(&url, Some("wrong")).unwrap_err();
    assert!(e.starts_with("HTTP 401"), "{e}");
    assert!(scrape(&url, Some(token)).unwrap().has("outpost_build_info"));
    let (status, _) = ctl.http("GET", "/healthz", "");
    assert_eq!(status, 200);
    let (status, body) = ctl.http("GET", "/v1/status", "");
    assert_eq!(status, 401, "{body}");
}

#[test]
fn agent_metrics_stay_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let a = Agent::fake(dir.path(), "obs-open", free_port(), 1024, "x");
    let out = Command::new(bin("outpost-agent"))
        .arg("--config")
        .arg(&a.config)
        .args(["--metrics-listen", "0.0.0.0:9465"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only on loopback"), "{err}");
}

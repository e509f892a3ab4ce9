//! The controller's HTTP API off loopback needs a token, and the controller drops garbage
//! published on every Outpost topic without crashing.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use outpost_protocol::topics::Channel;
use outpost_protocol::*;
use outpost_tests::*;

#[test]
fn api_off_loopback_requires_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // No token: refused at start, with the reason.
    let out = Command::new(bin("outpost-controller"))
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("d1"))
        .args(["--mqtt-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--api-listen", &format!("0.0.0.0:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("give --api-token"));

    // A blank token is refused at start.
    let blank = dir.path().join("blank.token");
    std::fs::write(&blank, "  \n").unwrap();
    let out = Command::new(bin("outpost-controller"))
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("d2"))
        .args(["--mqtt-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--api-listen", &format!("0.0.0.0:{port}")])
        .arg("--api-token-file")
        .arg(&blank)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("blank"));

    // With a token from a file: requests without it (or with a wrong one) get 401, and the
    // secret is nowhere on the command line.
    let token_file = dir.path().join("api.token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.args.extend([
        "--api-token-file".to_owned(),
        token_file.display().to_string(),
    ]);
    ctl.api = format!("http://127.0.0.1:{port}");
    // Off loopback without TLS is refused too, unless --insecure-http says so.
    let out = Command::new(bin("outpost-controller"))
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("d3"))
        .args(["--mqtt-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--api-listen", &format!("0.0.0.0:{port}")])
        .arg("--api-token-file")
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without TLS") && err.contains("--insecure-http"),
        "{err}"
    );
    let mut cmd = Command::new(bin("outpost-controller"));
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(&ctl.data_dir)
        .args(["--api-listen", &format!("0.0.0.0:{port}")])
        .arg("--insecure-http")
        .args(&ctl.args);
    ctl.proc = Some(Proc::spawn(cmd, dir.path().join("ctl.log")));
    let with = |token: &str| {
        Command::new(bin("outpost"))
            .args(["--api", &ctl.api, "--token", token, "nodes", "list"])
            .output()
            .unwrap()
    };
    wait_for(Duration::from_secs(20), "the API", || {
        with("s3cret-token").status.success().then_some(())
    });
    let pid = ctl.proc.as_ref().unwrap().pid();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("s3cret-token"));
    let bad = with("wrong");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("HTTP 401"));
    let none = Command::new(bin("outpost"))
        .args(["--api", &ctl.api, "nodes", "list"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&none.stderr).contains("HTTP 401"));
}

#[test]
fn names_follow_one_rule_and_every_path_segment_is_encoded() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let mut a = Agent::fake(dir.path(), "names-1", ctl.mqtt_port, 4096, "any");
    a.start();
    ctl.wait_nodes_up(1);
    for bad in [
        "x#y",
        "x?y",
        "a/b",
        "a b",
        "Web",
        "x\u{202e}y",
        "deadbeefdeadbeef",
    ] {
        let e = ctl.create(bad, &[]).unwrap_err();
        assert!(e.contains("HTTP 400") && e.contains("DNS"), "{bad:?}: {e}");
    }
    ctl.create("x", &[]).unwrap();
    // `x#y` does not address `x`: nothing is deleted, and the answer says so.
    let e = ctl.cli(&["instances", "delete", "x#y"]).unwrap_err();
    assert!(e.contains("HTTP 404"), "{e}");
    assert!(ctl.phase("x").is_some(), "x is still there");
    let e = ctl.cli(&["instances", "show", "x/../x"]).unwrap_err();
    assert!(e.contains("HTTP 404"), "{e}");
}

#[test]
fn controller_drops_garbage_on_every_topic() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let mut agent = Agent::configure(
        dir.path(),
        "edge-g",
        ctl.mqtt_port,
        "[hypervisor]\nbackend = \"fake\"\n",
    );
    agent.start();
    ctl.wait_nodes_up(1);
    let junk = TestController::connect(ctl.mqtt_port);
    let node = NodeId::new("edge-g").unwrap();
    let ghost = NodeId::new("ghost").unwrap();
    let mut n = 0;
    for ch in [
        Channel::Status,
        Channel::Inventory,
        Channel::Report,
        Channel::Event,
    ] {
        for payload in [
            vec![],
            vec![0xff; 3],
            vec![WIRE_VERSION + 1, 0, 0],
            vec![WIRE_VERSION; 70_000],
        ] {
            junk.publish_raw(&ghost, ch, payload.clone(), false);
            junk.publish_raw(&node, ch, payload, false);
            n += 2;
        }
    }
    // Still serving, the node still up and reporting, and the drops counted (and logged, at
    // the first ones and each doubling: garbage does not flood the log).
    let url = format!("{}/metrics", ctl.api);
    wait_for(Duration::from_secs(30), "the drops counted", || {
        let m = scrape(&url, None).ok()?;
        let failed: f64 = m
            .samples
            .iter()
            .filter(|s| s.name == "outpost_mqtt_decode_failures_total")
            .map(|s| s.value)
            .sum();
        (failed >= (n / 2) as f64).then_some(())
    });
    let logged = ctl
        .proc()
        .log_text()
        .lines()
        .filter(|l| l.contains("dropped a message that does not decode"))
        .count();
    assert!(
        logged >= 1 && logged <= n,
        "{logged} drop lines for {n} messages"
    );
    assert!(ctl.proc().alive());
    ctl.wait_nodes_up(1);
    let nodes = ctl.cli(&["nodes", "list"]).unwrap();
    assert_eq!(
        nodes.as_array().unwrap().len(),
        1,
        "garbage registered no node: {nodes}"
    );
    assert!(agent.proc().alive());
}

//! The operator's first hour: start means running, and every refusal names its real cause.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use outpost_tests::*;

const T: Duration = Duration::from_secs(60);

/// `outpost instances start` on a VM that stopped by itself (its domain was killed) runs it
/// again, whatever its restart policy.
#[test]
fn start_means_running() {
    assert!(ensure_libvirtd(), "libvirtd could not be started");
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let mut agent = Agent::real(dir.path(), "day1-real", ctl.mqtt_port, "real");
    agent.start();
    ctl.wait_nodes_up(1);
    let v = ctl.create("web-1", &["--restart", "on-failure"]).unwrap();
    ctl.wait_phase("web-1", "running", T);
    let domain = format!("outpost-{}", v["id"].as_str().unwrap());
    virsh(&["destroy", &domain]);
    wait_for(T, "the instance seen stopped", || {
        matches!(ctl.phase("web-1").as_deref(), Some("stopped" | "crashed")).then_some(())
    });
    ctl.cli(&["instances", "start", "web-1"]).unwrap();
    ctl.wait_phase("web-1", "running", T);
    assert_eq!(virsh(&["domstate", &domain]), "running");
    assert_eq!(agent.ops("create", None), 1, "started, not rebuilt");
    ctl.cli(&["instances", "delete", "web-1"]).unwrap();
    wait_for(T, "web-1 gone", || {
        ctl.phase("web-1").is_none().then_some(())
    });
}

/// Each refusal says what is wrong and what to do.
#[test]
fn refusals_name_the_real_cause() {
    let dir = tempfile::tempdir().unwrap();
    // A 0-byte flashed config.
    let empty = dir.path().join("device.bin");
    std::fs::write(&empty, b"").unwrap();
    let out = Command::new(bin("outpost-agent"))
        .arg("--config")
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is empty") && err.contains("outpost-provision install"),
        "{err}"
    );
    assert!(
        !err.contains("invalid config") && !err.contains("parse"),
        "{err}"
    );

    // A data directory that cannot be created.
    let out = Command::new(bin("outpost-controller"))
        .args(["serve", "--data-dir", "/proc/outpost-cannot-exist"])
        .args(["--mqtt-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--api-listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/proc/outpost-cannot-exist") && !err.contains("corrupt"),
        "{err}"
    );

    // A device whose password the broker refuses: said as such, not "unreachable".
    let reg = dir.path().join("registry");
    let mut ctl = Controller::embedded(dir.path());
    let port = ctl.mqtt_port;
    ctl.args.extend([
        "--mqtt-passwd".to_owned(),
        reg.join("mosquitto/passwd").display().to_string(),
    ]);
    let st = Command::new(bin("outpost-provision"))
        .args(["device", "day1-a", "--registry"])
        .arg(&reg)
        .args(["--broker", &format!("mqtt://127.0.0.1:{port}")])
        .status()
        .unwrap();
    assert!(st.success());
    ctl.start();
    let mut wrong = Agent::fake(dir.path(), "day1-a", port, 1024, "any");
    std::fs::write(
        &wrong.config,
        format!(
            "username = \"day1-a\"\npassword = \"not-its-password\"\n{}",
            std::fs::read_to_string(&wrong.config).unwrap()
        ),
    )
    .unwrap();
    wrong.start();
    wait_for(T, "the refused login said as such", || {
        wrong
            .proc()
            .log_text()
            .contains("refused this device's login")
            .then_some(())
    });
}

/// `--wait` returns once the change took effect; lists filter; `nodes show` shows the whole node.
#[test]
fn wait_filters_and_the_whole_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let mut a = Agent::fake(dir.path(), "day1-f1", ctl.mqtt_port, 2048, "north");
    let mut b = Agent::fake(dir.path(), "day1-f2", ctl.mqtt_port, 2048, "south");
    a.start();
    b.start();
    ctl.wait_nodes_up(2);
    let wait = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--wait", "--timeout", "60"]);
        ctl.cli(&all).unwrap()
    };
    let v = wait(&[
        "instances",
        "create",
        "w-1",
        "--kernel",
        "vmlinuz",
        "--memory",
        "64",
        "--selector",
        "zone=north",
        "--label",
        "app=web",
    ]);
    assert_eq!(v["phase"], "running", "{v}");
    ctl.create(
        "w-2",
        &[
            "--memory",
            "64",
            "--selector",
            "zone=south",
            "--group",
            "g",
            "--label",
            "app=db",
        ],
    )
    .unwrap();
    assert_eq!(wait(&["instances", "stop", "w-1"])["phase"], "stopped");
    assert_eq!(wait(&["instances", "start", "w-1"])["phase"], "running");
    // Forced and timed power operations are carried to the node and shown.
    let forced = wait(&["instances", "stop", "w-1", "--force"]);
    assert_eq!(forced["phase"], "stopped");
    assert_eq!(forced["power_mode"], "forced", "{forced}");
    assert_eq!(wait(&["instances", "start", "w-1"])["phase"], "running");
    let v = wait(&["instances", "reboot", "w-1", "--stop-timeout", "7"]);
    assert_eq!(v["power_mode"], "stop timeout 7 s", "{v}");
    assert_eq!(v["reboot_count"], 1, "{v}");
    let e = ctl
        .cli(&["instances", "stop", "w-1", "--force", "--stop-timeout", "5"])
        .unwrap_err();
    assert!(e.contains("cannot be used with"), "{e}");
    // The API refuses a malformed power request with the expected shape.
    let (status, body) = ctl.http("POST", "/v1/instances/w-1/stop", "{\"force\": \"yes\"}");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("stop_timeout_secs"), "{body}");
    assert_eq!(ctl.phase("w-1").as_deref(), Some("running"));
    // Label selectors on the list.
    let web = ctl
        .cli(&["instances", "list", "--selector", "app=web"])
        .unwrap();
    assert_eq!(web.as_array().unwrap().len(), 1, "{web}");
    assert_eq!(web[0]["name"], "w-1");
    let any_app = ctl.cli(&["instances", "list", "-l", "app"]).unwrap();
    assert_eq!(any_app.as_array().unwrap().len(), 2, "{any_app}");
    let both = ctl
        .cli(&["instances", "list", "--selector", "app=web,app=db"])
        .unwrap();
    assert!(both.as_array().unwrap().is_empty(), "{both}");
    let on_f1 = ctl
        .cli(&["instances", "list", "--node", "day1-f1"])
        .unwrap();
    assert_eq!(on_f1.as_array().unwrap().len(), 1, "{on_f1}");
    assert_eq!(on_f1[0]["name"], "w-1");
    let grouped = ctl.cli(&["instances", "list", "--group", "g"]).unwrap();
    assert_eq!(grouped.as_array().unwrap().len(), 1);
    assert_eq!(grouped[0]["name"], "w-2");
    let none = ctl.cli(&["instances", "list", "--phase", "error"]).unwrap();
    assert!(none.as_array().unwrap().is_empty());
    // `instances show` tells everything it was created with.
    let shown = ctl.cli(&["instances", "show", "w-2"]).unwrap();
    assert_eq!(shown["restart"], "on-failure");
    assert_eq!(shown["selector"][0], "zone=south");
    assert!(
        shown["boot"]
            .as_str()
            .unwrap()
            .starts_with("kernel vmlinuz"),
        "{shown}"
    );
    let out = Command::new(bin("outpost"))
        .args(["--api", &ctl.api, "instances", "show", "w-2"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "selector      zone=south",
        "group         g",
        "restart       on-failure",
        "placed        attempt 1: score ",
        "the best of 1 hosts that passed the filters (2 hosts)",
    ] {
        assert!(text.contains(want), "{want:?} missing in:\n{text}");
    }

    // What it uses comes with its next report (every second here).
    let text = wait_for(Duration::from_secs(20), "the node's usage reported", || {
        let out = Command::new(bin("outpost"))
            .args(["--api", &ctl.api, "nodes", "show", "day1-f1"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("used          1 vCPUs").then_some(text)
    });
    for want in [
        "state         up (connected ",
        &format!("agent         {}", env!("CARGO_PKG_VERSION")),
        "allocatable   8 vCPUs, ",
        "ratios        cpu 4, memory 1, disk 1",
        "capacity      32 vCPUs, ",
        "claimed       1 vCPUs, 64 MiB",
        "used          1 vCPUs, 64 MiB",
        "zone=north",
        "generation",
        "w-1",
    ] {
        assert!(text.contains(want), "{want:?} missing in:\n{text}");
    }
    let v = ctl.cli(&["nodes", "show", "day1-f1"]).unwrap();
    assert_eq!(v["agent_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["capacity"]["vcpus"], 32, "{v}");
    assert_eq!(wait(&["instances", "delete", "w-1"])["phase"], "deleted");
    assert!(ctl.phase("w-1").is_none());
}

/// `outpost-agent check-config` and `fingerprint` print what an operator reads (or JSON), with
/// secrets masked.
#[test]
fn agent_summaries_are_readable() {
    let dir = tempfile::tempdir().unwrap();
    let a = Agent::fake(dir.path(), "day1-sum", 1883, 2048, "north");
    std::fs::write(
        &a.config,
        format!(
            "username = \"day1-sum\"\npassword = \"s3cret-pass\"\n{}",
            std::fs::read_to_string(&a.config).unwrap()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(bin("outpost-agent"))
            .arg("--config")
            .arg(&a.config)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = run(&["check-config"]);
    assert!(text.contains("node            day1-sum"), "{text}");
    assert!(text.contains("day1-sum (password set)") && !text.contains("s3cret-pass"));
    assert!(!text.contains("Config {"), "not a debug dump: {text}");
    let json: serde_json::Value = serde_json::from_str(&run(&["check-config", "--json"])).unwrap();
    assert_eq!(json["labels"], "zone=north");
    let inv: serde_json::Value = serde_json::from_str(&run(&["fingerprint", "--json"])).unwrap();
    assert_eq!(inv["hypervisor"], "fake");
    assert!(inv["images"].as_str().unwrap().contains("vmlinuz"));
    let text = run(&["fingerprint"]);
    assert!(
        text.contains("allocatable") && text.contains("vCPUs"),
        "{text}"
    );
}

/// A node gone for good is removed (its instances moved first with --force) and its
/// credentials revoked.
#[test]
fn a_gone_node_is_removed_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let mut a = Agent::fake(dir.path(), "day1-r1", ctl.mqtt_port, 2048, "any");
    let mut b = Agent::fake(dir.path(), "day1-r2", ctl.mqtt_port, 2048, "any");
    a.start();
    ctl.wait_nodes_up(1);
    ctl.create("r-1", &["--memory", "64"]).unwrap();
    ctl.wait_phase("r-1", "running", T);
    b.start();
    ctl.wait_nodes_up(2);
    // day1-r1 dies for good.
    a.proc().kill();
    let e = ctl.cli(&["nodes", "remove", "day1-r1"]).unwrap_err();
    assert!(
        e.contains("still holds r-1") && e.contains("--force"),
        "{e}"
    );
    let v = ctl.cli(&["nodes", "remove", "day1-r1", "--force"]).unwrap();
    assert_eq!(v["moved"], 1, "{v}");
    let nodes = ctl.cli(&["nodes", "list"]).unwrap();
    assert!(!nodes.to_string().contains("day1-r1"), "{nodes}");
    ctl.wait_phase("r-1", "running", T);
    assert_eq!(
        ctl.cli(&["instances", "show", "r-1"]).unwrap()["node"],
        "day1-r2"
    );
    // Removed from the store too: a restart does not bring it back.
    ctl.proc().kill();
    ctl.start();
    let nodes = ctl.cli(&["nodes", "list"]).unwrap();
    assert!(!nodes.to_string().contains("day1-r1"), "{nodes}");

    // Revoking a device removes its broker entry.
    let reg = dir.path().join("registry");
    let provision = |args: &[&str]| {
        Command::new(bin("outpost-provision"))
            .args(args)
            .arg("--registry")
            .arg(&reg)
            .output()
            .unwrap()
    };
    assert!(
        provision(&["device", "day1-gone", "--broker", "mqtt://127.0.0.1:1883"])
            .status
            .success()
    );
    assert!(
        provision(&["device", "day1-kept", "--broker", "mqtt://127.0.0.1:1883"])
            .status
            .success()
    );
    let out = provision(&["revoke", "day1-gone"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passwd = std::fs::read_to_string(reg.join("mosquitto/passwd")).unwrap();
    assert!(!passwd.contains("day1-gone:") && passwd.contains("day1-kept:"));
    let again = provision(&["revoke", "day1-gone"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no broker entry"));
}

/// Labels set or removed from the controller override the flashed ones, steer placements at
/// once, and survive a restart.
#[test]
fn node_labels_from_the_controller() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let mut a = Agent::fake(dir.path(), "day1-l1", ctl.mqtt_port, 2048, "north");
    a.start();
    ctl.wait_nodes_up(1);
    let v = ctl
        .cli(&["nodes", "label", "day1-l1", "tier=gold", "zone-"])
        .unwrap();
    assert_eq!(v["labels"], serde_json::json!(["tier=gold"]), "{v}");
    assert_eq!(
        v["label_overrides"],
        serde_json::json!(["tier=gold", "zone-"])
    );
    ctl.create("gold-1", &["--memory", "64", "--selector", "tier=gold"])
        .unwrap();
    let e = ctl
        .create("north-1", &["--memory", "64", "--selector", "zone=north"])
        .unwrap_err();
    assert!(e.contains("labels"), "{e}");
    let e = ctl
        .cli(&["nodes", "label", "day1-l1", "Bad Key"])
        .unwrap_err();
    assert!(e.contains("HTTP 400") && e.contains("key=value"), "{e}");
    ctl.proc().kill();
    ctl.start();
    let v = ctl.cli(&["nodes", "show", "day1-l1"]).unwrap();
    assert_eq!(v["labels"], serde_json::json!(["tier=gold"]), "{v}");
}

//! An instance's console from the controller: its last lines, followed as it prints, and a
//! clear answer when its node is gone. A real guest on the real libvirtd.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use outpost_tests::*;

const BOOT: Duration = Duration::from_secs(120);

#[test]
fn the_console_from_the_controller() {
    assert!(ensure_libvirtd(), "libvirtd could not be started");
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let mut a = Agent::real(dir.path(), "con-1", ctl.mqtt_port, "real");
    a.start();
    ctl.wait_nodes_up(1);
    ctl.create("talker", &["--wait", "--timeout", "120"])
        .unwrap();
    // Its last lines, read through the node, with the guest's words in them.
    let v = wait_for(BOOT, "the guest's line on the console", || {
        let v = ctl
            .cli(&["instances", "console", "talker", "--lines", "20"])
            .ok()?;
        v["text"].as_str()?.contains(GUEST_MARKER).then_some(v)
    });
    assert_eq!(v["node"], "con-1");
    let text = v["text"].as_str().unwrap();
    assert!(
        !text.contains('\u{1b}') && !text.contains('\r'),
        "cleaned: {text:?}"
    );
    let n = text.lines().count();
    assert!(n <= 20, "{n} lines");

    // Follow: the guest boots again after a reset, and the follower prints it once more.
    let out = dir.path().join("follow.txt");
    let mut follow = Command::new(bin("outpost"));
    follow.args([
        "--api",
        &ctl.api,
        "instances",
        "console",
        "talker",
        "--lines",
        "1",
        "--follow",
    ]);
    let mut follower = Proc::spawn(follow, out.clone());
    std::thread::sleep(Duration::from_secs(1));
    ctl.cli(&["instances", "reboot", "talker", "--force"])
        .unwrap();
    wait_for(BOOT, "the reboot on the followed console", || {
        let t = std::fs::read_to_string(&out).ok()?;
        t.contains(GUEST_MARKER).then_some(())
    });
    let followed = std::fs::read_to_string(&out).unwrap();
    assert!(
        followed.contains("Linux version") || followed.contains(GUEST_MARKER),
        "{followed}"
    );

    // Unknown instance: said at once.
    let e = ctl.cli(&["instances", "console", "nobody"]).unwrap_err();
    assert!(e.contains("no instance nobody"), "{e}");

    // Its node goes away: a clear answer within seconds, and the follower ends saying why.
    a.proc().kill();
    let t = Instant::now();
    let e = wait_for(Duration::from_secs(30), "a refusal naming the node", || {
        ctl.cli(&["instances", "console", "talker"]).err()
    });
    assert!(e.contains("con-1"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(30));
    wait_for(Duration::from_secs(30), "the follower to end", || {
        (!follower.alive()).then_some(())
    });
    let log = std::fs::read_to_string(&out).unwrap();
    assert!(log.contains("con-1"), "the follower said why: {log}");
    // Clean up the guest through a restarted agent.
    a.start();
    ctl.wait_nodes_up(1);
    ctl.cli(&["instances", "delete", "talker", "--wait", "--timeout", "60"])
        .unwrap();
}

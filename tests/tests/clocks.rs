//! Clocks that lie (issue 29, items 1 and 2): the controller's wall clock stepped an hour
//! forward and back while it runs, and an agent restarted with its clock a day behind, in
//! 1970 and a day ahead. Real processes on libfaketime (the monotonic clock left alone, as on a
//! real machine): nothing moves, nothing flaps, and liveness still works afterwards.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_tests::*;

const T: Duration = Duration::from_secs(60);

/// Where each instance is, by name.
fn placements(ctl: &Controller) -> BTreeMap<String, String> {
    ctl.cli(&["instances", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_owned(),
                i["node"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect()
}

fn node_states(ctl: &Controller) -> BTreeMap<String, String> {
    ctl.cli(&["nodes", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().to_owned(),
                n["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The kinds of every event so far.
fn event_kinds(ctl: &Controller) -> Vec<String> {
    ctl.cli(&["events"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Watches for `secs` seconds that every node stays up and no instance moves.
fn nothing_moves(ctl: &Controller, placed: &BTreeMap<String, String>, secs: u64, when: &str) {
    for _ in 0..secs * 2 {
        for (node, state) in node_states(ctl) {
            assert_eq!(state, "up", "{when}: {node} flapped");
        }
        assert_eq!(&placements(ctl), placed, "{when}: an instance moved");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_wall_clock_step_on_the_controller_moves_nothing_and_liveness_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(dir.path(), "controller", "+0");
    let mut ctl = Controller::embedded(dir.path());
    // Lost after 10 s: an hour's step is far past it.
    ctl.args
        .extend(["--lost-after".to_owned(), "10".to_owned()]);
    ctl.env = clock.env();
    ctl.start();
    let mut agents: Vec<Agent> = ["clk-a", "clk-b"]
        .iter()
        .map(|n| Agent::fake(dir.path(), n, ctl.mqtt_port, 4096, "z"))
        .collect();
    for a in &mut agents {
        a.start();
    }
    ctl.wait_nodes_up(2);
    for k in 0..4 {
        ctl.create(&format!("clk-{k}"), &["--memory", "128"])
            .unwrap();
    }
    for k in 0..4 {
        ctl.wait_phase(&format!("clk-{k}"), "running", T);
    }
    let placed = placements(&ctl);
    let before = event_kinds(&ctl).len();

    clock.set("+3600");
    nothing_moves(&ctl, &placed, 9, "an hour forward");
    clock.set("-3600");
    nothing_moves(&ctl, &placed, 9, "an hour back");
    let new: Vec<String> = event_kinds(&ctl).split_off(before);
    for bad in ["down", "lost", "moved", "disconnected"] {
        assert!(
            !new.iter().any(|k| k == bad),
            "a clock step caused a {bad} event: {new:?}"
        );
    }

    // Liveness still counts real time: a node that stops reporting (frozen, connection
    // open) is down within the liveness timeout (5 s here) plus a tick, not after the
    // broker's keepalive or an hour.
    let frozen = agents[1].node.to_string();
    agents[1].proc().signal("STOP");
    let t0 = std::time::Instant::now();
    wait_for(Duration::from_secs(9), "the frozen node to go down", || {
        (node_states(&ctl)[&frozen] == "down").then_some(())
    });
    assert!(t0.elapsed() >= Duration::from_secs(3), "down too soon");
    agents[1].proc().signal("CONT");
    ctl.wait_nodes_up(2);
    assert_eq!(
        placements(&ctl),
        placed,
        "a node down briefly keeps its VMs"
    );
}

#[test]
fn an_agent_whose_clock_is_far_off_stays_up_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let clock = FakeClock::new(dir.path(), "agent", "+0");
    let mut a = Agent::fake(dir.path(), "rtc-less", ctl.mqtt_port, 4096, "z");
    a.env = clock.env();
    a.start();
    ctl.wait_nodes_up(1);
    ctl.create("rtc-1", &["--memory", "128"]).unwrap();
    ctl.wait_phase("rtc-1", "running", T);

    // An RTC-less device reboots (kill -9: the broker sends its Last Will) with its clock a
    // day behind, then in 1970, then a day ahead.
    for offset in ["-1d", "@1970-01-01 00:00:01", "+1d"] {
        a.proc().kill();
        wait_for(T, "the Last Will", || {
            (node_states(&ctl)["rtc-less"] == "down").then_some(())
        });
        clock.set(offset);
        a.start();
        ctl.wait_nodes_up(1);
        ctl.wait_phase("rtc-1", "running", T);
        // It stays up, reporting, past the liveness timeout (5 s), and its instance reads
        // running.
        for _ in 0..16 {
            assert_eq!(
                node_states(&ctl)["rtc-less"],
                "up",
                "clock {offset}: a connected, reporting node went down"
            );
            let i = ctl.cli(&["instances", "show", "rtc-1"]).unwrap();
            assert_eq!(i["phase"], "running", "clock {offset}: {i}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // The fake backend's VMs live in the agent's process: one create per start, no more.
    assert_eq!(a.ops("create", None), 4, "one VM, created once per start");
}

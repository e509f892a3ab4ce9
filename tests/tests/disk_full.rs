//! A full disk under the controller's store: the controller stays up, refuses changes with a
//! 503 that names the cause, keeps answering reads and keeping liveness (the embedded broker
//! with it), and takes changes again by itself once space returns. (A 4 MiB tmpfs as the data
//! directory: the tests run as root, as CI does.)
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use outpost_tests::*;

const T: Duration = Duration::from_secs(30);

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_refuses_changes_and_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mounting a tmpfs needs root (CI runs as root)"
    );
    let _guard = Tmpfs(mnt.clone());

    let mut ctl = Controller::embedded(dir.path());
    ctl.data_dir = mnt.join("data");
    ctl.start();
    let mut a = Agent::fake(dir.path(), "full-1", ctl.mqtt_port, 8192, "any");
    a.start();
    ctl.wait_nodes_up(1);
    ctl.create("before", &["--memory", "64"]).unwrap();
    ctl.wait_phase("before", "running", T);

    // Fill the disk.
    let filler = mnt.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let mut refused = None;
    for n in 0..50 {
        match ctl.create(&format!("full-{n}"), &["--memory", "16"]) {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("a create is refused once the disk is full");
    assert!(e.contains("HTTP 503") && e.contains("store"), "{e}");
    // Reads still answer, the controller and its broker stay up, the node stays up.
    assert!(ctl.proc().alive());
    let nodes = ctl.cli(&["nodes", "list"]).unwrap();
    assert_eq!(nodes[0]["state"], "up");
    let again = ctl.create("during", &["--memory", "16"]).unwrap_err();
    assert!(again.contains("HTTP 503"), "{again}");
    holds_for(
        Duration::from_secs(2),
        "the controller up, its node up",
        || ctl.proc().alive() && ctl.cli(&["nodes", "list"]).unwrap()[0]["state"] == "up",
    );

    // Space returns: changes are taken again without a restart.
    std::fs::remove_file(&filler).unwrap();
    wait_for(T, "creates accepted again", || {
        ctl.create("after", &["--memory", "16"]).ok()
    });
    ctl.wait_phase("after", "running", T);
    assert!(ctl.proc().log_text().contains("can be written again"));
}

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

/// A node whose disk cannot hold an image says so (before it starts, with what it needs and
/// has), and a disk that fills up during a download fails it cleanly: nothing unverified in
/// the cache, the agent still up.
#[test]
fn a_node_without_room_for_an_image_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("images");
    std::fs::create_dir_all(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mounting a tmpfs needs root (CI runs as root)"
    );
    let _guard = Tmpfs(mnt.clone());

    let mut ctl = Controller::embedded(dir.path());
    ctl.args
        .extend(["--max-attempts".to_owned(), "1".to_owned()]);
    ctl.start();
    let files = dir.path().join("guest");
    std::fs::create_dir_all(&files).unwrap();
    install_test_guest(&files);
    ctl.cli(&[
        "images",
        "upload",
        files.join("vmlinuz").to_str().unwrap(),
        "--name",
        "k",
    ])
    .unwrap();
    let a = Agent::fake(dir.path(), "full-img", ctl.mqtt_port, 4096, "any");
    let text = std::fs::read_to_string(&a.config).unwrap();
    std::fs::write(
        &a.config,
        format!(
            "image_dir = \"{}\"\n{text}\n[downloads]\nreserve_mib = 1\nmax_download_rate = 3000000\n",
            mnt.display()
        ),
    )
    .unwrap();
    let mut a = a;
    a.start();
    ctl.wait_nodes_up(1);

    // 14 MiB taken: a 13.5 MiB image does not fit. Said before a byte is fetched.
    let junk = mnt.join("junk");
    std::fs::write(&junk, vec![0u8; 14 << 20]).unwrap();
    ctl.cli(&[
        "instances",
        "create",
        "no-room",
        "--kernel",
        "k",
        "--memory",
        "64",
    ])
    .unwrap();
    let v = wait_for(T, "no-room failed", || {
        let v = ctl.cli(&["instances", "show", "no-room"]).ok()?;
        (v["phase"] == "error").then_some(v)
    });
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("not enough disk space"),
        "{v}"
    );
    ctl.cli(&["instances", "delete", "no-room"]).unwrap();

    // Room at the start, none halfway: the write fails, the download with it.
    std::fs::remove_file(&junk).unwrap();
    ctl.cli(&[
        "instances",
        "create",
        "fills-up",
        "--kernel",
        "k",
        "--memory",
        "64",
    ])
    .unwrap();
    let partial = mnt.join("partial");
    wait_for(T, "the download under way", || {
        std::fs::read_dir(&partial)
            .ok()?
            .filter_map(Result::ok)
            .any(|e| e.metadata().is_ok_and(|m| m.len() > (2 << 20)))
            .then_some(())
    });
    // Whatever space is left, taken.
    let _ = std::fs::write(&junk, vec![0u8; 24 << 20]);
    let v = wait_for(T, "fills-up failed", || {
        let v = ctl.cli(&["instances", "show", "fills-up"]).ok()?;
        (v["phase"] == "error").then_some(v)
    });
    let reason = v["reason"].as_str().unwrap();
    assert!(
        reason.contains("No space left") || reason.contains("not enough disk space"),
        "{reason}"
    );
    assert!(
        std::fs::read_dir(mnt.join("sha256")).map_or(true, |d| d.count() == 0),
        "nothing unverified in the cache"
    );
    assert!(a.proc().alive());
}

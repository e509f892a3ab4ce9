//! The image catalogue end to end: uploads through the CLI, nodes that fetch what their
//! instances need (verified, resumable, cached), and sources that misbehave.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outpost_tests::http::{ImageServer, Mode};
use outpost_tests::*;

const T: Duration = Duration::from_secs(120);

/// Appends a `[downloads]` section to an agent's config.
fn downloads(a: &Agent, toml: &str) {
    let mut text = std::fs::read_to_string(&a.config).unwrap();
    text.push_str(&format!("\n[downloads]\n{toml}\n"));
    std::fs::write(&a.config, text).unwrap();
}

/// A kernel and an initrd uploaded into the catalogue reach a node that has neither: it
/// fetches them (the instance says `downloading`), verifies them, caches them and boots; the
/// catalogue shows who uses the image and where it is cached, and refuses to delete it while
/// it is used.
#[test]
fn uploaded_images_reach_a_node_that_lacks_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let files = dir.path().join("guest");
    std::fs::create_dir_all(&files).unwrap();
    install_test_guest(&files);
    let k = ctl
        .cli(&[
            "images",
            "upload",
            files.join("vmlinuz").to_str().unwrap(),
            "--name",
            "guest-kernel",
        ])
        .unwrap();
    assert_eq!(k["format"], "kernel", "{k}");
    assert_eq!(
        k["arch"], "x86_64",
        "the kernel's architecture is read from it: {k}"
    );
    assert_eq!(k["sha256"], sha256(&files.join("vmlinuz")).as_str());
    let i = ctl
        .cli(&[
            "images",
            "upload",
            files.join("initrd.img").to_str().unwrap(),
            "--name",
            "guest-initrd",
            "--version",
            "2026.11",
        ])
        .unwrap();
    assert_eq!(i["format"], "initrd", "{i}");
    // A file that is no image, and a wrong --format: refused, nothing stored.
    let e = ctl
        .cli(&["images", "upload", "/etc/hostname", "--name", "junk"])
        .unwrap_err();
    assert!(e.contains("not an image"), "{e}");
    let (status, body) = ctl.http("POST", "/v1/images?name=junk&format=qcow2", "hello");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a qcow2 image"), "{body}");
    let e = ctl
        .cli(&[
            "images",
            "upload",
            files.join("initrd.img").to_str().unwrap(),
            "--name",
            "junk",
            "--format",
            "kernel",
        ])
        .unwrap_err();
    assert!(e.contains("initrd image, not kernel"), "{e}");
    let listed = ctl.cli(&["images", "list"]).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let tmp = ctl.data_dir.join("blobs/tmp");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "no half-written upload left"
    );

    // A node without these files.
    let mut a = Agent::fake(dir.path(), "img-f1", ctl.mqtt_port, 2048, "north");
    a.start();
    ctl.wait_nodes_up(1);
    let v = ctl
        .cli(&[
            "instances",
            "create",
            "web-1",
            "--kernel",
            "guest-kernel",
            "--initrd",
            "guest-initrd:2026.11",
            "--memory",
            "64",
            "--wait",
            "--timeout",
            "60",
        ])
        .unwrap();
    assert_eq!(v["phase"], "running", "{v}");
    assert_eq!(v["image"], "kernel:guest-kernel:1", "{v}");
    assert!(
        a.proc().log_text().contains("downloading an image"),
        "{}",
        a.proc().log_text()
    );
    // In the node's cache, byte for byte.
    let cached = a
        .state_dir
        .join("images/sha256")
        .join(sha256(&files.join("vmlinuz")));
    assert_eq!(sha256(&cached), sha256(&files.join("vmlinuz")));
    assert!(
        !a.state_dir
            .join("images/partial")
            .join(sha256(&files.join("vmlinuz")))
            .exists()
    );
    let shown = wait_for(T, "the node's cache in the catalogue", || {
        let s = ctl.cli(&["images", "show", "guest-kernel"]).ok()?;
        (s["cached_on"][0] == "img-f1").then_some(s)
    });
    assert_eq!(shown["used_by"][0], "web-1", "{shown}");

    // Used: not deleted. Unused: deleted, bytes and all.
    let e = ctl.cli(&["images", "delete", "guest-kernel"]).unwrap_err();
    assert!(e.contains("used by web-1"), "{e}");
    ctl.cli(&["instances", "delete", "web-1", "--wait", "--timeout", "60"])
        .unwrap();
    ctl.cli(&["images", "delete", "guest-kernel"]).unwrap();
    let blob = ctl
        .data_dir
        .join("blobs/sha256")
        .join(sha256(&files.join("vmlinuz")));
    assert!(!blob.exists(), "the unreferenced blob is removed");
    assert!(a.proc().alive());
}

/// Sources that lie: corrupt bytes, a truncated file, a size larger or smaller than the
/// catalogue says. Each ends in a clear reason; nothing half-written enters the cache.
#[test]
fn bad_sources_fail_with_a_reason_and_leave_nothing_in_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.args
        .extend(["--max-attempts".to_owned(), "1".to_owned()]);
    ctl.start();
    let files = dir.path().join("guest");
    std::fs::create_dir_all(&files).unwrap();
    install_test_guest(&files);
    // Each case its own content (same digests would be one blob with several sources).
    let content = |n: u8| {
        let mut k = std::fs::read(files.join("vmlinuz")).unwrap();
        k.extend(std::iter::repeat_n(n, 512));
        let p = dir.path().join(format!("content-{n}"));
        std::fs::write(&p, &k).unwrap();
        (k, sha256(&p))
    };
    let mut a = Agent::fake(dir.path(), "img-bad", ctl.mqtt_port, 4096, "north");
    downloads(&a, "attempts = 3\nstall_timeout_secs = 2");
    a.start();
    ctl.wait_nodes_up(1);

    let cases = [
        ("corrupt", Mode::Corrupt, 0i64, "did not verify"),
        // Cut after the same 100 kB every time: no progress, so the budget runs out (a cut
        // that makes progress resumes instead: see the cut-link test).
        (
            "truncated",
            Mode::NoRange(100_000),
            0,
            "gave up after 3 attempts",
        ),
        // A mirror that takes the request and never answers holds nothing for long.
        ("silent", Mode::Silent, 0, "no response within 2 s"),
        ("too-small", Mode::Good, 4096, "gave up after 3 attempts"),
        ("too-large", Mode::Good, -4096, "more than its"),
    ];
    for (n, (name, mode, off, want)) in cases.into_iter().enumerate() {
        let (bytes, sha) = content(n as u8);
        let size = (bytes.len() as i64 + off).to_string();
        let silent = mode == Mode::Silent;
        let server = ImageServer::start(bytes, mode);
        let url = server.url();
        ctl.cli(&[
            "images", "add", "--name", name, "--url", &url, "--sha256", &sha, "--size", &size,
            "--format", "kernel", "--arch", "x86_64",
        ])
        .unwrap();
        let inst = format!("from-{name}");
        ctl.cli(&[
            "instances",
            "create",
            &inst,
            "--kernel",
            name,
            "--memory",
            "64",
        ])
        .unwrap();
        let v = wait_for(T, &format!("{inst} failed"), || {
            let v = ctl.cli(&["instances", "show", &inst]).ok()?;
            (v["phase"] == "error").then_some(v)
        });
        let reason = v["reason"].as_str().unwrap();
        assert!(reason.contains(want), "{name}: {reason}");
        assert!(silent || server.sent.load(std::sync::atomic::Ordering::SeqCst) > 0);
        ctl.cli(&["instances", "delete", &inst]).unwrap();
    }
    // Nothing unverified entered the cache, and downloads that failed for good left no
    // partial file behind.
    for sub in ["images/sha256", "images/partial"] {
        let d = a.state_dir.join(sub);
        let left: Vec<_> = std::fs::read_dir(&d)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{sub} holds {left:?}");
    }
    assert!(a.proc().alive());
}

/// The done-when of the catalogue: a real guest boots on the real libvirtd from a qcow2 disk
/// image uploaded to the controller, on a node that did not have it.
#[test]
fn a_real_guest_boots_from_an_uploaded_disk_image() {
    assert!(ensure_libvirtd(), "libvirtd could not be started");
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let disk = make_boot_disk(dir.path());
    let v = ctl
        .cli(&[
            "images",
            "upload",
            disk.to_str().unwrap(),
            "--name",
            "tiny-disk",
            "--arch",
            "x86_64",
        ])
        .unwrap();
    assert_eq!(v["format"], "qcow2", "{v}");
    let mut a = Agent::real(dir.path(), "img-real", ctl.mqtt_port, "real");
    a.start();
    ctl.wait_nodes_up(1);
    let v = ctl
        .cli(&[
            "instances",
            "create",
            "disk-1",
            "--image",
            "tiny-disk",
            "--memory",
            "256",
            "--disk",
            "1",
            "--wait",
            "--timeout",
            "120",
        ])
        .unwrap();
    assert_eq!(v["phase"], "running", "{v}");
    let console = a
        .state_dir
        .join("instances")
        .join(v["id"].as_str().unwrap())
        .join("console.log");
    wait_for(T, "the guest booted from the uploaded disk", || {
        std::fs::read_to_string(&console)
            .ok()
            .filter(|t| t.contains(GUEST_MARKER))
    });
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        text.contains("SYSLINUX"),
        "booted by the disk's own boot loader"
    );
    ctl.cli(&["instances", "delete", "disk-1", "--wait", "--timeout", "60"])
        .unwrap();
}

/// A download over a link that is cut, by an agent that is killed and restarted, from a
/// controller that restarts: it resumes each time from the bytes it has (HTTP Range), and
/// moves barely more than the image over the link.
#[test]
fn downloads_resume_after_a_cut_link_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    let api_port: u16 = ctl.api.rsplit(':').next().unwrap().parse().unwrap();
    let link = Link::new(api_port);
    ctl.args.extend([
        "--image-url".to_owned(),
        format!("http://127.0.0.1:{}", link.port),
    ]);
    ctl.start();
    let files = dir.path().join("guest");
    std::fs::create_dir_all(&files).unwrap();
    install_test_guest(&files);
    let kernel = files.join("vmlinuz");
    let size = std::fs::metadata(&kernel).unwrap().len();
    let sha = sha256(&kernel);
    ctl.cli(&[
        "images",
        "upload",
        kernel.to_str().unwrap(),
        "--name",
        "big-kernel",
    ])
    .unwrap();
    let mut a = Agent::fake(dir.path(), "img-cut", ctl.mqtt_port, 2048, "north");
    // About 7 s for the whole image: time to cut and restart along the way.
    downloads(&a, "max_download_rate = 2000000\nstall_timeout_secs = 2");
    a.start();
    ctl.wait_nodes_up(1);
    ctl.cli(&[
        "instances",
        "create",
        "cut-1",
        "--kernel",
        "big-kernel",
        "--memory",
        "64",
    ])
    .unwrap();
    let partial = a.state_dir.join("images/partial").join(&sha);
    let have = || std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    let past = |n: u64| {
        wait_for(T, &format!("{n} bytes downloaded"), || {
            (have() >= n).then_some(())
        });
    };
    // Progress is shown while it runs.
    let shown = wait_for(T, "download progress in instances show", || {
        let v = ctl.cli(&["instances", "show", "cut-1"]).ok()?;
        (v["phase"] == "downloading" && v["downloads"][0]["done"].as_u64()? > 0).then_some(v)
    });
    assert_eq!(shown["downloads"][0]["blob"], "big-kernel:1", "{shown}");
    assert_eq!(shown["downloads"][0]["total"], size, "{shown}");

    past(size / 5);
    link.cut();
    std::thread::sleep(Duration::from_secs(3));
    link.restore();
    past(size * 2 / 5);
    // The agent dies mid-transfer; the partial file is kept and resumed.
    a.proc().kill();
    let kept = have();
    assert!(kept > 0);
    a.start();
    past(kept + size / 10);
    // The controller restarts mid-transfer.
    ctl.proc.as_mut().unwrap().kill();
    ctl.start();
    let v = wait_for(T, "cut-1 running", || {
        let v = ctl.cli(&["instances", "show", "cut-1"]).ok()?;
        (v["phase"] == "running").then_some(v)
    });
    assert!(v["downloads"].as_array().is_none_or(Vec::is_empty), "{v}");
    let cached = a.state_dir.join("images/sha256").join(&sha);
    assert_eq!(sha256(&cached), sha);
    // Resumed, not restarted: the link carried the image, plus at most what the killed agent
    // had received but not yet written (its 256 KiB batch and 256 KiB write buffer) and the
    // requests' headers.
    let ratio = link.bytes() as f64 / size as f64;
    eprintln!("bytes over the link / image size: {ratio:.3}");
    assert!(link.bytes() <= size + (576 << 10), "{ratio}");
}

/// `outpost images prefetch` seeds the nodes a selector names, a few at a time, and `--wait`
/// returns once they all hold the image; other nodes are left alone.
#[test]
fn prefetch_seeds_the_selected_nodes_a_few_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let files = dir.path().join("guest");
    std::fs::create_dir_all(&files).unwrap();
    install_test_guest(&files);
    ctl.cli(&[
        "images",
        "upload",
        files.join("initrd.img").to_str().unwrap(),
        "--name",
        "seed",
    ])
    .unwrap();
    let mut agents: Vec<Agent> = [("pf-1", "north"), ("pf-2", "north"), ("pf-3", "south")]
        .into_iter()
        .map(|(n, z)| Agent::fake(dir.path(), n, ctl.mqtt_port, 1024, z))
        .collect();
    for a in &mut agents {
        a.start();
    }
    ctl.wait_nodes_up(3);
    let v = ctl
        .cli(&[
            "images",
            "prefetch",
            "seed",
            "--selector",
            "zone=north",
            "--concurrency",
            "1",
            "--wait",
            "--timeout",
            "60",
        ])
        .unwrap();
    let mut queued: Vec<&str> = v["queued"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    queued.sort_unstable();
    assert_eq!(queued, ["pf-1", "pf-2"], "{v}");
    let shown = wait_for(T, "both north nodes in the catalogue", || {
        let s = ctl.cli(&["images", "show", "seed"]).ok()?;
        (s["cached_on"].as_array()?.len() == 2).then_some(s)
    });
    assert!(!shown["cached_on"].to_string().contains("pf-3"), "{shown}");
    for a in &mut agents[..2] {
        assert!(a.proc().log_text().contains("image cached"));
    }
    assert!(!agents[2].proc().log_text().contains("downloading an image"));
    // Again: they hold it, nothing to fetch.
    let again = ctl
        .cli(&["images", "prefetch", "seed", "--selector", "zone=north"])
        .unwrap();
    assert_eq!(again["cached"].as_array().unwrap().len(), 2, "{again}");
    assert!(again["queued"].as_array().unwrap().is_empty(), "{again}");
}

//! Guest access on a real guest: cloud-init NoCloud (user-data, SSH keys and a host name given
//! at create reach it on a read-only volume labelled `cidata`, which its init mounts by label
//! and prints), and its address (a DHCP lease from a libvirt network, reported by its node and
//! shown by `instances list` and `show`).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outpost_tests::*;

const BOOT: Duration = Duration::from_secs(120);

#[test]
fn the_guest_reads_its_seed() {
    assert!(ensure_libvirtd(), "libvirtd could not be started");
    ensure_test_network();
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let mut a = Agent::real(dir.path(), "seed-1", ctl.mqtt_port, "real");
    install_seed_guest(&a.state_dir.join("images"));
    a.start();
    ctl.wait_nodes_up(1);
    let user_data = dir.path().join("user-data");
    std::fs::write(
        &user_data,
        "#cloud-config\nruncmd:\n  - echo hello from outpost\n",
    )
    .unwrap();
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f operator@laptop";
    let keyfile = dir.path().join("id.pub");
    std::fs::write(&keyfile, format!("# the operator's key\n{key}\n")).unwrap();

    // Bad input first: a key that does not parse, user-data over the limit.
    let bad = dir.path().join("bad.pub");
    std::fs::write(&bad, "ssh-ed25519 not-base64!\n").unwrap();
    let e = ctl
        .create("s-bad", &["--ssh-key", bad.to_str().unwrap()])
        .unwrap_err();
    assert!(e.contains("ssh key 1") && e.contains("base64"), "{e}");
    let big = dir.path().join("big");
    std::fs::write(&big, "x".repeat(70_000)).unwrap();
    let e = ctl
        .create("s-big", &["--user-data", big.to_str().unwrap()])
        .unwrap_err();
    assert!(e.contains("at most 65536"), "{e}");
    let binary = dir.path().join("binary");
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00]).unwrap();
    let e = ctl
        .create("s-bin", &["--user-data", binary.to_str().unwrap()])
        .unwrap_err();
    assert!(e.contains("not UTF-8"), "{e}");

    let v = ctl
        .cli(&[
            "instances",
            "create",
            "seeded",
            "--kernel",
            "vmlinuz",
            "--initrd",
            "initrd-seed.img",
            "--cmdline",
            "console=ttyS0 quiet",
            "--memory",
            "256",
            "--user-data",
            user_data.to_str().unwrap(),
            "--ssh-key",
            keyfile.to_str().unwrap(),
            "--hostname",
            "edge-web",
            "--network",
            TEST_NETWORK,
            "--wait",
            "--timeout",
            "120",
        ])
        .unwrap();
    assert_eq!(v["phase"], "running", "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let console = a.state_dir.join("instances").join(&id).join("console.log");
    let text = wait_for(BOOT, "the guest's seed lines", || {
        let t = std::fs::read_to_string(&console).ok()?;
        (t.contains("operator@laptop") || t.contains("SEED: none")).then_some(t)
    });
    let digest = sha256(&user_data);
    assert!(
        text.contains(&format!("SEED: user-data {digest}")),
        "{text}"
    );
    assert!(text.contains(key), "the key in meta-data: {text}");
    assert!(text.contains("local-hostname: edge-web"), "{text}");
    assert!(
        text.contains(&format!("instance-id: {id}-seed-1")),
        "{text}"
    );

    // Its address: the guest took a lease; its node reads it from libvirt and the controller
    // shows it.
    let deadline = std::time::Instant::now() + BOOT;
    let bound = loop {
        let t = std::fs::read_to_string(&console).unwrap_or_default();
        if let Some(ip) = t
            .split("NET: bound ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
        {
            break ip.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no DHCP lease in the guest: {t}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(bound.starts_with("192.168.177."), "{bound}");
    let shown = wait_for(Duration::from_secs(30), "the address shown", || {
        let v = ctl.cli(&["instances", "show", "seeded"]).ok()?;
        (v["ip"] == bound.as_str()).then_some(v)
    });
    let nic = &shown["addresses"][0];
    let mac = nic["mac"].as_str().unwrap();
    assert!(mac.starts_with("52:54:00:"), "{shown}");
    assert_eq!(nic["ips"][0], format!("{bound}/24"), "{shown}");
    let leases = virsh(&["net-dhcp-leases", TEST_NETWORK]);
    assert!(
        leases.contains(mac) && leases.contains(&bound),
        "libvirt's lease {leases}"
    );
    let list = ctl.cli_text(&["instances", "list"]).unwrap();
    let header = list.lines().next().unwrap();
    assert!(header.contains(" IP "), "{list}");
    assert!(
        list.lines()
            .any(|l| l.contains("seeded") && l.contains(&bound)),
        "{list}"
    );
    let show = ctl.cli_text(&["instances", "show", "seeded"]).unwrap();
    assert!(
        show.contains(&format!("interface   {mac}  {bound}/24")),
        "{show}"
    );

    let stored = ctl.data_dir.join("blobs/sha256").join(&digest);
    assert!(stored.exists(), "the user-data is a blob on the controller");
    ctl.cli(&["instances", "delete", "seeded", "--wait", "--timeout", "60"])
        .unwrap();
    // Deleted with its instance: nothing refers to it any more.
    wait_for(Duration::from_secs(10), "the seed's blobs removed", || {
        (!stored.exists()).then_some(())
    });
}

/// Refused creates leave none of their cloud-init parts behind (issue 29, item 11), an
/// accepted one keeps them while its instance lives, and its delete takes them away.
#[test]
fn refused_creates_leave_no_seed_parts_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let mut a = Agent::fake(dir.path(), "seed-gc", ctl.mqtt_port, 2048, "z");
    a.start();
    ctl.wait_nodes_up(1);
    let blobs = ctl.data_dir.join("blobs/sha256");
    let count = || std::fs::read_dir(&blobs).map_or(0, |d| d.count());
    for k in 0..20 {
        let ud = dir.path().join(format!("ud-{k}"));
        std::fs::write(&ud, format!("#cloud-config\n# {k}\n{}", "x".repeat(60_000))).unwrap();
        let e = ctl
            .create(
                &format!("gc-{k}"),
                &["--memory", "999999", "--user-data", ud.to_str().unwrap()],
            )
            .unwrap_err();
        assert!(e.contains("no host fits"), "{e}");
    }
    assert_eq!(
        count(),
        0,
        "a refused create's parts were left in the blob store"
    );
    let ud = dir.path().join("ud-ok");
    std::fs::write(&ud, "#cloud-config\nhostname: kept\n").unwrap();
    ctl.create(
        "gc-ok",
        &["--memory", "128", "--user-data", ud.to_str().unwrap()],
    )
    .unwrap();
    assert_eq!(count(), 1, "an accepted create keeps its part");
    // The same part refused for another instance is still the first one's.
    ctl.create(
        "gc-no",
        &["--memory", "999999", "--user-data", ud.to_str().unwrap()],
    )
    .unwrap_err();
    assert_eq!(count(), 1, "a part another instance refers to stays");
    ctl.cli(&["instances", "delete", "gc-ok"]).unwrap();
    wait_for(
        Duration::from_secs(60),
        "the deleted instance's part to go",
        || (count() == 0).then_some(()),
    );
}

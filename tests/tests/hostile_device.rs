//! A device can harm only itself. One device's credentials in an attacker's hands (here: a
//! client publishing on that node's own topics of a real mosquitto, as the broker's ACL lets
//! the device do), against a real controller with honest fake agents beside it: no message it
//! sends crashes or stalls the controller, creates or moves instances on other nodes, or
//! takes what is not its own.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use outpost_protocol::topics::Channel;
use outpost_protocol::*;
use outpost_tests::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// A fake agent with room for many small instances.
fn roomy(dir: &std::path::Path, node: &str, port: u16, zone: &str) -> Agent {
    Agent::fake_sized(dir, node, port, 8192, Some(64), zone)
}

/// A mosquitto, a controller on it and a roomy agent for each `(node, zone)`, all up.
fn fleet(dir: &std::path::Path, agents: &[(&str, &str)]) -> (Mosquitto, Controller, Vec<Agent>) {
    let broker = Mosquitto::start(dir);
    let mut ctl = Controller::external(dir, broker.port);
    ctl.start();
    let agents: Vec<Agent> = agents
        .iter()
        .map(|(node, zone)| {
            let mut a = roomy(dir, node, broker.port, zone);
            a.start();
            a
        })
        .collect();
    ctl.wait_nodes_up(agents.len());
    (broker, ctl, agents)
}

fn list(ctl: &Controller) -> Vec<Value> {
    ctl.cli(&["instances", "list"])
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// The fleet's desired state for `node`, as the broker keeps it.
fn desired_of(port: u16, node: &NodeId) -> DesiredState {
    retained_as(port, node, Channel::Desired)
}

fn forged_instance(id: u64, name: &str) -> DesiredInstance {
    let mut di = instance(id, kernel_boot("console=ttyS0 init=/evil"), 16);
    di.name = InstanceName::new(name).unwrap();
    di
}

fn holding(d: &DesiredState, instances: Vec<DesiredInstance>) -> Vec<u8> {
    Holding {
        held: Some(Version {
            fleet: d.fleet,
            generation: d.generation + 1000,
        }),
        instances: instances.into_iter().collect(),
    }
    .to_vec()
    .unwrap()
}

/// 32 instances fill a node; the 33rd is refused by the scheduler's instance filter, a
/// holding of 32 more is not adopted past the cap, and the controller lives on.
#[test]
fn the_instance_cap_is_a_filter_and_nothing_overflows() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, mut ctl, agents) = fleet(dir.path(), &[("cap-1", "cap")]);
    let a = &agents[0];
    let cap = outpost_protocol::limits::MAX_INSTANCES_PER_NODE;
    for k in 0..cap {
        ctl.create(&format!("c{k}"), &["--memory", "16"]).unwrap();
    }
    let refused = ctl.create("one-more", &["--memory", "16"]).unwrap_err();
    assert!(refused.contains("instances removed 1"), "{refused}");

    // The device hands over 32 instances the store never had, under this fleet's identity.
    let node = a.node.clone();
    let d = desired_of(broker.port, &node);
    assert_eq!(d.instances.len(), cap);
    let evil = TestController::connect(broker.port);
    let forged: Vec<DesiredInstance> = (0..cap as u64)
        .map(|k| forged_instance(0xbad0_0000 + k, &format!("forged-{k}")))
        .collect();
    evil.publish_raw(&node, Channel::Holding, holding(&d, forged), false);
    wait_for(T, "the adoptions refused", || {
        let ev = ctl.cli(&["events", "--node", "cap-1"]).ok()?;
        ev.as_array()?
            .iter()
            .any(|e| e["kind"] == "adoption-refused")
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let all = list(&ctl);
    assert_eq!(all.len(), cap, "nothing adopted past the cap");
    assert!(all.iter().all(|i| i["adopted"] != true));
    assert!(ctl.proc().is_running(), "the controller is alive");
    let nodes = ctl.cli(&["nodes", "list"]).unwrap();
    assert_eq!(nodes[0]["state"], "up");
    // And keeps placing elsewhere once there is room.
    ctl.cli(&["instances", "delete", "c0"]).unwrap();
    wait_for(T, "c0 gone", || {
        (!list(&ctl).iter().any(|i| i["name"] == "c0")).then_some(())
    });
    ctl.create("one-more", &["--memory", "16"]).unwrap();
}

/// What a device hands back as its own is adopted onto it alone: pinned there (a forged build
/// failure does not rebuild it on an honest node, a drain does not move it), never under a
/// name in use, never naming a blob the device does not hold, and marked adopted.
#[test]
fn adopted_instances_stay_on_the_device_that_held_them() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, mut ctl, agents) = fleet(dir.path(), &[("dev-1", "edge"), ("honest-1", "edge")]);
    let [dev, honest]: [Agent; 2] = agents.try_into().ok().unwrap();
    ctl.create("db-1", &["--selector", "zone=edge"]).unwrap();
    ctl.wait_phase("db-1", "running", T);
    let db1 = ctl.cli(&["instances", "show", "db-1"]).unwrap();

    let node = dev.node.clone();
    let d = desired_of(broker.port, &node);
    let evil = TestController::connect(broker.port);
    let x = forged_instance(0xbad1_0001, "web-1");
    let squat = forged_instance(0xbad1_0002, "db-1");
    let mut secret = forged_instance(0xbad1_0003, "thief");
    // Names a blob (say another instance's cloud-init seed) the device does not hold.
    secret.spec.boot = Boot::Disk {
        image: Image::Blob(BlobRef {
            digest: Digest([7; 32]),
            size: 1 << 20,
        }),
    };
    secret.spec.disk_gib = 1;
    evil.publish_raw(
        &node,
        Channel::Holding,
        holding(&d, vec![x.clone(), squat.clone(), secret]),
        false,
    );
    wait_for(T, "web-1 adopted", || {
        let v = ctl.cli(&["instances", "show", "web-1"]).ok()?;
        (v["adopted"] == true && v["node"] == "dev-1").then_some(())
    });
    let all = list(&ctl);
    let names: Vec<&str> = all.iter().filter_map(|i| i["name"].as_str()).collect();
    assert!(
        !names.contains(&"thief"),
        "a blob it does not hold: {names:?}"
    );
    let renamed = all
        .iter()
        .find(|i| i["id"] == squat.id.to_string().as_str())
        .expect("the squatter adopted under another name");
    assert_ne!(renamed["name"], "db-1");
    let db1_now = ctl.cli(&["instances", "show", "db-1"]).unwrap();
    assert_eq!(db1_now["id"], db1["id"], "the operator's db-1 is untouched");
    let text = ctl.cli_text(&["instances", "show", "web-1"]).unwrap();
    assert!(text.contains("adopted"), "{text}");

    // A forged build failure: it fails in place, nothing is rebuilt on the honest node.
    let failed = AgentEvent::Instance {
        id: x.id,
        generation: d.generation + 1001,
        state: InstanceState::Error(ErrorKind::Hypervisor),
        reason: Reason::lossy("forged: build failed"),
    };
    for _ in 0..5 {
        evil.publish_raw(&node, Channel::Event, failed.to_vec().unwrap(), false);
    }
    std::thread::sleep(Duration::from_secs(3));
    let v = ctl.cli(&["instances", "show", "web-1"]).unwrap();
    assert_eq!(v["node"], "dev-1", "{v}");
    // An operator's drain does not move it either: it is named as left behind.
    let drained = ctl.cli(&["nodes", "drain", "dev-1"]);
    let said = format!("{drained:?}");
    assert!(said.contains("pinned"), "{said}");
    std::thread::sleep(Duration::from_secs(2));
    let v = ctl.cli(&["instances", "show", "web-1"]).unwrap();
    assert_eq!(v["node"], "dev-1", "{v}");
    for id in [x.id, squat.id] {
        assert_eq!(
            honest.ops("create", Some(&id.to_string())),
            0,
            "{id} built on the honest node"
        );
    }
    assert!(ctl.proc().is_running());
}

/// A removed node is not brought back by what the broker kept of it: its retained topics are
/// cleared, and after a controller restart it is still gone. Only its agent connecting anew
/// (provisioned again) brings it back.
#[test]
fn a_removed_node_stays_removed_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, mut ctl, agents) = fleet(dir.path(), &[("gone-1", "edge"), ("stays-1", "edge")]);
    let [mut gone, _stays]: [Agent; 2] = agents.try_into().ok().unwrap();
    // Revoked: its agent is stopped for good (it could not log in again).
    gone.proc().kill();
    let node = gone.node.clone();
    // Its Last Will and retained status, inventory and addresses are on the broker.
    ctl.cli(&["nodes", "remove", "gone-1"]).unwrap();
    wait_for(T, "its retained topics cleared", || {
        [Channel::Status, Channel::Inventory, Channel::Desired]
            .into_iter()
            .all(|ch| retained(broker.port, &node, ch, Duration::from_millis(500)).is_none())
            .then_some(())
    });
    let ids = |ctl: &Controller| -> Vec<String> {
        ctl.cli(&["nodes", "list"])
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|n| n["id"].as_str().map(str::to_owned))
            .collect()
    };
    for _ in 0..2 {
        ctl.proc().kill();
        ctl.start();
        ctl.wait_nodes_up(1);
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(ids(&ctl), vec!["stays-1".to_owned()], "gone-1 came back");
    }
    // A message it kept publishing (an old process, a replay) does not bring it back either.
    let evil = TestController::connect(broker.port);
    let inv = ctl.cli(&["nodes", "show", "stays-1"]).unwrap();
    assert!(inv.is_object());
    evil.publish_raw(
        &node,
        Channel::Report,
        NodeReport::default().to_vec().unwrap(),
        false,
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(ids(&ctl), vec!["stays-1".to_owned()]);
    // Provisioned again, its agent connects anew: it is a node again.
    gone.start();
    wait_for(T, "gone-1 admitted again", || {
        ids(&ctl).contains(&"gone-1".to_owned()).then_some(())
    });
    ctl.wait_nodes_up(2);
}

/// A device flooding its topics as fast as it can: it is held to its rate, the honest node
/// stays up and keeps taking placements, the controller's memory stays bounded, and the
/// device's node says why its messages are dropped.
#[test]
fn a_flooding_device_is_held_to_its_share() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, mut ctl, agents) =
        fleet(dir.path(), &[("flood-1", "edge"), ("honest-2", "honest")]);
    let [dev, _honest]: [Agent; 2] = agents.try_into().ok().unwrap();
    let rss = |ctl: &mut Controller| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", ctl.proc().pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let before = rss(&mut ctl);
    let node = dev.node.clone();
    let evil = TestController::connect(broker.port);
    // Progress of made-up downloads (each a new digest), notices and garbage, for 10 s.
    let started = Instant::now();
    let mut sent = 0u64;
    let mut placed = 0;
    while started.elapsed() < Duration::from_secs(10) {
        for k in 0..500u64 {
            let mut d = [0u8; 32];
            d[..8].copy_from_slice(&(sent + k).to_le_bytes());
            let ev = AgentEvent::Fetch {
                digest: Digest(d),
                done: 1,
                total: 2,
                rate: 1,
                state: FetchState::Running,
                reason: Reason::lossy("x".repeat(150).as_str()),
            };
            evil.publish_raw(&node, Channel::Event, ev.to_vec().unwrap(), false);
        }
        sent += 500;
        if placed < 3 && started.elapsed() > Duration::from_secs(2 + 2 * placed) {
            ctl.create(&format!("h{placed}"), &["--selector", "zone=honest"])
                .unwrap();
            placed += 1;
        }
        let nodes = ctl.cli(&["nodes", "show", "honest-2"]).unwrap();
        assert_eq!(
            nodes["state"], "up",
            "the honest node went {}",
            nodes["state"]
        );
    }
    let after = rss(&mut ctl);
    eprintln!("flood: {sent} messages in 10 s; controller RSS {before} kB -> {after} kB");
    assert!(
        after < before + 64 * 1024,
        "controller memory grew from {before} kB to {after} kB"
    );
    let m = scrape(&format!("{}/metrics", ctl.api), None).unwrap();
    let dropped = m.value("outpost_mqtt_messages_dropped_total", &[("reason", "rate")]);
    assert!(dropped > 0.0, "nothing dropped of {sent}");
    wait_for(T, "the flooding notice", || {
        let v = ctl.cli(&["nodes", "show", "flood-1"]).ok()?;
        v["notice"]
            .as_str()
            .is_some_and(|n| n.contains("flooding"))
            .then_some(())
    });
    for k in 0..placed {
        ctl.wait_phase(&format!("h{k}"), "running", T);
    }
    assert!(ctl.proc().is_running());
}

/// A qcow2 image whose header names another file (a backing file, an external data file) is
/// refused on both paths: by the controller at upload (400), and by the agent before any use
/// (an image already on the node), on the real libvirtd. No domain is ever defined on it, so no
/// guest ever reads the 0600 decoy it points at.
#[test]
fn qcow2_images_naming_host_files_are_refused_on_both_paths() {
    assert!(ensure_libvirtd(), "libvirtd could not be started");
    let dir = tempfile::tempdir().unwrap();
    let decoy = dir.path().join("decoy");
    std::fs::write(&decoy, vec![0x5a; 1 << 20]).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&decoy, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let qemu_img = |args: &[&str]| {
        let st = std::process::Command::new("qemu-img")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img {args:?}");
    };
    let backing = dir.path().join("backing.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        decoy.to_str().unwrap(),
        backing.to_str().unwrap(),
        "1G",
    ]);
    // An external data file: the incompatible feature bit 2 of a plain image's header.
    let data = dir.path().join("data.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", data.to_str().unwrap(), "1G"]);
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[79] |= 1 << 2;
    std::fs::write(&data, &bytes).unwrap();

    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    for (file, why) in [(&backing, "backing file"), (&data, "external data file")] {
        let e = ctl
            .cli(&["images", "upload", file.to_str().unwrap(), "--name", "evil"])
            .unwrap_err();
        assert!(e.contains(why) && e.contains("400"), "{e}");
    }
    assert_eq!(
        ctl.cli(&["images", "list"])
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // Already in a node's image directory (copied there, or fetched from a URL).
    let mut a = Agent::real(dir.path(), "qcow-real", ctl.mqtt_port, "real");
    for f in [&backing, &data] {
        std::fs::copy(f, a.state_dir.join("images").join(f.file_name().unwrap())).unwrap();
    }
    a.start();
    ctl.wait_nodes_up(1);
    for (name, file, why) in [
        ("evil-1", "backing.qcow2", "backing file"),
        ("evil-2", "data.qcow2", "external data file"),
    ] {
        let v = ctl
            .cli(&[
                "instances",
                "create",
                name,
                "--image",
                file,
                "--memory",
                "256",
                "--disk",
                "1",
            ])
            .unwrap();
        let id = v["id"].as_str().unwrap().to_owned();
        wait_for(T, &format!("{name} refused by the agent"), || {
            let log = a.proc().log_text();
            log.contains(why).then_some(())
        });
        let domains = virsh(&["list", "--all", "--name"]);
        assert!(!domains.contains(&id), "{name} was defined: {domains}");
    }
}

/// A device claiming far more than it has (to draw every placement and their cloud-init
/// secrets) counts only up to its ceiling (its first report) until an operator approves.
#[test]
fn capacity_claims_above_the_ceiling_wait_for_an_operator() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, ctl, agents) = fleet(dir.path(), &[("liar-1", "edge"), ("honest-3", "edge")]);
    let [dev, _honest]: [Agent; 2] = agents.try_into().ok().unwrap();
    let node = dev.node.clone();
    let vcpus = |ctl: &Controller| {
        ctl.cli(&["nodes", "show", "liar-1"]).unwrap()["allocatable"]["vcpus"]
            .as_u64()
            .unwrap()
    };
    let honest_vcpus = vcpus(&ctl);
    let inv: Inventory = retained_as(broker.port, &node, Channel::Inventory);
    let mut lie = inv.clone();
    lie.total.vcpus = u16::MAX;
    lie.total.memory_mib = u32::MAX;
    let evil = TestController::connect(broker.port);
    evil.publish_raw(&node, Channel::Inventory, lie.to_vec().unwrap(), false);
    wait_for(T, "the capacity notice", || {
        let v = ctl.cli(&["nodes", "show", "liar-1"]).ok()?;
        v["notice"]
            .as_str()
            .is_some_and(|n| n.contains("above its ceiling"))
            .then_some(())
    });
    assert_eq!(vcpus(&ctl), honest_vcpus, "clamped to its ceiling");
    // Placements spread by room as before: the liar does not draw them all.
    for k in 0..6 {
        ctl.create(
            &format!("p{k}"),
            &["--selector", "zone=edge", "--memory", "512"],
        )
        .unwrap();
    }
    let on_honest = list(&ctl)
        .iter()
        .filter(|i| i["node"] == "honest-3")
        .count();
    assert!(on_honest >= 2, "only {on_honest} of 6 on the honest node");
    let ev = ctl.cli(&["events", "--node", "liar-1"]).unwrap();
    assert!(
        ev.as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "capacity-above-ceiling"),
        "{ev}"
    );
    // The operator's word makes it count.
    ctl.cli(&["nodes", "approve-capacity", "liar-1"]).unwrap();
    assert_eq!(vcpus(&ctl), u64::from(u16::MAX));
    // Nothing left to approve: said so.
    let e = ctl
        .cli(&["nodes", "approve-capacity", "liar-1"])
        .unwrap_err();
    assert!(e.contains("nothing to approve"), "{e}");
}

/// A device enrolled with a capacity (`outpost-provision device --max-*`) counts only up to
/// it from its very first report, whatever that report says.
#[test]
fn an_enrolled_capacity_holds_from_the_first_report() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("registry");
    let broker = Mosquitto::start(dir.path());
    let out = std::process::Command::new(bin("outpost-provision"))
        .args(["device", "small-1", "--registry"])
        .arg(&reg)
        .args(["--broker", &format!("mqtt://127.0.0.1:{}", broker.port)])
        .args(["--max-vcpus", "2", "--max-memory", "1024"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("capacity limit"),
        "the tool says where the limit is kept"
    );
    let mut ctl = Controller::external(dir.path(), broker.port);
    ctl.args
        .extend(["--registry".into(), reg.display().to_string()]);
    ctl.start();
    // The device says it has 64 vCPUs and 8 GiB.
    let mut dev = roomy(dir.path(), "small-1", broker.port, "edge");
    dev.start();
    ctl.wait_nodes_up(1);
    let n = wait_for(T, "the enrolled ceiling", || {
        let n = ctl.cli(&["nodes", "show", "small-1"]).ok()?;
        n["notice"]
            .as_str()
            .is_some_and(|x| x.contains("above its ceiling"))
            .then_some(n)
    });
    assert_eq!(n["allocatable"]["vcpus"], 2, "{n}");
    assert_eq!(n["allocatable"]["memory_mib"], 1024, "{n}");
    let e = ctl
        .create("big", &["--memory", "2048", "--selector", "zone=edge"])
        .unwrap_err();
    assert!(e.contains("memory removed 1"), "{e}");
    ctl.create("fits", &["--memory", "512", "--selector", "zone=edge"])
        .unwrap();
}

//! Provisioning end to end: device identities and secrets from `outpost-provision`, a real
//! mosquitto locked down with the generated password file and ACL, an agent installed into a
//! target root and started from that tree with its flashed config, and a second device that
//! cannot touch the first one's topics.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost_firmware_config::flash;
use outpost_protocol::topics::{self, Channel};
use outpost_protocol::*;
use outpost_tests::*;
use rumqttc::{Client, ConnectReturnCode, Event, MqttOptions, Packet, QoS};

const T: Duration = Duration::from_secs(20);

fn provision(args: &[&str]) -> String {
    let out = Command::new(bin("outpost-provision"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "outpost-provision {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Connects as `user` and returns the CONNACK code, and the client if accepted.
fn connect(
    port: u16,
    user: &str,
    pass: &str,
) -> (ConnectReturnCode, Option<(Client, rumqttc::Connection)>) {
    connect_as(port, &format!("probe-{user}-{}", free_port()), user, pass)
}

/// Connects with this client id.
fn connect_as(
    port: u16,
    client_id: &str,
    user: &str,
    pass: &str,
) -> (ConnectReturnCode, Option<(Client, rumqttc::Connection)>) {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_credentials(user, pass);
    let (client, mut conn) = Client::new(o, 16);
    for ev in conn.iter() {
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(a))) => {
                let code = a.code;
                return (
                    code,
                    (code == ConnectReturnCode::Success).then_some((client, conn)),
                );
            }
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return (code, None),
            Err(e) => panic!("unexpected: {e}"),
            Ok(_) => {}
        }
    }
    unreachable!()
}

#[test]
fn provisioned_devices_are_confined_to_their_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    // mosquitto runs as its own user, as Debian ships it: it must reach the registry.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let reg = dir.path().join("registry");
    let reg_s = reg.to_str().unwrap();
    let port = free_port();
    let broker_url = format!("mqtt://127.0.0.1:{port}");
    let root = dir.path().join("sdcard");
    std::fs::create_dir_all(&root).unwrap();
    let state = root.join("var/lib/outpost");

    let ctl_out = provision(&["controller", "--registry", reg_s]);
    let ctl_pass = ctl_out
        .lines()
        .find_map(|l| l.strip_prefix("password "))
        .unwrap()
        .to_owned();
    provision(&[
        "device",
        "edge-p1",
        "--registry",
        reg_s,
        "--broker",
        &broker_url,
        "--label",
        "zone=north",
        "--reserve-memory",
        "256",
        "--state-dir",
        state.to_str().unwrap(),
        "--libvirt-uri",
        "test:///default",
    ]);
    provision(&[
        "device",
        "edge-p2",
        "--registry",
        reg_s,
        "--broker",
        &broker_url,
    ]);
    // The same identity is not silently replaced.
    let again = Command::new(bin("outpost-provision"))
        .args([
            "device",
            "edge-p1",
            "--registry",
            reg_s,
            "--broker",
            &broker_url,
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

    let dev1 = reg.join("devices/edge-p1/device.bin");
    assert_eq!(mode(&dev1), 0o600);
    // Readable by mosquitto's group and nobody else.
    let passwd = reg.join("mosquitto/passwd");
    assert_eq!(mode(&passwd), 0o640);
    let group = Command::new("stat")
        .args(["-c", "%U:%G"])
        .arg(&passwd)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&group.stdout).trim(),
        "root:mosquitto"
    );
    let inspected = provision(&["inspect", dev1.to_str().unwrap()]);
    assert!(
        inspected.contains("CRC-32 ok") && inspected.contains("node_id      edge-p1"),
        "{inspected}"
    );
    assert!(inspected.contains("label        zone=north"));
    let secret1 = flash::decode(&std::fs::read(&dev1).unwrap())
        .unwrap()
        .password
        .unwrap()
        .expose()
        .to_owned();
    assert!(
        !inspected.contains(&secret1),
        "inspect must mask the secret"
    );
    let secret2 = flash::decode(&std::fs::read(reg.join("devices/edge-p2/device.bin")).unwrap())
        .unwrap()
        .password
        .unwrap()
        .expose()
        .to_owned();
    assert_ne!(secret1, secret2, "each device has its own secret");

    // mosquitto with the generated configuration: no anonymous access.
    let conf = provision(&[
        "mosquitto-conf",
        "--registry",
        reg_s,
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]);
    assert!(conf.contains("use_username_as_clientid true"), "{conf}");
    let broker = Mosquitto::start_as_debian(dir.path(), port, &conf);

    // Install onto the "SD card" and start the agent from that tree.
    let out = provision(&[
        "install",
        "--root",
        root.to_str().unwrap(),
        "--device",
        dev1.to_str().unwrap(),
        "--agent-bin",
        bin("outpost-agent").to_str().unwrap(),
    ]);
    assert!(out.contains("installed device edge-p1"), "{out}");
    assert_eq!(mode(&root.join("usr/local/bin/outpost-agent")), 0o755);
    assert_eq!(mode(&root.join("etc/outpost/device.bin")), 0o600);
    assert_eq!(
        mode(&root.join("etc/systemd/system/outpost-agent.service")),
        0o644
    );
    assert!(
        root.join("etc/systemd/system/multi-user.target.wants/outpost-agent.service")
            .is_symlink()
    );
    // Another device's identity is not installed over it without --force.
    let over = Command::new(bin("outpost-provision"))
        .args(["install", "--root", root.to_str().unwrap(), "--device"])
        .arg(reg.join("devices/edge-p2/device.bin"))
        .arg("--agent-bin")
        .arg(bin("outpost-agent"))
        .output()
        .unwrap();
    assert!(!over.status.success());

    // Start the agent exactly as the installed unit does: its ExecStart, with every absolute
    // path taken inside the installed root.
    let unit =
        std::fs::read_to_string(root.join("etc/systemd/system/outpost-agent.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart");
    let mut words = exec.split_whitespace().map(|w| {
        w.strip_prefix('/')
            .map_or_else(|| std::path::PathBuf::from(w), |rel| root.join(rel))
    });
    let mut cmd = Command::new(words.next().unwrap());
    cmd.args(words);
    let mut agent = Proc::spawn(cmd, dir.path().join("agent.log"));
    // Where systemd is available, the unit is checked too.
    if let Ok(out) = Command::new("systemd-analyze")
        .arg("verify")
        .arg(root.join("etc/systemd/system/outpost-agent.service"))
        .output()
    {
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(
            !text.contains("Failed to parse") && !text.contains("Unknown key"),
            "{text}"
        );
    }

    let ctl = TestController::connect_as(port, Some(("outpost-controller", &ctl_pass)));
    let node = NodeId::new("edge-p1").unwrap();
    ctl.wait(T, "the provisioned agent online", |s| {
        s.status_of(&node)
            .filter(|st| st.presence == Presence::Online)
    });
    let inv = ctl.wait(T, "its inventory", |s| s.inventory_of(&node));
    assert_eq!(inv.reserved.memory_mib, 256);
    assert_eq!(inv.labels[0].to_string(), "zone=north");

    // Wrong password: refused.
    let (code, _) = connect(port, "edge-p1", "wrong-password");
    assert_ne!(code, ConnectReturnCode::Success);

    // Device 2 with its own password but device 1's client id does not take over device 1's
    // session: mosquitto uses the username as the client id.
    let (code, thief) = connect_as(port, "edge-p1", "edge-p2", &secret2);
    assert_eq!(code, ConnectReturnCode::Success);
    holds_for(Duration::from_secs(1), "device 1 staying connected", || {
        ctl.seen().status_of(&node).map(|s| s.presence) == Some(Presence::Online)
    });
    drop(thief);
    assert!(
        !broker.proc.log_text().contains("edge-p1 already connected"),
        "{}",
        broker.proc.log_text()
    );

    // Device 2 with its own valid credentials cannot read or write device 1's topics.
    let (code, c2) = connect(port, "edge-p2", &secret2);
    assert_eq!(code, ConnectReturnCode::Success);
    let (client2, mut conn2) = c2.unwrap();
    let theirs = topics::topic(&node, Channel::Desired).to_string();
    client2.subscribe(&theirs, QoS::AtLeastOnce).unwrap();
    let spoof = NodeStatus {
        presence: Presence::Offline,
        session: u64::MAX,
        boot: Default::default(),
    }
    .to_vec()
    .unwrap();
    client2
        .publish(
            topics::topic(&node, Channel::Status).as_str(),
            QoS::AtLeastOnce,
            true,
            spoof,
        )
        .unwrap();
    // Its own topic works.
    let mine = topics::topic(&NodeId::new("edge-p2").unwrap(), Channel::Status).to_string();
    let own = NodeStatus {
        presence: Presence::Online,
        session: 1,
        boot: Default::default(),
    }
    .to_vec()
    .unwrap();
    client2.publish(&mine, QoS::AtLeastOnce, true, own).unwrap();
    // The controller publishes device 1's desired state; device 2 must not receive it.
    ctl.publish_desired(
        &node,
        &DesiredState {
            generation: 1,
            ..Default::default()
        },
    );
    // (mosquitto 2.0 acknowledges a denied MQTT 3.1.1 subscription but delivers nothing on it.)
    let mut subacked = false;
    let end = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < end {
        match conn2.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::SubAck(a)))) => {
                subacked = true;
                eprintln!("suback for device 1's topic: {:?}", a.return_codes);
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => panic!("device 2 received {}", p.topic),
            _ => {}
        }
    }
    assert!(subacked);
    let p2 = NodeId::new("edge-p2").unwrap();
    ctl.wait(T, "device 2's own status", |s| s.status_of(&p2));
    let st = ctl.seen().status_of(&node).unwrap();
    assert_eq!(
        st.presence,
        Presence::Online,
        "device 2 could not mark device 1 offline"
    );
    assert_ne!(st.session, u64::MAX);
    assert!(agent.alive());
}

/// The embedded broker with the gate: the same per-device rules without mosquitto.
#[test]
fn embedded_broker_gate_confines_devices_too() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("registry");
    let reg_s = reg.to_str().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    let port = ctl.mqtt_port;
    ctl.args.extend([
        "--mqtt-passwd".to_owned(),
        reg.join("mosquitto/passwd").display().to_string(),
    ]);
    let url = format!("mqtt://127.0.0.1:{port}");
    let state = dir.path().join("g1-state");
    provision(&[
        "device",
        "edge-g1",
        "--registry",
        reg_s,
        "--broker",
        &url,
        "--state-dir",
        state.to_str().unwrap(),
        "--libvirt-uri",
        "test:///default",
    ]);
    provision(&["device", "edge-g2", "--registry", reg_s, "--broker", &url]);
    ctl.start();
    let mut cmd = Command::new(bin("outpost-agent"));
    cmd.arg("--config")
        .arg(reg.join("devices/edge-g1/device.bin"));
    let mut agent = Proc::spawn(cmd, dir.path().join("g1.log"));
    ctl.wait_nodes_up(1);
    assert_eq!(ctl.cli(&["nodes", "list"]).unwrap()[0]["id"], "edge-g1");

    // Anonymous, wrong password, or someone else's client id: refused.
    let secret2 = flash::decode(&std::fs::read(reg.join("devices/edge-g2/device.bin")).unwrap())
        .unwrap()
        .password
        .unwrap()
        .expose()
        .to_owned();
    assert_ne!(
        connect(port, "edge-g1", "wrong").0,
        ConnectReturnCode::Success
    );
    assert_ne!(
        connect_as(port, "edge-g1", "edge-g2", &secret2).0,
        ConnectReturnCode::Success
    );

    // Device 2, properly logged in, publishes on device 1's status topic: cut off at once.
    let (code, c2) = connect_as(port, "edge-g2", "edge-g2", &secret2);
    assert_eq!(code, ConnectReturnCode::Success);
    let (client2, mut conn2) = c2.unwrap();
    let g1 = NodeId::new("edge-g1").unwrap();
    let spoof = NodeStatus {
        presence: Presence::Offline,
        session: u64::MAX,
        boot: Default::default(),
    }
    .to_vec()
    .unwrap();
    client2
        .publish(
            topics::topic(&g1, Channel::Status).as_str(),
            QoS::AtLeastOnce,
            true,
            spoof,
        )
        .unwrap();
    let closed = wait_for(T, "the gate to close device 2's connection", || match conn2
        .recv_timeout(Duration::from_millis(200))
    {
        Ok(Err(_)) | Err(rumqttc::RecvTimeoutError::Disconnected) => Some(true),
        _ => None,
    });
    assert!(closed);
    holds_for(
        Duration::from_secs(2),
        "the spoofed offline status never reaching the controller",
        || ctl.cli(&["nodes", "show", "edge-g1"]).unwrap()["state"] == "up",
    );
    let log = ctl.proc().log_text();
    assert!(log.contains("outside its own topics"), "{log}");
    assert!(log.contains("wrong username or password"));
    assert!(agent.alive());

    // The broker's internal port is no side door: neither anonymous nor a device's own valid
    // credentials get in there (only the gate's per-start secret does).
    let internal: u16 = log
        .lines()
        .find(|l| l.contains("internal port"))
        .and_then(|l| l.split("internal=127.0.0.1:").nth(1))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("the controller logs its internal port");
    let secret1 = flash::decode(&std::fs::read(reg.join("devices/edge-g1/device.bin")).unwrap())
        .unwrap()
        .password
        .unwrap()
        .expose()
        .to_owned();
    let refused = |login: Option<(&str, &str)>| {
        let mut o = MqttOptions::new("edge-g1", "127.0.0.1", internal);
        o.set_keep_alive(Duration::from_secs(5));
        if let Some((u, p)) = login {
            o.set_credentials(u, p);
        }
        let (_c, mut conn) = Client::new(o, 4);
        conn.iter().find_map(|ev| match ev {
            Ok(Event::Incoming(Packet::ConnAck(a))) => Some(a.code != ConnectReturnCode::Success),
            Err(_) => Some(true),
            Ok(_) => None,
        })
    };
    assert_eq!(refused(None), Some(true), "anonymous on the internal port");
    assert_eq!(
        refused(Some(("edge-g1", &secret1))),
        Some(true),
        "a device's own password on the internal port"
    );

    // Sockets that never send CONNECT do not lock devices out, and are closed after the
    // deadline.
    let idle: Vec<std::net::TcpStream> = (0..150)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert_eq!(
        connect_as(port, "edge-g2", "edge-g2", &secret2).0,
        ConnectReturnCode::Success,
        "a device gets in past 150 idle sockets"
    );
    assert!(ctl.cli(&["nodes", "list"]).is_ok(), "the API answers");
    let mut first = idle.into_iter().next().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut b = [0u8; 1];
    let t = std::time::Instant::now();
    let n = std::io::Read::read(&mut first, &mut b).unwrap_or(0);
    assert_eq!(n, 0, "an idle socket is closed");
    assert!(t.elapsed() < Duration::from_secs(15));
}

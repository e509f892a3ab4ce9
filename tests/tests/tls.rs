//! The agent speaks MQTT over TLS to a real mosquitto: it verifies the broker against the
//! configured CA and presents its client certificate; a broker signed by another CA is refused.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outpost_protocol::*;
use outpost_tests::*;

#[test]
fn agent_connects_over_mutual_tls_and_refuses_an_unknown_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let rogue = dir.path().join("rogue");
    std::fs::create_dir_all(&pki).unwrap();
    std::fs::create_dir_all(&rogue).unwrap();
    make_pki(&pki, "Outpost Test CA");
    make_pki(&rogue, "Rogue CA");

    let tls_port = free_port();
    let broker = Mosquitto::start_with(
        dir.path(),
        free_port(),
        &format!(
            "listener {tls_port} 127.0.0.1\ncafile {p}/ca.pem\ncertfile {p}/server.pem\nkeyfile {p}/server.key\nrequire_certificate true\n",
            p = pki.display()
        ),
    );
    // The test controller uses the plain loopback listener.
    let ctl = TestController::connect(broker.port);

    let tls_conf = |ca: &std::path::Path| {
        format!(
            "ca_file = \"{}/ca.pem\"\nclient_cert_file = \"{p}/client.pem\"\nclient_key_file = \"{p}/client.key\"\n[hypervisor]\nbackend = \"fake\"\n",
            ca.display(),
            p = pki.display()
        )
    };
    let mut good = Agent::configure(dir.path(), "edge-tls", 0, &tls_conf(&pki));
    let mut bad = Agent::configure(dir.path(), "edge-rogue", 0, &tls_conf(&rogue));
    for a in [&good, &bad] {
        let text = std::fs::read_to_string(&a.config).unwrap().replace(
            "mqtt://127.0.0.1:0",
            &format!("mqtts://localhost:{tls_port}"),
        );
        std::fs::write(&a.config, text).unwrap();
    }
    good.start();
    bad.start();

    let node = good.node.clone();
    let st = ctl.wait(Duration::from_secs(20), "the TLS agent online", |s| {
        s.status_of(&node)
    });
    assert_eq!(st.presence, Presence::Online);
    ctl.wait(Duration::from_secs(20), "its inventory", |s| {
        s.inventory_of(&node)
    });

    // The controller speaks mutual TLS to the same listener and sees the node.
    let mut ctl_tls = Controller::external(dir.path(), tls_port);
    ctl_tls.args = vec![
        "--broker".into(),
        format!("mqtts://localhost:{tls_port}"),
        "--broker-ca-file".into(),
        pki.join("ca.pem").display().to_string(),
        "--broker-cert".into(),
        pki.join("client.pem").display().to_string(),
        "--broker-key".into(),
        pki.join("client.key").display().to_string(),
    ];
    ctl_tls.start();
    ctl_tls.wait_nodes_up(1);

    // The agent that trusts another CA never gets in, and says why.
    let rogue_node = bad.node.clone();
    let log = wait_for(
        Duration::from_secs(20),
        "a certificate error in the log",
        || {
            let l = bad.proc().log_text();
            l.contains("broker unreachable").then_some(l)
        },
    );
    assert!(
        log.to_lowercase().contains("certificate") || log.contains("Tls"),
        "{log}"
    );
    assert!(ctl.seen().status_of(&rogue_node).is_none());
    assert!(bad.proc().alive());
}

//! The API over TLS with a test CA: the CLI verifies the server (`--ca-file`), a wrong or
//! missing CA is a clear error naming the server, a rotated certificate is used by the next
//! handshake without a restart, and mutual TLS refuses a client without a certificate.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use outpost_tests::*;

struct TlsController {
    api: String,
    _proc: Proc,
}

fn start(
    dir: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    extra: &[&str],
) -> TlsController {
    let port = free_port();
    let mut cmd = Command::new(bin("outpost-controller"));
    cmd.args(["serve", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--mqtt-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--api-listen", &format!("127.0.0.1:{port}")])
        .arg("--api-tls-cert")
        .arg(cert)
        .arg("--api-tls-key")
        .arg(key)
        .args(extra);
    TlsController {
        api: format!("https://127.0.0.1:{port}"),
        _proc: Proc::spawn(cmd, dir.join("controller.log")),
    }
}

fn cli(api: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("outpost"))
        .args(["--api", api])
        .args(args)
        .args(["nodes", "list"])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_verifies_the_api_and_certificates_rotate() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for (d, name) in [(&a, "Outpost Test CA A"), (&b, "Outpost Test CA B")] {
        std::fs::create_dir_all(d).unwrap();
        make_pki(d, name);
    }
    // The controller reads these two files; the test replaces them to rotate.
    let (cert, key) = (dir.path().join("api.pem"), dir.path().join("api.key"));
    std::fs::copy(a.join("server.pem"), &cert).unwrap();
    std::fs::copy(a.join("server.key"), &key).unwrap();
    let ctl = start(dir.path(), &cert, &key, &[]);
    let ca_a = a.join("ca.pem").display().to_string();
    let ca_b = b.join("ca.pem").display().to_string();
    wait_for(Duration::from_secs(30), "the API over TLS", || {
        cli(&ctl.api, &["--ca-file", &ca_a]).0.then_some(())
    });
    // No CA given: the Mozilla roots do not know the test CA; a wrong CA: refused, naming the
    // server.
    for args in [vec![], vec!["--ca-file", ca_b.as_str()]] {
        let (ok, err) = cli(&ctl.api, &args);
        assert!(!ok, "{args:?}");
        assert!(
            err.contains(&format!("cannot reach the controller at {}", ctl.api))
                && err.contains("--ca-file"),
            "{err}"
        );
        assert!(
            err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"),
            "{err}"
        );
    }
    // Plain HTTP to the TLS port does not get an answer.
    let (ok, _) = cli(&ctl.api.replace("https://", "http://"), &[]);
    assert!(!ok);

    // Rotation: the files are replaced by a certificate of CA B; the next handshake uses it.
    std::fs::copy(b.join("server.key"), &key).unwrap();
    std::fs::copy(b.join("server.pem"), &cert).unwrap();
    wait_for(Duration::from_secs(15), "the rotated certificate", || {
        cli(&ctl.api, &["--ca-file", &ca_b]).0.then_some(())
    });
    assert!(
        !cli(&ctl.api, &["--ca-file", &ca_a]).0,
        "the old certificate is no longer served"
    );
}

#[test]
fn mutual_tls_refuses_a_client_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path(), "Outpost Test CA");
    let p = |f: &str| dir.path().join(f).display().to_string();
    let ctl = start(
        dir.path(),
        &dir.path().join("server.pem"),
        &dir.path().join("server.key"),
        &["--api-client-ca", &p("ca.pem")],
    );
    let with = [
        "--ca-file",
        &p("ca.pem"),
        "--client-cert",
        &p("client.pem"),
        "--client-key",
        &p("client.key"),
    ];
    wait_for(
        Duration::from_secs(30),
        "the API with a client certificate",
        || cli(&ctl.api, &with).0.then_some(()),
    );
    let (ok, err) = cli(&ctl.api, &["--ca-file", &p("ca.pem")]);
    assert!(!ok, "no client certificate: refused");
    assert!(err.contains("cannot reach the controller"), "{err}");
    // Off loopback, TLS satisfies the rule (with a token).
    let token = dir.path().join("token");
    std::fs::write(&token, "tls-token\n").unwrap();
    let port = free_port();
    let mut cmd = Command::new(bin("outpost-controller"));
    cmd.args(["serve", "--data-dir"])
        .arg(dir.path().join("data2"))
        .args(["--mqtt-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--api-listen", &format!("0.0.0.0:{port}")])
        .arg("--api-tls-cert")
        .arg(p("server.pem"))
        .arg("--api-tls-key")
        .arg(p("server.key"))
        .arg("--api-token-file")
        .arg(&token);
    let _open = Proc::spawn(cmd, dir.path().join("open.log"));
    let api = format!("https://127.0.0.1:{port}");
    wait_for(
        Duration::from_secs(30),
        "the API off loopback over TLS",
        || {
            cli(&api, &["--ca-file", &p("ca.pem"), "--token", "tls-token"])
                .0
                .then_some(())
        },
    );
}

//! The API's edge under a flood (issue 29, item 10): at a 160-file limit, 200 idle and 200
//! half-sent connections do not keep an operator's request from an answer, and are closed by
//! the header timeout; 400 stalled blob downloads hold two transfers of the node's, not 400,
//! and the controller's memory stays flat (measured and printed).
#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use outpost_tests::*;

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn idle_and_half_sent_connections_do_not_silence_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    let token = make_token(&ctl.data_dir.clone(), "boss", "admin", &[]);
    ctl.token = Some(token.clone());
    ctl.under = ["prlimit", "--nofile=160:160", "--"]
        .map(String::from)
        .to_vec();
    ctl.start();
    let addr = ctl.api.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    for k in 0..400 {
        let Ok(mut s) = TcpStream::connect(&addr) else {
            continue;
        };
        if k % 2 == 1 {
            // Half a request: the headers never end.
            let _ =
                s.write_all(b"GET /v1/nodes HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bear");
        }
        held.push(s);
    }
    // An operator's request is answered at once, by curl and by the CLI.
    let t = Instant::now();
    let (code, body) = curl("GET", &format!("{}/v1/nodes", ctl.api), Some(&token), "");
    assert_eq!(code, 200, "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    ctl.cli(&["nodes", "list"]).unwrap();
    let t = Instant::now();
    ctl.cli(&["status"]).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    // The header timeout closes what is left of them.
    std::thread::sleep(Duration::from_secs(12));
    let mut open = 0;
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 64];
        if matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
        {
            open += 1;
        }
    }
    assert_eq!(open, 0, "{open} idle or half-sent connections still open");
    assert!(ctl.proc().alive());
}

#[test]
fn stalled_blob_downloads_are_capped_and_memory_stays_flat() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::embedded(dir.path());
    ctl.start();
    let mut a = Agent::fake(dir.path(), "blob-node", ctl.mqtt_port, 4096, "z");
    a.start();
    ctl.wait_nodes_up(1);
    let file = dir.path().join("big.raw");
    let block: Vec<u8> = (0..(1u32 << 20)).map(|k| (k * 7 % 251) as u8).collect();
    std::fs::write(&file, block.repeat(8)).unwrap();
    let img = ctl
        .cli(&[
            "images",
            "upload",
            file.to_str().unwrap(),
            "--name",
            "big",
            "--format",
            "raw",
            "--arch",
            "x86_64",
        ])
        .unwrap();
    let sha = img["sha256"].as_str().unwrap().to_owned();
    ctl.cli(&[
        "instances",
        "create",
        "big-1",
        "--image",
        "big",
        "--memory",
        "128",
        "--disk",
        "1",
    ])
    .unwrap();
    ctl.wait_phase("big-1", "running", Duration::from_secs(60));
    let d: outpost_protocol::DesiredState = retained_as(
        ctl.mqtt_port,
        &a.node,
        outpost_protocol::topics::Channel::Desired,
    );
    let token: String = d
        .fetch
        .unwrap()
        .token
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let addr = ctl.api.trim_start_matches("http://").to_owned();
    let pid = ctl.proc().pid();
    let before = rss_kib(pid);
    let mut held = Vec::new();
    for _ in 0..400 {
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "GET /v1/nodes/blob-node/blobs/{sha} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .unwrap();
        held.push(s); // never read: a stalled download
    }
    std::thread::sleep(Duration::from_secs(3));
    let during = rss_kib(pid);
    let (mut served, mut busy) = (0, 0);
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 12];
        if s.read_exact(&mut b).is_ok() {
            match &b[9..12] {
                b"200" | b"206" => served += 1,
                b"503" => busy += 1,
                _ => {}
            }
        }
    }
    eprintln!(
        "400 stalled downloads of an 8 MiB blob: {served} served, {busy} told to retry; controller RSS {} MiB -> {} MiB",
        before / 1024,
        during / 1024
    );
    assert!(served <= 2, "{served} served at once (two per node)");
    assert!(busy >= 390, "{busy} told to retry");
    assert!(
        during.saturating_sub(before) < 64 * 1024,
        "memory grew by {} MiB",
        (during - before) / 1024
    );
    drop(held);
    // Retry-After answers do not count against the node: the next download goes through.
    let (code, _) = curl(
        "GET",
        &format!("{}/v1/nodes/blob-node/blobs/{sha}", ctl.api),
        Some(&token),
        "",
    );
    assert_eq!(code, 200);
}

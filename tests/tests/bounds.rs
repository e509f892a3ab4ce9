//! Every bounded collection and string, one past its bound, through the public paths: the API
//! (what an operator or a script sends) and a device's own topics (what a device with its own
//! credentials can send). Each gets a clear refusal, nothing panics, and the controller and the
//! honest node beside the device carry on.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outpost_protocol::limits::*;
use outpost_protocol::topics::Channel;
use outpost_protocol::*;
use outpost_tests::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

/// A create body of the tiny guest, with `extra` fields over it.
fn body(extra: Value) -> String {
    let mut b = json!({
        "name": "ok-1",
        "kernel": "vmlinuz",
        "memory_mib": 64,
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b.to_string()
}

fn many(n: usize, key: &str) -> Value {
    (0..n)
        .map(|i| (format!("{key}{i}"), json!("v")))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// A message whose trailing list holds `n` equal-sized items (encoded as `bytes`; `fewer` is
/// the same with `n - 1`), grown by one more copy of the last item (the list's length prefix
/// is a one-byte varint: `n` < 127).
fn one_more(bytes: &[u8], fewer: &[u8], n: usize) -> Vec<u8> {
    let item = bytes.len() - fewer.len();
    let start = bytes.len() - n * item;
    assert_eq!(bytes[start - 1] as usize, n, "the list is last");
    let mut out = bytes.to_vec();
    out[start - 1] = (n + 1) as u8;
    out.extend_from_slice(&bytes[bytes.len() - item..]);
    out
}

/// A string field at the end of `bytes`, of length `len` (< 16384: a two-byte varint at most),
/// grown by one byte.
fn one_more_char(bytes: &[u8], len: usize) -> Vec<u8> {
    let mut varint = Vec::new();
    let mut v = len;
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            varint.push(b);
            break;
        }
        varint.push(b | 0x80);
    }
    let start = bytes.len() - len - varint.len();
    assert_eq!(&bytes[start..start + varint.len()], varint.as_slice());
    let mut out = bytes[..start].to_vec();
    let n = len + 1;
    if n < 128 {
        out.push(n as u8);
    } else {
        out.extend_from_slice(&[(n & 0x7f) as u8 | 0x80, (n >> 7) as u8]);
    }
    out.extend_from_slice(&bytes[start + varint.len()..]);
    out.push(b'x');
    out
}

#[test]
fn one_past_every_bound_is_refused_and_nothing_falls_over() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let metrics_port = free_port();
    let mut ctl = Controller::external(dir.path(), broker.port);
    ctl.args.extend([
        "--metrics-listen".to_owned(),
        format!("127.0.0.1:{metrics_port}"),
    ]);
    ctl.start();
    let mut dev = Agent::fake(dir.path(), "bound-dev", broker.port, 4096, "b");
    let mut honest = Agent::fake(dir.path(), "bound-ok", broker.port, 4096, "b");
    dev.start();
    honest.start();
    ctl.wait_nodes_up(2);

    // ---- The API: each field one past its bound, a 400 that names the problem.
    let long = |n: usize| "a".repeat(n);
    let cases: Vec<(&str, Value)> = vec![
        ("name", json!({ "name": long(MAX_INSTANCE_NAME_LEN + 1) })),
        ("labels", json!({ "labels": many(MAX_LABELS + 1, "k") })),
        (
            "label key",
            json!({ "labels": { long(MAX_LABEL_KEY_LEN + 1): "v" } }),
        ),
        (
            "label value",
            json!({ "labels": { "k": long(MAX_LABEL_VALUE_LEN + 1) } }),
        ),
        ("cmdline", json!({ "cmdline": long(MAX_CMDLINE_LEN + 1) })),
        ("kernel", json!({ "kernel": long(MAX_IMAGE_NAME_LEN + 1) })),
        (
            "image",
            json!({ "kernel": null, "image": long(MAX_IMAGE_NAME_LEN + 1) }),
        ),
        ("network", json!({ "network": long(MAX_NET_NAME_LEN + 1) })),
        ("user-data", json!({ "user_data": long(64 * 1024 + 1) })),
        (
            "network-config",
            json!({ "network_config": long(64 * 1024 + 1) }),
        ),
    ];
    for (what, extra) in cases {
        let (status, text) = ctl.http("POST", "/v1/instances", &body(extra));
        assert_eq!(status, 400, "{what}: {text}");
        assert!(!text.trim().is_empty(), "{what}: the refusal says why");
    }
    let labels: Vec<String> = (0..=MAX_LABELS).map(|i| format!("k{i}=v")).collect();
    let (status, text) = ctl.http(
        "POST",
        "/v1/nodes/bound-ok/labels",
        &json!({ "labels": labels }).to_string(),
    );
    assert_eq!(status, 400, "node labels: {text}");
    let (status, text) = ctl.http(
        "GET",
        &format!("/v1/nodes/{}", long(MAX_NODE_ID_LEN + 1)),
        "",
    );
    assert_eq!(status, 404, "node id: {text}");
    // At the bound, all is well.
    let (status, text) = ctl.http(
        "POST",
        "/v1/instances",
        &body(
            json!({ "name": long(MAX_INSTANCE_NAME_LEN), "labels": many(MAX_LABELS, "k"),
                      "cmdline": long(MAX_CMDLINE_LEN) }),
        ),
    );
    assert!(status < 300, "at the bounds: {status} {text}");

    // ---- A device's own topics: each list or string one past its bound.
    let node = dev.node.clone();
    let evil = TestController::connect(broker.port);
    let report = |k: usize| {
        NodeReport {
            generation: 1,
            usage: Usage::default(),
            instances: (0..k as u64)
                .map(|i| InstanceReport {
                    id: InstanceId::from_u64(0x0100_0000_0000_0000 | i),
                    state: InstanceState::Running,
                })
                .collect(),
        }
        .to_vec()
        .unwrap()
    };
    let di = {
        let mut d = instance(1, kernel_boot("console=ttyS0"), 16);
        d.name = InstanceName::new("held-1").unwrap();
        d
    };
    let holding = |k: usize| {
        Holding {
            held: None,
            instances: (0..k).map(|_| di.clone()).collect(),
        }
        .to_vec()
        .unwrap()
    };
    let inv: Inventory = retained_as(broker.port, &node, Channel::Inventory);
    let inventory = |k: usize| {
        let mut i = inv.clone();
        i.cached = (0..k).map(|i| Digest([i as u8; 32])).collect();
        i.to_vec().unwrap()
    };
    let n = MAX_INSTANCES_PER_NODE;
    let event = |len: usize| {
        AgentEvent::Instance {
            id: InstanceId::from_u64(1),
            generation: 1,
            state: InstanceState::Running,
            reason: Reason::lossy(&"x".repeat(len)),
        }
        .to_vec()
        .unwrap()
    };
    // The splices make exactly the encoding one more item would have (checked below the
    // bound, where the real encoder still works).
    assert_eq!(
        one_more(&holding(n - 1), &holding(n - 2), n - 1),
        holding(n)
    );
    assert_eq!(
        one_more_char(&event(MAX_REASON_LEN - 1), MAX_REASON_LEN - 1),
        event(MAX_REASON_LEN)
    );
    assert_eq!(one_more_char(&event(126), 126), event(127));
    assert_eq!(one_more_char(&event(127), 127), event(128));
    let forged: Vec<(Channel, Vec<u8>)> = vec![
        (Channel::Report, one_more(&report(n), &report(n - 1), n)),
        (Channel::Holding, one_more(&holding(n), &holding(n - 1), n)),
        (
            Channel::Inventory,
            one_more(
                &inventory(MAX_CACHED),
                &inventory(MAX_CACHED - 1),
                MAX_CACHED,
            ),
        ),
        (
            Channel::Event,
            one_more_char(&event(MAX_REASON_LEN), MAX_REASON_LEN),
        ),
    ];
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let failures = |ch: &str| {
        scrape(&url, None)
            .map(|s| s.value("outpost_mqtt_decode_failures_total", &[("channel", ch)]))
            .unwrap_or(0.0)
    };
    for (ch, bytes) in forged {
        let before = failures(ch.name());
        evil.publish_raw(&node, ch, bytes, false);
        wait_for(
            T,
            &format!("{} one past its bound refused", ch.name()),
            || (failures(ch.name()) > before).then_some(()),
        );
    }
    // A node id one past its bound in the topic is no node at all.
    let topic = format!("outpost/node/{}/report", long(MAX_NODE_ID_LEN + 1));
    evil.publish_topic(&topic, report(1), false);

    assert!(ctl.proc().is_running(), "the controller lives");
    assert!(
        !ctl.proc().log_text().contains("panicked"),
        "nothing panicked"
    );
    let nodes = ctl.cli(&["nodes", "list"]).unwrap();
    for n in nodes.as_array().unwrap() {
        assert_eq!(n["state"], "up", "{n}");
    }
    let list = ctl.cli(&["instances", "list"]).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "nothing made by the device: {list}"
    );
    assert!(dev.proc().is_running() && honest.proc().is_running());
}

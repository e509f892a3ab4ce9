//! Guest access round trips: the console (API request to the node over MQTT and back, through
//! the embedded broker) and the event stream (a change asked through the API to its event on a
//! Server-Sent Events client). The real controller service in this process, one simulated node
//! that answers console requests at once with 4 KiB of text.
//!
//!     cargo bench -p outpost-controller --bench guest_access
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use outpost_controller::fleet::FleetConfig;
use outpost_controller::scheduler::SchedulerConfig;
use outpost_controller::service::{BrokerChoice, ServeConfig, serve};
use outpost_protocol::topics::{self, Channel};
use outpost_protocol::*;
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    v[((v.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0
}

/// A node that registers and answers every console request with 4 KiB of text.
async fn sim_node(port: u16) {
    let node = NodeId::new("ga-1").unwrap();
    let mut o = MqttOptions::new(node.as_str(), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(o, 64);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    el.set_network_options(net);
    let inventory = Inventory {
        arch: Arch::native().unwrap(),
        hypervisor: HypervisorKind::Kvm,
        total: Resources {
            vcpus: 64,
            memory_mib: 262_144,
            disk_gib: 2000,
        },
        reserved: Resources::default(),
        labels: Labels::new(),
        images: [ImageName::new("vmlinuz").unwrap()].into_iter().collect(),
        agent_version: Default::default(),
        cached: Default::default(),
    };
    let text: heapless::Vec<u8, { limits::MAX_CONSOLE_CHUNK }> =
        b"[    1.234567] a line of guest console output, about as long as a kernel's\n"
            .iter()
            .copied()
            .cycle()
            .take(4096)
            .collect();
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let st = NodeStatus {
                    presence: Presence::Online,
                    session: 1,
                    boot: Default::default(),
                };
                let _ = client.try_subscribe(
                    topics::topic(&node, Channel::ConsoleRequest).as_str(),
                    QoS::AtMostOnce,
                );
                let _ = client.try_publish(
                    topics::topic(&node, Channel::Status).as_str(),
                    QoS::AtLeastOnce,
                    true,
                    st.to_vec().unwrap(),
                );
                let _ = client.try_publish(
                    topics::topic(&node, Channel::Inventory).as_str(),
                    QoS::AtLeastOnce,
                    true,
                    inventory.to_vec().unwrap(),
                );
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Ok(r) = ConsoleRequest::decode(&p.payload) else {
                    continue;
                };
                let c = ConsoleChunk {
                    request: r.request,
                    id: r.id,
                    start: 0,
                    next: text.len() as u64,
                    data: text.clone(),
                    error: None,
                };
                let _ = client.try_publish(
                    topics::topic(&node, Channel::Console).as_str(),
                    QoS::AtMostOnce,
                    false,
                    c.to_vec().unwrap(),
                );
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") || !args.iter().any(|a| a == "--bench") {
        return; // test runners: nothing to run; `cargo bench` passes --bench.
    }
    let dir = tempfile::tempdir().unwrap();
    // `--broker-port P`: an external broker (say mosquitto) already listening on 127.0.0.1:P.
    let external: u16 = args
        .iter()
        .position(|a| a == "--broker-port")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mqtt = if external > 0 { external } else { free_port() };
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.spawn(serve(
        ServeConfig {
            data_dir: dir.path().to_owned(),
            broker: if external > 0 {
                BrokerChoice::External {
                    host: "127.0.0.1".into(),
                    port: mqtt,
                    credentials: None,
                    tls: None,
                }
            } else {
                BrokerChoice::Embedded(format!("127.0.0.1:{mqtt}").parse().unwrap())
            },
            api_listen: api,
            api_token: None,
            mqtt_passwd: None,
            registry: None,
            fleet: FleetConfig::default(),
            scheduler: SchedulerConfig::default(),
            metrics_listen: None,
            api_tls: None,
            insecure_http: false,
            store: outpost_controller::store::StoreChoice::Sqlite,
            name: "bench".into(),
            advertise_api: None,
        },
        std::future::pending(),
    ));
    std::thread::sleep(Duration::from_millis(500));
    rt.spawn(sim_node(mqtt));
    let base = format!("http://{api}");
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    // Wait for the node, then place one instance on it.
    loop {
        let up = http
            .get(&format!("{base}/v1/nodes/ga-1"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_json::<serde_json::Value>().ok())
            .is_some_and(|v| v["state"] == "up");
        if up {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = http
        .post(&format!("{base}/v1/instances"))
        .send_json(serde_json::json!({"name": "ga", "kernel": "vmlinuz", "memory_mib": 64}))
        .unwrap();
    assert!(r.status().is_success());

    // Console round trips.
    let mut console = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        let mut r = http
            .get(&format!("{base}/v1/instances/ga/console?lines=50"))
            .call()
            .unwrap();
        let v: serde_json::Value = r.body_mut().read_json().unwrap();
        assert!(v["text"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
        console.push(t.elapsed());
    }

    // Event stream: a stop or start asked through the API, to its event on an SSE client.
    let (tx, rx) = std::sync::mpsc::channel::<(String, Instant)>();
    let url = format!("{base}/v1/events?follow=true");
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
        let resp = agent.get(&url).call().unwrap();
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if let Some(kind) = line.strip_prefix("event:") {
                let _ = tx.send((kind.trim().to_owned(), Instant::now()));
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    while rx.try_recv().is_ok() {}
    let mut stream = Vec::new();
    for k in 0..200 {
        let (path, kind) = if k % 2 == 0 {
            ("stop", "stop-requested")
        } else {
            ("start", "start-requested")
        };
        let t = Instant::now();
        let r = http
            .post(&format!("{base}/v1/instances/ga/{path}"))
            .send_empty()
            .unwrap();
        assert!(r.status().is_success());
        loop {
            let (got, at) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            if got == kind {
                stream.push(at - t);
                break;
            }
        }
    }
    // What the history costs: the events table's rows and pages in the store.
    let db =
        rusqlite::Connection::open(dir.path().join(outpost_controller::store::DB_FILE)).unwrap();
    let (rows, payload): (i64, i64) = db
        .query_row(
            "SELECT count(*), sum(16 + length(coalesce(instance, '')) + length(coalesce(name, '')) \
             + length(coalesce(node, '')) + length(kind) + length(detail) + length(actor)) FROM events",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let on_disk: Option<i64> = db
        .query_row(
            "SELECT sum(pgsize) FROM dbstat WHERE name = 'events'",
            [],
            |r| r.get(0),
        )
        .ok();
    let broker = if external > 0 {
        "mosquitto"
    } else {
        "embedded broker"
    };
    println!("| round trip ({broker}, loopback, 2 cores) | n | p50 (ms) | p99 (ms) |");
    println!("|---|---|---|---|");
    let n = console.len();
    println!(
        "| console: API request to 4 KiB from the node | {n} | {:.2} | {:.2} |",
        pct(&mut console, 0.5),
        pct(&mut console, 0.99)
    );
    let n = stream.len();
    println!(
        "| events: change asked to its SSE event (stored first) | {n} | {:.2} | {:.2} |",
        pct(&mut stream, 0.5),
        pct(&mut stream, 0.99)
    );
    let per_row = payload as f64 / rows as f64;
    let disk = on_disk.map_or("dbstat not available".to_owned(), |b| {
        format!(
            "{:.0} bytes per event on disk (table pages)",
            b as f64 / rows as f64
        )
    });
    println!();
    println!(
        "event storage: {rows} events, {per_row:.0} bytes of fields per event, {disk}; \
         an instance's life (requested, scheduled, building, running, stop/start, deleting, deleted: about 9 events) \
         costs about {:.1} KB",
        9.0 * on_disk.map_or(per_row, |b| b as f64 / rows as f64) / 1000.0
    );
}

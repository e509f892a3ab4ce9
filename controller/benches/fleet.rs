//! End-to-end fleet simulator: the real controller service (embedded broker, SQLite store, HTTP
//! API) in this process, N simulated agents (each its own MQTT client, fake hypervisor: an
//! instance "runs" as soon as its desired state arrives), and M instance creates through the HTTP
//! API from a few concurrent clients. Prints agents connected, committed placements per second
//! (stored durably and answered by the API), dispatch latency (request sent to the agent holding
//! it) and request-to-running (request sent to the controller seeing it running).
//!
//!     cargo bench -p outpost-controller --bench fleet -- --agents 1000 --instances 4000
//!     cargo bench -p outpost-controller --bench fleet -- --agents 5000 --broker-port P --store postgres
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_controller::fleet::FleetConfig;
use outpost_controller::scheduler::SchedulerConfig;
use outpost_controller::service::{BrokerChoice, ServeConfig, serve};
use outpost_protocol::topics::{self, Channel};
use outpost_protocol::*;
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The body of a GET.
fn get_text(http: &ureq::Agent, url: &str) -> String {
    http.get(url)
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

fn text_arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

type Seen = Arc<Mutex<HashMap<InstanceId, Instant>>>;

async fn sim_agent(i: usize, port: u16, seen: Seen) {
    let node = NodeId::new(&format!("sim-{i:05}")).unwrap();
    let mut o = MqttOptions::new(node.as_str(), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(o, 64);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(60);
    el.set_network_options(net);
    let inventory = Inventory {
        arch: Arch::X86_64,
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
    // Reports from their own task: `EventLoop::poll` must not race a timer in a `select!`
    // (it is not cancel-safe while connecting).
    let held: Arc<Mutex<(u64, Vec<InstanceId>)>> = Arc::default();
    let (reporter, state) = (client.clone(), Arc::clone(&held));
    let report_topic = topics::topic(&node, Channel::Report);
    tokio::spawn(async move {
        // Agents boot at different times: spread the reports over the interval.
        let phase = Duration::from_millis(fastrand::u64(0..5000));
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + phase, Duration::from_secs(5));
        loop {
            tick.tick().await;
            let r = {
                let (generation, held) = &*state.lock().unwrap();
                NodeReport {
                    generation: *generation,
                    usage: Usage::default(),
                    instances: held
                        .iter()
                        .take(limits::MAX_INSTANCES_PER_NODE)
                        .map(|&id| InstanceReport {
                            id,
                            state: InstanceState::Running,
                        })
                        .collect(),
                }
            };
            let _ = reporter.try_publish(
                report_topic.as_str(),
                QoS::AtMostOnce,
                false,
                r.to_vec().unwrap(),
            );
        }
    });
    let mut first = true;
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let st = NodeStatus {
                    presence: Presence::Online,
                    session: 1,
                    boot: Default::default(),
                };
                if std::mem::take(&mut first) {
                    // An external broker keeps an earlier run's retained desired state for
                    // this node name (another fleet, maybe a higher generation, which this
                    // simulated agent would hold to and so never take this run's): cleared
                    // before subscribing.
                    let _ = client.try_publish(
                        topics::topic(&node, Channel::Desired).as_str(),
                        QoS::AtLeastOnce,
                        true,
                        Vec::new(),
                    );
                }
                let _ = client.try_subscribe(
                    topics::topic(&node, Channel::Desired).as_str(),
                    QoS::AtLeastOnce,
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
                let Ok(d) = DesiredState::decode(&p.payload) else {
                    continue;
                };
                let now = Instant::now();
                let mut fresh = Vec::new();
                {
                    let (generation, held) = &mut *held.lock().unwrap();
                    if d.generation <= *generation {
                        continue;
                    }
                    *generation = d.generation;
                    for di in &d.instances {
                        if !held.contains(&di.id) {
                            held.push(di.id);
                            fresh.push(di.id);
                        }
                    }
                }
                for id in fresh {
                    seen.lock().unwrap().entry(id).or_insert(now);
                    let ev = AgentEvent::Instance {
                        id,
                        generation: d.generation,
                        state: InstanceState::Running,
                        reason: Reason::default(),
                    };
                    let _ = client
                        .publish(
                            topics::topic(&node, Channel::Event).as_str(),
                            QoS::AtLeastOnce,
                            false,
                            ev.to_vec().unwrap(),
                        )
                        .await;
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") || !args.iter().any(|a| a == "--bench") {
        return; // test runners: nothing to run; `cargo bench` passes --bench.
    }
    let agents = arg("--agents", 1000);
    let instances = arg("--instances", 4000);
    let clients = arg("--clients", 8);
    // `--rate R`: offer R creates per second in all (open loop: each request has its slot, and
    // latency counts from the slot, so a late request is not forgiven); 0: as fast as answered.
    let rate = arg("--rate", 0);
    // `--scrape-ms N`: scrape /metrics every N ms while the creates run (0: never), to measure
    // what a Prometheus scraper costs the controller, side by side with a run without one.
    let scrape_ms = arg("--scrape-ms", 0);
    let dir = tempfile::tempdir().unwrap();
    // `--broker-port P`: an external broker (say mosquitto) already listening on 127.0.0.1:P.
    let external = arg("--broker-port", 0);
    let mqtt = if external > 0 {
        external as u16
    } else {
        free_port()
    };
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let pg = (text_arg("--store").as_deref() == Some("postgres"))
        .then(|| outpost_tests::Postgres::start(dir.path()));
    eprintln!(
        "store: {}",
        if pg.is_some() { "PostgreSQL" } else { "SQLite" }
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seen: Seen = Arc::new(Mutex::new(HashMap::new()));
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
            // `--store postgres`: a throwaway PostgreSQL started here (needs --broker-port).
            store: match &pg {
                Some(pg) => outpost_controller::store::StoreChoice::Postgres(
                    outpost_controller::store::PgConfig {
                        url: pg.url(),
                        password: Some(outpost_tests::PG_PASSWORD.into()),
                        ca_pem: None,
                    },
                ),
                None => outpost_controller::store::StoreChoice::Sqlite,
            },
            name: "bench".into(),
            advertise_api: None,
        },
        std::future::pending(),
    ));
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    for i in 0..agents {
        rt.spawn(sim_agent(i, mqtt, Arc::clone(&seen)));
    }
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let base = format!("http://{api}");
    loop {
        let nodes = http
            .get(&format!("{base}/v1/nodes"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_json::<serde_json::Value>().ok())
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default();
        let up = nodes.iter().filter(|n| n["state"] == "up").count();
        if up == agents {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            let seen: std::collections::HashSet<&str> =
                nodes.iter().filter_map(|n| n["id"].as_str()).collect();
            let missing: Vec<String> = (0..agents)
                .map(|i| format!("sim-{i:05}"))
                .filter(|id| !seen.contains(id.as_str()))
                .take(10)
                .collect();
            let down: Vec<&serde_json::Value> = nodes
                .iter()
                .filter(|n| n["state"] != "up")
                .take(10)
                .collect();
            panic!("only {up} of {agents} agents came up; unknown: {missing:?}; not up: {down:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let connect_time = t0.elapsed();

    // A scraper, if asked.
    let scraping = Arc::new(std::sync::atomic::AtomicBool::new(scrape_ms > 0));
    let scraper = (scrape_ms > 0).then(|| {
        let (http, base, on) = (http.clone(), base.clone(), Arc::clone(&scraping));
        std::thread::spawn(move || {
            let mut times = Vec::new();
            let mut size = 0;
            while on.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let text = get_text(&http, &format!("{base}/metrics"));
                times.push(t.elapsed());
                size = text.len();
                std::thread::sleep(Duration::from_millis(scrape_ms as u64));
            }
            (times, size)
        })
    });

    // Creates from `clients` threads.
    let sent: Arc<Mutex<HashMap<InstanceId, (Instant, Instant)>>> =
        Arc::new(Mutex::new(HashMap::new()));
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (http, base, sent) = (http.clone(), base.clone(), Arc::clone(&sent));
            std::thread::spawn(move || {
                let mut refused = 0;
                for k in (c..instances).step_by(clients) {
                    let t = if rate > 0 {
                        let slot = start + Duration::from_secs_f64(k as f64 / rate as f64);
                        if let Some(wait) = slot.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        slot
                    } else {
                        Instant::now()
                    };
                    let body = serde_json::json!({"name": format!("i{k}"), "kernel": "vmlinuz", "memory_mib": 64});
                    let mut r = http.post(&format!("{base}/v1/instances")).send_json(&body).unwrap();
                    let v: serde_json::Value = r.body_mut().read_json().unwrap();
                    match v["id"].as_str().and_then(|s| s.parse::<InstanceId>().ok()) {
                        Some(id) => {
                            sent.lock().unwrap().insert(id, (t, Instant::now()));
                        }
                        None => refused += 1,
                    }
                }
                refused
            })
        })
        .collect();
    let refused: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let committed = start.elapsed();
    // Wait until every placed instance reached its agent.
    let placed = sent.lock().unwrap().len();
    while seen.lock().unwrap().len() < placed && start.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let dispatched = start.elapsed();
    scraping.store(false, std::sync::atomic::Ordering::Relaxed);
    let scrapes = scraper.map(|t| t.join().unwrap());
    let sent = sent.lock().unwrap();
    let seen = seen.lock().unwrap();
    let mut commit: Vec<Duration> = sent.values().map(|(t, a)| *a - *t).collect();
    let mut lat: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, (t, _))| seen.get(id).map(|s| s.saturating_duration_since(*t)))
        .collect();
    commit.sort_unstable();
    lat.sort_unstable();
    let pct = |v: &[Duration], q: f64| {
        v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "\n| agents | connected in | offered/s | instances | refused | committed/s | commit p50 / p99 (ms) | dispatch p50 / p99 (ms) | all dispatched in |"
    );
    println!(
        "|--------|--------------|-----------|-----------|---------|-------------|-----------------------|-------------------------|-------------------|"
    );
    println!(
        "| {agents} | {:.1} s | {} | {placed} | {refused} | {:.0} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} s |",
        connect_time.as_secs_f64(),
        if rate > 0 {
            rate.to_string()
        } else {
            "max".into()
        },
        placed as f64 / committed.as_secs_f64(),
        pct(&commit, 0.50),
        pct(&commit, 0.99),
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        dispatched.as_secs_f64()
    );
    // Where a request's time goes (means over the run, from the controller's own histograms
    // and this bench's end-to-end times): the floor is visible.
    let metrics = get_text(&http, &format!("{base}/metrics"));
    let mean = |name: &str| {
        let get = |suffix: &str| {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}_{suffix} ")))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        get("sum") / get("count").max(1.0)
    };
    let durable = mean("outpost_request_durable_seconds") * 1e3;
    let commit_ms = mean("outpost_store_commit_seconds") * 1e3;
    let queued = mean("outpost_request_dispatch_seconds") * 1e3;
    let end_to_end =
        lat.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / lat.len().max(1) as f64;
    println!("\n| a request's time (means over the run) | ms |");
    println!("|---|---|");
    println!(
        "| queue wait (the batch in flight, then this batch's execution) | {:.2} |",
        (durable - commit_ms).max(0.0)
    );
    println!(
        "| batch commit (one transaction, {:.1} inputs a batch) | {commit_ms:.2} |",
        mean("outpost_store_batch_size")
    );
    println!(
        "| durable to desired state queued for publishing | {:.2} |",
        (queued - durable).max(0.0)
    );
    println!(
        "| queued to the agent holding it (broker, agent) | {:.2} |",
        (end_to_end - queued).max(0.0)
    );
    println!("| request to the agent holding it (this bench) | {end_to_end:.2} |");
    // `--page`: the status page's load in headless Chromium with this fleet (navigation to
    // the first full render: status, overview and instances fetched and drawn).
    if args.iter().any(|a| a == "--page") {
        let browser = outpost_tests::Browser::start();
        let mut page = browser.page();
        page.viewport(1280, 900, false);
        let mut render = Vec::new();
        for _ in 0..5 {
            page.navigate("about:blank");
            page.navigate(&format!("{base}/"));
            let ms = page.wait(
                Duration::from_secs(60),
                "document.body.dataset.renderMs",
                "document.body.innerText.slice(0, 500)",
            );
            render.push(ms.as_str().unwrap_or("0").parse::<f64>().unwrap_or(0.0));
        }
        let size = |path: &str| get_text(&http, &format!("{base}{path}")).len();
        let (o, i) = (size("/v1/overview"), size("/v1/instances"));
        render.sort_by(f64::total_cmp);
        println!(
            "\nstatus page with {agents} nodes and {placed} instances: first full render {:.0} ms (median of 5; min {:.0}, max {:.0}) after navigation; overview {o} bytes, instances {i} bytes",
            render[2], render[0], render[4]
        );
    }
    if let Some((mut times, size)) = scrapes {
        times.sort_unstable();
        println!(
            "\nmetrics scraped every {scrape_ms} ms during the run: {} scrapes of {size} bytes, scrape time p50 {:.2} ms, p99 {:.2} ms",
            times.len(),
            pct(&times, 0.50),
            pct(&times, 0.99)
        );
    }
    // What the instrumentation in the loop costs per turn: the calls one turn makes (a
    // message counted, a commit and a batch observed, a request's durable and dispatch times,
    // the API's request time), on their own.
    let m = outpost_controller::metrics::Metrics::new();
    let n = 1_000_000u32;
    let t = Instant::now();
    for k in 0..n {
        m.received("report", k % 1000 != 0);
        outpost_controller::metrics::Metrics::observe(&m.store_commit, Duration::from_micros(120));
        m.batch_size.observe(f64::from(k % 64));
        outpost_controller::metrics::Metrics::observe(
            &m.request_durable,
            Duration::from_micros(300),
        );
        outpost_controller::metrics::Metrics::observe(
            &m.request_dispatch,
            Duration::from_micros(350),
        );
    }
    let per_turn = t.elapsed().as_secs_f64() * 1e9 / f64::from(n);
    println!(
        "instrumentation per loop turn (1 message, 1 commit, 1 change): {per_turn:.0} ns; at {:.0} committed/s that is {:.3}% of one core",
        placed as f64 / committed.as_secs_f64(),
        per_turn * 1e-9 * placed as f64 / committed.as_secs_f64() * 100.0
    );
}

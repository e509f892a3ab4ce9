//! MQTT for the tests: a mosquitto on loopback, a stand-in controller recording what agents
//! send, and a link to the broker that a test can cut or slow.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_protocol::topics::{self, Channel};
use outpost_protocol::*;
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};

use crate::process::{Proc, free_port, wait_for};

/// A mosquitto broker on loopback.
pub struct Mosquitto {
    /// Its port.
    pub port: u16,
    /// Its process.
    pub proc: Proc,
    dir: PathBuf,
}

impl Mosquitto {
    /// Starts mosquitto with anonymous access on a free port, in `dir`.
    pub fn start(dir: &Path) -> Self {
        Self::start_on(dir, free_port())
    }

    /// Starts mosquitto on `port` (to restart it where agents expect it).
    pub fn start_on(dir: &Path, port: u16) -> Self {
        Self::start_with(dir, port, "")
    }

    /// Starts mosquitto with a plain loopback listener on `port` and `extra` configuration
    /// (more listeners...).
    pub fn start_with(dir: &Path, port: u16, extra: &str) -> Self {
        Self::start_conf(
            dir,
            port,
            &format!(
                "per_listener_settings false\nallow_anonymous true\nlistener {port} 127.0.0.1\n{extra}"
            ),
        )
    }

    /// Starts mosquitto with exactly `conf` (plus running as root, no persistence, logs to
    /// stderr); `port` is where it is expected to listen.
    pub fn start_conf(dir: &Path, port: u16, conf_text: &str) -> Self {
        Self::start_raw(dir, port, &format!("user root\n{conf_text}"))
    }

    /// Starts mosquitto with `conf` as Debian runs it: started as root, it drops to the
    /// `mosquitto` user before it reads the password file and ACL.
    pub fn start_as_debian(dir: &Path, port: u16, conf_text: &str) -> Self {
        Self::start_raw(dir, port, conf_text)
    }

    fn start_raw(dir: &Path, port: u16, conf_text: &str) -> Self {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("persistence false\nlog_dest stderr\n{conf_text}"),
        )
        .unwrap();
        let mut cmd = Command::new("mosquitto");
        cmd.arg("-c").arg(&conf);
        let proc = Proc::spawn(cmd, dir.join("mosquitto.log"));
        wait_for(Duration::from_secs(10), "mosquitto to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Self {
            port,
            proc,
            dir: dir.to_owned(),
        }
    }

    /// Stops it (SIGKILL) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.proc.kill();
        *self = Self::start_on(&self.dir.clone(), self.port);
    }
}

/// Everything a test controller has received.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Latest status per node.
    pub status: Vec<(NodeId, NodeStatus)>,
    /// Latest inventory per node.
    pub inventory: Vec<(NodeId, Inventory)>,
    /// Latest report per node.
    pub report: Vec<(NodeId, NodeReport)>,
    /// Every event, in arrival order.
    pub events: Vec<(NodeId, AgentEvent)>,
    /// Latest holding per node.
    pub holding: Vec<(NodeId, Holding)>,
    /// Latest addresses per node.
    pub addresses: Vec<(NodeId, Addresses)>,
    /// Payloads that did not decode.
    pub malformed: usize,
}

fn upsert<T>(v: &mut Vec<(NodeId, T)>, node: NodeId, t: T) {
    match v.iter_mut().find(|(n, _)| *n == node) {
        Some(slot) => slot.1 = t,
        None => v.push((node, t)),
    }
}

impl Seen {
    /// Latest holding of `node`.
    pub fn holding_of(&self, node: &NodeId) -> Option<Holding> {
        self.holding
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, h)| h.clone())
    }

    /// Latest status of `node`.
    pub fn status_of(&self, node: &NodeId) -> Option<NodeStatus> {
        self.status.iter().find(|(n, _)| n == node).map(|(_, s)| *s)
    }

    /// Latest inventory of `node`.
    pub fn inventory_of(&self, node: &NodeId) -> Option<Inventory> {
        self.inventory
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, s)| s.clone())
    }

    /// Latest report of `node`.
    pub fn report_of(&self, node: &NodeId) -> Option<NodeReport> {
        self.report
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, s)| s.clone())
    }

    /// The states `node` announced for `id`, in order.
    pub fn states(&self, node: &NodeId, id: InstanceId) -> Vec<InstanceState> {
        self.events
            .iter()
            .filter(|(n, _)| n == node)
            .filter_map(|(_, e)| match e {
                AgentEvent::Instance { id: i, state, .. } if *i == id => Some(*state),
                _ => None,
            })
            .collect()
    }

    /// The reasons `node` gave for `id`, in order.
    pub fn reasons(&self, node: &NodeId, id: InstanceId) -> Vec<String> {
        self.events
            .iter()
            .filter(|(n, _)| n == node)
            .filter_map(|(_, e)| match e {
                AgentEvent::Instance { id: i, reason, .. } if *i == id => {
                    Some(reason.as_str().to_owned())
                }
                _ => None,
            })
            .collect()
    }

    /// The acks `node` sent.
    pub fn acks(&self, node: &NodeId) -> Vec<(u64, AckResult)> {
        self.events
            .iter()
            .filter(|(n, _)| n == node)
            .filter_map(|(_, e)| match e {
                AgentEvent::Ack { generation, result } => Some((*generation, *result)),
                _ => None,
            })
            .collect()
    }
}

/// A stand-in controller: a real MQTT client subscribed to every node's topics.
pub struct TestController {
    client: AsyncClient,
    /// What it has received.
    pub seen: Arc<Mutex<Seen>>,
    rt: tokio::runtime::Runtime,
}

impl TestController {
    /// Connects to the broker on `port` and subscribes to every agent channel.
    pub fn connect(port: u16) -> Self {
        Self::connect_as(port, None)
    }

    /// Connects with a username and password.
    pub fn connect_as(port: u16, credentials: Option<(&str, &str)>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut opts = MqttOptions::new(
            format!("test-controller-{}", free_port()),
            "127.0.0.1",
            port,
        );
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_keep_alive(Duration::from_secs(5));
        if let Some((u, p)) = credentials {
            opts.set_credentials(u, p);
        }
        let (client, mut el) = AsyncClient::new(opts, 1024);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        el.set_network_options(net);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = Arc::clone(&seen);
        let c = client.clone();
        rt.spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for ch in [
                            Channel::Status,
                            Channel::Inventory,
                            Channel::Report,
                            Channel::Event,
                            Channel::Holding,
                            Channel::Addresses,
                        ] {
                            c.subscribe(ch.all_nodes(), QoS::AtLeastOnce).await.unwrap();
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => record(&s, &p.topic, &p.payload),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Self { client, seen, rt }
    }

    /// A snapshot of what was received.
    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }

    /// Publishes raw bytes on `node`'s `channel`, retained or not.
    pub fn publish_raw(&self, node: &NodeId, channel: Channel, payload: Vec<u8>, retain: bool) {
        self.publish_topic(&topics::topic(node, channel), payload, retain);
    }

    /// Publishes raw bytes on any topic, retained or not.
    pub fn publish_topic(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        let t = topic.to_owned();
        let c = self.client.clone();
        self.rt
            .block_on(async move { c.publish(t, QoS::AtLeastOnce, retain, payload).await })
            .unwrap();
    }

    /// Publishes `node`'s desired state, retained, as the real controller does.
    pub fn publish_desired(&self, node: &NodeId, d: &DesiredState) {
        self.publish_raw(node, Channel::Desired, d.to_vec().unwrap(), true);
    }

    /// Waits until `f` holds for what was received.
    pub fn wait<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&Seen) -> Option<T>,
    ) -> T {
        wait_for(timeout, what, || f(&self.seen.lock().unwrap()))
    }
}

fn record(seen: &Mutex<Seen>, topic: &str, payload: &[u8]) {
    let mut s = seen.lock().unwrap();
    let Ok((node, ch)) = topics::parse(topic) else {
        return;
    };
    let ok = match ch {
        Channel::Status => NodeStatus::decode(payload)
            .map(|m| upsert(&mut s.status, node, m))
            .is_ok(),
        Channel::Inventory => Inventory::decode(payload)
            .map(|m| upsert(&mut s.inventory, node, m))
            .is_ok(),
        Channel::Report => NodeReport::decode(payload)
            .map(|m| upsert(&mut s.report, node, m))
            .is_ok(),
        Channel::Event => AgentEvent::decode(payload)
            .map(|m| s.events.push((node, m)))
            .is_ok(),
        Channel::Holding => Holding::decode(payload)
            .map(|m| upsert(&mut s.holding, node, m))
            .is_ok(),
        Channel::Console => ConsoleChunk::decode(payload).is_ok(),
        Channel::Addresses => Addresses::decode(payload)
            .map(|m| upsert(&mut s.addresses, node, m))
            .is_ok(),
        Channel::Desired | Channel::ConsoleRequest => true,
    };
    if !ok {
        s.malformed += 1;
    }
}

/// A TCP link between an agent and its broker that a test can cut: it forwards
/// `127.0.0.1:port` to the broker, and while cut it drops every connection and refuses new
/// ones, like a network partition (the agent itself keeps running).
pub struct Link {
    /// The port agents connect to.
    pub port: u16,
    state: Arc<LinkState>,
}

/// What the link's forwarding threads share with the test.
#[derive(Default)]
struct LinkState {
    cut: std::sync::atomic::AtomicBool,
    /// Frozen: connections stay open and nothing crosses (a route that drops packets).
    frozen: std::sync::atomic::AtomicBool,
    /// Bumped by every cut: forwarders of an older generation stop.
    generation: std::sync::atomic::AtomicU64,
    latency_ms: std::sync::atomic::AtomicU64,
    accepted: std::sync::atomic::AtomicU64,
    /// Bytes forwarded, both ways.
    bytes: std::sync::atomic::AtomicU64,
}

impl Link {
    /// A link to the broker on `upstream`.
    pub fn new(upstream: u16) -> Self {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(LinkState::default());
        let st = Arc::clone(&state);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                st.accepted.fetch_add(1, Ordering::SeqCst);
                if st.cut.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let born = st.generation.load(Ordering::SeqCst);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let st = Arc::clone(&st);
                    std::thread::spawn(move || {
                        use std::io::{Read as _, Write as _};
                        let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            if st.cut.load(Ordering::SeqCst)
                                || st.generation.load(Ordering::SeqCst) != born
                            {
                                break;
                            }
                            if st.frozen.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(20));
                                continue;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    let delay = st.latency_ms.load(Ordering::SeqCst);
                                    if delay > 0 {
                                        std::thread::sleep(Duration::from_millis(delay));
                                    }
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                    st.bytes.fetch_add(n as u64, Ordering::SeqCst);
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { port, state }
    }

    /// Delays every chunk forwarded (each way) by `d`: a slow link, like a satellite hop.
    pub fn set_latency(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.state
            .latency_ms
            .store(ms, std::sync::atomic::Ordering::SeqCst);
    }

    /// Bytes forwarded so far (both ways).
    pub fn bytes(&self) -> u64 {
        self.state.bytes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Cuts the link: open connections die, new ones are refused.
    pub fn cut(&self) {
        use std::sync::atomic::Ordering;
        self.state.cut.store(true, Ordering::SeqCst);
        self.state.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Freezes the link: connections stay open, nothing crosses either way, new ones are
    /// accepted and hang (a dead route, no reset), until [`Link::thaw`].
    pub fn freeze(&self) {
        self.state
            .frozen
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets traffic cross a frozen link again.
    pub fn thaw(&self) {
        self.state
            .frozen
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Restores the link.
    pub fn restore(&self) {
        self.state
            .cut
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The message the broker keeps on `node`'s `channel`, decoded (waits up to 5 s; panics if
/// there is none or it does not decode).
pub fn retained_as<M: Message>(port: u16, node: &NodeId, channel: Channel) -> M {
    let bytes = retained(port, node, channel, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("nothing retained on {node}'s {}", channel.name()));
    M::decode(&bytes).unwrap()
}

/// What the broker on `port` keeps retained on `node`'s `channel`: a fresh client subscribes
/// and waits up to `wait` for it (none: nothing kept).
pub fn retained(port: u16, node: &NodeId, channel: Channel, wait: Duration) -> Option<Vec<u8>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let topic = topics::topic(node, channel).to_string();
    rt.block_on(async move {
        let opts = MqttOptions::new(format!("test-retained-{}", free_port()), "127.0.0.1", port);
        let (client, mut el) = AsyncClient::new(opts, 16);
        let got = tokio::time::timeout(wait, async {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        client.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.retain => {
                        return p.payload.to_vec();
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
        .await
        .ok();
        let _ = client.disconnect().await;
        got
    })
}

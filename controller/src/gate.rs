//! The gate in front of the embedded broker: per-device authentication and topic confinement,
//! the same rules as the mosquitto ACL that `outpost-provision` writes.
//!
//! rumqttd has no per-topic ACLs, so when the embedded broker must take remote devices, it
//! listens on an internal loopback port and this gate listens on the public address. For each
//! connection the gate reads the CONNECT packet, checks the password against the mosquitto
//! password file, requires the client id to be the username (the node id) and the Last Will to
//! be the node's own status topic; afterwards every PUBLISH must be on one of the node's own
//! agent topics and every SUBSCRIBE on its own desired topic. A violation closes the
//! connection. The controller's own user may use every topic.
//!
//! The broker behind the gate takes only connections that log in with a secret made at each
//! start and known only to this process: the gate swaps it in for the device's password once
//! the device is authenticated, so the internal port is no side door for local users. A
//! connection must send its CONNECT within [`CONNECT_DEADLINE`], and at most
//! [`MAX_UNAUTHENTICATED`] may be waiting to, so idle sockets cannot lock devices out.

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::BytesMut;
use outpost_protocol::NodeId;
use outpost_protocol::topics::{self, Channel, Side};
use rumqttc::mqttbytes::v4::Packet;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// The controller's MQTT username, allowed every topic.
pub const CONTROLLER_USER: &str = outpost_firmware_config::provision::CONTROLLER_USER;
/// Largest packet the gate forwards (a desired state is at most 48 KiB).
const MAX_PACKET: usize = 256 * 1024;
/// CONNACK "not authorized" (MQTT 3.1.1 return code 5).
const CONNACK_NOT_AUTHORIZED: [u8; 4] = [0x20, 0x02, 0x00, 0x05];
/// How long a new connection has to send its CONNECT.
pub const CONNECT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
/// Most connections that may be waiting to authenticate at once; past that the oldest one is
/// closed to make room (a real device sends CONNECT within milliseconds of connecting, so idle
/// sockets can never crowd it out).
pub const MAX_UNAUTHENTICATED: usize = 64;

/// The connections still waiting for their CONNECT, oldest first.
#[derive(Default)]
struct Pending {
    next: u64,
    waiting: std::collections::VecDeque<(u64, tokio::task::AbortHandle)>,
}

type PendingSet = std::sync::Arc<std::sync::Mutex<Pending>>;

/// Removes connection `id` from the waiting set (it authenticated, or gave up).
fn settled(pending: &PendingSet, id: u64) {
    if let Ok(mut p) = pending.lock() {
        p.waiting.retain(|(i, _)| *i != id);
    }
}

/// Where the gate listens and what it checks against.
#[derive(Debug, Clone)]
pub struct GateConfig {
    /// The public address devices connect to.
    pub listen: SocketAddr,
    /// The embedded broker's internal loopback address.
    pub upstream: SocketAddr,
    /// The mosquitto-format password file (read at every connect, so new devices need no
    /// restart).
    pub passwd: PathBuf,
    /// The password the internal broker requires (replaces the device's once admitted).
    pub internal_secret: String,
}

/// Who is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Peer {
    Controller,
    Node(NodeId),
}

impl Peer {
    fn may_publish(&self, topic: &str) -> bool {
        match self {
            Self::Controller => true,
            Self::Node(n) => Channel::ALL
                .into_iter()
                .any(|ch| ch.publisher() == Side::Agent && topics::topic(n, ch).as_str() == topic),
        }
    }

    fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Self::Controller => true,
            // Its own desired state and console requests: what the controller sends it.
            Self::Node(n) => Channel::ALL.into_iter().any(|ch| {
                ch.publisher() == Side::Controller && topics::topic(n, ch).as_str() == filter
            }),
        }
    }
}

/// Reads one whole packet: its raw bytes and its parse.
async fn next_packet(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Option<(Vec<u8>, Packet)> {
    loop {
        match rumqttc::mqttbytes::check(buf.iter(), MAX_PACKET) {
            Ok(h) => {
                let raw = buf[..h.frame_length()].to_vec();
                let packet = Packet::read(buf, MAX_PACKET).ok()?;
                return Some((raw, packet));
            }
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(_) => return None,
        }
        if s.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

/// Checks a CONNECT: who it is, or why not.
fn admit(c: &rumqttc::mqttbytes::v4::Connect, passwd: &str) -> Result<Peer, &'static str> {
    let login = c.login.as_ref().ok_or("no username and password")?;
    if !outpost_firmware_config::provision::verify_mosquitto_password(
        passwd,
        &login.username,
        &login.password,
    ) {
        return Err("wrong username or password");
    }
    if login.username == CONTROLLER_USER {
        return Ok(Peer::Controller);
    }
    let node = NodeId::new(&login.username).map_err(|_| "username is not a node id")?;
    if c.client_id != login.username {
        return Err("client id differs from the username");
    }
    if let Some(w) = &c.last_will
        && w.topic != topics::topic(&node, Channel::Status).as_str()
    {
        return Err("last will outside the node's own status topic");
    }
    Ok(Peer::Node(node))
}

async fn serve_one(
    mut client: TcpStream,
    from: SocketAddr,
    cfg: GateConfig,
    pending: PendingSet,
    id: u64,
) {
    let mut buf = BytesMut::with_capacity(4096);
    let first = tokio::time::timeout(CONNECT_DEADLINE, next_packet(&mut client, &mut buf)).await;
    settled(&pending, id);
    let Ok(Some((_, Packet::Connect(mut c)))) = first else {
        if first.is_err() {
            tracing::debug!(%from, "no CONNECT within the deadline: connection closed");
        }
        return;
    };
    let passwd = match std::fs::read_to_string(&cfg.passwd) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(passwd = %cfg.passwd.display(), error = %e, "cannot read the password file: refusing every device");
            String::new()
        }
    };
    let peer = match admit(&c, &passwd) {
        Ok(p) => p,
        Err(why) => {
            tracing::warn!(%from, client_id = %c.client_id, why, "MQTT connection refused");
            let _ = client.write_all(&CONNACK_NOT_AUTHORIZED).await;
            return;
        }
    };
    // The internal broker knows only the internal secret.
    if let Some(login) = c.login.as_mut() {
        login.password.clone_from(&cfg.internal_secret);
    }
    let mut connect = BytesMut::new();
    if c.write(&mut connect).is_err() {
        return;
    }
    let Ok(upstream) = TcpStream::connect(cfg.upstream).await else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (mut c_read, mut c_write) = client.into_split();
    let (mut u_read, mut u_write) = upstream.into_split();
    if u_write.write_all(&connect).await.is_err() {
        return;
    }
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut u_read, &mut c_write).await;
        let _ = c_write.shutdown().await;
    });
    // Bytes that arrived with the CONNECT are still in `buf`: they are checked like the rest.
    while let Some((raw, packet)) = next_packet(&mut c_read, &mut buf).await {
        let allowed = match &packet {
            Packet::Publish(p) => peer.may_publish(&p.topic),
            Packet::Subscribe(s) => s.filters.iter().all(|f| peer.may_subscribe(&f.path)),
            Packet::Connect(_) => false,
            _ => true,
        };
        if !allowed {
            tracing::warn!(%from, ?peer, packet = ?packet_name(&packet), "outside its own topics: connection closed");
            break;
        }
        if u_write.write_all(&raw).await.is_err() {
            break;
        }
    }
    let _ = u_write.shutdown().await;
    down.abort();
}

fn packet_name(p: &Packet) -> String {
    match p {
        Packet::Publish(p) => format!("PUBLISH {}", p.topic),
        Packet::Subscribe(s) => format!(
            "SUBSCRIBE {:?}",
            s.filters
                .iter()
                .map(|f| f.path.as_str())
                .collect::<Vec<_>>()
        ),
        Packet::Connect(_) => "a second CONNECT".to_owned(),
        other => format!("{other:?}"),
    }
}

/// Runs the gate until the process ends.
pub async fn run(cfg: GateConfig) -> std::io::Result<()> {
    let listener = TcpListener::bind(cfg.listen).await?;
    tracing::info!(listen = %cfg.listen, passwd = %cfg.passwd.display(), "MQTT gate listening: per-device authentication and topics");
    let pending: PendingSet = PendingSet::default();
    tokio::spawn(async move {
        loop {
            let (conn, from) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, most likely: do not spin.
                    tracing::warn!(error = %e, "MQTT gate cannot accept");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(mut p) = pending.lock() else { continue };
            p.waiting.retain(|(_, h)| !h.is_finished());
            if p.waiting.len() >= MAX_UNAUTHENTICATED
                && let Some((_, oldest)) = p.waiting.pop_front()
            {
                tracing::debug!(
                    limit = MAX_UNAUTHENTICATED,
                    "too many connections waiting to authenticate: closed the oldest"
                );
                oldest.abort();
            }
            p.next += 1;
            let id = p.next;
            let task = tokio::spawn(serve_one(conn, from, cfg.clone(), pending.clone(), id));
            p.waiting.push_back((id, task.abort_handle()));
        }
    });
    Ok(())
}

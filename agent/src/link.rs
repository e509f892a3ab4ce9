//! The agent's link to its broker: the MQTT options (Last Will, keep-alive, TLS, credentials),
//! and the task that drives rumqttc's event loop, rotating through the configured brokers with
//! the one back-off policy and a new session each time.

use std::time::{Duration, SystemTime};

use outpost_protocol::topics::{self, Channel};
use outpost_protocol::{Backoff, BootId, Message, NodeStatus, Presence};
use rumqttc::{
    AsyncClient, ConnectionError, Event, LastWill, MqttOptions, NetworkOptions, Packet, QoS,
    TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

use crate::config::Config;

/// MQTT keep-alive: the broker declares the agent gone (and publishes its Last Will) after
/// about 1.5 times this without traffic.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Largest MQTT packet accepted: a full desired state plus its topic and header.
pub const MAX_PACKET: usize = 64 * 1024;
/// First reconnect delay; doubles per failure up to [`RECONNECT_MAX`], with full jitter.
pub const RECONNECT_BASE: Duration = Duration::from_millis(200);
/// Longest reconnect delay.
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// Requests queued towards the MQTT event loop before new publishes are dropped (the next
/// connect republishes the full state anyway).
pub const REQUEST_QUEUE: usize = 256;
/// Longest TCP + TLS + MQTT handshake before the attempt counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Events queued from the MQTT link task to the loop (the link waits when it is full).
pub const LINK_QUEUE: usize = 64;

/// The wall clock in ms since the epoch.
pub(crate) fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The session number after `last` (one more: never from the clock, which may be wrong).
pub(crate) fn next_session(last: u64) -> u64 {
    last.saturating_add(1)
}

/// Encodes a message; `None` (logged) if it does not fit its bounds, so that nothing empty is
/// ever published in its place (an empty retained payload would erase the topic).
pub(crate) fn encode<M: Message>(m: &M) -> Option<Vec<u8>> {
    match m.to_vec() {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::error!(message = M::NAME, error = %e, "message does not encode; not sent");
            None
        }
    }
}

/// MQTT options for one connection attempt: broker `broker`, Last Will for `session` of
/// install `boot`.
fn mqtt_options(cfg: &Config, broker: usize, session: u64, boot: BootId) -> MqttOptions {
    let b = &cfg.brokers[broker % cfg.brokers.len()];
    let mut o = MqttOptions::new(cfg.node_id.as_str(), b.host.clone(), b.port);
    o.set_keep_alive(KEEP_ALIVE)
        .set_clean_session(false)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_last_will(LastWill::new(
            topics::topic(&cfg.node_id, Channel::Status).as_str(),
            encode(&NodeStatus {
                presence: Presence::Offline,
                session,
                boot,
            })
            .unwrap_or_default(),
            QoS::AtLeastOnce,
            true,
        ));
    if let Some(c) = &cfg.credentials {
        o.set_credentials(c.username.clone(), c.password.clone());
    }
    if let Some(tls) = cfg.tls.as_ref().filter(|_| b.tls) {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: tls.ca_pem.clone(),
            alpn: None,
            client_auth: tls.client.clone(),
        }));
    }
    o
}

pub(crate) fn qos(ch: Channel) -> QoS {
    match ch.qos() {
        0 => QoS::AtMostOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// What the MQTT link task tells the agent's loop.
#[derive(Debug)]
pub enum LinkEvent {
    /// Connected; the Last Will of this connection carries `session`.
    Connected {
        /// The session of this connection.
        session: u64,
        /// The broker's host.
        broker: String,
        /// The broker kept this client's session (its subscriptions, and the messages
        /// published for it while it was away, which it now delivers first).
        resumed: bool,
    },
    /// The broker acknowledged a subscription: what it kept for this client while it was
    /// away was delivered before this; a message after it that is not flagged retained is a
    /// new publish.
    Subscribed,
    /// A message from the broker.
    Message(rumqttc::Publish),
    /// The connection failed or dropped; the next attempt is in `retry_in`.
    Lost {
        /// Why.
        error: ConnectionError,
        /// When the next attempt is.
        retry_in: Duration,
    },
    /// The clean disconnect went out.
    Closed,
}

/// Drives the MQTT event loop in its own task: `EventLoop::poll` is not cancel-safe while it
/// connects (a dropped poll drops the half-open connection), so it must never race the agent's
/// timers in a `select!`, or a handshake slower than a tick would never finish. Reconnects
/// rotate through the brokers with jittered back-off and a new session each time, so that a
/// connection's Last Will can never hide the next connection's status.
async fn drive_link(
    cfg: Config,
    mut eventloop: rumqttc::EventLoop,
    mut session: u64,
    boot: BootId,
    tx: mpsc::Sender<LinkEvent>,
) {
    let mut broker = 0usize;
    let mut backoff = Backoff::new(RECONNECT_BASE, RECONNECT_MAX);
    loop {
        let ev = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                LinkEvent::Connected {
                    session,
                    broker: cfg.brokers[broker % cfg.brokers.len()].host.clone(),
                    resumed: ack.session_present,
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => LinkEvent::Message(p),
            Ok(Event::Incoming(Packet::SubAck(_))) => LinkEvent::Subscribed,
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                let _ = tx.send(LinkEvent::Closed).await;
                return;
            }
            Ok(_) => continue,
            Err(error) => {
                let retry_in = backoff.next_jittered(fastrand::f64());
                broker += 1;
                session = next_session(session);
                eventloop.mqtt_options = mqtt_options(&cfg, broker, session, boot);
                if tx.send(LinkEvent::Lost { error, retry_in }).await.is_err() {
                    return;
                }
                tokio::time::sleep(retry_in).await;
                continue;
            }
        };
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

/// Connects (in the background) with session `session` (see
/// [`DesiredStore::session_base`](crate::store::DesiredStore::session_base)): the client to
/// publish with, the events of the link, and the task driving it. The Last Will names install
/// `boot`.
pub fn start(
    cfg: &Config,
    boot: BootId,
    session: u64,
) -> (
    AsyncClient,
    mpsc::Receiver<LinkEvent>,
    tokio::task::JoinHandle<()>,
    u64,
) {
    let (client, mut eventloop) =
        AsyncClient::new(mqtt_options(cfg, 0, session, boot), REQUEST_QUEUE);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(CONNECT_TIMEOUT.as_secs());
    eventloop.set_network_options(net);
    let (link_tx, link_rx) = mpsc::channel(LINK_QUEUE);
    let task = tokio::spawn(drive_link(cfg.clone(), eventloop, session, boot, link_tx));
    (client, link_rx, task, session)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_always_grow() {
        assert_eq!(next_session(7), 8);
        assert_eq!(next_session(u64::MAX - 1), u64::MAX);
    }
}

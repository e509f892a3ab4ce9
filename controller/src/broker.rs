//! The embedded MQTT broker (rumqttd), for a controller that runs with no setup. It listens on
//! loopback unless told otherwise; a real broker (mosquitto, EMQX) replaces it with `--broker`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Largest MQTT payload the embedded broker accepts (a desired state is at most 48 KiB).
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The OS has no randomness to give.
    #[error("no randomness for the internal secret: {0}")]
    Random(String),
    /// The embedded broker may listen beyond loopback only behind the gate.
    #[error(
        "the embedded broker listens beyond loopback ({0}) only with authentication: give --mqtt-passwd (a password file from outpost-provision)"
    )]
    Unauthenticated(SocketAddr),
    /// Nothing accepted connections on the address in time.
    #[error("embedded broker did not start listening on {0}")]
    NotListening(SocketAddr),
    /// The broker thread could not be started.
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
}

/// The rumqttd configuration for one MQTT 3.1.1 listener. With `secret`, every connection must
/// log in with it as its password (the gate and the controller's own client do; no other local
/// process knows it).
pub fn config(listen: SocketAddr, secret: Option<String>) -> Config {
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PAYLOAD,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    if let Some(secret) = secret {
        connections.set_auth_handler(move |_client, _user, password: String| {
            let ok = crate::secret::same_secret(password.as_bytes(), secret.as_bytes());
            async move { ok }
        });
    }
    let server = ServerSettings {
        name: "outpost-v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 20_000,
            max_outgoing_packet_count: 1000,
            max_segment_size: 64 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("outpost".to_owned(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}

/// Starts the broker on its own thread (authenticated by `secret` when given). A broker that
/// cannot listen stops at once: that is reported here; agents and the controller's own client
/// reconnect until it answers.
pub fn start(listen: SocketAddr, secret: Option<String>) -> Result<(), BrokerError> {
    let cfg = config(listen, secret);
    let handle = std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(cfg);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    // Ready once it accepts a connection (or failed if its thread ended first).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if handle.is_finished() {
            return Err(BrokerError::NotListening(listen));
        }
        if std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(BrokerError::NotListening(listen))
}

/// How the controller's own client reaches the embedded broker.
#[derive(Debug, Clone)]
pub struct OwnLink {
    /// The broker's address.
    pub addr: SocketAddr,
    /// The login (the internal secret, behind the gate).
    pub credentials: Option<(String, String)>,
}

/// 128 random bits from the OS, as hex.
fn random_secret() -> Result<String, BrokerError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| BrokerError::Random(e.to_string()))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Starts the embedded broker on `listen`: alone on loopback, or, with a password file, on an
/// internal loopback port that takes only a secret made here, behind the gate on `listen`.
pub async fn start_embedded(
    listen: SocketAddr,
    passwd: Option<&Path>,
) -> Result<OwnLink, BrokerError> {
    let Some(passwd) = passwd else {
        if !listen.ip().is_loopback() {
            return Err(BrokerError::Unauthenticated(listen));
        }
        start(listen, None)?;
        tracing::info!(%listen, "embedded MQTT broker listening");
        return Ok(OwnLink {
            addr: listen,
            credentials: None,
        });
    };
    let internal = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|source| BrokerError::Listen {
            addr: listen,
            source,
        })?;
    let secret = random_secret()?;
    start(internal, Some(secret.clone()))?;
    tracing::info!(%internal, "embedded MQTT broker listening on its internal port (the gate's secret only)");
    crate::gate::run(crate::gate::GateConfig {
        listen,
        upstream: internal,
        passwd: passwd.to_owned(),
        internal_secret: secret.clone(),
    })
    .await
    .map_err(|source| BrokerError::Listen {
        addr: listen,
        source,
    })?;
    Ok(OwnLink {
        addr: internal,
        credentials: Some((crate::gate::CONTROLLER_USER.to_owned(), secret)),
    })
}

//! The embedded MQTT broker (rumqttd), for a controller that runs with no setup. It listens on
//! loopback unless told otherwise; a real broker (mosquitto, EMQX) replaces it with `--broker`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Largest MQTT payload the embedded broker accepts (a desired state is at most 48 KiB).
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Nothing accepted connections on the address in time.
    #[error("embedded broker did not start listening on {0}")]
    NotListening(SocketAddr),
    /// The broker thread could not be started.
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
}

/// Compares two secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
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
            let ok = same_secret(&password, &secret);
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
    std::thread::sleep(Duration::from_millis(200));
    if handle.is_finished() {
        return Err(BrokerError::NotListening(listen));
    }
    Ok(())
}

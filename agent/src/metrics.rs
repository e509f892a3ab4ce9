//! The agent's Prometheus metrics (`--metrics-listen`, loopback only: the agent has no API
//! token, so it serves nothing beyond the host). The shell updates them as it works; a tiny
//! HTTP/1 server (hyper) answers `GET /metrics` with OpenMetrics text.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// `{op}`: a hypervisor operation (`create`, `start`, `stop`, `list`...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// The operation.
    pub op: &'static str,
}

/// `{state}` of instances.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// The state, as the agent reports it.
    pub state: &'static str,
}

/// 50 µs to about 6.5 s, doubling: by multiplication, so that the agent does not need libm
/// (`cross/build-aarch64` checks the binary needs only libc, libgcc_s and libvirt).
fn seconds_buckets() -> impl Iterator<Item = f64> {
    std::iter::successors(Some(0.000_05), |b| Some(b * 2.0)).take(18)
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Reconciliation passes.
    pub passes: Counter,
    /// One pass (listing the domains and deciding), in seconds.
    pub pass_seconds: Histogram,
    /// Hypervisor calls by operation, in seconds.
    pub call_seconds: Family<OpLabel, Histogram>,
    /// Hypervisor calls that failed, by operation.
    pub call_errors: Family<OpLabel, Counter>,
    /// Instances by state.
    pub instances: Family<StateLabel, Gauge>,
    /// Bytes downloaded (images and seed parts).
    pub download_bytes: Counter,
    /// Bytes per second of the downloads running now.
    pub download_rate: Gauge,
    /// 1 while connected to a broker.
    pub mqtt_connected: Gauge,
    /// Connections made after the first one.
    pub mqtt_reconnects: Counter,
    /// Messages dropped because they did not decode.
    pub mqtt_malformed: Counter,
    /// Publishes dropped because the queue towards the broker was full.
    pub mqtt_dropped: Counter,
}

impl Metrics {
    /// Every metric, registered, with the node's id in `outpost_agent_build_info`.
    pub fn new(node: &str) -> Self {
        let secs = seconds_buckets;
        let m = Self {
            registry: Mutex::new(Registry::default()),
            passes: Counter::default(),
            pass_seconds: Histogram::new(secs()),
            call_seconds: Family::new_with_constructor(|| Histogram::new(seconds_buckets())),
            call_errors: Family::default(),
            instances: Family::default(),
            download_bytes: Counter::default(),
            download_rate: Gauge::default(),
            mqtt_connected: Gauge::default(),
            mqtt_reconnects: Counter::default(),
            mqtt_malformed: Counter::default(),
            mqtt_dropped: Counter::default(),
        };
        let mut r = Registry::default();
        r.register(
            "outpost_agent_build",
            "The agent's version and node",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("node", node.to_owned()),
            ]),
        );
        r.register(
            "outpost_agent_reconcile_passes",
            "Reconciliation passes",
            m.passes.clone(),
        );
        r.register(
            "outpost_agent_reconcile_seconds",
            "One reconciliation pass (listing the domains and deciding)",
            m.pass_seconds.clone(),
        );
        r.register(
            "outpost_agent_hypervisor_call_seconds",
            "Hypervisor calls by operation",
            m.call_seconds.clone(),
        );
        r.register(
            "outpost_agent_hypervisor_errors",
            "Hypervisor calls that failed, by operation",
            m.call_errors.clone(),
        );
        r.register(
            "outpost_agent_instances",
            "Instances by state",
            m.instances.clone(),
        );
        r.register(
            "outpost_agent_download_bytes",
            "Bytes downloaded (images and seed parts)",
            m.download_bytes.clone(),
        );
        r.register(
            "outpost_agent_download_rate_bytes_per_second",
            "Bytes per second of the downloads running now",
            m.download_rate.clone(),
        );
        r.register(
            "outpost_agent_mqtt_connected",
            "1 while connected to a broker",
            m.mqtt_connected.clone(),
        );
        r.register(
            "outpost_agent_mqtt_reconnects",
            "Broker connections made after the first one",
            m.mqtt_reconnects.clone(),
        );
        r.register(
            "outpost_agent_mqtt_malformed",
            "Messages dropped because they did not decode",
            m.mqtt_malformed.clone(),
        );
        r.register(
            "outpost_agent_mqtt_dropped_publishes",
            "Publishes dropped because the queue towards the broker was full",
            m.mqtt_dropped.clone(),
        );
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = r;
        m
    }

    /// Observes one hypervisor call.
    pub fn call(&self, op: &'static str, took: Duration, ok: bool) {
        let l = OpLabel { op };
        self.call_seconds
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        if !ok {
            self.call_errors.get_or_create(&l).inc();
        }
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

/// Why the metrics listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Beyond loopback.
    #[error(
        "metrics listen on {0}: the agent serves metrics without authentication, so only on loopback (127.0.0.1 or [::1]); scrape from the host or through a tunnel"
    )]
    NotLoopback(SocketAddr),
    /// The address cannot be bound.
    #[error("metrics listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// Binds `addr` (loopback only) and serves `GET /metrics` from `m` until the process ends.
pub async fn serve(addr: SocketAddr, m: Arc<Metrics>) -> Result<(), MetricsError> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};

    if !addr.ip().is_loopback() {
        return Err(MetricsError::NotLoopback(addr));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| MetricsError::Bind(addr, e))?;
    tracing::info!(listen = %addr, "metrics listening");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let m = Arc::clone(&m);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let m = Arc::clone(&m);
                    async move {
                        if req.uri().path() == "/metrics" {
                            Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(m.render())))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"only /metrics here\n")))
                        }
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    Ok(())
}

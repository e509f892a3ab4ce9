//! The controller's Prometheus metrics (OpenMetrics text, `prometheus-client`). Counters and
//! histograms are updated where the work happens (the service loop, the API); the fleet's
//! gauges (nodes, instances, resources) are set from an [`OverviewView`] at each scrape, so a
//! fleet of any size costs nothing between scrapes.
//!
//! Cardinality: every series has a fixed label set except the per-node resource gauges
//! (`outpost_node_*{node}`: 3 series per resource per node, 9 per node).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::views::{OverviewView, ResourcesView};

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `{channel}`: an MQTT channel (`status`, `report`, `desired`...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabel {
    /// The channel's name.
    pub channel: &'static str,
}

/// `{filter}`: a scheduler filter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FilterLabel {
    filter: String,
}

/// `{state, arch}` of nodes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeStateLabels {
    state: String,
    arch: String,
}

/// `{phase}` of instances.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

/// `{node, kind}`: one node's allocatable, claimed or used resource.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeResourceLabels {
    node: String,
    kind: &'static str,
}

/// `{kind}` of an API request: `read` or `change`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    /// `read` or `change`.
    pub kind: &'static str,
}

/// Why a message was dropped.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `rate`.
    pub reason: &'static str,
}

/// Every metric the controller exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// MQTT messages received, by channel.
    pub mqtt_received: Family<ChannelLabel, Counter>,
    /// MQTT messages that did not decode, by channel.
    pub mqtt_decode_failures: Family<ChannelLabel, Counter>,
    /// MQTT messages published, by channel.
    pub mqtt_sent: Family<ChannelLabel, Counter>,
    /// MQTT messages dropped before the service loop, by reason (`rate`: a node past its
    /// share).
    pub mqtt_dropped: Family<ReasonLabel, Counter>,
    /// 1 while the controller's own MQTT client is connected.
    pub broker_connected: Gauge,
    /// Broker connection losses.
    pub broker_disconnects: Counter,
    /// 1 while the store can be written.
    pub store_writable: Gauge,
    /// One transaction (a loop turn's changes), in seconds.
    pub store_commit: Histogram,
    /// Inputs (messages and API calls) per loop turn, all committed in one transaction.
    pub batch_size: Histogram,
    /// A create's placement decision (the action's execution), in seconds.
    pub placement_decision: Histogram,
    /// An API change from its arrival to its commit, in seconds.
    pub request_durable: Histogram,
    /// An API change from its arrival to its desired states queued for publishing, in seconds.
    pub request_dispatch: Histogram,
    /// API requests, by kind, from arrival to answer, in seconds.
    pub api_request: Family<RequestLabel, Histogram>,
    /// Blob transfers the controller served to nodes (image and seed downloads).
    pub blob_transfers: Counter,
    /// Bytes of blobs served to nodes.
    pub blob_bytes: Counter,
    placements: Counter,
    placement_failures: Counter,
    refusals: Family<FilterLabel, Counter>,
    nodes: Family<NodeStateLabels, Gauge>,
    instances: Family<PhaseLabel, Gauge>,
    node_cpus: Family<NodeResourceLabels, Gauge>,
    node_memory: Family<NodeResourceLabels, Gauge>,
    node_disk: Family<NodeResourceLabels, Gauge>,
    /// Counts already exported for the scheduler's totals (they only grow).
    exported: Mutex<(u64, u64, std::collections::BTreeMap<String, u64>)>,
    started: Instant,
    /// When the broker connection came up (ms after `started`, plus one); 0 while it is down.
    broker_since: AtomicU64,
    /// 1 while this controller leads (always, on a store only one controller uses).
    pub leading: Gauge,
    /// The lease epoch this controller leads in (0 with SQLite).
    pub epoch: Gauge,
    /// The leader's name and API URL, while this controller is a standby.
    leader: Mutex<Option<(String, String)>>,
    /// When the broker connection was lost (ms after `started`, plus one); 0 while it is up.
    broker_lost: AtomicU64,
    /// When the service loop began waiting on the store (ms after `started`, plus one); 0
    /// while it is not waiting.
    store_wait: AtomicU64,
    /// The leader's last lease renewal failed: it may have lost the lease already.
    lease_unconfirmed: std::sync::atomic::AtomicBool,
    /// No lead or standby turn has begun yet (the store is opening or loading).
    starting: std::sync::atomic::AtomicBool,
}

/// How long after connecting the controller counts the nodes' retained state as arrived.
pub const SETTLE: Duration = Duration::from_secs(1);

fn seconds_buckets() -> impl Iterator<Item = f64> {
    // 50 µs to about 6.5 s.
    exponential_buckets(0.000_05, 2.0, 18)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered.
    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Self {
            registry: Mutex::new(Registry::default()),
            mqtt_received: Family::default(),
            mqtt_decode_failures: Family::default(),
            mqtt_sent: Family::default(),
            mqtt_dropped: Family::default(),
            broker_connected: Gauge::default(),
            broker_disconnects: Counter::default(),
            store_writable: Gauge::default(),
            store_commit: Histogram::new(seconds_buckets()),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            placement_decision: Histogram::new(seconds_buckets()),
            request_durable: Histogram::new(seconds_buckets()),
            request_dispatch: Histogram::new(seconds_buckets()),
            api_request: Family::new_with_constructor(|| Histogram::new(seconds_buckets())),
            blob_transfers: Counter::default(),
            blob_bytes: Counter::default(),
            placements: Counter::default(),
            placement_failures: Counter::default(),
            refusals: Family::default(),
            nodes: Family::default(),
            instances: Family::default(),
            node_cpus: Family::default(),
            node_memory: Family::default(),
            node_disk: Family::default(),
            exported: Mutex::new(Default::default()),
            started: Instant::now(),
            broker_since: AtomicU64::new(0),
            leading: Gauge::default(),
            epoch: Gauge::default(),
            leader: Mutex::new(None),
            broker_lost: AtomicU64::new(1),
            store_wait: AtomicU64::new(0),
            lease_unconfirmed: std::sync::atomic::AtomicBool::new(false),
            starting: std::sync::atomic::AtomicBool::new(true),
        };
        r.register(
            "outpost_leader",
            "1 while this controller leads the fleet, 0 while it is a standby",
            m.leading.clone(),
        );
        r.register(
            "outpost_leader_epoch",
            "The lease epoch this controller leads in (0: a store only it uses)",
            m.epoch.clone(),
        );
        r.register(
            "outpost_build",
            "The controller's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        r.register(
            "outpost_nodes",
            "Nodes by state and architecture",
            m.nodes.clone(),
        );
        r.register(
            "outpost_instances",
            "Instances by phase",
            m.instances.clone(),
        );
        r.register(
            "outpost_node_cpus",
            "A node's vCPUs: allocatable (physical, after reservations), claimed (by placed instances), used (as last reported)",
            m.node_cpus.clone(),
        );
        r.register(
            "outpost_node_memory_bytes",
            "A node's memory: allocatable, claimed, used",
            m.node_memory.clone(),
        );
        r.register(
            "outpost_node_disk_bytes",
            "A node's disk: allocatable, claimed, used",
            m.node_disk.clone(),
        );
        r.register(
            "outpost_placements",
            "Instances placed (created or moved)",
            m.placements.clone(),
        );
        r.register(
            "outpost_placement_failures",
            "Placement decisions where no host fitted",
            m.placement_failures.clone(),
        );
        r.register(
            "outpost_placement_refusals",
            "Failed placement decisions in which a filter removed hosts, by filter",
            m.refusals.clone(),
        );
        r.register(
            "outpost_placement_decision_seconds",
            "Time to decide a create (scheduling included)",
            m.placement_decision.clone(),
        );
        r.register(
            "outpost_request_durable_seconds",
            "An API change from arrival to its store commit",
            m.request_durable.clone(),
        );
        r.register(
            "outpost_request_dispatch_seconds",
            "An API change from arrival to its desired states queued for the broker",
            m.request_dispatch.clone(),
        );
        r.register(
            "outpost_api_request_seconds",
            "API requests from arrival to answer, by kind (read or change)",
            m.api_request.clone(),
        );
        r.register(
            "outpost_store_commit_seconds",
            "One store transaction (a loop turn's changes)",
            m.store_commit.clone(),
        );
        r.register(
            "outpost_store_batch_size",
            "Inputs (messages and API calls) committed per transaction",
            m.batch_size.clone(),
        );
        r.register(
            "outpost_store_writable",
            "1 while the store can be written",
            m.store_writable.clone(),
        );
        r.register(
            "outpost_mqtt_messages_received",
            "MQTT messages received, by channel",
            m.mqtt_received.clone(),
        );
        r.register(
            "outpost_mqtt_decode_failures",
            "MQTT messages that did not decode (malformed, oversized, another version), by channel",
            m.mqtt_decode_failures.clone(),
        );
        r.register(
            "outpost_mqtt_messages_dropped",
            "MQTT messages dropped before they were handled, by reason (rate: a node past its share)",
            m.mqtt_dropped.clone(),
        );
        r.register(
            "outpost_mqtt_messages_sent",
            "MQTT messages published, by channel",
            m.mqtt_sent.clone(),
        );
        r.register(
            "outpost_broker_connected",
            "1 while the controller's MQTT client is connected to the broker",
            m.broker_connected.clone(),
        );
        r.register(
            "outpost_broker_disconnects",
            "Losses of the controller's broker connection",
            m.broker_disconnects.clone(),
        );
        r.register(
            "outpost_blob_transfers",
            "Blob (image, seed) downloads served to nodes",
            m.blob_transfers.clone(),
        );
        r.register(
            "outpost_blob_served_bytes",
            "Bytes of blobs served to nodes",
            m.blob_bytes.clone(),
        );
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = r;
        m
    }

    /// This controller leads in `epoch`.
    pub fn lead(&self, epoch: u64) {
        self.starting.store(false, Ordering::Relaxed);
        self.lease_unconfirmed.store(false, Ordering::Relaxed);
        self.leading.set(1);
        self.epoch.set(i64::try_from(epoch).unwrap_or(i64::MAX));
        *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// This controller is a standby; `leader` leads, if a live lease names one.
    pub fn standby(&self, leader: Option<(String, String)>) {
        self.starting.store(false, Ordering::Relaxed);
        self.leading.set(0);
        *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = leader;
    }

    /// The leader's name and API URL, while this controller is a standby.
    pub fn leader(&self) -> Option<(String, String)> {
        self.leader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Since the controller started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The broker connection came up (or went down).
    pub fn broker(&self, up: bool) {
        let was = self.broker_connected.set(i64::from(up)) == 1;
        if up {
            self.broker_since.store(self.mark_now(), Ordering::Relaxed);
            self.broker_lost.store(0, Ordering::Relaxed);
        } else {
            self.broker_since.store(0, Ordering::Relaxed);
            if was {
                self.broker_lost.store(self.mark_now(), Ordering::Relaxed);
            }
            if was {
                self.broker_disconnects.inc();
            }
        }
    }

    /// Whether no lead or standby turn has begun yet.
    pub fn starting(&self) -> bool {
        self.starting.load(Ordering::Relaxed)
    }

    /// Whether the leader's last lease renewal failed (it may no longer lead).
    pub fn set_lease_unconfirmed(&self, unconfirmed: bool) {
        self.lease_unconfirmed.store(unconfirmed, Ordering::Relaxed);
    }

    /// Whether the leader's last lease renewal failed.
    pub fn lease_unconfirmed(&self) -> bool {
        self.lease_unconfirmed.load(Ordering::Relaxed)
    }

    fn since_start_ms(&self) -> u64 {
        u64::try_from(self.uptime().as_millis()).unwrap_or(u64::MAX)
    }

    /// How long ago the instant kept in `mark` was (ms after `started`, plus one; 0: none).
    fn since_mark(&self, mark: &AtomicU64) -> Option<Duration> {
        match mark.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Duration::from_millis(
                self.since_start_ms().saturating_sub(at - 1),
            )),
        }
    }

    /// Now, as a mark for [`since_mark`](Self::since_mark).
    fn mark_now(&self) -> u64 {
        self.since_start_ms().saturating_add(1)
    }

    /// How long the broker connection has been down (`None` while it is up).
    pub fn broker_down_for(&self) -> Option<Duration> {
        self.since_mark(&self.broker_lost)
    }

    /// The service loop begins (or stops) waiting on the store.
    pub fn store_waiting(&self, waiting: bool) {
        let v = if waiting { self.mark_now() } else { 0 };
        self.store_wait.store(v, Ordering::Relaxed);
    }

    /// How long the service loop has been waiting on the store (`None` while it is not).
    pub fn store_waiting_for(&self) -> Option<Duration> {
        self.since_mark(&self.store_wait)
    }

    /// Connected for at least [`SETTLE`].
    pub fn broker_settled(&self) -> bool {
        self.since_mark(&self.broker_since)
            .is_some_and(|d| d >= SETTLE)
    }

    /// Counts one MQTT message dropped before it was handled.
    pub fn dropped(&self, reason: &'static str) {
        self.mqtt_dropped
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts one MQTT message received on `channel`, and whether it decoded.
    pub fn received(&self, channel: &'static str, decoded: bool) {
        let l = ChannelLabel { channel };
        self.mqtt_received.get_or_create(&l).inc();
        if !decoded {
            self.mqtt_decode_failures.get_or_create(&l).inc();
        }
    }

    /// Observes a duration in a histogram.
    pub fn observe(h: &Histogram, d: Duration) {
        h.observe(d.as_secs_f64());
    }

    /// The OpenMetrics text, with the fleet's gauges set from `o`.
    pub fn render(&self, o: &OverviewView) -> String {
        self.set_fleet(o);
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }

    fn set_fleet(&self, o: &OverviewView) {
        self.nodes.clear();
        for n in &o.nodes {
            let l = NodeStateLabels {
                state: n.state.clone(),
                arch: n.arch.clone().unwrap_or_else(|| "unknown".into()),
            };
            self.nodes.get_or_create(&l).inc();
        }
        self.instances.clear();
        for (phase, count) in &o.phases {
            let l = PhaseLabel {
                phase: phase.clone(),
            };
            self.instances
                .get_or_create(&l)
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
        self.node_cpus.clear();
        self.node_memory.clear();
        self.node_disk.clear();
        for n in &o.nodes {
            for (kind, r) in [
                ("allocatable", &n.allocatable),
                ("claimed", &n.claimed),
                ("used", &n.used),
            ] {
                let l = NodeResourceLabels {
                    node: n.id.clone(),
                    kind,
                };
                let ResourcesView {
                    vcpus,
                    memory_mib,
                    disk_gib,
                } = *r;
                let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                self.node_cpus.get_or_create(&l).set(int(vcpus));
                self.node_memory
                    .get_or_create(&l)
                    .set(int(memory_mib.saturating_mul(1 << 20)));
                self.node_disk
                    .get_or_create(&l)
                    .set(int(disk_gib.saturating_mul(1 << 30)));
            }
        }
        // The scheduler's totals live in the fleet; counters move by what grew since.
        let s = &o.scheduler;
        let mut done = self.exported.lock().unwrap_or_else(|e| e.into_inner());
        self.placements.inc_by(s.placements.saturating_sub(done.0));
        self.placement_failures
            .inc_by(s.failures.saturating_sub(done.1));
        for (filter, n) in &s.refusals {
            let before = done.2.get(filter).copied().unwrap_or(0);
            self.refusals
                .get_or_create(&FilterLabel {
                    filter: filter.clone(),
                })
                .inc_by(n.saturating_sub(before));
        }
        *done = (s.placements, s.failures, s.refusals.clone());
    }
}

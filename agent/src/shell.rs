//! The agent's async shell: MQTT in and out, the hypervisor on blocking threads, the desired
//! state on disk, and the timers. All decisions are the [`Reconciler`]'s.
//!
//! One current-thread runtime is enough: the loop waits on MQTT, on hypervisor results and on
//! two timers. Hypervisor calls run on blocking threads and never stall the loop, so VMs keep
//! converging while the broker is away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_protocol::limits::{MAX_CONSOLE_CHUNK, MAX_NICS};
use outpost_protocol::topics::{self, Channel};
use outpost_protocol::{
    Addresses, AgentEvent, Backoff, BlobRef, ConsoleChunk, ConsoleRequest, DesiredState, ErrorKind,
    FetchFrom, FetchState, InstanceId, InstanceNics, InstanceState, Inventory, Message, NodeStatus,
    NoticeKind, Presence, Reason,
};
use rumqttc::{AsyncClient, ConnectionError, QoS};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::fingerprint;
use crate::hypervisor::{Hypervisor, HypervisorError, Note, Op, execute};
pub use crate::link::{CONNECT_TIMEOUT, KEEP_ALIVE, MAX_PACKET, RECONNECT_BASE, RECONNECT_MAX};
use crate::link::{LinkEvent, encode, qos, wall_ms};
use crate::metrics::{Metrics, MetricsError, StateLabel};
use crate::reconcile::{Effect, HostFacts, Offer, Reconciler};
use crate::store::{DesiredStore, StoreError};

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The hypervisor could not describe the host at start.
    #[error("cannot fingerprint the host: {0}")]
    Host(#[from] HypervisorError),
    /// The state directory is unusable.
    #[error("state directory: {0}")]
    Store(#[from] StoreError),
    /// A blocking task panicked.
    #[error("a blocking hypervisor task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// The metrics listener could not start.
    #[error("{0}")]
    Metrics(#[from] MetricsError),
}

/// Counters of things that went wrong without stopping the agent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Messages dropped because they did not decode (malformed, oversized, wrong version).
    pub malformed: u64,
    /// Publishes dropped because the queue towards the broker was full.
    pub dropped_publishes: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
}

/// How often, while connected, the agent records on disk that it heard from its controller.
pub const HEARD_EVERY: Duration = Duration::from_secs(60);

/// A finished hypervisor operation, as the reconciler takes it back.
type Done = (InstanceId, Op, Result<Note, (ErrorKind, String)>);

/// The running agent.
struct Shell {
    cfg: Config,
    hv: Arc<dyn Hypervisor>,
    store: DesiredStore,
    rec: Reconciler,
    client: AsyncClient,
    counters: Counters,
    inventory: Inventory,
    connected: bool,
    done_tx: mpsc::UnboundedSender<Done>,
    /// Node notices to repeat after every connect until they no longer hold.
    notices: Vec<(NoticeKind, String)>,
    /// When `heard` was last written to disk.
    heard_saved: Option<Instant>,
    /// A desired state arrived on the current connection (the retained one comes first): only
    /// then does the live link count as contact with the controller.
    synced: bool,
    /// A desired state the controller published since this connection was made (not the
    /// retained one the broker kept) arrived: only that, and the live link after it, counts as
    /// contact. A retained state may be older than what the controller decided meanwhile (its
    /// instances rebuilt elsewhere, or deleted), so an agent past its lease starts nothing on
    /// its word alone.
    fresh: bool,
    /// On a resumed session, until the broker's retained copy arrives: what arrives is what
    /// was queued while the agent was away.
    queued: bool,
    /// The hypervisor stopped answering (libvirtd restarting): nothing is changed meanwhile.
    hv_down: bool,
    /// Downloads: their progress and results come back here.
    fetch_tx: mpsc::UnboundedSender<FetchMsg>,
    /// At most this many downloads at once.
    fetch_slots: Arc<tokio::sync::Semaphore>,
    /// The HTTP(S) client for downloads.
    http: crate::images::fetch::Client,
    /// The instances' addresses as last read (published retained on every connect and change).
    addresses: Addresses,
    /// Reading the addresses: the result comes back here; at most one read at a time.
    addr_tx: mpsc::UnboundedSender<Addresses>,
    addr_busy: bool,
    /// What `--metrics-listen` serves.
    metrics: Arc<Metrics>,
    /// Downloads running: bytes received so far and their rate, by blob.
    downloading: std::collections::HashMap<outpost_protocol::Digest, (u64, u32)>,
    /// The download tasks, by blob: cancelled when nothing held needs their blob any more.
    fetch_tasks: std::collections::HashMap<outpost_protocol::Digest, tokio::task::AbortHandle>,
    /// Downloads cancelled whose last word may still be on its way: it is ignored.
    cancelled: std::collections::HashSet<outpost_protocol::Digest>,
}

/// What a download tells the agent's loop.
#[derive(Debug)]
enum FetchMsg {
    /// Publish this progress event.
    Progress(AgentEvent),
    /// It ended.
    Done(BlobRef, Result<(), String>),
}

impl Shell {
    fn publish(&mut self, ch: Channel, payload: Option<Vec<u8>>) {
        let Some(payload) = payload else { return };
        let topic = topics::topic(&self.cfg.node_id, ch);
        if self
            .client
            .try_publish(topic.as_str(), qos(ch), ch.retained(), payload)
            .is_err()
        {
            self.counters.dropped_publishes += 1;
            self.metrics.mqtt_dropped.inc();
        }
    }

    fn publish_event(&mut self, ev: &AgentEvent) {
        tracing::debug!(?ev, "event");
        self.publish(Channel::Event, encode(ev));
    }

    fn apply(&mut self, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Publish(ev) => self.publish_event(&ev),
                Effect::Fetch(blob, from) => self.fetch(blob, from),
                Effect::Run(id, op) => {
                    tracing::info!(%id, op = op.name(), "hypervisor");
                    let hv = Arc::clone(&self.hv);
                    let tx = self.done_tx.clone();
                    let m = Arc::clone(&self.metrics);
                    tokio::task::spawn_blocking(move || {
                        let t = Instant::now();
                        let r = execute(hv.as_ref(), id, &op);
                        m.call(op.name(), t.elapsed(), r.is_ok());
                        if let Err((_, why)) = &r {
                            tracing::warn!(%id, op = op.name(), %why, "hypervisor call failed");
                        }
                        let _ = tx.send((id, op, r));
                    });
                }
            }
        }
    }

    /// Answers a console request from the controller: reads the log on a blocking thread and
    /// publishes what it read (or why it could not).
    fn on_console(&mut self, payload: &[u8]) {
        let req = match ConsoleRequest::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                self.counters.malformed += 1;
                self.metrics.mqtt_malformed.inc();
                tracing::warn!(error = %e, "dropped a console request that does not decode");
                return;
            }
        };
        let path = self
            .cfg
            .instance_dir
            .join(req.id.to_string())
            .join("console.log");
        let known = self.rec.held().is_some_and(|h| {
            h.desired
                .instances
                .iter()
                .chain(&h.kept)
                .any(|i| i.id == req.id)
        });
        let (client, topic) = (
            self.client.clone(),
            topics::topic(&self.cfg.node_id, Channel::Console),
        );
        tokio::task::spawn_blocking(move || {
            let mut chunk = ConsoleChunk {
                request: req.request,
                id: req.id,
                start: 0,
                next: 0,
                data: heapless::Vec::new(),
                error: None,
            };
            match crate::console::read(&path, req.from, req.lines.max(1)) {
                _ if !known => chunk.error = Some(Reason::lossy("no such instance on this node")),
                Ok(r) => {
                    chunk.start = r.start;
                    chunk.next = r.next;
                    chunk.data = r.data.into_iter().take(MAX_CONSOLE_CHUNK).collect();
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    chunk.error = Some(Reason::lossy("no console output yet"));
                }
                Err(e) => chunk.error = Some(Reason::lossy(&format!("reading its console: {e}"))),
            }
            if let Some(b) = encode(&chunk) {
                let _ = client.try_publish(topic.as_str(), QoS::AtMostOnce, false, b);
            }
        });
    }

    /// Starts a download (it waits for a free slot); its progress and result come back
    /// through `fetch_tx`.
    fn fetch(&mut self, blob: BlobRef, from: Option<FetchFrom>) {
        let tx = self.fetch_tx.clone();
        let Some(from) = from else {
            let why = crate::images::fetch::FetchError::NoSource.to_string();
            let _ = tx.send(FetchMsg::Done(blob, Err(why)));
            return;
        };
        let cache = crate::images::Cache::new(&self.cfg.image_dir);
        let d = &self.cfg.downloads;
        let lim = crate::images::fetch::Limits {
            stall: d.stall,
            rate: d.rate,
            reserve: d.reserve,
            attempts: d.attempts,
            ..Default::default()
        };
        let (slots, http, node) = (
            Arc::clone(&self.fetch_slots),
            self.http.clone(),
            self.cfg.node_id.clone(),
        );
        let keep = self.rec.blobs_in_use();
        tracing::info!(blob = %blob.digest.short(), size = blob.size, "downloading an image");
        self.cancelled.remove(&blob.digest);
        let task = tokio::spawn(async move {
            let _slot = slots.acquire().await;
            let progress = |state: FetchState, done: u64, rate: u32, reason: &str| {
                let _ = tx.send(FetchMsg::Progress(AgentEvent::Fetch {
                    digest: blob.digest,
                    done,
                    total: blob.size,
                    rate,
                    state,
                    reason: Reason::lossy(reason),
                }));
            };
            let on = |p: crate::images::fetch::Progress| {
                progress(FetchState::Running, p.done, p.rate, "");
            };
            let started = std::time::Instant::now();
            let mut r =
                crate::images::fetch::fetch(&http, &cache, &node, &from, blob, &lim, on).await;
            if let Err(crate::images::fetch::FetchError::NoSpace { need, .. }) = &r {
                // Room first: unused cached images go, the least recently used first.
                let (c, need) = (cache.clone(), need + lim.reserve);
                let freed = tokio::task::spawn_blocking(move || {
                    c.evict(&keep, std::time::SystemTime::UNIX_EPOCH, need)
                })
                .await
                .unwrap_or_default();
                if !freed.is_empty() {
                    tracing::info!(evicted = freed.len(), "made room in the image cache");
                    r = crate::images::fetch::fetch(&http, &cache, &node, &from, blob, &lim, on)
                        .await;
                }
            }
            match &r {
                Ok(()) => {
                    let secs = started.elapsed().as_secs_f64().max(0.001);
                    tracing::info!(blob = %blob.digest.short(), mib_per_s = format!("{:.1}", blob.size as f64 / secs / 1048576.0), "image cached");
                    progress(FetchState::Cached, blob.size, 0, "");
                }
                Err(e) => {
                    tracing::warn!(blob = %blob.digest.short(), error = %e, "image download failed");
                    progress(FetchState::Failed, 0, 0, &e.to_string());
                }
            }
            let _ = tx.send(FetchMsg::Done(blob, r.map_err(|e| e.to_string())));
        });
        self.fetch_tasks.insert(blob.digest, task.abort_handle());
    }

    /// Cancels the downloads whose blob nothing held needs any more (its instance or image
    /// deleted): the slot is freed and the partial file removed.
    fn cancel_unneeded(&mut self) {
        if self.fetch_tasks.is_empty() {
            return;
        }
        let needed = self.rec.blobs_in_use();
        let gone: Vec<outpost_protocol::Digest> = self
            .fetch_tasks
            .keys()
            .filter(|d| !needed.contains(d))
            .copied()
            .collect();
        let cache = crate::images::Cache::new(&self.cfg.image_dir);
        for d in gone {
            if let Some(task) = self.fetch_tasks.remove(&d) {
                task.abort();
                self.cancelled.insert(d);
            }
            let _ = std::fs::remove_file(cache.partial(&d));
            let _ = std::fs::remove_file(cache.partial_source(&d));
            self.downloading.remove(&d);
            self.rec.fetch_cancelled(d);
            tracing::info!(blob = %d.short(), "download cancelled: nothing needs it any more");
            if self.connected {
                self.publish_event(&AgentEvent::Fetch {
                    digest: d,
                    done: 0,
                    total: 0,
                    rate: 0,
                    state: FetchState::Failed,
                    reason: Reason::lossy("cancelled: nothing needs it any more"),
                });
            }
        }
        self.set_download_rate();
    }

    /// A notice about the node: logged, published now if connected, and again after every
    /// connect while `sticky`.
    fn notice(&mut self, kind: NoticeKind, reason: String, sticky: bool) {
        tracing::warn!(notice = kind.as_str(), %reason, "node notice");
        if sticky {
            self.notices.retain(|(k, _)| *k != kind);
            self.notices.push((kind, reason.clone()));
        }
        if self.connected {
            self.publish_event(&AgentEvent::Notice {
                kind,
                reason: Reason::lossy(&reason),
            });
        }
    }

    /// Publishes what the agent holds, for a controller that may be behind it.
    fn publish_holding(&mut self) {
        let h = self.rec.holding();
        self.publish(Channel::Holding, encode(&h));
    }

    /// The agent heard from its controller now; recorded on disk at most every
    /// [`HEARD_EVERY`] (or at once when `force`).
    async fn heard(&mut self, force: bool) {
        let now = Instant::now();
        self.rec.heard(now);
        if !force
            && self
                .heard_saved
                .is_some_and(|t| now.duration_since(t) < HEARD_EVERY)
        {
            return;
        }
        self.heard_saved = Some(now);
        let store = self.store.clone();
        let ms = wall_ms();
        match tokio::task::spawn_blocking(move || store.save_heard(ms)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot record when the controller was last heard")
            }
            Err(e) => tracing::warn!(error = %e, "recording the last contact panicked"),
        }
    }

    /// Everything the controller needs after a (re)connect: online status, inventory, report,
    /// each instance's state, what the agent holds, and standing notices.
    fn announce(&mut self, session: u64) {
        let status = NodeStatus {
            presence: Presence::Online,
            session,
            boot: self.rec.boot(),
        };
        self.publish(Channel::Status, encode(&status));
        self.publish(Channel::Inventory, encode(&self.inventory));
        self.publish(Channel::Report, encode(&self.rec.report()));
        for ev in self.rec.resync() {
            self.publish_event(&ev);
        }
        self.publish_holding();
        self.publish(Channel::Addresses, encode(&self.addresses));
        for (kind, reason) in self.notices.clone() {
            self.publish_event(&AgentEvent::Notice {
                kind,
                reason: Reason::lossy(&reason),
            });
        }
    }

    /// A desired state from the broker; `old`: the broker's kept copy (delivered on subscribe)
    /// or one queued for this session while the agent was away, not a publish of the
    /// controller's since this connection: it is stored and converged to, but is not contact.
    async fn on_desired(&mut self, payload: &[u8], old: bool) -> bool {
        let d = match DesiredState::decode(payload) {
            Ok(d) => Box::new(d),
            Err(e) => {
                self.counters.malformed += 1;
                self.metrics.mqtt_malformed.inc();
                tracing::warn!(error = %e, count = self.counters.malformed, "dropped a desired state that does not decode");
                return false;
            }
        };
        match self.rec.offer(&d) {
            Offer::Newer => {
                let (generation, fleet, count) = (d.generation, d.fleet, d.instances.len());
                let next = self.rec.next_held(d);
                let store = self.store.clone();
                let copy = next.clone();
                let saved = move || {
                    store.save(&copy)?;
                    store.save_floor(copy.desired.version())
                };
                match tokio::task::spawn_blocking(saved).await {
                    Ok(Ok(())) => {
                        tracing::info!(%fleet, generation, instances = count, kept = next.kept.len(), "desired state accepted");
                        let effects = self.rec.accept(next);
                        self.apply(effects);
                        self.notices.retain(|(k, _)| {
                            !matches!(
                                k,
                                NoticeKind::StateUnreadable
                                    | NoticeKind::StateNotStored
                                    | NoticeKind::LeaseExpired
                            )
                        });
                        if !old {
                            self.heard(true).await;
                        }
                        return true;
                    }
                    Ok(Err(e)) => self.notice(
                        NoticeKind::StateNotStored,
                        format!("desired state {generation} not accepted: cannot store it: {e}"),
                        true,
                    ),
                    Err(e) => tracing::error!(error = %e, "storing the desired state panicked"),
                }
            }
            Offer::Same => {
                let ack = self.rec.ack_current();
                self.publish_event(&ack);
                if !old {
                    // The controller's answer to this connection: starting is allowed again
                    // (a restart with an expired lease).
                    self.heard(false).await;
                }
                return true;
            }
            Offer::Refused(ack) => {
                if let AgentEvent::Ack {
                    result: outpost_protocol::AckResult::OtherInstall { mine },
                    ..
                } = *ack
                {
                    tracing::error!(
                        %mine,
                        bound = ?d.boot,
                        "refused a desired state for another agent install of this node: its identity is in use on another box (or this agent lost its state); building nothing until an operator runs `outpost nodes resolve`"
                    );
                } else {
                    let held = self.rec.held().map(|h| h.desired.version());
                    tracing::warn!(
                        fleet = %d.fleet,
                        generation = d.generation,
                        epoch = d.version().epoch(),
                        held_epoch = held.map(|h| h.epoch()),
                        ?held,
                        "refused a desired state that is older than, or from another fleet than, the one held (an older epoch: from a controller that no longer leads)"
                    );
                }
                self.publish_event(&ack);
                self.publish_holding();
            }
        }
        false
    }

    /// The hypervisor answered (`Ok`) or not: says so once on each change.
    fn hypervisor_health(&mut self, r: Result<(), String>) {
        match r {
            Err(why) if !self.hv_down => {
                self.hv_down = true;
                self.notice(
                    NoticeKind::HypervisorUnavailable,
                    format!("the hypervisor does not answer ({why}): instances keep running, nothing is changed until it is back"),
                    true,
                );
            }
            Ok(()) if self.hv_down => {
                self.hv_down = false;
                self.notices
                    .retain(|(k, _)| *k != NoticeKind::HypervisorUnavailable);
                self.notice(
                    NoticeKind::HypervisorBack,
                    "the hypervisor answers again".into(),
                    false,
                );
            }
            _ => {}
        }
    }

    /// Reads the running instances' addresses on a blocking thread (the answer comes back on
    /// `addr_tx`); one read at a time.
    fn read_addresses(&mut self) {
        if self.addr_busy || self.hv_down {
            return;
        }
        self.addr_busy = true;
        let running: Vec<InstanceId> = self
            .rec
            .report()
            .instances
            .iter()
            .filter(|i| i.state == InstanceState::Running)
            .map(|i| i.id)
            .collect();
        let hv = Arc::clone(&self.hv);
        let tx = self.addr_tx.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Addresses::default();
            for id in running {
                let nics = match hv.addresses(id) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::debug!(%id, error = %e, "cannot read addresses");
                        continue;
                    }
                };
                if nics.is_empty() {
                    continue;
                }
                let nics = nics.into_iter().take(MAX_NICS).collect();
                let _ = out.instances.push(InstanceNics { id, nics });
            }
            let _ = tx.send(out);
        });
    }

    /// Sets the instances-by-state gauges from what the reconciler reports.
    fn count_instances(&self) {
        self.metrics.instances.clear();
        for i in &self.rec.report().instances {
            self.metrics
                .instances
                .get_or_create(&StateLabel {
                    state: i.state.as_str(),
                })
                .inc();
        }
    }

    /// Counts a download's new bytes and its rate.
    fn download_progress(&mut self, ev: &AgentEvent) {
        if let AgentEvent::Fetch {
            digest, done, rate, ..
        } = ev
        {
            let before = self.downloading.get(digest).map_or(0, |d| d.0);
            self.metrics
                .download_bytes
                .inc_by(done.saturating_sub(before));
            self.downloading.insert(*digest, (*done, *rate));
            self.set_download_rate();
        }
    }

    fn set_download_rate(&self) {
        let sum: u64 = self.downloading.values().map(|d| u64::from(d.1)).sum();
        self.metrics
            .download_rate
            .set(i64::try_from(sum).unwrap_or(i64::MAX));
    }

    /// Publishes the addresses read if they changed.
    fn addresses_read(&mut self, a: Addresses) {
        self.addr_busy = false;
        if a != self.addresses {
            tracing::info!(instances = a.instances.len(), "instance addresses changed");
            self.addresses = a;
            if self.connected {
                self.publish(Channel::Addresses, encode(&self.addresses));
            }
        }
    }

    async fn reconcile(&mut self) -> Result<(), AgentError> {
        let hv = Arc::clone(&self.hv);
        let t = Instant::now();
        let listed = tokio::task::spawn_blocking(move || hv.list()).await?;
        self.metrics.call("list", t.elapsed(), listed.is_ok());
        match listed {
            Ok(domains) => {
                self.hypervisor_health(Ok(()));
                let effects = self.rec.observe(Instant::now(), &domains);
                self.apply(effects);
                self.metrics.passes.inc();
                self.metrics.pass_seconds.observe(t.elapsed().as_secs_f64());
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list domains; will retry");
                self.hypervisor_health(Err(e.to_string()));
            }
        }
        Ok(())
    }

    /// Re-reads the host (images, disk, CPUs, memory); republishes the inventory if it changed.
    /// A hypervisor that does not answer is reported, never fatal.
    async fn refresh_host(&mut self) -> Result<(), AgentError> {
        // Cached images nothing has used for the TTL go (never one the held state names).
        let cache = crate::images::Cache::new(&self.cfg.image_dir);
        let keep = self.rec.blobs_in_use();
        if let Some(before) = std::time::SystemTime::now().checked_sub(self.cfg.downloads.ttl) {
            let gone = tokio::task::spawn_blocking(move || cache.evict(&keep, before, 0))
                .await
                .unwrap_or_default();
            for d in gone {
                tracing::info!(blob = %d.short(), "unused cached image removed");
            }
        }
        let (inventory, facts) = match describe(&self.cfg, Arc::clone(&self.hv)).await {
            Ok(d) => d,
            Err(AgentError::Host(e)) => {
                tracing::warn!(error = %e, "cannot describe the host; will retry");
                self.hypervisor_health(Err(e.to_string()));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if inventory != self.inventory {
            tracing::info!("host changed: republishing the inventory");
            self.inventory = inventory;
            self.rec.set_host(facts);
            if self.connected {
                self.publish(Channel::Inventory, encode(&self.inventory));
            }
        }
        Ok(())
    }
}

async fn describe(
    cfg: &Config,
    hv: Arc<dyn Hypervisor>,
) -> Result<(Inventory, HostFacts), AgentError> {
    let image_dir = cfg.image_dir.clone();
    let state_dir = cfg.state_dir.clone();
    let (host, images, disk, cached) = tokio::task::spawn_blocking(move || {
        (
            hv.host(),
            fingerprint::scan_images(&image_dir),
            fingerprint::disk_free_gib(&state_dir),
            crate::images::Cache::new(&image_dir).reported(),
        )
    })
    .await?;
    Ok(fingerprint::describe(
        host?,
        disk,
        cfg.reserved,
        &cfg.labels,
        images,
        cached,
    ))
}

/// Resolves at `at`, or never.
async fn wake_at(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Runs the agent until `shutdown` resolves. Running VMs are left running when it returns.
pub async fn run(
    cfg: Config,
    hv: Arc<dyn Hypervisor>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Counters, AgentError> {
    // (TLS uses the process's rustls provider, which `main` installs.)
    // The loop's state holds whole desired states (tens of KiB each): keep it on the heap,
    // not on the stack of whichever thread polls it.
    Box::pin(run_loop(cfg, hv, shutdown)).await
}

async fn run_loop(
    cfg: Config,
    hv: Arc<dyn Hypervisor>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Counters, AgentError> {
    let store = DesiredStore::open(&cfg.state_dir)?;
    let boot = store.boot_id()?;
    tracing::info!(%boot, "this agent install");
    let mut notices = Vec::new();
    let restored = match store.load() {
        Ok(d) => d,
        Err(e) => {
            // Never guess: without a trustworthy desired state nothing is created or deleted
            // until the controller sends one.
            tracing::error!(error = %e, "ignoring the stored desired state");
            notices.push((NoticeKind::StateUnreadable, e.to_string()));
            None
        }
    };
    if let Some(h) = &restored {
        tracing::info!(
            fleet = %h.desired.fleet,
            generation = h.desired.generation,
            instances = h.desired.instances.len(),
            kept = h.kept.len(),
            "restored the desired state from disk"
        );
    }
    // A hypervisor that is not up yet (libvirtd starting after the agent) is waited for.
    let mut backoff = Backoff::new(Duration::from_secs(1), RECONNECT_MAX);
    let (inventory, facts) = loop {
        match describe(&cfg, Arc::clone(&hv)).await {
            Ok(d) => break d,
            Err(AgentError::Host(e)) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_s = wait.as_secs(), "cannot describe the host yet");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    };
    tracing::info!(
        node = %cfg.node_id, arch = %inventory.arch, hypervisor = %inventory.hypervisor,
        vcpus = inventory.total.vcpus, memory_mib = inventory.total.memory_mib,
        disk_gib = inventory.total.disk_gib, images = inventory.images.len(), "host fingerprinted"
    );

    let first_session = store.session_base(wall_ms())?;
    let (client, mut link_rx, link, mut session) = crate::link::start(&cfg, boot, first_session);

    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let (fetch_tx, mut fetch_rx) = mpsc::unbounded_channel();
    let (addr_tx, mut addr_rx) = mpsc::unbounded_channel();
    let http = crate::images::fetch::Client::new(cfg.tls.as_ref().map(|t| t.ca_pem.as_slice()));
    let fetch_slots = Arc::new(tokio::sync::Semaphore::new(cfg.downloads.concurrent.max(1)));
    let desired_topic = topics::topic(&cfg.node_id, Channel::Desired);
    let console_topic = topics::topic(&cfg.node_id, Channel::ConsoleRequest);
    let mut reconcile_tick = tokio::time::interval(cfg.reconcile_interval);
    let mut report_tick = tokio::time::interval(cfg.report_interval);
    report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    reconcile_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut rec = Reconciler::new(facts, restored)
        .with_boot(boot)
        .with_floor(store.floor());
    // The lease runs from the last contact recorded on disk, if the clock still agrees.
    if let Some(age) = store
        .heard_ms()
        .and_then(|ms| wall_ms().checked_sub(ms))
        .map(Duration::from_millis)
        && let Some(at) = Instant::now().checked_sub(age)
    {
        rec.heard(at);
    }
    if rec.held().is_some() && !rec.may_start(Instant::now()) {
        let why = "restarted after the controller's lease ran out: starting nothing until it is heard from again";
        tracing::warn!("{why}");
        notices.push((NoticeKind::LeaseExpired, why.to_owned()));
    }
    let metrics = Arc::new(Metrics::new(cfg.node_id.as_str()));
    if let Some(addr) = cfg.metrics_listen {
        crate::metrics::serve(addr, Arc::clone(&metrics)).await?;
    }
    let mut sh = Shell {
        rec,
        cfg,
        hv,
        store,
        client,
        counters: Counters::default(),
        inventory,
        connected: false,
        done_tx,
        notices,
        heard_saved: None,
        synced: false,
        fresh: false,
        queued: false,
        hv_down: false,
        fetch_tx,
        fetch_slots,
        http,
        addresses: Addresses::default(),
        addr_tx,
        addr_busy: false,
        metrics,
        downloading: std::collections::HashMap::new(),
        fetch_tasks: std::collections::HashMap::new(),
        cancelled: std::collections::HashSet::new(),
    };
    let mut pass_due = true;
    let mut ever_connected = false;
    tokio::pin!(shutdown);

    loop {
        if pass_due {
            pass_due = false;
            sh.cancel_unneeded();
            sh.reconcile().await?;
        }
        tokio::select! {
            () = &mut shutdown => break,
            Some(ev) = link_rx.recv() => match ev {
                LinkEvent::Connected { session: s, broker, resumed } => {
                    if ever_connected {
                        sh.metrics.mqtt_reconnects.inc();
                    }
                    ever_connected = true;
                    sh.metrics.mqtt_connected.set(1);
                    session = s;
                    tracing::info!(%broker, session, "connected");
                    sh.connected = true;
                    sh.synced = false;
                    sh.fresh = false;
                    // A resumed session first delivers what was published while the agent was
                    // away (not flagged retained, yet as old): only a publish after the
                    // subscription's acknowledgement (or the broker's retained copy, sent
                    // again for the new subscription) is new.
                    sh.queued = resumed;
                    let _ = sh.client.try_subscribe(desired_topic.as_str(), QoS::AtLeastOnce);
                    let _ = sh.client.try_subscribe(console_topic.as_str(), QoS::AtMostOnce);
                    sh.announce(session);
                }
                LinkEvent::Subscribed => sh.queued = false,
                LinkEvent::Message(p) => {
                    if p.topic == desired_topic.as_str() {
                        sh.synced = true;
                        let old = p.retain || sh.queued;
                        if p.retain {
                            sh.queued = false;
                        }
                        sh.fresh |= !old;
                        pass_due |= sh.on_desired(&p.payload, old).await;
                    } else if p.topic == console_topic.as_str() {
                        sh.on_console(&p.payload);
                    } else {
                        sh.counters.malformed += 1;
                        sh.metrics.mqtt_malformed.inc();
                        tracing::warn!(topic = %p.topic, "message on an unexpected topic dropped");
                    }
                }
                LinkEvent::Lost { error, retry_in } => {
                    sh.counters.connect_failures += 1;
                    if sh.connected || sh.counters.connect_failures.is_power_of_two() {
                        let retry_in_ms = retry_in.as_millis() as u64;
                        let failures = sh.counters.connect_failures;
                        match &error {
                            ConnectionError::ConnectionRefused(code) => tracing::error!(
                                ?code, retry_in_ms, failures,
                                "the broker refused this device's login: check its credentials (re-provision it with outpost-provision, and reload the broker's password file); VMs keep running"
                            ),
                            _ => tracing::warn!(%error, retry_in_ms, failures, "broker unreachable; VMs keep running"),
                        }
                    }
                    if matches!(error, ConnectionError::MqttState(_)) {
                        tracing::warn!("protocol error from the broker side");
                    }
                    sh.connected = false;
                    sh.metrics.mqtt_connected.set(0);
                }
                LinkEvent::Closed => {}
            },
            Some(msg) = fetch_rx.recv() => match msg {
                FetchMsg::Progress(AgentEvent::Fetch { digest, .. })
                    if sh.cancelled.contains(&digest) => {}
                FetchMsg::Progress(ev) => {
                    sh.download_progress(&ev);
                    if sh.connected {
                        sh.publish_event(&ev);
                    }
                }
                FetchMsg::Done(blob, _) if sh.cancelled.remove(&blob.digest) => {}
                FetchMsg::Done(blob, result) => {
                    sh.fetch_tasks.remove(&blob.digest);
                    sh.downloading.remove(&blob.digest);
                    sh.set_download_rate();
                    let ok = result.is_ok();
                    sh.rec.fetched(blob.digest, result);
                    if ok {
                        // The cache changed: the controller learns it with the inventory.
                        sh.refresh_host().await?;
                    }
                    pass_due = true;
                }
            },
            Some((id, op, result)) = done_rx.recv() => {
                let effects = sh.rec.completed(Instant::now(), id, &op, result);
                sh.apply(effects);
                pass_due = true;
            }
            Some(a) = addr_rx.recv() => sh.addresses_read(a),
            _ = reconcile_tick.tick() => pass_due = true,
            // The core said when it needs the next pass (a retry or a restart after back-off).
            () = wake_at(sh.rec.next_pass(Instant::now())) => pass_due = true,
            _ = report_tick.tick() => {
                sh.refresh_host().await?;
                sh.read_addresses();
                sh.count_instances();
                if sh.connected && sh.synced {
                    // A live link to the fleet's broker counts as contact once the controller
                    // spoke on it: while it is up, the controller sees this node and does not
                    // rebuild its instances elsewhere.
                    if sh.fresh {
                        sh.heard(false).await;
                    }
                    let report = encode(&sh.rec.report());
                    sh.publish(Channel::Report, report);
                }
            }
        }
    }

    // A clean exit says so at once instead of waiting for the Last Will. VMs keep running.
    if sh.connected {
        let offline = NodeStatus {
            presence: Presence::Offline,
            session,
            boot: sh.rec.boot(),
        };
        sh.publish(Channel::Status, encode(&offline));
        let _ = sh.client.try_disconnect();
        let flush = async {
            while let Some(ev) = link_rx.recv().await {
                if matches!(ev, LinkEvent::Closed) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
    }
    link.abort();
    tracing::info!(counters = ?sh.counters, "agent stopped; instances keep running");
    Ok(sh.counters)
}

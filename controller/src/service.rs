//! The controller service: one task owns the fleet and the store; the MQTT event loop and the
//! HTTP API feed it through channels. Inputs are taken in batches (whatever is queued when the
//! loop wakes, up to [`MAX_BATCH`]); each batch's changes are stored in one transaction, and only
//! then are desired states published (retained, QoS 1) and API calls answered.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use outpost_protocol::topics::{self, Channel};
use outpost_protocol::{
    Addresses, AgentEvent, FleetId, Holding, InstanceId, Inventory, Message, NodeId, NodeReport,
    NodeStatus,
};
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};
use tokio::sync::mpsc;

use crate::action::{ActionError, Call, Reply, Responder, execute};
use crate::consoles::Consoles;
use crate::fleet::{Fleet, FleetConfig};
use crate::inbound::{Inbound, Limiter};
use crate::metrics::Metrics;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::store::{PgStore, SqliteStore, Store, StoreError};

/// Where the MQTT broker is.
#[derive(Debug, Clone)]
pub enum BrokerChoice {
    /// Start the embedded broker on this address.
    Embedded(SocketAddr),
    /// Use an external broker.
    External {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// Username and password.
        credentials: Option<(String, String)>,
        /// MQTT over TLS.
        tls: Option<BrokerTls>,
    },
}

/// TLS to the broker, PEM-encoded.
#[derive(Debug, Clone)]
pub struct BrokerTls {
    /// The CA the broker's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// Client certificate and key, for mutual TLS.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

/// How to run the controller.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where the store lives.
    pub data_dir: PathBuf,
    /// The broker.
    pub broker: BrokerChoice,
    /// The HTTP API's address.
    pub api_listen: SocketAddr,
    /// Bearer token the API requires (mandatory off loopback).
    pub api_token: Option<String>,
    /// A mosquitto-format password file: puts the gate (per-device authentication and topic
    /// confinement) in front of the embedded broker, which may then listen beyond loopback.
    pub mqtt_passwd: Option<PathBuf>,
    /// The provisioning registry: the capacity each device was enrolled with
    /// (`devices/NODE/ceiling.toml`), read at start and every [`ENROLLED_EVERY`].
    pub registry: Option<PathBuf>,
    /// Fleet settings.
    pub fleet: FleetConfig,
    /// Scheduler settings.
    pub scheduler: SchedulerConfig,
    /// A second listener serving only `/metrics` (same token rules as the API).
    pub metrics_listen: Option<SocketAddr>,
    /// The API over TLS.
    pub api_tls: Option<crate::tls::ApiTls>,
    /// Allow the API off loopback without TLS (tokens then cross the network in clear).
    pub insecure_http: bool,
    /// Where the fleet is stored.
    pub store: crate::store::StoreChoice,
    /// This controller's name among those sharing a store (its lease holder name).
    pub name: String,
    /// The API URL standbys point clients at while this controller leads (default: from
    /// `api_listen`).
    pub advertise_api: Option<String>,
}

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The embedded broker failed.
    #[cfg(feature = "embedded-broker")]
    #[error("{0}")]
    Broker(#[from] crate::broker::BrokerError),
    /// The API could not listen.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Refused configuration.
    #[error("{0}")]
    Config(String),
}

/// The most inputs folded into one stored batch: bounds how long the first caller of a batch
/// waits for its answer.
const MAX_BATCH: usize = 512;

/// One input to the service loop.
enum Input {
    Message(Inbound),
    Call(Call),
    Tick,
}

/// `first` and whatever else is already queued, up to [`MAX_BATCH`] inputs in all; calls
/// before messages, so that a waiting caller is answered sooner. What is left stays queued.
fn batch(
    first: Input,
    calls: &mut mpsc::Receiver<Call>,
    msgs: &mut mpsc::Receiver<Inbound>,
) -> Vec<Input> {
    let mut inputs = vec![first];
    while inputs.len() < MAX_BATCH {
        match calls
            .try_recv()
            .map(Input::Call)
            .or_else(|_| msgs.try_recv().map(Input::Message))
        {
            Ok(i) => inputs.push(i),
            Err(_) => break,
        }
    }
    inputs
}

/// Starts the embedded broker on `a` (behind the gate when `passwd` is given) and says how the
/// controller's own client reaches it.
#[cfg(feature = "embedded-broker")]
async fn embedded(
    a: SocketAddr,
    passwd: Option<&std::path::Path>,
) -> Result<BrokerChoice, ServeError> {
    let link = crate::broker::start_embedded(a, passwd).await?;
    Ok(match link.credentials {
        None => BrokerChoice::Embedded(link.addr),
        credentials => BrokerChoice::External {
            host: link.addr.ip().to_string(),
            port: link.addr.port(),
            credentials,
            tls: None,
        },
    })
}

/// This build has no embedded broker.
#[cfg(not(feature = "embedded-broker"))]
async fn embedded(_: SocketAddr, _: Option<&std::path::Path>) -> Result<BrokerChoice, ServeError> {
    Err(ServeError::Config(
        "this build has no embedded broker (feature embedded-broker): give --broker".into(),
    ))
}

/// A new fleet identity: 64 random bits from the OS (never 0).
fn random_fleet() -> Result<FleetId, ServeError> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| ServeError::Config(format!("no randomness: {e}")))?;
    Ok(FleetId(u64::from_le_bytes(b).max(1)))
}

/// How often the stored blobs nothing refers to are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// How often the registry's enrolled capacities are read again.
pub const ENROLLED_EVERY: Duration = Duration::from_secs(10);

/// The capacities devices were enrolled with, from the provisioning registry (unreadable files
/// logged: those devices fall back to their first report).
fn read_enrolled(
    registry: &std::path::Path,
) -> std::collections::BTreeMap<NodeId, outpost_firmware_config::enrolled::Enrolled> {
    let (found, bad) = outpost_firmware_config::enrolled::read_all(registry);
    for (file, why) in bad {
        tracing::warn!(file = %file.display(), %why, "enrolled capacity unreadable: ignored");
    }
    found.into_iter().collect()
}

/// The devices' broker credentials from the password file the controller knows of (see
/// [`credentials_file`]; `user:hash` lines), each entry hashed; `None` if there is none or it
/// cannot be read (what was known stands).
fn read_credentials(cfg: &ServeConfig) -> Option<std::collections::BTreeMap<NodeId, [u8; 32]>> {
    use sha2::Digest as _;
    let path = credentials_file(cfg)?;
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the broker's password file: the devices' credentials are as last read");
            return None;
        }
    };
    Some(
        text.lines()
            .filter_map(|l| {
                let (user, _) = l.split_once(':')?;
                let node = NodeId::new(user.trim()).ok()?;
                Some((node, sha2::Sha256::digest(l.trim().as_bytes()).into()))
            })
            .collect(),
    )
}

/// Where the devices' broker credentials are, if the controller knows: the gate's password
/// file, or the registry's.
fn credentials_file(cfg: &ServeConfig) -> Option<PathBuf> {
    cfg.mqtt_passwd.clone().or_else(|| {
        cfg.registry
            .as_ref()
            .map(|r| r.join("mosquitto").join("passwd"))
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The fleet's time: the wall clock read once, when the controller started, carried forward
/// by the monotonic clock. Liveness, lost-after delays and failure memory are differences of
/// it, so a step of the wall clock (NTP, an operator, a VM restored) moves nothing; the times
/// shown (events, creation) stay the wall clock's as it was at start plus time since.
#[derive(Debug, Clone, Copy)]
struct Clock {
    wall0_ms: u64,
    t0: Instant,
}

impl Clock {
    fn start() -> Self {
        Self {
            wall0_ms: now_ms(),
            t0: Instant::now(),
        }
    }

    fn now(self) -> u64 {
        let since = u64::try_from(self.t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.wall0_ms.saturating_add(since)
    }
}

/// Ticks further apart than this mean the controller was not looking (frozen, starved, or
/// stuck on its store): the time between is not counted against any node.
const OBSERVE_GAP: Duration = Duration::from_secs(3);

/// A leader whose broker link has been down this long refuses changes: they could not reach
/// their nodes (a blip of a reconnect is ridden out).
const BROKER_REFUSE: Duration = Duration::from_secs(1);

/// A leader whose broker link has been down this long says so to the store, so that a
/// standby that has the broker takes over.
pub const BROKER_GRACE: Duration = Duration::from_secs(3);

/// How long before the lease's end (already short of the store's by [`LEASE_MARGIN`]) a
/// leader stops publishing: what it queues is on the wire before any standby may lead.
const PUBLISH_MARGIN: Duration = Duration::from_millis(500);

/// Folds one MQTT message into the fleet; returns false if it did not decode.
///
/// A node an operator removed is not re-admitted by what the broker kept of it (its retained
/// status, inventory, addresses): only by its agent connecting anew (a live `online` status,
/// which needs credentials: provisioned again). Until then everything it sends is dropped.
pub fn ingest(fleet: &mut Fleet, now: u64, m: &Inbound) -> bool {
    let Ok((node, ch)) = topics::parse(&m.topic) else {
        return false;
    };
    let payload = m.payload.as_slice();
    if fleet.is_removed(&node) {
        let fresh_online = ch == Channel::Status
            && !m.retained
            && NodeStatus::decode(payload)
                .is_ok_and(|s| s.presence == outpost_protocol::Presence::Online);
        if !fresh_online {
            return true;
        }
        fleet.readmit(&node);
    }
    match ch {
        Channel::Status => NodeStatus::decode(payload)
            .map(|s| fleet.on_status(now, &node, s))
            .is_ok(),
        Channel::Inventory => Inventory::decode(payload)
            .map(|i| fleet.on_inventory(now, &node, i))
            .is_ok(),
        Channel::Report => NodeReport::decode(payload)
            .map(|r| fleet.on_report(now, &node, &r))
            .is_ok(),
        Channel::Event => AgentEvent::decode(payload)
            .map(|e| fleet.on_event(now, &node, &e))
            .is_ok(),
        Channel::Holding => Holding::decode(payload)
            .map(|h| fleet.on_holding(now, &node, h))
            .is_ok(),
        Channel::Addresses => Addresses::decode(payload)
            .map(|a| fleet.on_addresses(&node, a))
            .is_ok(),
        // Answers to console requests go to the API (see `Consoles`); the controller's own.
        Channel::Desired | Channel::ConsoleRequest | Channel::Console => true,
    }
}

fn mqtt(cfg: &ServeConfig) -> (AsyncClient, rumqttc::EventLoop) {
    let (host, port, creds, tls) = match &cfg.broker {
        BrokerChoice::Embedded(a) => (a.ip().to_string(), a.port(), None, None),
        BrokerChoice::External {
            host,
            port,
            credentials,
            tls,
        } => (host.clone(), *port, credentials.clone(), tls.clone()),
    };
    // Controllers sharing a fleet each need their own client id (one id, two clients: the
    // broker throws one off each time the other connects).
    let id = match cfg.store {
        StoreChoice::Sqlite => "outpost-controller".to_owned(),
        StoreChoice::Postgres(_) => format!("outpost-controller-{}", cfg.name),
    };
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(10))
        .set_clean_session(false)
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_inflight(1000);
    if let Some((u, p)) = creds {
        o.set_credentials(u, p);
    }
    if let Some(BrokerTls {
        ca_pem: ca,
        client: client_auth,
    }) = tls
    {
        // (the process's rustls provider is installed by `main`)
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Simple {
                ca,
                alpn: None,
                client_auth,
            },
        ));
    }
    let (client, mut el) = AsyncClient::new(o, 10_000);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    el.set_network_options(net);
    (client, el)
}

/// The channels the leader subscribes to (a standby subscribes to none).
const SUBSCRIBED: [Channel; 7] = [
    Channel::Status,
    Channel::Inventory,
    Channel::Report,
    Channel::Event,
    Channel::Holding,
    Channel::Console,
    Channel::Addresses,
];

/// How long the lease is counted on after the renewal that was sent at some instant: the
/// store's clock starts the lease's [`LEASE_TTL`] after that instant, and this margin covers
/// the two clocks' drift, so the leader stops before any standby may start.
const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// How often a standby asks whether it may lead.
const STANDBY_POLL: Duration = Duration::from_millis(500);

/// The longest a store call may take before the controller gives up on it (a standby's lease
/// query, or the load at takeover).
const STORE_WAIT: Duration = Duration::from_secs(60);

use crate::store::{Candidate, LEASE_TTL, Lead, RENEW_EVERY, StoreChoice, StoreWorker};

/// How the configured store is opened (on its own thread).
fn store_opener(
    cfg: &ServeConfig,
) -> Result<impl FnOnce() -> Result<Box<dyn Store>, StoreError> + Send + 'static, ServeError> {
    let fleet = random_fleet()?;
    let choice = cfg.store.clone();
    let dir = cfg.data_dir.clone();
    let name = cfg.name.clone();
    Ok(move || match choice {
        StoreChoice::Sqlite => {
            Ok::<_, StoreError>(Box::new(SqliteStore::open(&dir, fleet)?) as Box<dyn Store>)
        }
        StoreChoice::Postgres(pg) => {
            Ok(Box::new(PgStore::open(pg, &name, fleet)?) as Box<dyn Store>)
        }
    })
}

/// Opens the configured store on its own thread.
async fn open_store(cfg: &ServeConfig) -> Result<StoreWorker, ServeError> {
    Ok(StoreWorker::spawn("store", store_opener(cfg)?).await?)
}

/// How often at most a store that hangs is given up on and opened again (each attempt may
/// leave a thread waiting on a dead link).
const REPLACE_EVERY: Duration = Duration::from_secs(5);

/// How a leader's or a standby's turn ended.
enum Ended {
    /// Shut down.
    Stop,
    /// This controller may lead, in this epoch.
    Lead(u64),
    /// It lost the lease (or the store stopped answering): it is a standby again.
    SteppedDown,
}

/// What the service loop owns besides the fleet.
struct Shell {
    cfg: ServeConfig,
    me: Candidate,
    store: StoreWorker,
    client: AsyncClient,
    leading: std::sync::Arc<std::sync::atomic::AtomicBool>,
    msgs: mpsc::Receiver<Inbound>,
    /// The per-node rate limit the MQTT task applies (its drop counts become node notices).
    limiter: std::sync::Arc<std::sync::Mutex<Limiter>>,
    calls: mpsc::Receiver<Call>,
    events_tx: tokio::sync::broadcast::Sender<crate::views::EventView>,
    consoles: Consoles,
    blob_store: crate::blobs::BlobStore,
    metrics: std::sync::Arc<Metrics>,
    clock: Clock,
    /// When the store was last given up on and opened again.
    replaced: Option<Instant>,
}

/// Runs the controller until `shutdown` resolves.
pub async fn serve(
    cfg: ServeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    if matches!(cfg.store, StoreChoice::Postgres(_))
        && matches!(cfg.broker, BrokerChoice::Embedded(_))
    {
        return Err(ServeError::Config(
            "--store postgres://… is for several controllers, which must share one broker: give --broker (mosquitto, EMQX, VerneMQ)".into(),
        ));
    }
    // The store first: the first thing a controller needs, and the clearest error if missing.
    let store = open_store(&cfg).await?;
    let tokens = std::sync::Arc::new(
        crate::tokens::Tokens::for_store(
            cfg.api_token.as_deref(),
            &cfg.store,
            &cfg.data_dir,
            false,
        )
        .map_err(|e| ServeError::Config(e.to_string()))?,
    );
    for (what, addr) in [
        ("API", Some(cfg.api_listen)),
        ("metrics listener", cfg.metrics_listen),
    ] {
        if let Some(a) = addr
            && !a.ip().is_loopback()
            && !tokens.required()
        {
            return Err(ServeError::Config(format!(
                "the {what} listens on {a} (not loopback): give --api-token-file, or make named tokens (outpost-controller tokens create)"
            )));
        }
    }
    if !cfg.api_listen.ip().is_loopback() && cfg.api_tls.is_none() && !cfg.insecure_http {
        return Err(ServeError::Config(format!(
            "the API listens on {} without TLS: its tokens would cross the network in clear. Give --api-tls-cert and --api-tls-key (or --insecure-http to accept that)",
            cfg.api_listen
        )));
    }
    let api_tls = cfg
        .api_tls
        .clone()
        .map(crate::tls::Reloading::new)
        .transpose()
        .map_err(ServeError::Config)?;
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    // The address the controller's own client uses.
    let mut own = cfg.clone();
    if let BrokerChoice::Embedded(a) = cfg.broker {
        own.broker = embedded(a, cfg.mqtt_passwd.as_deref()).await?;
    }

    let (client, mut el) = mqtt(&own);
    let (msg_tx, msg_rx) = mpsc::channel::<Inbound>(10_000);
    let limiter = std::sync::Arc::new(std::sync::Mutex::new(Limiter::default()));
    let limit = std::sync::Arc::clone(&limiter);
    let sub = client.clone();
    let m = std::sync::Arc::clone(&metrics);
    let leading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lead_flag = std::sync::Arc::clone(&leading);
    tokio::spawn(async move {
        let mut backoff =
            outpost_protocol::Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    m.broker(true);
                    tracing::info!("connected to the broker");
                    // A standby listens to nothing: it subscribes when it takes over.
                    if lead_flag.load(std::sync::atomic::Ordering::SeqCst) {
                        subscribe(&sub).await;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    // One device gets its share and no more (see `inbound`): what passes is
                    // queued for the service loop, which keeps up with honest nodes.
                    let node = p.topic.split('/').nth(2).unwrap_or_default();
                    let pass = limit.lock().unwrap_or_else(|e| e.into_inner()).admit(
                        node,
                        p.payload.len(),
                        Instant::now(),
                    );
                    if !pass {
                        m.dropped("rate");
                        continue;
                    }
                    let msg = Inbound {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                        retained: p.retain,
                    };
                    if msg_tx.send(msg).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    m.broker(false);
                    let wait = backoff.next_jittered(fastrand::f64());
                    // Said at the first failures, then at each doubling of their count.
                    if backoff.failures().is_power_of_two() {
                        let (failures, retry_in_ms) = (backoff.failures(), wait.as_millis() as u64);
                        match &e {
                            rumqttc::ConnectionError::ConnectionRefused(code) => tracing::error!(
                                ?code,
                                failures,
                                retry_in_ms,
                                "the broker refused the controller's login: check --broker-username and the broker password (outpost-provision controller prints it)"
                            ),
                            _ => {
                                tracing::warn!(error = %e, failures, retry_in_ms, "broker connection lost; retrying with back-off")
                            }
                        }
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    });

    let (call_tx, call_rx) = mpsc::channel::<Call>(1024);
    let listener = tokio::net::TcpListener::bind(cfg.api_listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: cfg.api_listen,
            source,
        })?;
    tracing::info!(listen = %cfg.api_listen, "HTTP API listening");
    let (events_tx, _) = tokio::sync::broadcast::channel::<crate::views::EventView>(4096);
    let consoles = Consoles::default();
    let app = crate::api::router(
        call_tx.clone(),
        std::sync::Arc::clone(&tokens),
        crate::blobs::BlobStore::new(&cfg.data_dir),
        events_tx.clone(),
        crate::api::ConsoleLink {
            client: client.clone(),
            waiting: consoles.clone(),
        },
        std::sync::Arc::clone(&metrics),
    );
    if let Some(addr) = cfg.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Listen { addr, source })?;
        tracing::info!(listen = %addr, "metrics listening");
        let app = crate::api::metrics_router(
            call_tx.clone(),
            std::sync::Arc::clone(&tokens),
            std::sync::Arc::clone(&metrics),
            crate::api::ConsoleLink {
                client: client.clone(),
                waiting: consoles.clone(),
            },
            crate::blobs::BlobStore::new(&cfg.data_dir),
        );
        tokio::spawn(crate::listener::serve(
            l,
            app,
            None,
            crate::listener::Limits::for_open_files(64),
        ));
    }
    if let Some(tls) = &api_tls {
        tls.watch();
    }
    tokio::spawn(crate::listener::serve(
        listener,
        app,
        api_tls,
        crate::listener::Limits::from_process(),
    ));

    let me = Candidate {
        name: cfg.name.clone(),
        api: cfg.advertise_api.clone().unwrap_or_else(|| {
            let scheme = if cfg.api_tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}", cfg.api_listen)
        }),
        broker: true,
    };
    let mut shell = Shell {
        blob_store: crate::blobs::BlobStore::new(&cfg.data_dir),
        cfg,
        me,
        store,
        client,
        leading,
        msgs: msg_rx,
        limiter,
        calls: call_rx,
        events_tx,
        consoles,
        metrics,
        clock: Clock::start(),
        replaced: None,
    };
    tokio::pin!(shutdown);
    loop {
        let epoch = match shell.standby(&mut shutdown).await {
            Ended::Lead(epoch) => epoch,
            _ => break,
        };
        match shell.lead(epoch, &mut shutdown).await {
            Ended::SteppedDown => continue,
            _ => {
                // A clean stop hands the lease over at once.
                let r =
                    tokio::time::timeout(Duration::from_secs(2), shell.store.run(|s| s.resign()))
                        .await;
                if let Ok(Ok(Err(e))) = r {
                    tracing::warn!(error = %e, "could not give the lease up: a standby takes over when it runs out");
                }
                break;
            }
        }
    }
    tracing::info!("controller stopped");
    Ok(())
}

async fn subscribe(client: &AsyncClient) {
    for ch in SUBSCRIBED {
        let _ = client.subscribe(ch.all_nodes(), QoS::AtLeastOnce).await;
    }
}

impl Shell {
    /// Waits for the lease (at once with a store only this controller uses), answering every
    /// call with the leader's whereabouts meanwhile.
    async fn standby(&mut self, shutdown: &mut (impl Future<Output = ()> + Unpin)) -> Ended {
        self.leading
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let mut poll = tokio::time::interval(STANDBY_POLL);
        let mut said: Option<Option<(String, String)>> = None;
        loop {
            tokio::select! {
                () = &mut *shutdown => return Ended::Stop,
                Some(_) = self.msgs.recv() => {} // left from a lost lease: not ours to act on
                Some((_, _, reply, _)) = self.calls.recv() => {
                    let e = if self.metrics.starting() || matches!(self.cfg.store, StoreChoice::Sqlite) {
                        ActionError::Starting
                    } else {
                        ActionError::NotLeader(self.metrics.leader())
                    };
                    let _ = reply.send(Err(e));
                }
                _ = poll.tick() => {
                    let me = Candidate { broker: self.metrics.broker_down_for().is_none(), ..self.me.clone() };
                    self.metrics.store_waiting(true);
                    let r = tokio::time::timeout(LEASE_TTL / 2, self.store.run(move |s| s.lead(&me))).await;
                    self.metrics.store_waiting(false);
                    match r {
                        Ok(Ok(Ok(Lead::Leader { epoch }))) => return Ended::Lead(epoch),
                        Ok(Ok(Ok(Lead::Standby { leader }))) => {
                            if said.as_ref() != Some(&leader) {
                                match &leader {
                                    Some((name, api)) => tracing::info!(leader = %name, %api, "standby: another controller leads"),
                                    None => tracing::info!("standby: no controller leads; waiting for the lease"),
                                }
                                said = Some(leader.clone());
                            }
                            self.metrics.standby(leader);
                        }
                        Ok(Ok(Err(e))) => {
                            tracing::warn!(error = %e, "standby: cannot reach the store");
                            self.metrics.standby(None);
                        }
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "the store's thread is gone; opening the store again");
                            self.replace_store().await;
                        }
                        Err(_) => {
                            tracing::warn!("standby: the store did not answer; opening it again");
                            self.replace_store().await;
                        }
                    }
                }
            }
        }
    }

    /// Renews the lease (call when [`renewal_due`]); true if it is lost (taken over, or not
    /// renewed in time).
    async fn renew(
        &mut self,
        epoch: u64,
        until: Instant,
        renewed_at: &mut Instant,
        lease_until: &mut Option<Instant>,
    ) -> bool {
        if Instant::now() >= until {
            tracing::error!(
                epoch,
                "the lease could not be renewed in time: stepping down (no more writes or publishing)"
            );
            return true;
        }
        let sent = Instant::now();
        // Whether this leader still has its broker: a standby that has it takes over from one
        // that has lost it for longer than the grace.
        let me = Candidate {
            broker: self
                .metrics
                .broker_down_for()
                .is_none_or(|d| d < BROKER_GRACE),
            ..self.me.clone()
        };
        let me_broker = me.broker;
        self.metrics.store_waiting(true);
        let r = tokio::time::timeout_at(until.into(), self.store.run(move |s| s.lead(&me))).await;
        self.metrics.store_waiting(false);
        // A leader that said it lost its broker may be replaced before its lease ends (a
        // standby that has the broker takes over): it does not claim to lead meanwhile.
        self.metrics
            .set_lease_unconfirmed(!me_broker || !matches!(r, Ok(Ok(Ok(Lead::Leader { .. })))));
        match r {
            Ok(Ok(Ok(Lead::Leader { epoch: e }))) if e == epoch => {
                *renewed_at = sent;
                *lease_until = Some(sent + LEASE_TTL - LEASE_MARGIN);
                false
            }
            Ok(Ok(Ok(_))) => {
                tracing::error!(
                    epoch,
                    "another controller took the lease over: stepping down"
                );
                true
            }
            Ok(Ok(Err(e))) => {
                *renewed_at = sent;
                tracing::warn!(error = %e, "cannot renew the lease; retrying");
                false
            }
            Ok(Err(_)) | Err(_) => {
                tracing::error!(
                    epoch,
                    "the store did not answer the lease renewal in time: stepping down"
                );
                self.replace_store().await;
                true
            }
        }
    }

    /// Gives up on a store thread that hangs (a database behind a dead link) and opens the
    /// store again on a new one, without waiting for it to open (a link that hangs would
    /// hang the loop): calls queue behind the open. At most every [`REPLACE_EVERY`].
    async fn replace_store(&mut self) {
        if self.replaced.is_some_and(|t| t.elapsed() < REPLACE_EVERY) {
            return;
        }
        self.replaced = Some(Instant::now());
        let opened = store_opener(&self.cfg).and_then(|open| {
            StoreWorker::spawn_lazy("store", "cannot open the store yet; will retry", open)
                .map_err(|e| ServeError::Store(e.into()))
        });
        match opened {
            Ok(s) => self.store = s,
            Err(e) => tracing::warn!(error = %e, "cannot open the store yet; will retry"),
        }
    }

    /// Leads in `epoch` until shutdown or until the lease is lost.
    async fn lead(
        &mut self,
        epoch: u64,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> Ended {
        let t0 = Instant::now();
        let sqlite = matches!(self.cfg.store, StoreChoice::Sqlite);
        // The lease holds until this instant (none with a store only this controller uses).
        let mut lease_until = (!sqlite).then(|| t0 + LEASE_TTL - LEASE_MARGIN);
        self.metrics.store_waiting(true);
        let loaded = tokio::time::timeout(STORE_WAIT, self.store.run(|s| s.load())).await;
        self.metrics.store_waiting(false);
        let snap = match loaded {
            Ok(Ok(Ok(snap))) => snap,
            Ok(Ok(Err(e))) => {
                tracing::error!(error = %e, "cannot load the fleet from the store");
                if sqlite {
                    return Ended::Stop;
                }
                return Ended::SteppedDown;
            }
            _ => {
                self.replace_store().await;
                return Ended::SteppedDown;
            }
        };
        tracing::info!(
            fleet = %snap.fleet, epoch, nodes = snap.nodes.len(), instances = snap.instances.len(),
            load_ms = t0.elapsed().as_millis() as u64, "store opened; leading"
        );
        // A long load may outlast the lease taken before it: renewed (or found lost) before
        // anything is published.
        let mut renewed_at = t0;
        if let Some(until) = lease_until
            && Instant::now() + PUBLISH_MARGIN >= until
            && self
                .renew(
                    epoch,
                    Instant::now() + LEASE_TTL,
                    &mut renewed_at,
                    &mut lease_until,
                )
                .await
        {
            return Ended::SteppedDown;
        }
        if snap.nodes.is_empty() && snap.instances.is_empty() {
            tracing::warn!(fleet = %snap.fleet, "the store is empty: a new fleet. Agents bound to another fleet keep their instances and wait for `outpost nodes adopt NODE`");
        }
        // Every node gets a fresh liveness grace (a takeover does not declare nodes lost).
        let mut fleet = Fleet::new(
            Scheduler::new(self.cfg.scheduler.clone()),
            self.cfg.fleet.clone(),
            snap,
            self.clock.now(),
        );
        fleet.set_epoch(epoch);
        // Before anything is published: the blob tokens include the devices' credentials.
        if let Some(creds) = read_credentials(&self.cfg) {
            fleet.set_credentials(Some(creds));
        }
        self.metrics.lead(epoch);
        self.leading
            .store(true, std::sync::atomic::Ordering::SeqCst);
        subscribe(&self.client).await;
        let metrics = std::sync::Arc::clone(&self.metrics);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // The last tick, on the monotonic clock: a longer gap is time the controller did not
        // see (see `OBSERVE_GAP`).
        let mut ticked = Instant::now();
        let mut enrolled_at: Option<Instant> = None;
        // The blob sweep: at once, then every SWEEP_EVERY.
        let mut swept_at: Option<Instant> = None;
        let mut malformed: u64 = 0;
        // Calls executed since the last commit was sent, and how many inputs that was.
        let mut replies: Vec<Answer> = Vec::new();
        let mut executed = 0usize;
        // The commit under way on the store's thread, at most one (pipelined group commit):
        // while it syncs, the next inputs are taken and executed, and their changes go to the
        // store the moment it lands. Nothing is published or answered before its own commit
        // has landed.
        let mut inflight: Option<InFlight> = None;
        // Why the store cannot be written, while it cannot: changes are refused, reads answered,
        // the broker and liveness keep running, and the store is tried again every turn.
        let mut store_down: Option<String> = None;
        // Calls taken when the lease turned out lost: answered once this controller stands by.
        let mut unanswered: Vec<Responder> = Vec::new();
        let mut stopping = false;
        let ended = loop {
            if inflight.is_none() && executed > 0 {
                if store_down.is_some() {
                    let wait = lease_until
                        .map_or(STORE_WAIT, |u| u.saturating_duration_since(Instant::now()));
                    self.metrics.store_waiting(true);
                    let r =
                        tokio::time::timeout(wait, self.store.run(|s| s.check_writable())).await;
                    self.metrics.store_waiting(false);
                    if let Ok(Ok(Ok(()))) = r {
                        tracing::warn!("the store can be written again: changes are accepted");
                        store_down = None;
                    }
                }
                let changes = fleet.take_changes();
                let sent = Instant::now();
                let submitted = self.store.submit(move |s| {
                    let r = s.apply(&changes);
                    (changes, r)
                });
                self.metrics.store_waiting(true);
                let batch = std::mem::take(&mut replies);
                let inputs = std::mem::take(&mut executed);
                match submitted {
                    Ok(rx) => {
                        inflight = Some(InFlight {
                            rx,
                            replies: batch,
                            inputs,
                            sent,
                            deadline: lease_until.unwrap_or(sent + STORE_WAIT),
                        });
                    }
                    Err(_) => break self.store_gone(epoch, batch).await,
                }
            }
            if stopping && inflight.is_none() {
                break Ended::Stop;
            }
            // Wait for one input, then take what else is already queued (group commit): one
            // transaction and at most one desired state per node cover the whole batch.
            let first = tokio::select! {
                () = &mut *shutdown, if !stopping => {
                    // What is taken is still stored, published and answered.
                    stopping = true;
                    continue;
                }
                landed = landing(&mut inflight) => {
                    let Some(f) = inflight.take() else { continue };
                    match self.land(f, landed, &mut fleet, &mut store_down, &mut replies, epoch, lease_until).await {
                        Some(end) => break end,
                        None => continue,
                    }
                }
                Some(m) = self.msgs.recv(), if !stopping => Input::Message(m),
                Some(c) = self.calls.recv(), if !stopping => Input::Call(c),
                _ = tick.tick(), if !stopping => Input::Tick,
            };
            if let Some(until) = lease_until
                && renewal_due(until, renewed_at)
            {
                // The commit in flight lands first: none is left in flight if the lease is lost.
                if inflight.is_some() {
                    let landed = landing(&mut inflight).await;
                    if let Some(f) = inflight.take()
                        && let Some(end) = self
                            .land(
                                f,
                                landed,
                                &mut fleet,
                                &mut store_down,
                                &mut replies,
                                epoch,
                                lease_until,
                            )
                            .await
                    {
                        break end;
                    }
                }
                let lost = self
                    .renew(epoch, until, &mut renewed_at, &mut lease_until)
                    .await;
                if lost {
                    if let Input::Call((_, _, reply, _)) = first {
                        unanswered.push(reply);
                    }
                    // Executed but never stored: the changes go with this controller's lead.
                    for (reply, mutates, r, _) in replies.drain(..) {
                        match r {
                            Ok(_) if mutates => unanswered.push(reply),
                            r => {
                                let _ = reply.send(r);
                            }
                        }
                    }
                    break Ended::SteppedDown;
                }
            }
            let now = self.clock.now();
            fleet.set_clock(now);
            // Changes could not reach their nodes while the broker is away.
            let broker_down = self
                .metrics
                .broker_down_for()
                .filter(|d| *d >= BROKER_REFUSE);
            let inputs = batch(first, &mut self.calls, &mut self.msgs);
            executed += inputs.len();
            for input in inputs {
                match input {
                    Input::Message(m) => {
                        let parsed = topics::parse(&m.topic);
                        let ok = match &parsed {
                            Ok((node, Channel::Console)) => {
                                self.consoles.answer(node, &m.payload)
                                    != crate::consoles::Answered::Malformed
                            }
                            _ => ingest(&mut fleet, now, &m),
                        };
                        let channel = parsed.as_ref().map_or("other", |(_, c)| c.name());
                        metrics.received(channel, ok);
                        if !ok {
                            malformed += 1;
                            // Said at the first ones, then at each doubling: a flood of garbage
                            // does not flood the log.
                            if malformed.is_power_of_two() {
                                tracing::warn!(topic = %m.topic, len = m.payload.len(), malformed, "dropped a message that does not decode");
                            }
                        }
                    }
                    Input::Call((_, _, reply, _)) if reply.is_closed() => {
                        // Its caller gave up waiting (the loop was stuck): not done, as it
                        // was told.
                    }
                    Input::Call((action, actor, reply, arrived)) => {
                        let mutates = action.mutates();
                        let create = matches!(action, crate::action::Action::CreateInstance(_));
                        if mutates {
                            // The audit trail: who asked for which change.
                            let what = format!("{action:?}");
                            let what = what.split(['(', ' ', '{']).next().unwrap_or_default();
                            tracing::info!(actor = %actor, action = what, "change asked");
                        }
                        let t = Instant::now();
                        let r = match (&store_down, broker_down) {
                            (Some(cause), _) if mutates => {
                                Err(ActionError::StoreDown(cause.clone()))
                            }
                            (_, Some(d)) if mutates => {
                                Err(ActionError::BrokerDown(format!("for {} s", d.as_secs())))
                            }
                            _ => {
                                // Ids come from here, so that executing an action is deterministic.
                                let id = InstanceId::from_u64(fastrand::u64(..));
                                fleet.set_actor(&actor);
                                let r = execute(&mut fleet, now, id, action);
                                fleet.set_actor("controller");
                                r
                            }
                        };
                        if create {
                            Metrics::observe(&metrics.placement_decision, t.elapsed());
                        }
                        replies.push((reply, mutates, r, arrived));
                    }
                    Input::Tick => {
                        let dropped = self
                            .limiter
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .take_dropped();
                        for (node, n) in dropped {
                            fleet.on_flood(&node, n);
                        }
                        if swept_at.is_none_or(|t| t.elapsed() >= SWEEP_EVERY) {
                            swept_at = Some(Instant::now());
                            self.sweep_blobs(&fleet);
                        }
                        if enrolled_at.is_none_or(|t| t.elapsed() >= ENROLLED_EVERY) {
                            enrolled_at = Some(Instant::now());
                            if let Some(reg) = &self.cfg.registry {
                                fleet.set_enrolled(read_enrolled(reg));
                            }
                            // Revoked or provisioned-again devices: their blob tokens follow.
                            if let Some(creds) = read_credentials(&self.cfg) {
                                fleet.set_credentials(Some(creds));
                            }
                        }
                        // Time the controller did not see (broker away, or the loop frozen
                        // or stuck) is not counted against any node.
                        let gap = ticked.elapsed();
                        ticked = Instant::now();
                        let blind = self.metrics.broker_down_for().is_some() || gap >= OBSERVE_GAP;
                        if blind {
                            if gap >= OBSERVE_GAP {
                                tracing::warn!(
                                    gap_ms = gap.as_millis() as u64,
                                    "the controller saw nothing for a while (frozen, starved or waiting on its store): that time is not counted against any node"
                                );
                            }
                            fleet.unobserved(
                                now,
                                u64::try_from(gap.as_millis()).unwrap_or(u64::MAX),
                            );
                        }
                        fleet.tick(now);
                    }
                }
            }
        };
        if let Ended::SteppedDown = ended {
            // Standby before anyone is told so (the API reads the role), then stop listening:
            // the next leader owns the nodes' messages now.
            self.leading
                .store(false, std::sync::atomic::Ordering::SeqCst);
            self.metrics.standby(None);
            for reply in unanswered {
                let _ = reply.send(Err(ActionError::NotLeader(None)));
            }
            for ch in SUBSCRIBED {
                let _ = self.client.unsubscribe(ch.all_nodes()).await;
            }
        }
        ended
    }
}

/// Whether the lease held until `until` and last renewed at `renewed_at` is to be renewed now
/// (or is already lost).
fn renewal_due(until: Instant, renewed_at: Instant) -> bool {
    Instant::now() >= until || renewed_at.elapsed() >= RENEW_EVERY
}

/// A call's answer, held until its changes are durable: the caller, whether it changes
/// anything, the outcome, when it arrived.
type Answer = (Responder, bool, Result<Reply, ActionError>, Instant);

/// What a commit gives back: the changes it was given, and whether they are stored.
type Applied = (crate::fleet::Changes, Result<(), StoreError>);

/// A commit's outcome, or its thread gone, or its deadline passed.
type Landed =
    Result<Result<Applied, tokio::sync::oneshot::error::RecvError>, tokio::time::error::Elapsed>;

/// A batch's commit under way on the store's thread.
struct InFlight {
    rx: tokio::sync::oneshot::Receiver<Applied>,
    /// The batch's calls, answered when it lands.
    replies: Vec<Answer>,
    /// Inputs in the batch.
    inputs: usize,
    sent: Instant,
    /// Past this, the store is given up on (the lease's end, for a leader sharing a store).
    deadline: Instant,
}

/// The commit in flight landing (never, when there is none).
async fn landing(f: &mut Option<InFlight>) -> Landed {
    match f {
        Some(f) => tokio::time::timeout_at(f.deadline.into(), &mut f.rx).await,
        None => std::future::pending().await,
    }
}

/// Answers calls whose changes are not stored: a change is refused with `cause`, a read
/// keeps its answer.
fn refuse(replies: impl IntoIterator<Item = Answer>, cause: &str) {
    for (reply, mutates, r, _) in replies {
        let r = match r {
            Ok(_) if mutates => Err(ActionError::NotStored(cause.to_owned())),
            other => other,
        };
        let _ = reply.send(r);
    }
}

impl Shell {
    /// Removes, in the background, the stored blobs nothing refers to (see
    /// [`BlobStore::sweep`](crate::blobs::BlobStore::sweep)).
    fn sweep_blobs(&self, fleet: &Fleet) {
        let referenced = fleet.referenced_blobs();
        let store = self.blob_store.clone();
        tokio::task::spawn_blocking(move || {
            let n = store.sweep(&referenced);
            if n > 0 {
                tracing::info!(removed = n, "removed stored blobs nothing refers to");
            }
        });
    }

    /// The store hangs or its thread is gone: what was sent may or may not be stored. A
    /// leader steps down (the next one loads what is stored); a sole controller opens the
    /// store again and reloads.
    async fn store_gone(&mut self, epoch: u64, replies: Vec<Answer>) -> Ended {
        let cause = "the store did not answer in time";
        tracing::error!(epoch, "{cause}: stepping down");
        refuse(replies, cause);
        self.replace_store().await;
        Ended::SteppedDown
    }

    /// Commit `f` landed (or not in time): it publishes and answers its batch, or refuses its
    /// changes and puts them back for the next commit. `Some` when this controller must stop
    /// leading; `pending` (executed since) is then refused too. Nothing is published unless
    /// the lease (held until `lease_until`, if shared) is still good for [`PUBLISH_MARGIN`]:
    /// a leader frozen past its lease wakes and stands down without a word to any node.
    #[allow(clippy::too_many_arguments)]
    async fn land(
        &mut self,
        f: InFlight,
        landed: Landed,
        fleet: &mut Fleet,
        store_down: &mut Option<String>,
        pending: &mut Vec<Answer>,
        epoch: u64,
        lease_until: Option<Instant>,
    ) -> Option<Ended> {
        let metrics = std::sync::Arc::clone(&self.metrics);
        metrics.store_waiting(false);
        let Ok(Ok((changes, applied))) = landed else {
            let all = f.replies.into_iter().chain(pending.drain(..)).collect();
            return Some(self.store_gone(epoch, all).await);
        };
        Metrics::observe(&metrics.store_commit, f.sent.elapsed());
        metrics.batch_size.observe(f.inputs as f64);
        metrics.store_writable.set(i64::from(applied.is_ok()));
        match applied {
            Ok(()) if lease_until.is_some_and(|u| Instant::now() + PUBLISH_MARGIN >= u) => {
                // Stored, but this controller can no longer prove it leads: the next leader
                // loads what is stored and publishes it. The calls are answered: their
                // changes are durable.
                tracing::error!(
                    epoch,
                    "the lease may have run out (this controller was frozen or its store slow): stepping down without publishing"
                );
                for (reply, _, r, _) in f.replies {
                    let _ = reply.send(r);
                }
                refuse(
                    pending.drain(..),
                    "this controller stepped down before storing it",
                );
                Some(Ended::SteppedDown)
            }
            Ok(()) => {
                let durable = Instant::now();
                for (_, mutates, _, arrived) in &f.replies {
                    if *mutates {
                        Metrics::observe(&metrics.request_durable, durable - *arrived);
                    }
                }
                for e in &changes.events {
                    // Nobody listening is fine.
                    let _ = self.events_tx.send(crate::views::EventView::from(e));
                }
                for d in &changes.dropped_blobs {
                    if let Err(e) = self.blob_store.remove(d) {
                        tracing::warn!(error = %e, "an unreferenced blob could not be removed");
                    }
                }
                // Without the broker nothing is queued in the client (it would go out late,
                // perhaps after another leader's): published again once the broker is back.
                let dispatched = if self.metrics.broker_down_for().is_some() {
                    fleet.publish_again(changes.publish.into_iter().map(|(n, _)| n));
                    None
                } else {
                    let sent = changes.publish.len() as u64;
                    publish(&self.client, changes.publish).await;
                    clear_retained(&self.client, &changes.removed_nodes).await;
                    metrics
                        .mqtt_sent
                        .get_or_create(&crate::metrics::ChannelLabel {
                            channel: Channel::Desired.name(),
                        })
                        .inc_by(sent);
                    Some(Instant::now())
                };
                for (reply, mutates, r, arrived) in f.replies {
                    if mutates && let Some(at) = dispatched {
                        Metrics::observe(&metrics.request_dispatch, at - arrived);
                    }
                    let _ = reply.send(r);
                }
                None
            }
            Err(e) => {
                let fenced = matches!(e, StoreError::Fenced { .. });
                let cause = e.to_string();
                if fenced {
                    tracing::error!(error = %cause, "stepping down: another controller leads");
                } else if store_down.is_none() {
                    tracing::error!(error = %cause, "cannot write the store: refusing changes until it can be written; the broker and liveness keep running");
                }
                *store_down = Some(cause.clone());
                fleet.requeue(changes);
                refuse(f.replies, &cause);
                if fenced {
                    refuse(pending.drain(..), &cause);
                    return Some(Ended::SteppedDown);
                }
                None
            }
        }
    }
}

/// Clears what the broker keeps of nodes an operator removed (their status, inventory,
/// desired state and addresses), so that nothing of them is delivered again: a controller
/// starting later would otherwise see them `up` from their retained status.
async fn clear_retained(client: &AsyncClient, nodes: &[NodeId]) {
    for node in nodes {
        for ch in Channel::ALL.into_iter().filter(|c| c.retained()) {
            let topic = topics::topic(node, ch);
            // An empty retained payload removes the broker's copy.
            if let Err(e) = client
                .publish(topic.as_str(), QoS::AtLeastOnce, true, Vec::new())
                .await
            {
                tracing::warn!(%node, error = %e, "cannot clear a removed node's retained topic");
            }
        }
    }
}

async fn publish(client: &AsyncClient, states: Vec<(NodeId, outpost_protocol::DesiredState)>) {
    for (node, d) in states {
        let bytes = match d.to_vec() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(%node, generation = d.generation, error = %e, "desired state does not encode: not published");
                continue;
            }
        };
        let topic = topics::topic(&node, Channel::Desired);
        tracing::debug!(%node, generation = d.generation, instances = d.instances.len(), "publishing desired state");
        if let Err(e) = client
            .publish(topic.as_str(), QoS::AtLeastOnce, true, bytes)
            .await
        {
            tracing::warn!(%node, error = %e, "cannot queue the desired state; it goes out with the next change or report");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_bounded_and_lose_nothing() {
        let (call_tx, mut calls) = mpsc::channel::<Call>(8);
        let (msg_tx, mut msgs) = mpsc::channel(4 * MAX_BATCH);
        let total = 2 * MAX_BATCH + 7;
        for k in 0..total {
            msg_tx
                .try_send(Inbound {
                    topic: format!("t{k}"),
                    payload: vec![],
                    retained: false,
                })
                .unwrap();
        }
        let (reply, _rx) = tokio::sync::oneshot::channel();
        call_tx
            .try_send((
                crate::action::Action::ListNodes,
                "local".into(),
                reply,
                Instant::now(),
            ))
            .unwrap();
        let mut seen = Vec::new();
        let mut calls_seen = 0;
        let mut first = Input::Tick;
        loop {
            let b = batch(first, &mut calls, &mut msgs);
            assert!(b.len() <= MAX_BATCH);
            for i in b {
                match i {
                    Input::Message(m) => seen.push(m.topic),
                    Input::Call(_) => calls_seen += 1,
                    Input::Tick => {}
                }
            }
            match msgs.try_recv() {
                Ok(m) => first = Input::Message(m),
                Err(_) => break,
            }
        }
        assert_eq!(calls_seen, 1);
        let want: Vec<String> = (0..total).map(|k| format!("t{k}")).collect();
        assert_eq!(seen, want, "every message, once, in order");
    }
}

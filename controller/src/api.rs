//! The HTTP JSON API (axum): a thin layer that turns requests into [`Action`]s for the service
//! loop and its typed answers into responses. The only place that knows HTTP status codes.
//! Loopback by default; a bearer token when configured.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use outpost_protocol::{Arch, BlobRef, Digest, PowerMode};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::action::{Action, ActionError, Call, NewImage, Reply};
use crate::blobs::{BlobError, BlobStore, BlobWriter};
use crate::fleet::FleetError;
use crate::fleet::images::{BlobSource, ImageFormat, sniff};
use crate::metrics::{Metrics, RequestLabel};
use crate::tokens::{Role, Tokens, Verdict};
use crate::views::CreateBody;
use crate::views::EventView;

/// How the API reaches nodes' consoles: the controller's MQTT client, and the requests
/// waiting for an answer (the service loop hands answers over).
#[derive(Clone)]
pub struct ConsoleLink {
    /// The controller's MQTT client.
    pub client: rumqttc::AsyncClient,
    /// Requests waiting for their answer.
    pub waiting: crate::consoles::Consoles,
}

/// How long a node has to answer a console request.
const CONSOLE_ANSWER: std::time::Duration = std::time::Duration::from_secs(3);

#[derive(Clone)]
struct Api {
    calls: mpsc::Sender<Call>,
    tokens: std::sync::Arc<Tokens>,
    failures: std::sync::Arc<FailureLimiter>,
    blobs: BlobStore,
    events: tokio::sync::broadcast::Sender<EventView>,
    console: ConsoleLink,
    metrics: std::sync::Arc<Metrics>,
    /// Blob downloads served at once.
    transfers: std::sync::Arc<crate::blobs::Transfers>,
}

/// An HTTP error: a status, the `{"error": ...}` body, and for a 503 whose request was not
/// acted on, the `Retry-After` seconds.
struct HttpError(StatusCode, String, Option<u8>);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if let Some(secs) = self.2 {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(u16::from(secs)),
            );
        }
        r
    }
}

/// How long the service loop may wait on its store before calls are refused at once.
const STORE_STALL: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest a call waits for its answer (a change: until it is stored).
const CALL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl HttpError {
    const fn new(status: StatusCode, message: String) -> Self {
        Self(status, message, None)
    }

    /// The service loop has waited `w` on its store (the request was not acted on).
    fn busy(w: std::time::Duration) -> Self {
        Self(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the controller's store has not answered for {:.1} s: nothing was changed by this request unless it says so later; retry, or try another controller",
                w.as_secs_f64()
            ),
            Some(1),
        )
    }
}

/// The status code of each refusal.
fn status(e: &ActionError) -> StatusCode {
    match e {
        ActionError::Fleet(
            FleetError::NoInstance(_)
            | FleetError::NoNode(_)
            | FleetError::NoImage(_)
            | FleetError::NoNodeMatches(_)
            | FleetError::NoSuchInstall(..),
        ) => StatusCode::NOT_FOUND,
        ActionError::Fleet(FleetError::BlobDenied) => StatusCode::FORBIDDEN,
        ActionError::Fleet(
            FleetError::Spec(_)
            | FleetError::BadLabel(..)
            | FleetError::BadImageName(_)
            | FleetError::ImageArch(..),
        )
        | ActionError::Invalid(_) => StatusCode::BAD_REQUEST,
        ActionError::Fleet(
            FleetError::NoValidHost(_)
            | FleetError::Exists(_)
            | FleetError::GroupPolicy(_)
            | FleetError::Deleting(_)
            | FleetError::NotForeign(_)
            | FleetError::NodeNotEmpty(..)
            | FleetError::CannotMove(..)
            | FleetError::ImageExists(_)
            | FleetError::ImageInUse { .. }
            | FleetError::NotPlaced(_)
            | FleetError::Pinned(_)
            | FleetError::NothingToApprove(_)
            | FleetError::NoConflict(_),
        ) => StatusCode::CONFLICT,
        ActionError::StoreDown(_)
        | ActionError::NotStored(_)
        | ActionError::BrokerDown(_)
        | ActionError::Starting
        | ActionError::NotLeader(_)
        | ActionError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl From<ActionError> for HttpError {
    fn from(e: ActionError) -> Self {
        // When a retry may help soon and the request was not acted on: a start, a takeover.
        // (Not after a failed store: its change may still land. Not for a store or broker
        // that is away: a retry would wait in vain.)
        let retry = match &e {
            ActionError::Starting | ActionError::NotLeader(_) => Some(1),
            ActionError::StoreDown(_) | ActionError::BrokerDown(_) => Some(5),
            _ => None,
        };
        Self(status(&e), e.to_string(), retry)
    }
}

async fn call(api: &Api, action: Action) -> Result<Json<Reply>, HttpError> {
    Ok(Json(ask(api, action).await?))
}

async fn ask(api: &Api, action: Action) -> Result<Reply, HttpError> {
    let (tx, rx) = oneshot::channel();
    // Who asks: the API token's holder, or a local user where the API has no token.
    let actor = match &action {
        Action::BlobAccess { node, .. } => format!("node {node}"),
        _ => CALLER
            .try_with(Clone::clone)
            .unwrap_or_else(|_| "local".to_owned()),
    };
    let kind = if action.mutates() { "change" } else { "read" };
    // A service loop stuck on its store answers nothing: say so at once rather than queue
    // behind it (the caller, or the CLI with several --api URLs, moves on).
    if let Some(w) = api.metrics.store_waiting_for()
        && w >= STORE_STALL
    {
        return Err(HttpError::busy(w));
    }
    let t0 = std::time::Instant::now();
    api.calls
        .send((action, actor, tx, t0))
        .await
        .map_err(|_| ActionError::ShuttingDown)?;
    // Waits for the answer, but not behind a loop stuck on its store: a call not taken yet
    // is then left (the loop skips calls nobody waits for), and said so at once.
    let mut rx = rx;
    let r = loop {
        tokio::select! {
            r = &mut rx => break r.map_err(|_| ActionError::ShuttingDown)?,
            () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {
                if let Some(w) = api.metrics.store_waiting_for().filter(|w| *w >= STORE_STALL) {
                    return Err(HttpError::busy(w));
                }
                if t0.elapsed() >= CALL_WAIT {
                    return Err(HttpError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "no answer from the controller in {} s (its store is slow): this request may still take effect; check before retrying",
                            CALL_WAIT.as_secs()
                        ),
                    ));
                }
            }
        }
    };
    Metrics::observe(
        &api.metrics
            .api_request
            .get_or_create(&RequestLabel { kind }),
        t0.elapsed(),
    );
    Ok(r?)
}

/// The status page (`/`): embedded in the binary, no build step, no CDN.
const PAGE_HTML: &str = include_str!("ui/index.html");
const PAGE_JS: &str = include_str!("ui/app.js");
const PAGE_CSS: &str = include_str!("ui/style.css");

/// One of the status page's files, with headers that keep it to itself.
fn page(body: &'static str, content_type: &'static str) -> Response {
    use axum::http::header;
    (
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The fleet at a glance, from the service loop.
/// The fleet at a glance; empty on a standby (its own state is in [`health`]; the fleet's is
/// the leader's to tell).
async fn overview(api: &Api) -> Result<Box<crate::views::OverviewView>, HttpError> {
    if api.metrics.leading.get() == 0 {
        return Ok(Box::default());
    }
    match ask(api, Action::Overview).await {
        Ok(Reply::Overview(o)) => Ok(o),
        // Stepped down while asked.
        Err(_) if api.metrics.leading.get() == 0 => Ok(Box::default()),
        Err(e) => Err(e),
        _ => Err(HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unexpected reply".into(),
        )),
    }
}

/// `GET /metrics`: OpenMetrics text.
async fn scrape(api: &Api) -> Result<Response, HttpError> {
    let o = overview(api).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        api.metrics.render(&o),
    )
        .into_response())
}

/// The controller's own state: what `/readyz` and `GET /v1/status` say.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Health {
    /// The controller's version.
    pub version: String,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// Its MQTT client is connected to the broker.
    pub broker_connected: bool,
    /// The store can be written.
    pub store_writable: bool,
    /// Connected for long enough that the retained state of every node has arrived.
    pub settled: bool,
    /// All of the above, and leading: ready to take changes.
    pub ready: bool,
    /// `leader`, or `standby` (another controller leads; see `leader`).
    pub role: String,
    /// The lease epoch this controller leads in (0 with SQLite; absent on a standby).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// On a standby: the leader's name and API URL, if a live lease names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<(String, String)>,
}

fn health(m: &Metrics) -> Health {
    let broker_connected = m.broker_connected.get() == 1;
    let stalled = m.store_waiting_for().is_some_and(|w| w >= STORE_STALL);
    let store_writable = m.store_writable.get() == 1 && !stalled;
    let settled = m.broker_settled();
    let leading = m.leading.get() == 1;
    // A leader whose last renewal failed may already have lost the lease: it does not say
    // `leader` until the store confirms it again.
    let confirmed = leading && !m.lease_unconfirmed();
    let role = match () {
        () if m.starting() => "starting",
        () if confirmed => "leader",
        () if leading => "unconfirmed",
        () => "standby",
    };
    Health {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_secs: m.uptime().as_secs(),
        broker_connected,
        store_writable,
        settled,
        ready: broker_connected && store_writable && settled && confirmed,
        role: role.to_owned(),
        epoch: leading.then(|| u64::try_from(m.epoch.get()).unwrap_or(0)),
        leader: if leading { None } else { m.leader() },
    }
}

/// `GET /readyz`: 200 when ready, else 503 naming what is not.
fn readyz(m: &Metrics) -> Response {
    let h = health(m);
    if h.ready {
        return (StatusCode::OK, "ready\n").into_response();
    }
    if h.role == "starting" {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting up (opening the store)\n",
        )
            .into_response();
    }
    if h.role == "standby" {
        let who = match &h.leader {
            Some((name, url)) => format!("the leader is {name} at {url}"),
            None => "no controller leads right now".to_owned(),
        };
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: standby ({who})\n"),
        )
            .into_response();
    }
    let mut why = Vec::new();
    if !h.broker_connected {
        why.push("broker not connected");
    }
    if m.store_waiting_for().is_some_and(|w| w >= STORE_STALL) {
        why.push("store not answering");
    } else if !h.store_writable {
        why.push("store not writable");
    }
    if h.role == "unconfirmed" {
        why.push("lease not confirmed (the last renewal failed)");
    }
    if h.broker_connected && !h.settled {
        why.push("starting up");
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {}\n", why.join(", ")),
    )
        .into_response()
}

/// `GET /v1/status`: the controller's own state and the fleet in numbers.
async fn fleet_status(api: &Api) -> Result<Json<serde_json::Value>, HttpError> {
    let o = overview(api).await?;
    let mut nodes = std::collections::BTreeMap::<String, u64>::new();
    for n in &o.nodes {
        *nodes.entry(n.state.clone()).or_default() += 1;
    }
    let mut v = serde_json::to_value(health(&api.metrics)).unwrap_or_default();
    v["nodes"] = json!(nodes);
    v["instances"] = json!(
        o.phases
            .iter()
            .filter(|(_, n)| **n > 0)
            .collect::<std::collections::BTreeMap<_, _>>()
    );
    v["scheduler"] = json!(o.scheduler);
    Ok(Json(v))
}

/// The routes of a metrics-only listener (`--metrics-listen`): `/metrics`, with the API's
/// token rules.
pub fn metrics_router(
    calls: mpsc::Sender<Call>,
    tokens: std::sync::Arc<Tokens>,
    metrics: std::sync::Arc<Metrics>,
    console: ConsoleLink,
    blobs: BlobStore,
) -> Router {
    let api = Api {
        calls,
        tokens,
        failures: std::sync::Arc::default(),
        blobs,
        events: tokio::sync::broadcast::channel(1).0,
        console,
        metrics,
        transfers: std::sync::Arc::default(),
    };
    Router::new()
        .route(
            "/metrics",
            get(|State(a): State<Api>| async move { scrape(&a).await }),
        )
        .layer(middleware::from_fn_with_state(api.clone(), auth))
        .fallback(|| async { HttpError::new(StatusCode::NOT_FOUND, "only /metrics here".into()) })
        .layer(middleware::from_fn_with_state(
            std::sync::Arc::clone(&api.tokens),
            crate::origin::guard,
        ))
        .with_state(api)
}

/// The query of `uri` as `T`, if it has one (a malformed one: 400).
fn query<T: serde::de::DeserializeOwned>(uri: &axum::http::Uri) -> Result<Option<T>, HttpError> {
    uri.query()
        .map(|_| {
            Query::<T>::try_from_uri(uri)
                .map(|q| q.0)
                .map_err(|e| bad(e.body_text()))
        })
        .transpose()
}

fn bad(msg: impl Into<String>) -> HttpError {
    HttpError::new(StatusCode::BAD_REQUEST, msg.into())
}

/// `POST /v1/images?name=N[&version=V][&arch=A][&format=F]`: the query of an upload.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    name: String,
    version: Option<String>,
    arch: Option<String>,
    format: Option<String>,
}

/// `POST /v1/images` with JSON: an image served elsewhere (a web server, an object store).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UrlImage {
    name: String,
    version: Option<String>,
    url: String,
    sha256: String,
    size: u64,
    arch: Option<String>,
    format: String,
}

fn parse_arch(a: Option<&str>) -> Result<Option<Arch>, HttpError> {
    a.map(|a| Arch::parse(a).ok_or_else(|| bad(format!("unknown arch {a:?} (x86_64 or aarch64)"))))
        .transpose()
}

fn parse_format(f: &str) -> Result<ImageFormat, HttpError> {
    ImageFormat::parse(f)
        .ok_or_else(|| bad(format!("unknown format {f:?} (qcow2, raw, kernel, initrd)")))
}

/// What an upload is, from its first bytes and what the uploader said: refused when they
/// disagree, or when nothing says what it is.
fn check_upload(
    head: &[u8],
    size: u64,
    format: Option<ImageFormat>,
    arch: Option<Arch>,
) -> Result<(ImageFormat, Option<Arch>), HttpError> {
    let seen = sniff(head);
    let (format, seen_arch) = match (format, seen) {
        (None, None) => {
            return Err(bad(
                "not an image Outpost recognises (qcow2, a Linux kernel, an initrd): a raw disk needs --format raw",
            ));
        }
        (None, Some(s)) => s,
        (Some(ImageFormat::Raw), None) => (ImageFormat::Raw, None),
        (Some(f), Some((s, a))) if f == s => (f, a),
        (Some(f), Some((s, _))) => {
            return Err(bad(format!(
                "the file is a {} image, not {}",
                s.as_str(),
                f.as_str()
            )));
        }
        (Some(f), None) => {
            return Err(bad(format!(
                "the file is not a {} image (its first bytes do not say so)",
                f.as_str()
            )));
        }
    };
    if format == ImageFormat::Qcow2 {
        // Self-contained or refused: a header naming another file would make a guest read
        // a file of the node's.
        outpost_protocol::qcow2::check(head).map_err(|e| bad(format!("this qcow2 image: {e}")))?;
    }
    if format == ImageFormat::Raw && (size == 0 || !size.is_multiple_of(512)) {
        return Err(bad(format!(
            "a raw disk image is a non-empty multiple of 512 bytes; this one is {size}"
        )));
    }
    match (arch, seen_arch) {
        (Some(a), Some(s)) if a != s => Err(bad(format!("the kernel is {s}, not {a}"))),
        (a, s) => Ok((format, a.or(s))),
    }
}

/// An upload: streamed into the blob store (hashed and synced, never whole in memory), checked,
/// then added to the catalogue.
async fn upload(
    api: &Api,
    q: UploadQuery,
    body: axum::body::Body,
) -> Result<Json<Reply>, HttpError> {
    use futures_util::StreamExt as _;
    let format = q.format.as_deref().map(parse_format).transpose()?;
    let arch = parse_arch(q.arch.as_deref())?;
    crate::fleet::images::check_part("name", &q.name, true).map_err(|e| bad(e.to_string()))?;
    if let Some(v) = &q.version {
        crate::fleet::images::check_part("version", v, false).map_err(|e| bad(e.to_string()))?;
    }
    let store_err = |e: BlobError| {
        HttpError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("the controller could not store the image: {e}"),
        )
    };
    let mut w = api.blobs.writer().map_err(store_err)?;
    // Writes and hashing on a blocking thread, fed in order through a short queue.
    let (tx, mut rx) = mpsc::channel::<Bytes>(16);
    let writer = tokio::task::spawn_blocking(move || -> Result<BlobWriter, BlobError> {
        while let Some(chunk) = rx.blocking_recv() {
            w.write(&chunk)?;
        }
        Ok(w)
    });
    let mut stream = body.into_data_stream();
    let mut cut = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                if tx.send(c).await.is_err() {
                    break; // the writer failed: its error is below
                }
            }
            Err(e) => {
                cut = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let w = writer
        .await
        .map_err(|e| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(store_err)?;
    if let Some(e) = cut {
        return Err(bad(format!(
            "the upload was cut after {} bytes: {e}",
            w.size()
        )));
    }
    let (format, arch) = check_upload(w.head(), w.size(), format, arch)?;
    let (digest, size) = tokio::task::spawn_blocking(move || w.finish())
        .await
        .map_err(|e| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(store_err)?;
    let reply = ask(
        api,
        Action::AddImage(Box::new(NewImage {
            name: q.name,
            version: q.version,
            blob: BlobRef { digest, size },
            arch,
            format,
            url: None,
        })),
    )
    .await?;
    Ok(Json(reply))
}

/// An image served elsewhere.
async fn add_url(api: &Api, b: UrlImage) -> Result<Json<Reply>, HttpError> {
    if !(b.url.starts_with("http://") || b.url.starts_with("https://"))
        || b.url.contains(char::is_whitespace)
    {
        return Err(bad(format!("url {:?}: an http:// or https:// URL", b.url)));
    }
    let digest = Digest::parse(&b.sha256).ok_or_else(|| bad("sha256: 64 hex digits"))?;
    if b.size == 0 {
        return Err(bad("size: the image's size in bytes (more than 0)"));
    }
    let reply = ask(
        api,
        Action::AddImage(Box::new(NewImage {
            name: b.name,
            version: b.version,
            blob: BlobRef {
                digest,
                size: b.size,
            },
            arch: parse_arch(b.arch.as_deref())?,
            format: parse_format(&b.format)?,
            url: Some(b.url),
        })),
    )
    .await?;
    Ok(Json(reply))
}

/// Checks an instance's cloud-init parts and stores them as blobs (nodes fetch them like
/// images), setting `b.seed`; they are held (see [`BlobStore::hold`]) until the create is
/// answered.
async fn store_seed(
    api: &Api,
    b: &mut CreateBody,
) -> Result<Option<crate::blobs::BlobHold>, HttpError> {
    use crate::views::{MAX_USER_DATA, check_ssh_key};
    for (what, text) in [
        ("user-data", &b.user_data),
        ("network-config", &b.network_config),
    ] {
        if let Some(t) = text
            && t.len() > MAX_USER_DATA
        {
            return Err(bad(format!(
                "{what} is {} bytes: at most {MAX_USER_DATA} (64 KiB)",
                t.len()
            )));
        }
    }
    for (i, k) in b.ssh_keys.iter().enumerate() {
        check_ssh_key(k).map_err(|e| bad(format!("ssh key {}: {e}", i + 1)))?;
    }
    if b.user_data.is_none()
        && b.network_config.is_none()
        && b.ssh_keys.is_empty()
        && b.hostname.is_none()
    {
        return Ok(None);
    }
    let keys = (!b.ssh_keys.is_empty()).then(|| b.ssh_keys.join("\n") + "\n");
    let parts = [b.user_data.clone(), b.network_config.clone(), keys];
    // Held before they are written: no sweep or removal takes them while this create runs.
    let digests: Vec<Digest> = parts
        .iter()
        .flatten()
        .map(|t| Digest(<sha2::Sha256 as sha2::Digest>::digest(t.as_bytes()).into()))
        .collect();
    let hold = api.blobs.hold(&digests);
    let blobs = api.blobs.clone();
    let stored = tokio::task::spawn_blocking(move || -> Result<Vec<Option<BlobRef>>, BlobError> {
        parts
            .into_iter()
            .map(|p| {
                p.map(|text| {
                    let mut w = blobs.writer()?;
                    w.write(text.as_bytes())?;
                    let (digest, size) = w.finish()?;
                    Ok(BlobRef { digest, size })
                })
                .transpose()
            })
            .collect()
    })
    .await
    .map_err(|e| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| {
        HttpError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("the controller could not store the seed: {e}"),
        )
    })?;
    b.seed = Some(outpost_protocol::Seed {
        user_data: stored[0],
        network_config: stored[1],
        ssh_keys: stored[2],
        hostname: None,
    });
    Ok(Some(hold))
}

/// `GET /v1/events?since=SEQ&node=NODE&instance=NAME-OR-ID&follow=true&live=true`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    #[serde(default)]
    since: u64,
    node: Option<String>,
    /// Only the events of this instance (its name or id).
    instance: Option<String>,
    /// Only the events this actor caused (a token's name, `local`, `node`, `controller`).
    actor: Option<String>,
    #[serde(default)]
    follow: bool,
    /// With `follow`: only what happens from now on (no backlog), as `--wait` needs.
    #[serde(default)]
    live: bool,
}

impl EventsQuery {
    fn keeps(&self, e: &EventView) -> bool {
        self.node
            .as_ref()
            .is_none_or(|n| e.node.as_ref() == Some(n))
            && self
                .instance
                .as_ref()
                .is_none_or(|i| e.instance.as_ref() == Some(i) || e.instance_id.as_ref() == Some(i))
            && self.actor.as_ref().is_none_or(|a| e.actor == *a)
    }
}

/// The fleet's history; with `follow`, a Server-Sent Events stream: what is kept after
/// `since`, then each event as it is stored (nothing repeated or skipped: each carries its
/// sequence number as the SSE id).
async fn events(api: &Api, q: EventsQuery) -> Result<Response, HttpError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures_util::StreamExt as _;
    // Listening before reading the backlog: an event stored in between is in one or the other.
    let rx = api.events.subscribe();
    let backlog = if q.follow && q.live {
        Vec::new()
    } else {
        match ask(
            api,
            Action::Events {
                since: q.since,
                node: q.node.clone(),
            },
        )
        .await?
        {
            Reply::Events(v) => v.into_iter().filter(|e| q.keeps(e)).collect(),
            _ => Vec::new(),
        }
    };
    if !q.follow {
        return Ok(Json(backlog).into_response());
    }
    // Live only: whatever the broadcast brings is new.
    let last = if q.live {
        0
    } else {
        backlog.last().map_or(q.since, |e| e.seq)
    };
    let q = std::sync::Arc::new(q);
    let sse = |e: &EventView| {
        Event::default()
            .id(e.seq.to_string())
            .event(e.kind.clone())
            .json_data(e)
            .map_err(std::io::Error::other)
    };
    let first = futures_util::stream::iter(backlog.iter().map(sse).collect::<Vec<_>>());
    let live = futures_util::stream::unfold((rx, last), move |(mut rx, last)| {
        let q = std::sync::Arc::clone(&q);
        async move {
            loop {
                match rx.recv().await {
                    Ok(e) if e.seq <= last => continue,
                    Ok(e) if !q.keeps(&e) => continue,
                    Ok(e) => {
                        let seq = e.seq;
                        return Some((sse(&e), (rx, seq)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let gap = Event::default()
                            .event("lagged")
                            .data(format!("{n} events skipped: reconnect with since={last}"));
                        return Some((Ok(gap), (rx, last)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok(Sse::new(first.chain(live))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// `GET /v1/instances/{key}/console?lines=N&follow=true`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsoleQuery {
    lines: Option<u16>,
    #[serde(default)]
    follow: bool,
}

/// What an instance's console says, as JSON.
#[derive(Debug, serde::Serialize)]
struct ConsoleView {
    instance: String,
    node: String,
    start: u64,
    next: u64,
    text: String,
}

/// One request to the node holding instance `key`'s console, and its answer.
async fn console_once(
    api: &Api,
    key: &str,
    from: Option<u64>,
    lines: u16,
) -> Result<ConsoleView, HttpError> {
    let Reply::ConsoleTarget { id, node, up } =
        ask(api, Action::ConsoleTarget(key.to_owned())).await?
    else {
        return Err(HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unexpected reply".into(),
        ));
    };
    if !up {
        return Err(HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "node {node} is not connected: the console of {key} cannot be read until it is"
            ),
        ));
    }
    let (request, rx) = api.console.waiting.ask(&node, id);
    let req = outpost_protocol::ConsoleRequest {
        request,
        id,
        from,
        lines,
    };
    let topic =
        outpost_protocol::topics::topic(&node, outpost_protocol::topics::Channel::ConsoleRequest);
    let payload = outpost_protocol::Message::to_vec(&req)
        .map_err(|e| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Err(e) = api
        .console
        .client
        .publish(topic.as_str(), rumqttc::QoS::AtMostOnce, false, payload)
        .await
    {
        api.console.waiting.forget(request);
        return Err(HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot reach the broker: {e}"),
        ));
    }
    let chunk = match tokio::time::timeout(CONSOLE_ANSWER, rx).await {
        Ok(Ok(c)) => c,
        _ => {
            api.console.waiting.forget(request);
            return Err(HttpError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "node {node} did not answer within {} s",
                    CONSOLE_ANSWER.as_secs()
                ),
            ));
        }
    };
    if let Some(why) = chunk.error {
        return Err(HttpError::new(
            StatusCode::NOT_FOUND,
            format!("{key} on {node}: {why}"),
        ));
    }
    Ok(ConsoleView {
        instance: key.to_owned(),
        node: node.to_string(),
        start: chunk.start,
        next: chunk.next,
        text: String::from_utf8_lossy(&chunk.data).into_owned(),
    })
}

/// An instance's console: its last lines, or with `follow` a Server-Sent Events stream of
/// what it prints (asked about every 200 ms from where the last answer ended: nothing repeated
/// or skipped), until the client leaves or the node stops answering.
async fn console_http(api: &Api, key: String, q: ConsoleQuery) -> Result<Response, HttpError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let lines = q.lines.unwrap_or(50);
    let first = console_once(api, &key, None, lines).await?;
    if !q.follow {
        return Ok(Json(first).into_response());
    }
    let api = api.clone();
    let start = Event::default()
        .event("console")
        .json_data(&first)
        .map_err(std::io::Error::other);
    let next = first.next;
    let more = futures_util::stream::unfold(Some(next), move |at| {
        let (api, key) = (api.clone(), key.clone());
        async move {
            let mut at = at?;
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                match console_once(&api, &key, Some(at), 0).await {
                    Ok(v) if v.text.is_empty() => at = v.next,
                    Ok(v) => {
                        let n = v.next;
                        let e = Event::default()
                            .event("console")
                            .json_data(&v)
                            .map_err(std::io::Error::other);
                        return Some((e, Some(n)));
                    }
                    Err(HttpError(_, why, _)) => {
                        let e = Event::default().event("end").data(why);
                        return Some((Ok(e), None));
                    }
                }
            }
        }
    });
    use futures_util::StreamExt as _;
    Ok(Sse::new(futures_util::stream::iter([start]).chain(more))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// `POST /v1/images/{key}/prefetch`: `{"selector": {"zone": "north"}, "concurrency": 4}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PrefetchBody {
    #[serde(default)]
    selector: std::collections::BTreeMap<String, String>,
    #[serde(default = "default_concurrency")]
    concurrency: usize,
}

fn default_concurrency() -> usize {
    4
}

/// Deletes an image, and its bytes once no image refers to them.
async fn delete_image(api: &Api, key: String) -> Result<Json<Reply>, HttpError> {
    let reply = ask(api, Action::DeleteImage(key)).await?;
    if let Reply::ImageDeleted {
        unreferenced: Some(d),
        ..
    } = &reply
    {
        let (blobs, d) = (api.blobs.clone(), *d);
        let r = tokio::task::spawn_blocking(move || blobs.remove(&d)).await;
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "an unreferenced blob could not be removed");
        }
    }
    Ok(Json(reply))
}

/// `GET /v1/nodes/{node}/blobs/{sha256}`: a node fetching a blob its instances need, with its
/// token; served with Range (resumable), or redirected to where the image lives.
async fn blob(api: &Api, node: String, sha: String, req: Request) -> Response {
    let node_name = node.clone();
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(hex32);
    let (Some(token), Some(digest)) = (token, Digest::parse(&sha)) else {
        return HttpError::new(
            StatusCode::FORBIDDEN,
            "not a blob this node may fetch".into(),
        )
        .into_response();
    };
    match ask(
        api,
        Action::BlobAccess {
            node,
            token: token.to_vec(),
            digest,
        },
    )
    .await
    {
        Ok(Reply::Blob(BlobSource::Local(d))) => {
            // A place among the downloads served at once, held until the body ends.
            let Some(place) = api.transfers.take(&node_name) else {
                let mut r = HttpError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the controller serves as many downloads as it may: retry shortly".into(),
                )
                .into_response();
                r.headers_mut().insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("2"),
                );
                return r;
            };
            match tower::ServiceExt::oneshot(
                tower_http::services::ServeFile::new(api.blobs.path(&d)),
                req,
            )
            .await
            {
                Ok(r) => {
                    if r.status().is_success() {
                        let len = axum::body::HttpBody::size_hint(r.body())
                            .exact()
                            .unwrap_or(0);
                        api.metrics.blob_transfers.inc();
                        api.metrics.blob_bytes.inc_by(len);
                    }
                    let (parts, body) = r.into_response().into_parts();
                    let body = futures_util::StreamExt::map(body.into_data_stream(), move |c| {
                        let _held = &place;
                        c
                    });
                    Response::from_parts(parts, axum::body::Body::from_stream(body))
                }
                Err(e) => {
                    HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                }
            }
        }
        Ok(Reply::Blob(BlobSource::Url(u))) => (
            StatusCode::TEMPORARY_REDIRECT,
            [(axum::http::header::LOCATION, u)],
        )
            .into_response(),
        Ok(_) => HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, "unexpected reply".into())
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// 64 hex digits as 32 bytes.
fn hex32(s: &str) -> Option<[u8; 32]> {
    Digest::parse(s).map(|d| d.0)
}

tokio::task_local! {
    /// Who the request being answered is for: a token's name, or `local`.
    static CALLER: String;
}

/// The role a request needs: reading needs `read`; instances and cordoning, draining and
/// labelling nodes need `operator`; everything else (removing and adopting nodes, images)
/// needs `admin`.
fn needed(method: &axum::http::Method, path: &str) -> Role {
    use axum::http::Method;
    if method == Method::GET || method == Method::HEAD {
        return Role::Read;
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["v1", "instances", ..] => Role::Operator,
        ["v1", "nodes", _, "cordon" | "uncordon" | "drain" | "labels"] => Role::Operator,
        _ => Role::Admin,
    }
}

/// Failed authentications per address: past [`MAX_FAILURES`] in [`FAILURE_WINDOW`], the address
/// is refused (429) until the window ends.
#[derive(Default)]
pub struct FailureLimiter {
    seen: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (std::time::Instant, u32)>>,
}

/// Failed authentications an address may make per window.
pub const MAX_FAILURES: u32 = 10;
/// The window.
pub const FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl FailureLimiter {
    fn blocked(&self, ip: std::net::IpAddr) -> Option<std::time::Duration> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (at, n) = seen.get(&ip)?;
        let left = FAILURE_WINDOW.checked_sub(at.elapsed())?;
        (*n >= MAX_FAILURES).then_some(left)
    }

    fn failed(&self, ip: std::net::IpAddr) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > 10_000 {
            seen.retain(|_, (at, _)| at.elapsed() < FAILURE_WINDOW);
        }
        let e = seen.entry(ip).or_insert((std::time::Instant::now(), 0));
        if e.0.elapsed() >= FAILURE_WINDOW {
            *e = (std::time::Instant::now(), 0);
        }
        e.1 += 1;
    }
}

async fn auth(State(api): State<Api>, req: Request, next: Next) -> Response {
    if !api.tokens.required() {
        return CALLER.scope("local".to_owned(), next.run(req)).await;
    }
    let ip = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let secret = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let why = match secret.as_deref().map(|s| api.tokens.check(s)) {
        // A valid token passes even from an address held off for others' guesses.
        Some(Verdict::Valid { name, role }) => {
            let need = needed(req.method(), req.uri().path());
            if role < need {
                return HttpError::new(
                    StatusCode::FORBIDDEN,
                    format!("this needs the {need} role; token {name} has the {role} role"),
                )
                .into_response();
            }
            let resp = CALLER.scope(name, next.run(req)).await;
            return match secret {
                Some(s) => while_valid(resp, std::sync::Arc::clone(&api.tokens), s),
                None => resp,
            };
        }
        // No token at all is no guess (a browser opening the status page): not counted.
        None => {
            return HttpError::new(StatusCode::UNAUTHORIZED, "missing bearer token".into())
                .into_response();
        }
        Some(Verdict::Unknown) => "unknown or wrong bearer token".to_owned(),
        Some(Verdict::Expired(n)) => format!("token {n} has expired"),
        Some(Verdict::Revoked(n)) => format!("token {n} was revoked"),
    };
    if let Some(left) = ip.and_then(|ip| api.failures.blocked(ip)) {
        return HttpError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many failed authentications from this address: try again in {} s",
                left.as_secs() + 1
            ),
        )
        .into_response();
    }
    if let Some(ip) = ip {
        api.failures.failed(ip);
    }
    HttpError::new(StatusCode::UNAUTHORIZED, why).into_response()
}

/// A stream (events, a console) opened with token `secret` ends once the token is no longer
/// valid (revoked, expired): checked every [`RECHECK`](crate::tokens::RECHECK).
fn while_valid(resp: Response, tokens: std::sync::Arc<Tokens>, secret: String) -> Response {
    use futures_util::StreamExt as _;
    let streaming = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/event-stream"));
    if !streaming {
        return resp;
    }
    let ended = async move {
        loop {
            tokio::time::sleep(crate::tokens::RECHECK).await;
            if !matches!(tokens.check(&secret), Verdict::Valid { .. }) {
                break;
            }
        }
    };
    let (parts, body) = resp.into_parts();
    let body = axum::body::Body::from_stream(body.into_data_stream().take_until(ended));
    Response::from_parts(parts, body)
}

type Key = Path<String>;

/// `POST /v1/nodes/{id}/labels`: `{"labels": ["key=value", "key-"]}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelBody {
    labels: Vec<String>,
}

/// `POST /v1/nodes/{id}/resolve`: `{"keep": "BOOT-ID"}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    keep: String,
}

/// `DELETE /v1/nodes/{id}?force=true`, `DELETE /v1/instances/{key}?force=true`.
#[derive(Debug, Default, serde::Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

/// `POST /v1/instances/{key}/stop|reboot`, body optional: `{"force": true}` pulls the plug
/// (a reset for a reboot); `{"stop_timeout_secs": 30}` gives the guest that long to act on the power
/// button before it is forced (0 or absent: the agent's configured default).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PowerBody {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    stop_timeout_secs: u16,
}

/// Reads an optional [`PowerBody`].
fn power_mode(body: &[u8]) -> Result<PowerMode, HttpError> {
    let b: PowerBody = if body.iter().all(u8::is_ascii_whitespace) {
        PowerBody::default()
    } else {
        serde_json::from_slice(body).map_err(|e| {
            HttpError::new(
                StatusCode::BAD_REQUEST,
                format!("bad power request: {e} (expected {{\"force\": bool, \"stop_timeout_secs\": 0..65535}})"),
            )
        })?
    };
    Ok(PowerMode {
        force: b.force,
        stop_timeout_secs: b.stop_timeout_secs,
    })
}

/// The API's routes, under `/v1`; image content lives in `blobs`.
pub fn router(
    calls: mpsc::Sender<Call>,
    tokens: std::sync::Arc<Tokens>,
    blobs: BlobStore,
    events_tx: tokio::sync::broadcast::Sender<EventView>,
    console: ConsoleLink,
    metrics: std::sync::Arc<Metrics>,
) -> Router {
    let api = Api {
        calls,
        tokens,
        failures: std::sync::Arc::default(),
        blobs,
        events: events_tx,
        console,
        metrics,
        transfers: std::sync::Arc::default(),
    };
    // Nodes fetch blobs with their own tokens, not the API's.
    let nodes = Router::new().route(
        "/v1/nodes/{node}/blobs/{sha256}",
        get(|State(a): State<Api>, Path((node, sha)): Path<(String, String)>, req: Request| async move { blob(&a, node, sha, req).await }),
    );
    // Liveness and readiness, for load balancers and supervisors: no token, nothing but a word.
    // The status page's files hold no data (it reads the API, with the token when there is
    // one): no token either.
    let open = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(a): State<Api>| async move { readyz(&a.metrics) }),
        )
        .route(
            "/",
            get(|| async { page(PAGE_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/ui/app.js",
            get(|| async { page(PAGE_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/ui/style.css",
            get(|| async { page(PAGE_CSS, "text/css; charset=utf-8") }),
        );
    Router::new()
        .route("/metrics", get(|State(a): State<Api>| async move { scrape(&a).await }))
        .route("/v1/status", get(|State(a): State<Api>| async move { fleet_status(&a).await }))
        .route("/v1/overview", get(|State(a): State<Api>| async move { call(&a, Action::Overview).await }))
        .route("/v1/nodes", get(|State(a): State<Api>| async move { call(&a, Action::ListNodes).await }))
        .route(
            "/v1/nodes/{id}",
            get(|State(a): State<Api>, Path(id): Key| async move { call(&a, Action::GetNode(id)).await })
                .delete(|State(a): State<Api>, Path(id): Key, Query(q): Query<RemoveQuery>| async move {
                    call(&a, Action::RemoveNode(id, q.force)).await
                }),
        )
        .route("/v1/nodes/{id}/cordon", post(|State(a): State<Api>, Path(id): Key| async move { call(&a, Action::CordonNode(id)).await }))
        .route("/v1/nodes/{id}/uncordon", post(|State(a): State<Api>, Path(id): Key| async move { call(&a, Action::UncordonNode(id)).await }))
        .route("/v1/nodes/{id}/labels", post(|State(a): State<Api>, Path(id): Key, body: Result<Json<LabelBody>, axum::extract::rejection::JsonRejection>| async move {
            match body {
                Ok(Json(b)) => call(&a, Action::LabelNode(id, b.labels)).await,
                Err(e) => Err(HttpError::new(StatusCode::BAD_REQUEST, e.body_text())),
            }
        }))
        .route("/v1/nodes/{id}/adopt", post(|State(a): State<Api>, Path(id): Key| async move { call(&a, Action::AdoptNode(id)).await }))
        .route("/v1/nodes/{id}/approve-capacity", post(|State(a): State<Api>, Path(id): Key| async move { call(&a, Action::ApproveCapacity(id)).await }))
        .route("/v1/nodes/{id}/resolve", post(|State(a): State<Api>, Path(id): Key, body: Result<Json<ResolveBody>, axum::extract::rejection::JsonRejection>| async move {
            match body {
                Ok(Json(b)) => call(&a, Action::ResolveNode(id, b.keep)).await,
                Err(e) => Err(HttpError::new(StatusCode::BAD_REQUEST, e.body_text())),
            }
        }))
        .route("/v1/nodes/{id}/drain", post(|State(a): State<Api>, Path(id): Key| async move { call(&a, Action::DrainNode(id)).await }))
        .route(
            "/v1/instances",
            get(|State(a): State<Api>| async move { call(&a, Action::ListInstances).await })
                .post(|State(a): State<Api>, body: Result<Json<CreateBody>, axum::extract::rejection::JsonRejection>| async move {
                    match body {
                        Ok(Json(mut b)) => {
                            let hold = store_seed(&a, &mut b).await?;
                            let parts: Vec<Digest> = b.seed.iter().flat_map(|s| s.blobs().map(|p| p.digest)).collect();
                            let r = call(&a, Action::CreateInstance(Box::new(b))).await;
                            drop(hold);
                            if r.is_err() && !parts.is_empty() {
                                // Refused: its parts go, unless something else refers to them.
                                let _ = ask(&a, Action::ForgetBlobs(parts)).await;
                            }
                            r.map(|v| (StatusCode::CREATED, v))
                        }
                        Err(e) => Err(HttpError::new(StatusCode::BAD_REQUEST, e.body_text())),
                    }
                }),
        )
        .route(
            "/v1/instances/{key}",
            get(|State(a): State<Api>, Path(k): Key| async move { call(&a, Action::GetInstance(k)).await })
                .delete(|State(a): State<Api>, Path(k): Key, uri: axum::http::Uri| async move {
                    let q: RemoveQuery = query(&uri)?.unwrap_or_default();
                    call(&a, Action::DeleteInstance(k, q.force)).await
                }),
        )
        .route("/v1/instances/{key}/stop", post(|State(a): State<Api>, Path(k): Key, body: Bytes| async move { call(&a, Action::StopInstance(k, power_mode(&body)?)).await }))
        .route("/v1/instances/{key}/start", post(|State(a): State<Api>, Path(k): Key| async move { call(&a, Action::StartInstance(k)).await }))
        .route("/v1/instances/{key}/reboot", post(|State(a): State<Api>, Path(k): Key, body: Bytes| async move { call(&a, Action::RebootInstance(k, power_mode(&body)?)).await }))
        .route(
            "/v1/images",
            get(|State(a): State<Api>| async move { call(&a, Action::ListImages).await })
                .post(|State(a): State<Api>, headers: HeaderMap, uri: axum::http::Uri, body: axum::body::Body| async move {
                    let json = headers
                        .get(axum::http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|t| t.starts_with("application/json"));
                    let r = match (query::<UploadQuery>(&uri)?, json) {
                        (Some(q), _) => upload(&a, q, body).await,
                        (None, true) => {
                            let bytes = axum::body::to_bytes(body, 64 * 1024).await.map_err(|e| bad(e.to_string()))?;
                            let b: UrlImage = serde_json::from_slice(&bytes).map_err(|e| bad(format!("bad image: {e}")))?;
                            add_url(&a, b).await
                        }
                        (None, false) => Err(bad("an upload needs ?name=NAME (and optionally version, arch, format); an image served elsewhere is JSON")),
                    };
                    r.map(|v| (StatusCode::CREATED, v))
                })
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/images/{key}",
            get(|State(a): State<Api>, Path(k): Key| async move { call(&a, Action::GetImage(k)).await })
                .delete(|State(a): State<Api>, Path(k): Key| async move { delete_image(&a, k).await }),
        )
        .route("/v1/instances/{key}/console", get(|State(a): State<Api>, Path(k): Key, uri: axum::http::Uri| async move {
            console_http(&a, k, query(&uri)?.unwrap_or_default()).await
        }))
        .route("/v1/instances/{key}/events", get(|State(a): State<Api>, Path(k): Key| async move { call(&a, Action::InstanceEvents(k)).await }))
        .route("/v1/events", get(|State(a): State<Api>, uri: axum::http::Uri| async move {
            events(&a, query(&uri)?.unwrap_or_default()).await
        }))
        .route("/v1/images/{key}/prefetch", post(|State(a): State<Api>, Path(k): Key, body: Result<Json<PrefetchBody>, axum::extract::rejection::JsonRejection>| async move {
            let b = body.map_err(|e| bad(e.body_text()))?.0;
            let selector = b.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
            call(&a, Action::PrefetchImage { key: k, selector, concurrency: b.concurrency }).await
        }))
        .layer(middleware::from_fn_with_state(api.clone(), auth))
        .merge(nodes)
        .merge(open)
        .fallback(|| async { HttpError::new(StatusCode::NOT_FOUND, "no such endpoint (see README: HTTP API)".into()) })
        .layer(middleware::from_fn_with_state(api.clone(), name_leader))
        .layer(middleware::from_fn_with_state(
            std::sync::Arc::clone(&api.tokens),
            crate::origin::guard,
        ))
        .with_state(api)
}

/// The header a standby's 503 answers carry: the leader's API URL, for clients to follow.
pub const LEADER_HEADER: &str = "x-outpost-leader";

/// On a standby, every 503 names the leader (when a live lease names one).
async fn name_leader(State(api): State<Api>, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    if resp.status() == StatusCode::SERVICE_UNAVAILABLE
        && api.metrics.leading.get() == 0
        && let Some((_, url)) = api.metrics.leader()
        && let Ok(v) = axum::http::HeaderValue::from_str(&url)
    {
        resp.headers_mut().insert(LEADER_HEADER, v);
    }
    resp
}

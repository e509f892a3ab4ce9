//! The downloader: one blob from the controller (or where it redirects) into the cache,
//! resumable, verified, at most at a configured rate.
//!
//! - Resumes with HTTP Range from the bytes already in `partial/` (kept across agent restarts);
//!   a source that changed (another size or URL, or an `If-Range` the server no longer
//!   honours) starts over from zero.
//! - A stall (no byte for [`Limits::stall`]) or a cut link retries with back-off, resuming.
//! - The SHA-256 is checked before the file enters the cache (synced, then renamed): a
//!   mismatch deletes the partial file and starts over, a bounded number of times.
//! - Free space is checked first, keeping [`Limits::reserve`] free.
//! - A hostile or broken mirror cannot hold a download (and its slot) forever: the response
//!   headers must come within [`Limits::stall`], the body must keep above [`Limits::min_rate`]
//!   over each [`Limits::rate_window`], and the retry budget counts only attempts that added
//!   nothing to the file (a resumable transfer that keeps progressing is never given up on,
//!   one that makes none is, whatever the server says).
//! - A redirect never leads to this node itself (loopback, link-local, unspecified, or one of
//!   its own interface addresses) unless the source it came from is there too: a mirror
//!   cannot make the agent fetch from the node's own services.
//! - A download that fails for good leaves no partial file behind.

use std::io::{Read as _, Seek as _, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use outpost_protocol::{Backoff, BlobRef, Digest, FetchFrom, NodeId};
use sha2::Digest as _;

use super::cache::{Cache, free_bytes};

/// Bytes handed to the writer and the hasher at a time (with the writer's buffer, what an
/// agent killed mid-download may lose and fetch again).
const BATCH: usize = 256 << 10;

/// Bytes written between two starts of the partial file's writeback.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// How a download behaves.
#[derive(Debug, Clone)]
pub struct Limits {
    /// No byte for this long: the connection is dropped and the download resumed.
    pub stall: Duration,
    /// At most this many bytes per second (0: no limit).
    pub rate: u64,
    /// Bytes to keep free on the image directory's file system.
    pub reserve: u64,
    /// Transfer attempts (connection failures, stalls, cut links) before giving up.
    pub attempts: u32,
    /// Downloads that complete but do not verify, before giving up.
    pub corrupt_attempts: u32,
    /// The least bytes per second a transfer must keep up over each [`Limits::rate_window`]
    /// (a trickle just above the stall timeout is cut and resumed).
    pub min_rate: u64,
    /// The window [`Limits::min_rate`] is measured over.
    pub rate_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            stall: Duration::from_secs(30),
            rate: 0,
            reserve: 256 << 20,
            attempts: 10,
            corrupt_attempts: 3,
            min_rate: 1024,
            rate_window: Duration::from_secs(60),
        }
    }
}

/// Why a download failed for good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// Not enough free space, even after evicting unused images.
    #[error("not enough disk space: needs {need} bytes (keeping {reserve} free), {free} free")]
    NoSpace {
        /// Bytes needed.
        need: u64,
        /// Bytes free.
        free: u64,
        /// The reserve kept free.
        reserve: u64,
    },
    /// The server refused (the node may not fetch it, or it is gone).
    #[error("the image server refused: HTTP {0} {1}")]
    Refused(u16, String),
    /// The content never matched its digest.
    #[error("the image did not verify {0} times (sha256 mismatch): the source is corrupt")]
    Corrupt(u32),
    /// The source is larger than the catalogue says.
    #[error("the source sends more than its {0} bytes")]
    TooLarge(u64),
    /// The transfer kept failing.
    #[error("gave up after {attempts} attempts: {last}")]
    Transfer {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
    /// The node has no fetch source (the controller serves no images).
    #[error("the controller serves no images (start it with --image-url)")]
    NoSource,
    /// A local file operation failed.
    #[error("{0}")]
    Local(String),
}

/// Progress of a download, about once a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes in the partial file.
    pub done: u64,
    /// The blob's size.
    pub total: u64,
    /// Bytes per second over the last interval.
    pub rate: u32,
}

/// One transfer attempt's failure.
enum Attempt {
    /// Retry (resuming).
    Retry(String),
    /// Retry, but the attempt counts against the budget whatever it added: it was cut for
    /// being slower than the minimum rate.
    Slow(String),
    /// The server is busy (503 with Retry-After): wait that long and try again, without
    /// counting against the budget (the overall deadline still holds).
    Busy(Duration),
    /// The partial file is bad or stale: start from zero.
    Restart(String),
    /// Stop.
    Fatal(FetchError),
}

fn local(what: &str) -> impl Fn(std::io::Error) -> FetchError + '_ {
    move |e| FetchError::Local(format!("{what}: {e}"))
}

/// An HTTP(S) client over hyper: one connection per request.
#[derive(Clone)]
pub struct Client {
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Client {
    /// A client; `ca_pem` adds a CA (the device's) to the system roots for https.
    pub fn new(ca_pem: Option<&[u8]>) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
        if let Some(pem) = ca_pem {
            for c in rustls_pemfile::certs(&mut &pem[..]).flatten() {
                let _ = roots.add(c);
            }
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            tls: Some(Arc::new(tls)),
        }
    }

    /// Sends a GET; follows up to 5 redirects (the token goes only to the first host, and a
    /// redirect never to the node itself unless the first host is there: see the module).
    async fn get(
        &self,
        url: &str,
        token: Option<&str>,
        headers: &[(&str, String)],
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let mut url = url.to_owned();
        let first_host = authority(&url).map(str::to_owned);
        let own = own_addresses();
        // Whether the source itself is on this node: then so may its redirects be.
        let mut local_ok = false;
        for hop in 0..6 {
            let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
            let host = uri.host().ok_or("URL without a host")?.to_owned();
            let https = uri.scheme_str() == Some("https");
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((bare, port))
                .await
                .map_err(|e| format!("resolving {host}: {e}"))?
                .collect();
            if hop == 0 {
                local_ok = addrs.iter().any(|a| is_this_node(a.ip(), &own));
            }
            // The addresses vetted are the ones connected to (no second lookup to rebind).
            let allowed: Vec<std::net::SocketAddr> = addrs
                .into_iter()
                .filter(|a| local_ok || !is_this_node(a.ip(), &own))
                .collect();
            if allowed.is_empty() {
                return Err(format!(
                    "refused a redirect to {host}: it is this node itself (loopback, link-local or its own address)"
                ));
            }
            let tcp = tokio::net::TcpStream::connect(&allowed[..])
                .await
                .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let mut req = hyper::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
                .header(
                    hyper::header::HOST,
                    uri.authority().map_or(host.clone(), |a| a.to_string()),
                );
            if let Some(t) = token.filter(|_| authority(&url).map(str::to_owned) == first_host) {
                req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            for (k, v) in headers {
                req = req.header(*k, v);
            }
            let req = req
                .body(http_body_util::Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let resp = if https {
                let tls = self.tls.clone().ok_or("https is not available")?;
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| format!("bad server name {host}: {e}"))?;
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {host}: {e}"))?;
                send(hyper_util::rt::TokioIo::new(stream), req).await?
            } else {
                send(hyper_util::rt::TokioIo::new(tcp), req).await?
            };
            if resp.status().is_redirection()
                && let Some(loc) = resp.headers().get(hyper::header::LOCATION)
            {
                let loc = loc.to_str().map_err(|_| "bad redirect")?;
                url = if loc.starts_with("http://") || loc.starts_with("https://") {
                    loc.to_owned()
                } else {
                    format!(
                        "{}://{}{loc}",
                        uri.scheme_str().unwrap_or("http"),
                        uri.authority().map_or("", |a| a.as_str())
                    )
                };
                continue;
            }
            return Ok(resp);
        }
        Err("too many redirects".into())
    }
}

/// This node's own interface addresses.
fn own_addresses() -> Vec<std::net::IpAddr> {
    nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|i| i.address)
                .filter_map(|a| {
                    a.as_sockaddr_in()
                        .map(|s| std::net::IpAddr::V4(s.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|s| std::net::IpAddr::V6(s.ip())))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `ip` reaches this node itself: loopback, unspecified, link-local (IPv4 169.254/16,
/// IPv6 fe80::/10, where cloud metadata services live), or one of `own` addresses.
fn is_this_node(ip: std::net::IpAddr, own: &[std::net::IpAddr]) -> bool {
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    let special = match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_unspecified() || v4.is_link_local(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    };
    special || own.contains(&ip)
}

fn authority(url: &str) -> Option<&str> {
    url.split_once("://")
        .map(|(_, r)| r.split('/').next().unwrap_or(r))
}

async fn send<T>(
    io: T,
    req: hyper::Request<http_body_util::Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    tx.send_request(req)
        .await
        .map_err(|e| format!("HTTP request: {e}"))
}

/// What the partial file is a copy of: a new source means starting over.
fn source_line(url: &str, blob: &BlobRef, validator: &str) -> String {
    format!("{url}\n{}\n{validator}\n", blob.size)
}

/// Downloads `blob` for `node` from `from` into `cache`, calling `progress` about once a
/// second. Returns once the blob is verified and in the cache.
pub async fn fetch(
    client: &Client,
    cache: &Cache,
    node: &NodeId,
    from: &FetchFrom,
    blob: BlobRef,
    lim: &Limits,
    mut progress: impl FnMut(Progress),
) -> Result<(), FetchError> {
    let d = blob.digest;
    if cache.has(&d) {
        return Ok(());
    }
    for dir in [cache.blob(&d), cache.partial(&d)] {
        if let Some(p) = dir.parent() {
            std::fs::create_dir_all(p).map_err(local("creating the cache"))?;
        }
    }
    let url = format!("{}/v1/nodes/{node}/blobs/{d}", from.url);
    let token: String = from.token.iter().map(|b| format!("{b:02x}")).collect();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let (mut failures, mut corrupt) = (0u32, 0u32);
    // The most the partial file ever held: an attempt that adds to it is progress.
    let mut best = partial_len(cache, &d);
    let given_up = |e: FetchError| {
        // Nothing is left behind by a download that failed for good.
        let _ = std::fs::remove_file(cache.partial(&d));
        let _ = std::fs::remove_file(cache.partial_source(&d));
        Err(e)
    };
    let started = Instant::now();
    // However it goes, a download ends: an hour, plus the time its size takes at 64 KiB/s.
    let deadline = Duration::from_secs(3600 + blob.size / (64 << 10));
    loop {
        if started.elapsed() > deadline {
            return given_up(FetchError::Transfer {
                attempts: failures,
                last: format!("not done within {} s", deadline.as_secs()),
            });
        }
        let result = attempt(client, cache, &url, &token, blob, lim, &mut progress).await;
        let slow = matches!(result, Err(Attempt::Slow(_)));
        match result {
            Ok(()) => {
                let _ = std::fs::remove_file(cache.partial_source(&d));
                return Ok(());
            }
            Err(Attempt::Busy(wait)) => {
                tracing::debug!(blob = %d.short(), retry_in_ms = wait.as_millis() as u64, "the server is busy; waiting");
                tokio::time::sleep(wait).await;
            }
            Err(Attempt::Fatal(e @ FetchError::NoSpace { .. })) => return Err(e),
            Err(Attempt::Fatal(e)) => return given_up(e),
            Err(Attempt::Restart(why)) => {
                corrupt += 1;
                tracing::warn!(blob = %d.short(), %why, "discarding the partial download");
                let _ = std::fs::remove_file(cache.partial(&d));
                let _ = std::fs::remove_file(cache.partial_source(&d));
                best = 0;
                if corrupt >= lim.corrupt_attempts {
                    return Err(FetchError::Corrupt(corrupt));
                }
            }
            Err(Attempt::Retry(why) | Attempt::Slow(why)) => {
                let now = partial_len(cache, &d);
                if now > best && !slow {
                    // Progress: the budget counts only attempts that added nothing.
                    best = now;
                    failures = 0;
                    backoff.reset();
                }
                failures += 1;
                if failures >= lim.attempts {
                    return given_up(FetchError::Transfer {
                        attempts: failures,
                        last: why,
                    });
                }
                let wait = backoff.next_jittered(fastrand::f64());
                tracing::warn!(blob = %d.short(), %why, retry_in_ms = wait.as_millis() as u64, "download interrupted; resuming");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// How many bytes the partial file of `d` holds.
fn partial_len(cache: &Cache, d: &Digest) -> u64 {
    std::fs::metadata(cache.partial(d)).map_or(0, |m| m.len())
}

async fn attempt(
    client: &Client,
    cache: &Cache,
    url: &str,
    token: &str,
    blob: BlobRef,
    lim: &Limits,
    progress: &mut impl FnMut(Progress),
) -> Result<(), Attempt> {
    let d = blob.digest;
    let part = cache.partial(&d);
    let src = cache.partial_source(&d);
    // What the partial file holds, if it is a copy of this source.
    let noted = std::fs::read_to_string(&src).unwrap_or_default();
    let mut noted_lines = noted.lines();
    let same = noted_lines.next() == Some(url)
        && noted_lines.next() == Some(blob.size.to_string().as_str());
    let validator = noted_lines.next().unwrap_or("").to_owned();
    let mut have = if same {
        std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0)
    } else {
        let _ = std::fs::remove_file(&part);
        0
    };
    if have > blob.size {
        return Err(Attempt::Restart(
            "the partial file is larger than the image".into(),
        ));
    }
    let dir = cache.blob(&d);
    let dir = dir.parent().unwrap_or(std::path::Path::new("."));
    let free = free_bytes(dir);
    let need = blob.size - have + lim.reserve;
    if free < need {
        return Err(Attempt::Fatal(FetchError::NoSpace {
            need: blob.size - have,
            free,
            reserve: lim.reserve,
        }));
    }
    let mut headers: Vec<(&str, String)> = Vec::new();
    if have > 0 {
        headers.push(("range", format!("bytes={have}-")));
        if !validator.is_empty() {
            headers.push(("if-range", validator.clone()));
        }
    }
    // A server that accepts the connection and never answers holds nothing for long.
    let resp = tokio::time::timeout(lim.stall, client.get(url, Some(token), &headers))
        .await
        .map_err(|_| Attempt::Retry(format!("no response within {} s", lim.stall.as_secs())))?
        .map_err(Attempt::Retry)?;
    let status = resp.status().as_u16();
    match status {
        206 if have > 0 => {
            let start = resp
                .headers()
                .get(hyper::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            if start != Some(have) {
                return Err(Attempt::Restart(
                    "the server resumed at another offset".into(),
                ));
            }
        }
        200 => {
            // A full body: the source changed, or it does not do ranges. From zero.
            have = 0;
        }
        416 if have == blob.size => {}
        416 => {
            return Err(Attempt::Restart(
                "the server cannot resume this file".into(),
            ));
        }
        503 if resp.headers().contains_key(hyper::header::RETRY_AFTER) => {
            let secs = resp
                .headers()
                .get(hyper::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(2)
                .clamp(1, 60);
            // Jittered, so that many nodes told to wait do not all come back at once.
            let jitter = fastrand::u64(0..=secs * 500);
            return Err(Attempt::Busy(Duration::from_millis(secs * 1000 + jitter)));
        }
        // A 404 may be a mirror catching up: retried like any failure, within the budget.
        401 | 403 | 410 => {
            let reason = resp.status().canonical_reason().unwrap_or("").to_owned();
            return Err(Attempt::Fatal(FetchError::Refused(status, reason)));
        }
        _ => return Err(Attempt::Retry(format!("HTTP {status}"))),
    }
    let validator = ["etag", "last-modified"]
        .iter()
        .find_map(|h| resp.headers().get(*h).and_then(|v| v.to_str().ok()))
        .unwrap_or("")
        .to_owned();
    std::fs::write(&src, source_line(url, &blob, &validator))
        .map_err(|e| Attempt::Fatal(local("noting the download")(e)))?;

    // Three stages in parallel, fed in order: the network (this task), a writer thread that
    // appends to the partial file (and starts its writeback every few MiB on a third thread,
    // so the final fsync has little left), and a hasher thread that first hashes what the file
    // already held.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    let (htx, mut hrx) = tokio::sync::mpsc::channel::<Bytes>(32);
    let part2 = part.clone();
    let writer = tokio::task::spawn_blocking(move || -> Result<u64, String> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&part2)
            .map_err(|e| format!("opening the partial file: {e}"))?;
        f.set_len(have).map_err(|e| e.to_string())?;
        f.seek(std::io::SeekFrom::Start(have))
            .map_err(|e| e.to_string())?;
        let syncer = f.try_clone().map_err(|e| e.to_string())?;
        let (stx, srx) = std::sync::mpsc::sync_channel::<()>(1);
        let flusher = std::thread::spawn(move || {
            while srx.recv().is_ok() {
                let _ = syncer.sync_data();
            }
        });
        let mut w = std::io::BufWriter::with_capacity(BATCH, f);
        let (mut written, mut since_sync) = (have, 0u64);
        while let Some(chunk) = rx.blocking_recv() {
            w.write_all(&chunk)
                .map_err(|e| format!("writing the image: {e}"))?;
            written += chunk.len() as u64;
            since_sync += chunk.len() as u64;
            if since_sync >= WRITEBACK_EVERY {
                since_sync = 0;
                let _ = stx.try_send(()); // skipped while the last one still runs
            }
        }
        drop(stx);
        let f = w.into_inner().map_err(|e| e.to_string())?;
        let _ = flusher.join();
        f.sync_all()
            .map_err(|e| format!("syncing the image: {e}"))?;
        Ok(written)
    });
    let part3 = part.clone();
    let hasher = tokio::task::spawn_blocking(move || -> Result<sha2::Sha256, String> {
        let mut hash = sha2::Sha256::new();
        if have > 0 {
            let mut f = std::fs::File::open(&part3)
                .map_err(|e| format!("reading the partial file: {e}"))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut left = have;
            while left > 0 {
                let want = buf.len().min(left as usize);
                let n = f.read(&mut buf[..want]).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                left -= n as u64;
            }
        }
        while let Some(chunk) = hrx.blocking_recv() {
            hash.update(&chunk);
        }
        Ok(hash)
    });

    let mut body = resp.into_body();
    let mut got = have;
    let started = Instant::now();
    let mut this_session: u64 = 0;
    let (mut tick, mut tick_bytes) = (Instant::now(), got);
    let (mut window, mut window_bytes) = (Instant::now(), got);
    let mut failure = None;
    let mut batch = bytes::BytesMut::with_capacity(BATCH);
    loop {
        let frame = match tokio::time::timeout(lim.stall, body.frame()).await {
            Err(_) => {
                failure = Some(Attempt::Retry(format!(
                    "no data for {} s",
                    lim.stall.as_secs()
                )));
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                failure = Some(Attempt::Retry(format!("the transfer was cut: {e}")));
                break;
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        got += data.len() as u64;
        this_session += data.len() as u64;
        if got > blob.size {
            failure = Some(Attempt::Fatal(FetchError::TooLarge(blob.size)));
            break;
        }
        // Handed on in batches of about 1 MiB: fewer, larger writes and hashes.
        batch.extend_from_slice(&data);
        if batch.len() >= BATCH {
            let b = batch.split().freeze();
            if htx.send(b.clone()).await.is_err() || tx.send(b).await.is_err() {
                break; // the writer or the hasher failed: the error is below
            }
        }
        if lim.rate > 0 {
            let due = Duration::from_secs_f64(this_session as f64 / lim.rate as f64);
            let spent = started.elapsed();
            if due > spent {
                tokio::time::sleep(due - spent).await;
            }
        }
        if window.elapsed() >= lim.rate_window {
            let rate = (got - window_bytes) as f64 / window.elapsed().as_secs_f64();
            if lim.min_rate > 0 && rate < lim.min_rate as f64 {
                failure = Some(Attempt::Slow(format!(
                    "slower than {} B/s over {} s ({rate:.0} B/s)",
                    lim.min_rate,
                    lim.rate_window.as_secs()
                )));
                break;
            }
            (window, window_bytes) = (Instant::now(), got);
        }
        if tick.elapsed() >= Duration::from_secs(1) {
            let rate = ((got - tick_bytes) as f64 / tick.elapsed().as_secs_f64()) as u32;
            progress(Progress {
                done: got,
                total: blob.size,
                rate,
            });
            (tick, tick_bytes) = (Instant::now(), got);
        }
    }
    // What arrived before the end (or a cut) is kept: the next attempt resumes after it.
    if !batch.is_empty() {
        let b = batch.split().freeze();
        let _ = htx.send(b.clone()).await;
        let _ = tx.send(b).await;
    }
    drop((tx, htx));
    let written = match writer.await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(Attempt::Fatal(FetchError::Local(e))),
        Err(e) => return Err(Attempt::Fatal(FetchError::Local(e.to_string()))),
    };
    let hash = match hasher.await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return Err(Attempt::Fatal(FetchError::Local(e))),
        Err(e) => return Err(Attempt::Fatal(FetchError::Local(e.to_string()))),
    };
    if let Some(f) = failure {
        return Err(f);
    }
    if written < blob.size {
        return Err(Attempt::Retry(format!(
            "the source ended after {written} of {} bytes",
            blob.size
        )));
    }
    let digest = Digest(hash.finalize().into());
    if digest != d {
        return Err(Attempt::Restart(format!(
            "sha256 {} instead of {}",
            digest.short(),
            d.short()
        )));
    }
    let to = cache.blob(&d);
    std::fs::rename(&part, &to).map_err(|e| Attempt::Fatal(local("caching the image")(e)))?;
    if let Some(dir) = to.parent() {
        let _ = std::fs::File::open(dir).and_then(|f| f.sync_all());
    }
    progress(Progress {
        done: blob.size,
        total: blob.size,
        rate: 0,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn redirects_to_this_node_are_recognised() {
        let own: Vec<IpAddr> = vec!["192.0.2.7".parse().unwrap()];
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "169.254.169.254",
            "::1",
            "::",
            "fe80::1",
            "::ffff:127.0.0.1",
            "192.0.2.7",
        ] {
            assert!(is_this_node(ip.parse().unwrap(), &own), "{ip}");
        }
        for ip in ["192.0.2.8", "198.51.100.1", "2001:db8::1"] {
            assert!(!is_this_node(ip.parse().unwrap(), &own), "{ip}");
        }
        // The node's own interfaces are found (loopback at least).
        assert!(own_addresses().iter().any(IpAddr::is_loopback));
    }
}

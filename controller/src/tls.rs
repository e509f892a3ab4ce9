//! The API over TLS (rustls): the certificate and key are read from PEM files and read again
//! when they change (checked every [`WATCH_EVERY`]) or on SIGHUP, so that a certificate can be
//! rotated without a restart: the next handshake uses the new one. With a client CA, every
//! client must present a certificate that chains to it (mutual TLS).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;

/// How often the certificate files are checked for a change.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);
/// How long a client has to finish its handshake.
pub(crate) const HANDSHAKE: Duration = Duration::from_secs(10);

/// Where the API's TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTls {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA (PEM) that client certificates must chain to, for mutual TLS.
    pub client_ca: Option<PathBuf>,
}

fn read_pem<T>(
    path: &Path,
    what: &str,
    parse: impl FnOnce(&mut dyn std::io::BufRead) -> Result<T, String>,
) -> Result<T, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    parse(&mut bytes.as_slice()).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// The server config from the files.
pub fn load(t: &ApiTls) -> Result<Arc<ServerConfig>, String> {
    let certs = read_pem(&t.cert, "--api-tls-cert", |r| {
        let c: Vec<_> = rustls_pemfile::certs(r)
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        if c.is_empty() {
            return Err("no certificate in it".into());
        }
        Ok(c)
    })?;
    let key = read_pem(&t.key, "--api-tls-key", |r| {
        rustls_pemfile::private_key(r)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "no private key in it".to_owned())
    })?;
    let builder = ServerConfig::builder();
    let builder = match &t.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = read_pem(ca, "--api-client-ca", |r| {
                rustls_pemfile::certs(r)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())
            })?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("--api-client-ca {}: {e}", ca.display()))?;
            }
            let v = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| format!("--api-client-ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(v)
        }
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("--api-tls-cert/--api-tls-key: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The current server config, read again when its files change.
pub struct Reloading {
    files: ApiTls,
    current: RwLock<Arc<ServerConfig>>,
    stamp: RwLock<Vec<Option<SystemTime>>>,
}

impl Reloading {
    /// Reads the files (an error here stops the controller: it cannot serve).
    pub fn new(files: ApiTls) -> Result<Arc<Self>, String> {
        let cfg = load(&files)?;
        let stamp = stamps(&files);
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(cfg),
            stamp: RwLock::new(stamp),
        }))
    }

    /// The config the next handshake uses.
    pub fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reads the files again if they changed (or if `force`); a config that does not load is
    /// logged and the one in use kept.
    pub fn reload(&self, force: bool) {
        let now = stamps(&self.files);
        if !force && *self.stamp.read().unwrap_or_else(|e| e.into_inner()) == now {
            return;
        }
        match load(&self.files) {
            Ok(cfg) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = cfg;
                *self.stamp.write().unwrap_or_else(|e| e.into_inner()) = now;
                tracing::info!(cert = %self.files.cert.display(), "API certificate loaded again");
            }
            Err(e) => {
                // Keep trying at each change, but say it once per change.
                *self.stamp.write().unwrap_or_else(|e| e.into_inner()) = now;
                tracing::error!(error = %e, "cannot load the new API certificate: keeping the one in use");
            }
        }
    }

    /// Watches the files (and SIGHUP) for as long as the process runs.
    pub fn watch(self: &Arc<Self>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(WATCH_EVERY);
            loop {
                let forced = match &mut hup {
                    Some(h) => tokio::select! {
                        _ = tick.tick() => false,
                        _ = h.recv() => true,
                    },
                    None => {
                        tick.tick().await;
                        false
                    }
                };
                me.reload(forced);
            }
        });
    }
}

fn stamps(t: &ApiTls) -> Vec<Option<SystemTime>> {
    [Some(&t.cert), Some(&t.key), t.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

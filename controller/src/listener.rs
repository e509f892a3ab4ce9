//! The API's listener, plain or TLS: one accept loop that keeps the API answering under a
//! flood of idle, half-sent or stalled connections.
//!
//! - Each connection carries one request (no keep-alive): a client has [`HEADER_TIMEOUT`] to
//!   send its headers, and [`HANDSHAKE`](crate::tls) to finish a TLS handshake.
//! - At most [`Limits::max`] connections are open at once (a share of the open-file limit).
//!   A new connection past that closes the oldest one that has not sent its request yet
//!   (idle, or half-sent): room is always kept for a caller that speaks, such as an operator
//!   with a token, while anonymous connections that say nothing are the ones let go. Only
//!   when every connection is busy answering is a new one closed at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;

use crate::tls::Reloading;

/// How long a client may take to send a request's headers (or sit idle between requests).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How many connections the API keeps open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// In all.
    pub max: usize,
}

impl Limits {
    /// A quarter of the open-file limit `nofile` (the broker's devices and the store need the
    /// rest), between 16 and 1024.
    pub fn for_open_files(nofile: u64) -> Self {
        Self {
            max: usize::try_from(nofile / 4)
                .unwrap_or(usize::MAX)
                .clamp(16, 1024),
        }
    }

    /// From this process's open-file limit.
    pub fn from_process() -> Self {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        Self::for_open_files(soft)
    }
}

/// The open connections: how many, and those that have not sent their request yet (oldest
/// first), each with the means to close it.
#[derive(Default)]
struct Table {
    open: usize,
    next: u64,
    waiting: std::collections::BTreeMap<u64, tokio::sync::oneshot::Sender<()>>,
}

impl Table {
    /// Makes room for one more connection (closing the oldest waiting one if the table is
    /// full): its number and its close signal, or `None` if every connection is busy.
    fn admit(&mut self, max: usize) -> Option<(u64, tokio::sync::oneshot::Receiver<()>)> {
        if self.open >= max {
            let (_, close) = self.waiting.pop_first()?;
            let _ = close.send(());
            self.open -= 1;
        }
        self.open += 1;
        self.next += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting.insert(self.next, tx);
        Some((self.next, rx))
    }

    /// Connection `id` sent its request: no longer the first to go.
    fn busy(&mut self, id: u64) {
        self.waiting.remove(&id);
    }

    /// Connection `id` ended (`evicted`: [`admit`](Self::admit) already counted it out).
    fn ended(&mut self, id: u64, evicted: bool) {
        self.waiting.remove(&id);
        if !evicted {
            self.open -= 1;
        }
    }
}

/// Serves `app` on `listener` (over TLS with `tls`) until the process ends. Each request
/// carries its peer address (for the API's per-address limit on failed authentications).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<Arc<Reloading>>,
    limits: Limits,
) {
    let table = Arc::new(std::sync::Mutex::new(Table::default()));
    let mut refused: u64 = 0;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admitted = table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(limits.max);
        let Some((id, close)) = admitted else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    %peer, max = limits.max, refused,
                    "the API's connections are all busy: new connections are closed"
                );
            }
            drop(stream);
            continue;
        };
        let (app, tls, table) = (app.clone(), tls.clone(), Arc::clone(&table));
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let conn = Conn {
                peer,
                app,
                id,
                table: Arc::clone(&table),
            };
            let served = async move {
                match tls {
                    None => conn.serve(stream).await,
                    Some(tls) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                        match tokio::time::timeout(crate::tls::HANDSHAKE, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(s)) => conn.serve(s).await,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    }
                }
            };
            let evicted = tokio::select! {
                () = served => false,
                Ok(()) = close => {
                    tracing::debug!(%peer, "closed a connection that sent nothing, to make room");
                    true
                }
            };
            table
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .ended(id, evicted);
        });
    }
}

/// One connection being served.
struct Conn {
    peer: SocketAddr,
    app: Router,
    id: u64,
    table: Arc<std::sync::Mutex<Table>>,
}

impl Conn {
    /// Serves its one request, with the header timeout.
    async fn serve<S>(self, io: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Self {
            peer,
            app,
            id,
            table,
        } = self;
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                table.lock().unwrap_or_else(|e| e.into_inner()).busy(id);
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                tower::ServiceExt::oneshot(app.clone(), req)
            });
        let io = hyper_util::rt::TokioIo::new(io);
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .keep_alive(false)
            .serve_connection(io, svc)
            .await
        {
            tracing::debug!(%peer, error = %e, "API connection ended");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn limits_follow_the_open_file_limit() {
        assert_eq!(Limits::for_open_files(160).max, 40);
        assert_eq!(Limits::for_open_files(10).max, 16);
        assert_eq!(Limits::for_open_files(1 << 20).max, 1024);
    }

    #[test]
    fn a_full_table_lets_the_oldest_silent_connection_go() {
        let mut t = Table::default();
        let (a, mut close_a) = t.admit(2).unwrap();
        let (b, _close_b) = t.admit(2).unwrap();
        t.busy(b);
        // Full: the oldest that said nothing (a) is closed for the newcomer.
        let (c, _close_c) = t.admit(2).unwrap();
        assert!(close_a.try_recv().is_ok(), "a was told to close");
        t.ended(a, true);
        assert_eq!(t.open, 2);
        // Full, and everyone else busy (c speaks too): the next one is refused.
        t.busy(c);
        assert!(t.admit(2).is_none());
        t.ended(b, false);
        assert!(t.admit(2).is_some());
    }
}

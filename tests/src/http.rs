//! A tiny HTTP server for image sources that misbehave on purpose: the bytes of one file at
//! any path, with `Range` support, optionally corrupted, truncated or stalled.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How the server misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serves the bytes as they are.
    Good,
    /// Flips one byte in the middle of every response.
    Corrupt,
    /// Closes every response after this many body bytes.
    Truncate(u64),
    /// Ignores Range (always the whole body, from the start) and closes after this many bytes:
    /// a download that never gets further.
    NoRange(u64),
    /// Takes the request and never answers (holds the connection open).
    Silent,
}

/// A running image server.
pub struct ImageServer {
    /// Its port.
    pub port: u16,
    /// Body bytes sent so far.
    pub sent: Arc<AtomicU64>,
}

impl ImageServer {
    /// Serves `bytes` as `mode` says, until the test ends.
    pub fn start(bytes: Vec<u8>, mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(AtomicU64::new(0));
        let (bytes, counter) = (Arc::new(bytes), Arc::clone(&sent));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let (bytes, counter) = (Arc::clone(&bytes), Arc::clone(&counter));
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut start = 0u64;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                        let l = line.to_ascii_lowercase();
                        if let Some(r) = l.strip_prefix("range: bytes=") {
                            start = r.trim().trim_end_matches('-').parse().unwrap_or(0);
                        }
                    }
                    if mode == Mode::Silent {
                        std::thread::sleep(Duration::from_secs(600));
                        return;
                    }
                    if matches!(mode, Mode::NoRange(_)) {
                        start = 0;
                    }
                    let len = bytes.len() as u64;
                    let start = start.min(len);
                    let head = if start > 0 {
                        format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{len}\r\nConnection: close\r\n\r\n",
                            len - start,
                            len - 1
                        )
                    } else {
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                        )
                    };
                    if conn.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    let mut body = bytes[start as usize..].to_vec();
                    if mode == Mode::Corrupt && !body.is_empty() {
                        let mid = body.len() / 2;
                        body[mid] ^= 0xff;
                    }
                    if let Mode::Truncate(n) | Mode::NoRange(n) = mode {
                        body.truncate(n as usize);
                    }
                    for chunk in body.chunks(64 * 1024) {
                        if conn.write_all(chunk).is_err() {
                            return;
                        }
                        counter.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                    }
                    let _ = conn.flush();
                });
            }
        });
        Self { port, sent }
    }

    /// The URL of the file.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/image", self.port)
    }
}

//! Image transfer: the agent's downloader against `curl -o`, from the same server in the same
//! run, and the bytes a resumed download moves.
//!
//! The server is the controller's serving stack (axum with tower-http's `ServeFile`, Range
//! included) on loopback, in this process. The downloader's time includes everything before
//! the image is usable: the free-space check, the transfer, SHA-256 of every byte, fsync and the
//! rename into the cache. curl's includes the transfer and writing the file (no hash, no
//! fsync). `OUTPOST_BENCH_FETCH_MIB` sets the size (default 1024).
//!
//!     cargo bench -p outpost-agent --bench fetch

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use outpost_agent::images::Cache;
use outpost_agent::images::fetch::{Client, Limits, fetch};
use outpost_protocol::{BaseUrl, BlobRef, Digest, FetchFrom, NodeId};
use sha2::Digest as _;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") || !args.iter().any(|a| a == "--bench") {
        return; // test runners: nothing to run; `cargo bench` passes --bench.
    }
    let mib: u64 = std::env::var("OUTPOST_BENCH_FETCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("image.raw");
    // Incompressible-ish content, written once.
    let mut hash = sha2::Sha256::new();
    {
        use std::io::Write as _;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        let mut block = vec![0u8; 1 << 20];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..mib {
            for b in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes());
            }
            hash.update(&block);
            f.write_all(&block).unwrap();
        }
    }
    let digest = Digest(hash.finalize().into());
    let size = mib << 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let served = Arc::new(AtomicU64::new(0));
    let cut_once = Arc::new(AtomicU64::new(0));
    let addr: SocketAddr = rt.block_on(serve(
        src.clone(),
        digest,
        Arc::clone(&served),
        Arc::clone(&cut_once),
    ));
    let node = NodeId::new("bench").unwrap();
    let from = FetchFrom {
        url: BaseUrl::new(&format!("http://{addr}")).unwrap(),
        token: [0; 32],
    };
    let blob = BlobRef { digest, size };
    let lim = Limits {
        reserve: 0,
        ..Limits::default()
    };
    let client = Client::new(None);
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    println!(
        "machine: {machine}, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let mut rows = Vec::new();
    for round in 0..3 {
        // curl, to a file on the same file system.
        let out = dir.path().join("curl.out");
        let t = Instant::now();
        let st = std::process::Command::new("curl")
            .args(["-s", "-o"])
            .arg(&out)
            .arg(format!("http://{addr}/v1/nodes/bench/blobs/{digest}"))
            .status()
            .expect("curl (scripts/setup installs it)");
        assert!(st.success());
        let curl = t.elapsed();
        std::fs::remove_file(&out).unwrap();

        // The agent's downloader into a fresh cache.
        let cache_dir = dir.path().join(format!("cache-{round}"));
        let cache = Cache::new(&cache_dir);
        let t = Instant::now();
        rt.block_on(fetch(&client, &cache, &node, &from, blob, &lim, |_| {}))
            .unwrap();
        let ours = t.elapsed();
        assert!(cache.has(&digest));
        std::fs::remove_dir_all(&cache_dir).unwrap();
        rows.push((curl, ours));
    }

    // The parts: SHA-256 alone over the file (in memory), and fsync of a written copy.
    let bytes = std::fs::read(&src).unwrap();
    let t = Instant::now();
    let mut h = sha2::Sha256::new();
    for c in bytes.chunks(1 << 20) {
        h.update(c);
    }
    let _ = h.finalize();
    let hash_time = t.elapsed();
    drop(bytes);
    let copy = dir.path().join("copy");
    std::fs::copy(&src, &copy).unwrap();
    let t = Instant::now();
    std::fs::File::open(&copy).unwrap().sync_all().unwrap();
    let sync_time = t.elapsed();
    std::fs::remove_file(&copy).unwrap();

    // Resume: the first response is cut at half the image; the downloader resumes.
    let cache_dir = dir.path().join("cache-resume");
    let cache = Cache::new(&cache_dir);
    served.store(0, Ordering::SeqCst);
    cut_once.store(size / 2, Ordering::SeqCst);
    rt.block_on(fetch(&client, &cache, &node, &from, blob, &lim, |_| {}))
        .unwrap();
    let resumed = served.load(Ordering::SeqCst) as f64 / size as f64;

    println!(
        "\n| {mib} MiB on loopback | curl -o | outpost fetch (sha256 + fsync + rename) | ratio |"
    );
    println!("|---|---|---|---|");
    for (i, (curl, ours)) in rows.iter().enumerate() {
        let rate = |d: std::time::Duration| size as f64 / d.as_secs_f64() / 1048576.0;
        println!(
            "| run {} | {:.0} MiB/s | {:.0} MiB/s | {:.2} |",
            i + 1,
            rate(*curl),
            rate(*ours),
            curl.as_secs_f64() / ours.as_secs_f64()
        );
    }
    println!(
        "\nparts: sha256 alone {:.0} MiB/s; fsync of a freshly written copy {:.0} ms",
        size as f64 / hash_time.as_secs_f64() / 1048576.0,
        sync_time.as_secs_f64() * 1000.0
    );
    println!(
        "resume after a cut at 50%: bytes served / image size = {resumed:.3} (target <= 1.05)"
    );
}

/// The controller's serving stack: axum + tower-http `ServeFile` with Range; the first
/// response after `cut` is set is cut after that many bytes.
async fn serve(
    file: std::path::PathBuf,
    _digest: Digest,
    served: Arc<AtomicU64>,
    cut: Arc<AtomicU64>,
) -> SocketAddr {
    use axum::body::Body;
    use axum::extract::Request;
    use futures_util::StreamExt as _;
    use http_body_util::BodyExt as _;
    let app = axum::Router::new().route(
        "/v1/nodes/{node}/blobs/{sha}",
        axum::routing::get(move |req: Request| {
            let (file, served, cut) = (file.clone(), Arc::clone(&served), Arc::clone(&cut));
            async move {
                let resp =
                    tower::ServiceExt::oneshot(tower_http::services::ServeFile::new(file), req)
                        .await
                        .unwrap();
                let (parts, body) = resp.into_parts();
                let limit = cut.swap(0, Ordering::SeqCst);
                let mut sent = 0u64;
                let stream = body.into_data_stream().map(move |chunk| {
                    let chunk = chunk.map_err(std::io::Error::other)?;
                    if limit > 0 && sent >= limit {
                        return Err(std::io::Error::other("cut"));
                    }
                    sent += chunk.len() as u64;
                    served.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(chunk)
                });
                axum::response::Response::from_parts(parts, Body::from_stream(stream))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

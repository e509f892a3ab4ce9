//! Encode and decode time of each message, typical values.
//!
//!     cargo bench -p outpost-protocol --bench codec
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use common::*;
use criterion::{Criterion, criterion_group, criterion_main};
use outpost_protocol::*;

fn pair<M: Message>(c: &mut Criterion, what: &str, m: &M) {
    let bytes = m.to_vec().unwrap();
    let mut buf = vec![0u8; M::MAX_SIZE];
    c.bench_function(&format!("encode/{what}"), |b| {
        b.iter(|| black_box(m).encode(&mut buf).unwrap().len())
    });
    c.bench_function(&format!("decode/{what}"), |b| {
        b.iter(|| M::decode(black_box(&bytes)).unwrap())
    });
}

fn bench(c: &mut Criterion) {
    pair(c, "status", &status());
    pair(c, "inventory", &inventory());
    pair(c, "desired-2", &desired());
    pair(c, "report-4", &report(4));
    pair(c, "event", &instance_event());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .measurement_time(std::time::Duration::from_secs(1))
        .warm_up_time(std::time::Duration::from_millis(300));
    targets = bench
}
criterion_main!(benches);

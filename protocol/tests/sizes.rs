//! The size table: encoded size of each message, typical and largest, against its cap.
//! Run `cargo test -p outpost-protocol --test sizes -- --nocapture` to see it.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use outpost_protocol::*;

fn row<M: Message>(what: &str, typical: &M, largest: &M) -> (usize, usize) {
    let t = typical.to_vec().unwrap().len();
    let l = largest.to_vec().unwrap().len();
    println!(
        "| {:<9} | {:<32} | {:>7} | {:>7} | {:>7} |",
        M::NAME,
        what,
        t,
        l,
        M::MAX_SIZE
    );
    assert!(t <= l && l <= M::MAX_SIZE);
    (t, l)
}

#[test]
fn size_table() {
    println!("| message   | typical value                    | typical | largest |     cap |");
    println!("|-----------|----------------------------------|---------|---------|---------|");
    row("online", &status(), &max_status());
    row("8 vCPU, 2 labels, 2 images", &inventory(), &max_inventory());
    row("2 instances", &desired(), &max_desired());
    let d = desired();
    let holding = Holding {
        held: Some(d.version()),
        instances: d.instances,
    };
    row("2 instances held", &holding, &max_holding());
    let (four, _) = row("4 instances", &report(4), &max_report());
    row("1 instance", &report(1), &max_report());
    row("16 instances", &report(16), &max_report());
    row("ack", &ack(), &max_event());
    row("instance error + reason", &instance_event(), &max_event());
    let mut worst = max_report();
    worst.instances.truncate(4);
    let worst = worst.to_vec().unwrap().len();
    println!(
        "\nreport with 4 instances: {four} bytes typical, {worst} bytes worst case (limit 128)"
    );
    assert!(four <= worst && worst <= 128);
}

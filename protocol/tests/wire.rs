//! The encoding contract: golden bytes, round trips, and every decode error.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use outpost_protocol::*;
use proptest::prelude::*;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Encodes `msg`, compares with the pinned hex, and decodes the pinned bytes back.
fn golden<M: Message + PartialEq + std::fmt::Debug>(msg: &M, pinned: &str) {
    let bytes = msg.to_vec().unwrap();
    assert_eq!(hex(&bytes), pinned, "{} encoding changed", M::NAME);
    let mut buf = [0u8; 1024];
    assert_eq!(msg.encode(&mut buf).unwrap(), &bytes[..]);
    assert_eq!(&M::decode(&bytes).unwrap(), msg);
}

#[test]
fn golden_status() {
    golden(&status(), "050180d0dfb4ab33ef9bafcdf8acd19101");
}

#[test]
fn golden_inventory() {
    golden(
        &inventory(),
        "05010008808001c8010180080a02047a6f6e65056e6f7274680473697465076465706f742d34020f64656269616e2d31322e71636f773207766d6c696e757a05302e312e30014b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b",
    );
}

#[test]
fn golden_desired() {
    golden(
        &desired(),
        "059dcefb780700ac02021111222233334444057765622d310000000002800404010000000f64656269616e2d31322e71636f7732010764656661756c740101036170700363616d00aaaabbbbccccdddd0466772d310102011e01800100000001014b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b959aef3a01000a696e697472642e696d670d636f6e736f6c653d747479533000000001017777777777777777777777777777777777777777777777777777777777777777959aef3a00018888888888888888888888888888888888888888888888888888888888888888959aef3a010266770155556666777788880117687474703a2f2f63746c2e6578616d706c653a383038300707070707070707070707070707070707070707070707070707070707070707015a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a959aef3a01ef9bafcdf8acd19101",
    );
}

#[test]
fn golden_report() {
    golden(
        &report(4),
        "052a0880201004049e3779b97f4a7c15023c6ef372fe94f82a02daa66d2c7ddf743f0278dde6e5fd29f0540500",
    );
}

#[test]
fn golden_other_fleet_ack_and_notice() {
    golden(
        &AgentEvent::Ack {
            generation: 1,
            result: AckResult::OtherFleet {
                held: Version {
                    fleet: FleetId(5),
                    generation: 9,
                },
            },
        },
        "0500010205 09".replace(' ', "").as_str(),
    );
    golden(
        &AgentEvent::Notice {
            kind: NoticeKind::StateUnreadable,
            reason: Reason::lossy("crc"),
        },
        "050200 03637263".replace(' ', "").as_str(),
    );
}

#[test]
fn golden_holding() {
    let d = desired();
    golden(
        &Holding {
            held: Some(d.version()),
            instances: d.instances.into_iter().take(1).collect(),
        },
        "0501 9dcefb78 07 01 1111222233334444 057765622d31 00 00 0000 02800404 01 00 00 00 0f64656269616e2d31322e71636f7732010764656661756c740101036170700363616d 00".replace(' ', "").as_str(),
    );
}

#[test]
fn golden_fetch_event() {
    golden(
        &fetch_event(),
        "05 03 4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b 8080808004 8080808008 a0f8fa05 00 00"
            .replace(' ', "")
            .as_str(),
    );
}

#[test]
fn golden_ack() {
    golden(&ack(), "0500070109");
}

#[test]
fn golden_instance_event() {
    golden(
        &instance_event(),
        "050111112222333344440705013373706563207265717569726573204b564d3b206e6f646520686173206f6e6c7920736f66747761726520656d756c6174696f6e",
    );
}

/// The largest value of each message encodes within its cap, so a legal message is never
/// refused for size.
#[test]
fn largest_messages_fit_their_caps() {
    fn fits<M: Message>(m: &M) -> usize {
        let len = m.to_vec().unwrap().len();
        assert!(len <= M::MAX_SIZE, "{}: {len} > {}", M::NAME, M::MAX_SIZE);
        len
    }
    fits(&max_status());
    fits(&max_inventory());
    fits(&max_desired());
    fits(&max_holding());
    fits(&max_report());
    fits(&max_event());
    fits(&AgentEvent::Fetch {
        digest: Digest([0xff; 32]),
        done: u64::MAX,
        total: u64::MAX,
        rate: u32::MAX,
        state: FetchState::Failed,
        reason: Reason::lossy(&"é".repeat(200)),
    });
}

#[test]
fn report_with_four_instances_is_at_most_128_bytes() {
    // Worst case for four instances: every integer at its maximum.
    let mut r = max_report();
    r.instances.truncate(4);
    let len = r.to_vec().unwrap().len();
    assert!(len <= 128, "report with 4 instances is {len} bytes");
}

#[test]
fn empty_payload_is_refused() {
    assert_eq!(NodeReport::decode(&[]), Err(DecodeError::Empty));
}

#[test]
fn oversize_payload_is_refused_before_decoding() {
    let big = vec![WIRE_VERSION; NodeReport::MAX_SIZE + 1];
    assert_eq!(
        NodeReport::decode(&big),
        Err(DecodeError::Oversize {
            len: NodeReport::MAX_SIZE + 1,
            max: NodeReport::MAX_SIZE
        })
    );
}

#[test]
fn unknown_version_is_refused() {
    let mut bytes = report(1).to_vec().unwrap();
    // A version-1 message (before fleets and holdings), a version-2 one (before power modes
    // and agent versions), a version-3 one (before images by digest), a version-4 one (before
    // agent installs) and a future one are all refused.
    for v in [1, 2, 3, 4, 6] {
        bytes[0] = v;
        assert_eq!(
            NodeReport::decode(&bytes),
            Err(DecodeError::UnknownVersion(v))
        );
    }
    // The message says what to do.
    bytes[0] = 3;
    let msg = NodeReport::decode(&bytes).unwrap_err().to_string();
    assert!(
        msg.contains("wire version 3")
            && msg.contains("speaks version 5")
            && msg.contains("upgrade"),
        "{msg}"
    );
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = ack().to_vec().unwrap();
    bytes.extend_from_slice(&[0, 0]);
    assert_eq!(
        AgentEvent::decode(&bytes),
        Err(DecodeError::TrailingBytes(2))
    );
}

#[test]
fn truncated_body_is_malformed() {
    let bytes = desired().to_vec().unwrap();
    for cut in 1..bytes.len() {
        assert_eq!(
            DesiredState::decode(&bytes[..cut]),
            Err(DecodeError::Malformed),
            "cut at {cut}"
        );
    }
}

#[test]
fn invalid_ids_inside_a_message_are_malformed() {
    // An inventory whose image name is a path: patch the bytes of a valid one.
    let mut bytes = inventory().to_vec().unwrap();
    let at = bytes.windows(7).position(|w| w == b"vmlinuz").unwrap();
    bytes[at + 1] = b'/';
    assert_eq!(Inventory::decode(&bytes), Err(DecodeError::Malformed));
}

#[test]
fn list_over_its_bound_is_malformed() {
    // A report claiming 33 instances (one over MAX_INSTANCES_PER_NODE).
    let mut r = max_report();
    r.usage = Usage::default();
    r.generation = 0;
    let mut bytes = r.to_vec().unwrap();
    // version, generation(1), used(3), instances(1), then the list length.
    let len_at = 1 + 1 + 3 + 1;
    assert_eq!(bytes[len_at] as usize, limits::MAX_INSTANCES_PER_NODE);
    bytes[len_at] += 1;
    let first = bytes[len_at + 1..len_at + 11].to_vec();
    bytes.extend_from_slice(&first);
    assert_eq!(NodeReport::decode(&bytes), Err(DecodeError::Malformed));
}

#[test]
fn encode_into_a_small_buffer_fails_cleanly() {
    let mut buf = [0u8; 8];
    assert_eq!(desired().encode(&mut buf), Err(EncodeError::TooLarge(8)));
    assert_eq!(desired().encode(&mut []), Err(EncodeError::TooLarge(0)));
}

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: &M) -> Result<(), TestCaseError> {
    let bytes = m.to_vec().unwrap();
    prop_assert!(bytes.len() <= M::MAX_SIZE);
    prop_assert_eq!(bytes[0], WIRE_VERSION);
    prop_assert_eq!(&M::decode(&bytes).unwrap(), m);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn status_round_trips(m in arb_status()) { round_trip(&m)?; }

    #[test]
    fn inventory_round_trips(m in arb_inventory()) { round_trip(&m)?; }

    #[test]
    fn desired_round_trips(m in arb_desired()) {
        // A full desired state is ~44 KiB in memory; unoptimized test builds copy it around
        // more than the default 2 MiB test-thread stack allows.
        std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn(move || round_trip(&m))
            .unwrap()
            .join()
            .unwrap()?;
    }

    #[test]
    fn report_round_trips(m in arb_report()) { round_trip(&m)?; }

    #[test]
    fn event_round_trips(m in arb_event()) { round_trip(&m)?; }

    /// Random bytes never panic a decoder.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = NodeStatus::decode(&bytes);
        let _ = Inventory::decode(&bytes);
        let _ = DesiredState::decode(&bytes);
        let _ = NodeReport::decode(&bytes);
        let _ = AgentEvent::decode(&bytes);
    }
}

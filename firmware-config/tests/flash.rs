//! The flashed format: TOML → flashed bytes → decode, corruption, versions, golden bytes.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use outpost_firmware_config::flash::{self, FlashError};
use outpost_firmware_config::human::{ConfigError, HumanConfig, load};
use outpost_firmware_config::*;

const TOML: &str = r#"
node_id = "edge-7"
brokers = ["mqtts://broker.example:8883", "mqtt://10.0.0.2:1883"]
username = "edge-7"
password = "hunter2-but-longer"
state_dir = "/var/lib/outpost"
report_interval_secs = 15
[labels]
zone = "north"
[reserved]
memory_mib = 512
[hypervisor]
kind = "emulated"
"#;

fn sample() -> DeviceConfig {
    HumanConfig::from_toml(TOML)
        .unwrap()
        .resolve(Path::new("."))
        .unwrap()
}

#[test]
fn toml_to_flashed_and_back() {
    let cfg = sample();
    assert_eq!(cfg.node_id.as_str(), "edge-7");
    assert_eq!(cfg.brokers.len(), 2);
    assert_eq!(
        cfg.password.as_ref().unwrap().expose(),
        "hunter2-but-longer"
    );
    let bytes = flash::to_vec(&cfg).unwrap();
    assert!(flash::is_flashed(&bytes));
    assert_eq!(flash::decode(&bytes).unwrap(), cfg);
}

#[test]
fn golden_bytes_pin_the_format() {
    let mut cfg = DeviceConfig::new("edge-1".parse().unwrap());
    cfg.brokers
        .push("mqtt://127.0.0.1:1883".try_into().unwrap())
        .unwrap();
    cfg.report_interval_secs = Some(10);
    let hex: String = flash::to_vec(&cfg)
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        hex,
        "4f504443023300000006656467652d3101156d7174743a2f2f3132372e302e302e313a313838330000000000000000000000000000000000010a0000aea007b6"
    );
    // A device flashed with format version 1 (before the downloads section) still boots:
    // these are the bytes the previous release wrote for the same config.
    let v1 = "4f504443013200000006656467652d3101156d7174743a2f2f3132372e302e302e313a313838330000000000000000000000000000000000010a009f9f4609";
    let v1: Vec<u8> = (0..v1.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&v1[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(flash::decode(&v1).unwrap(), cfg);
}

#[test]
fn every_corrupt_byte_is_caught() {
    let bytes = flash::to_vec(&sample()).unwrap();
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x40;
        assert!(
            flash::decode(&bad).is_err(),
            "flipping byte {i} went unnoticed"
        );
    }
    let mut bad = bytes.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    assert!(matches!(
        flash::decode(&bad),
        Err(FlashError::BadCrc { .. })
    ));
    let msg = flash::decode(&bad).unwrap_err().to_string();
    assert!(msg.contains("corrupt"), "{msg}");
}

#[test]
fn other_versions_and_foreign_data_are_refused() {
    let mut bytes = flash::to_vec(&sample()).unwrap();
    bytes[4] = 3;
    assert_eq!(flash::decode(&bytes), Err(FlashError::UnknownVersion(3)));
    assert!(
        flash::decode(&bytes)
            .unwrap_err()
            .to_string()
            .contains("version 3 is not supported")
    );
    assert_eq!(
        flash::decode(b"PK\x03\x04 not a config"),
        Err(FlashError::BadMagic)
    );
    assert_eq!(flash::decode(b"OPDC"), Err(FlashError::TooShort(4)));
    let good = flash::to_vec(&sample()).unwrap();
    assert!(matches!(
        flash::decode(&good[..good.len() - 1]),
        Err(FlashError::LengthMismatch { .. })
    ));
    assert!(matches!(
        flash::decode(&vec![0; flash::MAX_FLASHED_LEN + 1]),
        Err(FlashError::Oversize(_))
    ));
}

#[test]
fn secrets_are_never_printed() {
    let shown = format!("{:?}", sample());
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("********"));
}

#[test]
fn certificates_are_read_from_files_and_inlined() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ca.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let path = dir.path().join("device.toml");
    std::fs::write(
        &path,
        "node_id = \"edge-9\"\nbrokers = [\"mqtts://b:8883\"]\nca_file = \"ca.pem\"\n",
    )
    .unwrap();
    let cfg = load(&path).unwrap();
    assert!(
        cfg.ca_cert
            .as_ref()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    // The flashed file loads the same way.
    let flashed = dir.path().join("device.bin");
    std::fs::write(&flashed, flash::to_vec(&cfg).unwrap()).unwrap();
    assert_eq!(load(&flashed).unwrap(), cfg);
}

#[test]
fn bad_human_configs_get_clear_errors() {
    let err = |t: &str| {
        HumanConfig::from_toml(t)
            .and_then(|h| h.resolve(Path::new(".")))
            .unwrap_err()
            .to_string()
    };
    assert!(err("node_id = \"Bad\"").starts_with("invalid node_id"));
    assert!(err("node_id = \"a\"\nextra = 1").contains("unknown field"));
    assert!(err("node_id = \"a\"\nbrokers = [\"http://x\"]").contains("invalid broker address"));
    assert!(err("node_id = \"a\"\nusername = \"a\"").contains("together"));
    assert!(err("node_id = \"a\"\nreport_interval_secs = 0").contains("at least 1"));
    assert!(err("node_id = \"a\"\nca_file = \"/nonexistent/ca.pem\"").contains("cannot read"));
    assert!(
        err(&format!(
            "node_id = \"a\"\nusername = \"{}\"\npassword = \"x\"",
            "u".repeat(65)
        ))
        .contains("longer than 64")
    );
    assert!(matches!(
        HumanConfig::from_toml(
            "node_id = \"a\"\nbrokers = [\"a:1\",\"a:2\",\"a:3\",\"a:4\",\"a:5\"]"
        )
        .unwrap()
        .resolve(Path::new(".")),
        Err(ConfigError::TooMany {
            field: "brokers",
            ..
        })
    ));
}

#[test]
fn broker_urls_parse() {
    let b = parse_broker("mqtts://broker.example:8883").unwrap();
    assert!(b.tls);
    assert_eq!((b.host, b.port), ("broker.example", 8883));
    let b = parse_broker("[::1]:1883").unwrap();
    assert!(!b.tls);
    assert_eq!(b.host, "::1");
    assert!(parse_broker("mqtt://nohost").is_none());
    assert!(parse_broker("mqtt://:1883").is_none());
}

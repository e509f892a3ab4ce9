//! Fuzzes the `Inventory` decoder: it must never panic, and whatever it accepts must re-encode
//! and decode back to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocol::{Inventory, Message};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = Inventory::decode(data) {
        let bytes = msg.to_vec().expect("a decoded message re-encodes");
        assert_eq!(Inventory::decode(&bytes).as_ref(), Ok(&msg));
    }
});

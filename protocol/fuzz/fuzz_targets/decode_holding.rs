//! Fuzzes the `Holding` decoder: it must never panic, and whatever it accepts must re-encode
//! and decode back to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocol::{Holding, Message};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = Holding::decode(data) {
        let bytes = msg.to_vec().expect("a decoded message re-encodes");
        assert_eq!(Holding::decode(&bytes).as_ref(), Ok(&msg));
    }
});

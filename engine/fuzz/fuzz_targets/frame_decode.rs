//! A peer's frame: the pre-decode check, the hello version sniff and decoding never panic,
//! and whatever decodes encodes back to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidesync_core::sync::{validate, Message};

fuzz_target!(|frame: &[u8]| {
    let _ = validate::check_frame(frame);
    let _ = Message::hello_version(frame);
    if let Ok(msg) = Message::decode(frame) {
        let again = Message::decode(&msg.encode()).expect("an encoded message decodes");
        assert_eq!(again, msg);
        if let Message::Hello(h) = &msg {
            let _ = validate::check_hello(h);
        }
    }
});

//! Fuzz target: arbitrary bytes into the delta codec's decoder. Any panic or huge allocation is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mana_protocol::decode_delta(data, 1 << 20);
});

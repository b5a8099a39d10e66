//! Fuzz target: arbitrary bytes into `decode_envelope`, then `verify` and the validator. Any panic,
//! overflow or out-of-memory is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mana_protocol::*;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = decode_envelope(data) {
        let _ = envelope.signer_peer_id();
        if let Ok(message) = envelope.verify() {
            let run = message.run().clone();
            let ctx = ValidationContext {
                run: &run,
                coordinator: &envelope.signer,
                current: None,
                now_ms: envelope.timestamp_ms,
                limits: ValidationLimits::default(),
            };
            let _ = validate_message(&ctx, &envelope.signer, envelope.timestamp_ms, &message);
        }
    }
});

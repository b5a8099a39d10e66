//! Fuzz target: arbitrary bytes as the payload of an envelope whose signature already checked out, i.e.
//! the decoding that `SignedEnvelope::verify` does after the signature (which random bytes never pass in
//! `decode_envelope`). Any message that decodes must sign, encode, decode and verify back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mana_protocol::limits::MAX_MESSAGE_BYTES;
use mana_protocol::*;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = wire::decode::<Message, MAX_MESSAGE_BYTES>(data, "message") else { return };
    if message.check_limits().is_err() {
        return;
    }
    let key = Keypair::from_seed(&[7; 32]);
    let envelope = SignedEnvelope::sign(&key, &message, 1).expect("a decoded, bounded message signs");
    let bytes = envelope.encode().expect("a signed envelope encodes");
    let back = decode_envelope(&bytes).expect("our own envelope decodes").verify().expect("and verifies");
    let again = SignedEnvelope::sign(&key, &back, 1).expect("signs again").encode().expect("encodes again");
    assert_eq!(again, bytes, "the round trip changed the message");
    let run = message.run().clone();
    let ctx = ValidationContext { run: &run, coordinator: &key.public(), current: None, now_ms: 1, limits: ValidationLimits::default() };
    let _ = validate_message(&ctx, &key.public(), 1, &message);
});

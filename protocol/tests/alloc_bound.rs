//! Decoding untrusted bytes never allocates beyond the limit of the frame kind, whatever lengths the bytes
//! claim. A counting global allocator measures the peak of live bytes on the decoding thread.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::*;
use mana_protocol::*;
use proptest::prelude::*;

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes in thread-locals that
// have no destructor (so they are usable at any time, even during thread teardown).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc(new_size);
        note_free(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note_alloc(n: usize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + n;
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

fn note_free(n: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(n)));
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak extra bytes allocated while running `f`.
fn peak_of(f: impl FnOnce()) -> usize {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    f();
    PEAK.with(Cell::get) - base
}

/// The bound for envelopes: one buffer of at most the envelope limit (a claimed length is allocated before
/// the bytes are read) plus the copies verification makes of an input that is itself bounded.
const ENVELOPE_ALLOC_BOUND: usize = 2 * limits::MAX_ENVELOPE_BYTES;

/// The delta decoder allocates at most the dense output (4 bytes per value, capped by the caller's max
/// length) plus the stored values and indices (bounded by the payload's own length).
fn delta_alloc_bound(max_len: usize, input: usize) -> usize {
    4 * max_len + 8 * input + 1024
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn envelope_decoding_stays_within_its_limit(bytes in proptest::collection::vec(any::<u8>(), 0..1024), claim in any::<u32>()) {
        // Variant: a plausible envelope head that claims a payload of `claim` bytes.
        let mut head = vec![1u8];
        head.extend_from_slice(&node().public().0);
        head.push(5);
        head.push(252);
        head.extend_from_slice(&claim.to_le_bytes());
        head.extend_from_slice(&bytes);
        for input in [&bytes[..], &head[..]] {
            let peak = peak_of(|| {
                if let Ok(env) = decode_envelope(input) {
                    let _ = env.verify();
                }
            });
            prop_assert!(peak <= ENVELOPE_ALLOC_BOUND, "peak {} for {} input bytes", peak, input.len());
        }
    }

    #[test]
    fn delta_decoding_stays_within_its_limit(bytes in proptest::collection::vec(any::<u8>(), 0..1024), len in any::<u32>(), nnz in any::<u32>(), sparse in any::<bool>()) {
        let mut payload = b"MDLT\x01".to_vec();
        payload.push(u8::from(sparse));
        payload.extend_from_slice(&128u16.to_le_bytes());
        payload.extend_from_slice(&len.to_le_bytes());
        payload.extend_from_slice(&nnz.to_le_bytes());
        payload.extend_from_slice(&bytes);
        let max_len = 4096;
        let peak = peak_of(|| { let _ = decode_delta(&payload, max_len); });
        prop_assert!(peak <= delta_alloc_bound(max_len, payload.len()), "peak {}", peak);
    }

    #[test]
    fn per_block_delta_decoding_stays_within_its_limit(bytes in proptest::collection::vec(any::<u8>(), 0..1024), len in prop_oneof![0u32..8192, any::<u32>()], k in 1u16..=128, bits in prop::sample::select(vec![2u8, 4, 8]), pow2 in any::<bool>()) {
        let mut payload = b"MDLT\x02".to_vec();
        payload.push(if pow2 { 2 } else { 0 });
        payload.extend_from_slice(&128u16.to_le_bytes());
        payload.extend_from_slice(&len.to_le_bytes());
        payload.extend_from_slice(&k.to_le_bytes());
        payload.push(bits);
        payload.push(0);
        payload.extend_from_slice(&bytes);
        // Mostly give the payload the length its header implies, so the whole decoder runs on random bits.
        if let Err(mana_protocol::CodecError::Truncated { needed, .. }) = mana_protocol::codec::DeltaHeader::parse(&payload)
            && needed <= 1 << 16
        {
            let mut filler = bytes.iter().cycle().copied();
            payload.resize_with(needed, || filler.next().unwrap_or(0));
        }
        let max_len = 4096;
        let peak = peak_of(|| { let _ = decode_delta(&payload, max_len); });
        prop_assert!(peak <= delta_alloc_bound(max_len, payload.len()), "peak {}", peak);
    }
}

#[test]
fn a_valid_envelope_stays_within_the_bound_too() {
    for (_, bytes) in all_envelopes() {
        let peak = peak_of(|| {
            decode_envelope(&bytes).unwrap().verify().unwrap();
        });
        assert!(peak <= ENVELOPE_ALLOC_BOUND, "peak {peak}");
    }
}

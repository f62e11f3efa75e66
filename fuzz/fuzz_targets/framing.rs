//! Fuzz target for the HTTP/1.1 framing scanner (`phoenix_proxy::framing::FrameScanner`), which reads
//! every byte a client sends before hyper does.
//!
//! Input: the first byte picks where the rest is cut into reads (a seed for the cut points); the
//! rest is the byte stream of one connection. Properties beyond "does not panic":
//! - the verdicts (refused request index and reason), the number of heads seen and the reason the
//!   scanner stopped are the same whether the stream arrives whole, byte by byte, or in the cut
//!   reads: what a client can choose (how its bytes are split) never changes the outcome;
//! - a refusal never names a request the scanner has not finished reading the head of.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phoenix_proxy::framing::FrameScanner;

const MAX_HEAD: usize = 16 * 1024;

fn run(chunks: impl Iterator<Item = Vec<u8>>) -> (Vec<(u64, String)>, u64, String) {
    let mut scanner = FrameScanner::new(MAX_HEAD);
    let mut refusals = Vec::new();
    for chunk in chunks {
        if let Some(r) = scanner.feed(&chunk) {
            assert!(r.index < scanner.heads(), "refusal of a head not read yet");
            refusals.push((r.index, format!("{:?}", r.reason)));
        }
    }
    (refusals, scanner.heads(), format!("{:?}", scanner.stopped()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let whole = run(std::iter::once(stream.to_vec()));
    let bytes = run(stream.iter().map(|b| vec![*b]));
    assert_eq!(whole, bytes, "whole vs byte by byte");
    // Cuts from a small linear congruential sequence seeded by the first byte.
    let mut state = u32::from(seed) | 1;
    let mut cuts = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = (state >> 16) as usize % 17 + 1;
        let (a, b) = rest.split_at(n.min(rest.len()));
        cuts.push(a.to_vec());
        rest = b;
    }
    assert_eq!(whole, run(cuts.into_iter()), "whole vs cut");
});

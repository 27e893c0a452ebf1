//! Writes the seed inputs of every target (`catalog::fuzzing::seeds`,
//! `streamer::fuzzing::seeds`) into `corpus/<target>/`, named by their content, so
//! that writing them again changes nothing. `scripts/fuzz` runs it first.

use std::path::Path;

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, bytes) in catalog::fuzzing::seeds().into_iter().chain(streamer::fuzzing::seeds()) {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).expect("create a corpus directory");
        let name = format!("seed-{:016x}", fnv1a(&bytes));
        std::fs::write(dir.join(name), &bytes).expect("write a seed");
    }
}

/// A stable name for a seed's content (FNV-1a, 64 bits).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

//! Every fuzzing corpus and every crash input the fuzzers ever found, replayed
//! through the decoders as an ordinary test (item 15 of issue 15): a decoder that
//! panics, loops or fails an invariant on any of them fails here, in CI, without
//! a fuzzer. The inputs live in `tests/fuzz/corpus/<target>/` and
//! `tests/fuzz/artifacts/<target>/`; `scripts/fuzz` grows them.

use std::collections::BTreeMap;
use std::path::Path;

fn targets() -> BTreeMap<&'static str, fn(&[u8])> {
    catalog::fuzzing::TARGETS.iter().chain(streamer::fuzzing::TARGETS).map(|&(n, f)| (n, f)).collect()
}

/// The files of `dir/<target>/`, for every target directory there.
fn inputs(dir: &Path) -> BTreeMap<String, Vec<std::path::PathBuf>> {
    let mut out = BTreeMap::new();
    for d in std::fs::read_dir(dir).into_iter().flatten() {
        let d = d.unwrap();
        if !d.file_type().unwrap().is_dir() {
            continue;
        }
        let mut files: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|f| f.unwrap().path()).collect();
        files.sort();
        out.insert(d.file_name().into_string().unwrap(), files);
    }
    out
}

#[test]
fn every_corpus_and_crash_input_replays_through_its_decoder() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz");
    let targets = targets();
    let corpus = inputs(&root.join("corpus"));
    let crashes = inputs(&root.join("artifacts"));
    for name in targets.keys() {
        assert!(
            corpus.get(*name).is_some_and(|f| !f.is_empty()),
            "fuzz target {name} has no corpus in tests/fuzz/corpus/{name}: run scripts/fuzz"
        );
    }
    let mut replayed = 0;
    for (name, files) in corpus.iter().chain(&crashes) {
        let target = targets.get(name.as_str()).unwrap_or_else(|| panic!("tests/fuzz/*/{name} names no fuzz target"));
        for f in files {
            let bytes = std::fs::read(f).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&bytes));
            assert!(outcome.is_ok(), "{} made fuzz target {name} panic", f.display());
            replayed += 1;
        }
    }
    // The seeds the corpora grew from, as the encoders make them today.
    for (name, bytes) in catalog::fuzzing::seeds().into_iter().chain(streamer::fuzzing::seeds()) {
        targets[name](&bytes);
    }
    assert!(replayed >= targets.len(), "{replayed} inputs replayed");
}

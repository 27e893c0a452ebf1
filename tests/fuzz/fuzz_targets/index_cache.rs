#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| catalog::fuzzing::index_cache(data));

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| streamer::fuzzing::pg_names(data));

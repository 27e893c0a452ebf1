#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| catalog::fuzzing::wal_object(data));

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| catalog::fuzzing::host_index(data));

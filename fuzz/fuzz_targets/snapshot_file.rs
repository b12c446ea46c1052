//! cargo fuzz target: see `concord::fuzzing::snapshot_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| concord::fuzzing::snapshot_file(data));

//! cargo fuzz target: see `concord::fuzzing::log_record`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| concord::fuzzing::log_record(data));

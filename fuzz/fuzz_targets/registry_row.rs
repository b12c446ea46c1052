//! cargo fuzz target: see `concord::fuzzing::registry_row`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| concord::fuzzing::registry_row(data));

//! cargo fuzz target: see `concord::fuzzing::json_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| concord::fuzzing::json_request(data));

//! cargo fuzz target: see `concord::fuzzing::redis_command`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| concord::fuzzing::redis_command(data));

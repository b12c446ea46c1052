//! cargo fuzz target: see `concord::fuzzing::grpc_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| concord::fuzzing::grpc_request(data));

//! cargo fuzz target: see `concord::fuzzing::etcd_snapshot`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| concord::fuzzing::etcd_snapshot(data));

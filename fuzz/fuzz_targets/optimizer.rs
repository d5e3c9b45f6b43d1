#![no_main]
//! `cargo fuzz run optimizer`: see kiln_fuzz::harness::optimizer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::harness::optimizer(data));

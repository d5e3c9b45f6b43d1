#![no_main]
//! `cargo fuzz run config`: see kiln_fuzz::harness::config.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::harness::config(data));

#![no_main]
//! `cargo fuzz run config`: see kiln_fuzz::harness::config.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::harness::config(data);
});

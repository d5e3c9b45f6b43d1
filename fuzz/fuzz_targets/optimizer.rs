#![no_main]
//! `cargo fuzz run optimizer`: see kiln_fuzz::harness::optimizer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::harness::optimizer(data);
});

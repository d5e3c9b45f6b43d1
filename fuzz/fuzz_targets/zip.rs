#![no_main]
//! `cargo fuzz run zip`: see kiln_fuzz::harness::zip.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::harness::zip(data);
});

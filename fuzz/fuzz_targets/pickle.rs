#![no_main]
//! `cargo fuzz run pickle`: see kiln_fuzz::harness::pickle.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::harness::pickle(data);
});

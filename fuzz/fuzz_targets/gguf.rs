#![no_main]
//! `cargo fuzz run gguf`: see kiln_fuzz::harness::gguf.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::harness::gguf(data);
});

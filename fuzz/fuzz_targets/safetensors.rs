#![no_main]
//! `cargo fuzz run safetensors`: see kiln_fuzz::harness::safetensors.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::harness::safetensors(data);
});

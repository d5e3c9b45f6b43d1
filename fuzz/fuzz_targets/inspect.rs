#![no_main]
//! `cargo fuzz run inspect`: see kiln_fuzz::harness::inspect.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::harness::inspect(data);
});

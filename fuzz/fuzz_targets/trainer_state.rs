#![no_main]
//! `cargo fuzz run trainer_state`: see kiln_fuzz::harness::trainer_state.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::harness::trainer_state(data);
});

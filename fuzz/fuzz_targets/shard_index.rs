#![no_main]
//! `cargo fuzz run shard_index`: see kiln_fuzz::harness::shard_index.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::harness::shard_index(data);
});

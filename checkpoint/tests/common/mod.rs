//! Helpers shared by the integration tests: deterministic checkpoints and their checks.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_checkpoint::commit::{Fs, SingleProcess, Staging, StdFs};
use kiln_formats::{DType, TensorMap, TensorView};

/// Deterministic bytes for (step, generation, salt).
pub fn bytes(step: u64, generation: u64, salt: u64, len: usize) -> Vec<u8> {
    let mut x = step
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(generation.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(salt);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The size of one test checkpoint's parts.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Bytes of the `w` tensor in `model.safetensors` (written by kiln-formats).
    pub model: usize,
    /// Bytes of `extra_state.dat`, written through the staging `Fs` in 64 KiB chunks.
    pub extra: usize,
}

pub const SMALL: Sizes = Sizes {
    model: 4096,
    extra: 3 * 65536 + 100,
};

/// Writes and commits `checkpoint-<step>` with content determined by (step, generation).
pub fn save(
    out: &Path,
    step: u64,
    generation: u64,
    sizes: Sizes,
) -> kiln_checkpoint::Result<PathBuf> {
    save_with(out, step, generation, sizes, Arc::new(StdFs))
}

/// [`save`] through `fs`.
pub fn save_with(
    out: &Path,
    step: u64,
    generation: u64,
    sizes: Sizes,
    fs: Arc<dyn Fs>,
) -> kiln_checkpoint::Result<PathBuf> {
    let s = Staging::begin_with(out, step, &SingleProcess, fs)?;
    let mut map = TensorMap::new();
    map.insert(
        "w",
        TensorView::new(
            DType::U8,
            vec![sizes.model],
            bytes(step, generation, 1, sizes.model),
        )?,
    )?;
    map.set_metadata("format", "pt");
    kiln_formats::safetensors::save(s.dir().join("model.safetensors"), &map)?;
    let extra = bytes(step, generation, 2, sizes.extra);
    let mut f = s.create("extra_state.dat")?;
    for chunk in extra.chunks(65536) {
        f.write_all(chunk)
            .map_err(|e| kiln_checkpoint::Error::io(f.path(), e))?;
    }
    f.finish()?;
    s.write(
        "trainer_state.json",
        format!("{{\n  \"generation\": {generation},\n  \"global_step\": {step}\n}}\n").as_bytes(),
    )?;
    s.commit(&SingleProcess)
}

/// Asserts `dir` verifies and holds exactly what `save(.., step, generation, sizes)` wrote.
pub fn assert_content(dir: &Path, step: u64, generation: u64, sizes: Sizes) {
    kiln_checkpoint::scan::verify_checkpoint(dir)
        .unwrap_or_else(|e| panic!("{} does not verify: {e}", dir.display()));
    let model = kiln_formats::open(dir.join("model.safetensors")).unwrap();
    let w = model.tensor("w").unwrap();
    assert!(
        w.data() == bytes(step, generation, 1, sizes.model).as_slice(),
        "{}: model bytes are not those of step {step} generation {generation}",
        dir.display()
    );
    let extra = std::fs::read(dir.join("extra_state.dat")).unwrap();
    assert!(
        extra == bytes(step, generation, 2, sizes.extra),
        "{}: extra_state.dat is not that of step {step} generation {generation}",
        dir.display()
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["global_step"], step);
    assert_eq!(state["generation"], generation);
}

#[allow(unused_imports)] // not every test binary lists or copies folders
pub use kiln_test_support::fs::{copy_dir, names};

/// The steps of `out`'s checkpoints, in order.
pub fn steps(out: &Path) -> Vec<u64> {
    kiln_checkpoint::scan::list_checkpoints(out)
        .unwrap()
        .iter()
        .map(|e| e.step)
        .collect()
}

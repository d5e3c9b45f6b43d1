//! Tests of the torch format: pickle opcodes and refusals, hostile zips, tensor
//! layouts, and write → read round trips.

mod archive;
mod pickle;
mod roundtrip;
mod tensors;

use std::path::{Path, PathBuf};

use super::archive::ZipWriter;

/// A zip built from `(name, bytes)` entries with kiln's writer.
pub(super) fn zip_bytes(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data) in entries {
        w.add(name, data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// Writes `bytes` to `name` in `dir` and returns the path.
pub(super) fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Concatenates byte strings (for hand-written pickles).
pub(super) fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

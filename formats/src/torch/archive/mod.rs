//! The zip container of a torch checkpoint: a strict reader over a memory map and a
//! streaming writer of stored, 64-byte aligned entries.

mod read;
mod write;

pub(crate) use read::{Archive, Entry};
pub(crate) use write::ZipWriter;

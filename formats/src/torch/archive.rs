//! The zip container of a torch checkpoint, through the `zip` crate: a strict reader
//! that locates each entry's bytes in a memory map, and a writer of stored, 64-byte
//! aligned entries.
//!
//! The crate parses the central directory and the local headers and checks that
//! they agree; kiln adds what a checkpoint needs on top: sane names, no duplicates,
//! stored data lying inside the file, no two entries sharing bytes.

use std::collections::HashMap;
use std::io::{Cursor, Seek, Write};

use zip::result::ZipError;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, ZipArchive};

use crate::{Error, Result};

/// Payload alignment (torch's `kFieldAlignment`).
const ALIGNMENT: u16 = 64;
/// Header id of torch's alignment padding extra field: `"FB"` (`getPadding` in
/// `caffe2/serialize/inline_container.cc`).
const PADDING_HEADER_ID: u16 = u16::from_le_bytes(*b"FB");

fn zip_err(msg: impl Into<String>) -> Error {
    Error::Zip(msg.into())
}

/// The crate's message, without its "invalid Zip archive" prefix (kiln's error
/// says that already).
fn crate_msg(e: ZipError) -> String {
    match e {
        ZipError::InvalidArchive(m) => m.into_owned(),
        e => e.to_string(),
    }
}

/// One entry of the archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Full name (`archive/data/0`).
    pub name: String,
    /// Offset of the local header.
    pub header_start: u64,
    /// Offset of the first byte of data.
    pub data_start: u64,
    /// Length of the data as stored in the file (the compressed size).
    pub size: u64,
    /// CRC-32 from the central directory.
    pub crc32: u32,
    /// The compression method, for entries that are not stored (refused by
    /// [`Archive::require_stored`]).
    pub compression: Option<String>,
}

/// The entries of a zip archive, validated: inside the file, not overlapping, with
/// sane unique names and local headers that match the central directory.
#[derive(Debug)]
pub(crate) struct Archive {
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
}

impl Archive {
    /// Reads and validates the zip in `bytes` (the whole file, mapped).
    pub fn parse(bytes: &[u8]) -> Result<Archive> {
        let mut zip = ZipArchive::new(Cursor::new(bytes)).map_err(|e| zip_err(crate_msg(e)))?;
        if zip.has_duplicate_names() {
            return Err(zip_err("two entries have the same name"));
        }
        let file_len = bytes.len() as u64;
        let dir_start = zip.central_directory_start();
        let mut entries = Vec::with_capacity(zip.len());
        for i in 0..zip.len() {
            let name = entry_name(&zip, i)?;
            // The raw entry (no decompressor): opening it reads the local header, which
            // is where `data_start` comes from.
            let e = zip
                .by_index_raw(i)
                .map_err(|e| zip_err(format!("entry {name}: {}", crate_msg(e))))?;
            if e.encrypted() {
                return Err(zip_err(format!("entry {name} is encrypted")));
            }
            let stored = e.compression() == CompressionMethod::Stored;
            if stored && e.compressed_size() != e.size() {
                return Err(zip_err(format!(
                    "stored entry {name} has size {} but compressed size {}",
                    e.size(),
                    e.compressed_size()
                )));
            }
            let data_start = e
                .data_start()
                .ok_or_else(|| zip_err(format!("entry {name}: local header not read")))?;
            let end = data_start
                .checked_add(e.compressed_size())
                .filter(|&end| end <= file_len)
                .ok_or_else(|| {
                    zip_err(format!(
                        "entry {name} ({} bytes at offset {data_start}) runs past the end \
                         of the file ({file_len} bytes)",
                        e.compressed_size()
                    ))
                })?;
            if end > dir_start {
                return Err(zip_err(format!(
                    "entry {name} runs into the central directory"
                )));
            }
            entries.push(Entry {
                name,
                header_start: e.header_start(),
                data_start,
                size: e.compressed_size(),
                crc32: e.crc32(),
                compression: (!stored).then(|| e.compression().to_string()),
            });
        }
        check_overlaps(&entries)?;
        // Names, methods, flags, times, CRCs and sizes of the local headers against the
        // central directory; local headers the directory does not list.
        zip.validate_header_consistency().map_err(|e| {
            let m = crate_msg(e);
            let m = m
                .strip_prefix("header inconsistency detected: ")
                .unwrap_or(&m);
            zip_err(format!("local and central headers disagree: {m}"))
        })?;
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Ok(Archive { entries, by_name })
    }

    /// Refuses the archive if any entry is compressed: torch stores every entry, and
    /// a compressed storage record cannot be mapped (torch's own `mmap=True` load
    /// silently reads it wrong).
    pub fn require_stored(&self) -> Result<()> {
        match self.entries.iter().find(|e| e.compression.is_some()) {
            Some(e) => Err(Error::Unsupported(format!(
                "entry {} is compressed ({}); torch checkpoints store entries \
                 uncompressed (re-save with torch.save)",
                e.name,
                e.compression.as_deref().unwrap_or("?")
            ))),
            None => Ok(()),
        }
    }

    /// Every entry, in central-directory order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The entry called `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    /// The data of `entry` within `bytes` (the file the archive was parsed from),
    /// borrowed: the compressed bytes for an entry that is not stored.
    pub fn data<'a>(&self, bytes: &'a [u8], entry: &Entry) -> &'a [u8] {
        // Validated in `parse`: data_start + size <= bytes.len().
        let start = entry.data_start as usize;
        &bytes[start..start + entry.size as usize]
    }
}

/// The name of entry `i`, checked: UTF-8 and harmless.
fn entry_name(zip: &ZipArchive<Cursor<&[u8]>>, i: usize) -> Result<String> {
    let e = zip.by_index_data(i).map_err(|e| zip_err(crate_msg(e)))?;
    let name =
        std::str::from_utf8(e.name_raw()).map_err(|_| zip_err("an entry name is not UTF-8"))?;
    check_name(name)?;
    Ok(name.to_string())
}

/// Refuses names that are absolute, climb out with `..`, or are otherwise odd.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('/')
        || name.contains('\0')
        || name.contains('\\')
        || name.split('/').any(|c| c == "..")
        || name.as_bytes().get(1) == Some(&b':')
    {
        return Err(zip_err(format!("entry name {name:?} is not allowed")));
    }
    Ok(())
}

/// Refuses entries whose local header and data overlap another entry's.
fn check_overlaps(entries: &[Entry]) -> Result<()> {
    let mut ranges: Vec<(u64, u64, &str)> = entries
        .iter()
        .map(|e| (e.header_start, e.data_start + e.size, e.name.as_str()))
        .collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        let ((_, end, a), (start, _, b)) = (w[0], w[1]);
        if start < end {
            return Err(zip_err(format!("entries {a} and {b} overlap")));
        }
    }
    Ok(())
}

/// Writes a torch archive entry by entry: stored, each payload 64-byte aligned by
/// torch's `FB` padding field, CRC and sizes in the local header (the output can
/// seek, so the crate patches them in and writes no data descriptors), zip64 for
/// entries of 4 GiB or more and wherever an offset needs it, and a fixed timestamp
/// so that equal inputs give equal files.
pub(crate) struct ZipWriter<W: Write + Seek> {
    zip: zip::ZipWriter<W>,
    force_zip64: bool,
}

impl<W: Write + Seek> std::fmt::Debug for ZipWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZipWriter").finish_non_exhaustive()
    }
}

fn write_err(e: impl std::fmt::Display) -> Error {
    zip_err(format!("write failed: {e}"))
}

impl<W: Write + Seek> ZipWriter<W> {
    /// A writer of a new archive into `out`.
    pub fn new(out: W) -> Self {
        ZipWriter {
            zip: zip::ZipWriter::new(out),
            force_zip64: false,
        }
    }

    /// Writes zip64 size fields for every entry, even small ones; for tests.
    #[cfg(test)]
    pub fn with_zip64(mut self) -> Self {
        self.force_zip64 = true;
        self
    }

    /// Adds a stored entry holding `data`, streamed straight to the output.
    pub fn add(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let options = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .with_alignment_and_header_id(ALIGNMENT, PADDING_HEADER_ID)
            .last_modified_time(DateTime::default())
            .unix_permissions(0o644)
            .large_file(self.force_zip64 || data.len() as u64 >= zip::ZIP64_BYTES_THR);
        self.zip.start_file(name, options).map_err(write_err)?;
        self.zip.write_all(data).map_err(write_err)
    }

    /// Writes the central directory and the end records, and returns the output.
    pub fn finish(self) -> Result<W> {
        let mut out = self.zip.finish().map_err(write_err)?;
        out.flush().map_err(write_err)?;
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["archive/data.pkl", "a.b/data/0", "x/.data/serialization_id"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "a\\b",
            "C:/x",
            "",
            "a/..",
            "a\0b",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}

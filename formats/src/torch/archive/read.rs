//! Reading the zip container: the central directory through the `zip` crate, every
//! local header checked here, and each entry's bytes sliced out of the map.

use std::collections::HashMap;
use std::io::Cursor;

use zip::{CompressionMethod, ZipArchive};

use crate::{Error, Result};

/// Size of a local file header before its name and extra field.
const LOCAL_HEADER_LEN: u64 = 30;

/// One stored entry of the archive.
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

/// The entries of a zip archive, validated: stored, inside the file, not
/// overlapping, with sane names and matching local headers.
#[derive(Debug)]
pub(crate) struct Archive {
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
}

fn zip_err(msg: impl Into<String>) -> Error {
    Error::Zip(msg.into())
}

impl Archive {
    /// Reads and validates the central directory of the zip in `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Archive> {
        let zip = ZipArchive::new(Cursor::new(bytes)).map_err(|e| zip_err(e.to_string()))?;
        let meta = zip.metadata();
        if meta.has_duplicate_names() {
            return Err(zip_err("two entries have the same name"));
        }
        let file_len = bytes.len() as u64;
        let mut entries = Vec::with_capacity(zip.len());
        for i in 0..zip.len() {
            let e = zip.by_index_data(i).map_err(|e| zip_err(e.to_string()))?;
            let name = std::str::from_utf8(e.name_raw())
                .map_err(|_| zip_err("an entry name is not UTF-8"))?
                .to_string();
            check_name(&name)?;
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
            let header_start = e.header_start();
            let data_start = local_data_start(bytes, header_start, &name, stored)?;
            data_start
                .checked_add(e.compressed_size())
                .filter(|&end| end <= file_len)
                .ok_or_else(|| {
                    zip_err(format!(
                        "entry {name} ({} bytes at offset {data_start}) runs past the end \
                         of the file ({file_len} bytes)",
                        e.compressed_size()
                    ))
                })?;
            entries.push(Entry {
                name,
                header_start,
                data_start,
                size: e.compressed_size(),
                crc32: e.crc32(),
                compression: (!stored).then(|| e.compression().to_string()),
            });
        }
        check_overlaps(&entries)?;
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

    /// The data of `entry` within `bytes` (the file the archive was parsed from): the
    /// compressed bytes for an entry that is not stored.
    pub fn data<'a>(&self, bytes: &'a [u8], entry: &Entry) -> &'a [u8] {
        // Validated in `parse`: data_start + size <= bytes.len().
        let start = entry.data_start as usize;
        &bytes[start..start + entry.size as usize]
    }
}

/// Refuses names that are absolute, climb out with `..`, or are otherwise odd.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('/')
        || name.starts_with('\\')
        || name.contains('\0')
        || name.contains('\\')
        || name.split('/').any(|c| c == "..")
        || name.as_bytes().get(1) == Some(&b':')
    {
        return Err(zip_err(format!("entry name {name:?} is not allowed")));
    }
    Ok(())
}

/// Checks the local header at `at` and returns where its data starts.
fn local_data_start(bytes: &[u8], at: u64, name: &str, stored: bool) -> Result<u64> {
    let bad = |why: &str| zip_err(format!("entry {name}: {why}"));
    let header = usize::try_from(at)
        .ok()
        .and_then(|at| bytes.get(at..at.checked_add(LOCAL_HEADER_LEN as usize)?))
        .ok_or_else(|| bad("local header outside the file"))?;
    if header[..4] != *b"PK\x03\x04" {
        return Err(bad("no local header where the central directory points"));
    }
    let method = u16::from_le_bytes([header[8], header[9]]);
    if (method == 0) != stored {
        return Err(bad("local and central headers disagree on compression"));
    }
    let name_len = u64::from(u16::from_le_bytes([header[26], header[27]]));
    let extra_len = u64::from(u16::from_le_bytes([header[28], header[29]]));
    let name_start = at + LOCAL_HEADER_LEN;
    let local_name = usize::try_from(name_start)
        .ok()
        .and_then(|s| bytes.get(s..s + name_len as usize))
        .ok_or_else(|| bad("local header outside the file"))?;
    if local_name != name.as_bytes() {
        return Err(bad("local header names another file"));
    }
    let data_start = name_start + name_len + extra_len;
    if data_start > bytes.len() as u64 {
        return Err(bad("local header outside the file"));
    }
    Ok(data_start)
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

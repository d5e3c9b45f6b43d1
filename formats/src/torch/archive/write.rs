//! A streaming zip writer for torch checkpoints: stored entries only, each payload
//! 64-byte aligned with torch's `FB` padding extra field, CRC and sizes in both the
//! local and the central headers (no data descriptors), zip64 where a size or an
//! offset needs it.
//!
//! Each entry is written in one call from a slice, so the writer holds no more than
//! one entry's bytes (which the caller already has) and the central directory.

use std::io::{self, Write};

/// Payload alignment (torch's `kFieldAlignment`).
pub(crate) const ALIGNMENT: u64 = 64;
/// Sizes and offsets from this value on need zip64.
const ZIP64_LIMIT: u64 = 0xFFFF_FFFF;
/// DOS date 1980-01-01, time 00:00.
const DOS_DATE: u16 = (1 << 5) | 1;
const DOS_TIME: u16 = 0;
/// General purpose flags: bit 11, names are UTF-8.
const FLAGS: u16 = 1 << 11;

struct CentralEntry {
    name: String,
    crc32: u32,
    size: u64,
    offset: u64,
}

/// Writes a zip archive entry by entry, tracking offsets itself.
pub(crate) struct ZipWriter<W: Write> {
    out: W,
    offset: u64,
    entries: Vec<CentralEntry>,
    force_zip64: bool,
}

impl<W: Write> std::fmt::Debug for ZipWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZipWriter")
            .field("offset", &self.offset)
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl<W: Write> ZipWriter<W> {
    /// A writer that starts at offset 0 of `out`.
    pub fn new(out: W) -> Self {
        ZipWriter {
            out,
            offset: 0,
            entries: Vec::new(),
            force_zip64: false,
        }
    }

    /// Writes zip64 records for every entry and the end of the archive, even small
    /// ones (as torch's miniz does for the end record); for tests.
    #[cfg(test)]
    pub fn with_zip64(mut self) -> Self {
        self.force_zip64 = true;
        self
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Adds a stored entry holding `data`.
    pub fn add(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let crc32 = crc32fast::hash(data);
        self.add_with_crc(name, data, crc32)
    }

    /// Adds a stored entry whose CRC-32 the caller computed.
    pub fn add_with_crc(&mut self, name: &str, data: &[u8], crc32: u32) -> io::Result<()> {
        let name_len = u16::try_from(name.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "entry name too long"))?;
        let size = data.len() as u64;
        let offset = self.offset;
        let zip64 = self.force_zip64 || size >= ZIP64_LIMIT;
        let zip64_len: u64 = if zip64 { 20 } else { 0 };
        // Pad the extra field so that the data starts on an ALIGNMENT boundary.
        let unpadded = offset + 30 + u64::from(name_len) + zip64_len + 4;
        let pad = (ALIGNMENT - unpadded % ALIGNMENT) % ALIGNMENT;
        let extra_len = (zip64_len + 4 + pad) as u16;

        let mut h = Vec::with_capacity(30 + name.len() + usize::from(extra_len));
        h.extend_from_slice(b"PK\x03\x04");
        h.extend_from_slice(&version_needed(zip64).to_le_bytes());
        h.extend_from_slice(&FLAGS.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes()); // stored
        h.extend_from_slice(&DOS_TIME.to_le_bytes());
        h.extend_from_slice(&DOS_DATE.to_le_bytes());
        h.extend_from_slice(&crc32.to_le_bytes());
        let small = if zip64 {
            ZIP64_LIMIT as u32
        } else {
            size as u32
        };
        h.extend_from_slice(&small.to_le_bytes()); // compressed size
        h.extend_from_slice(&small.to_le_bytes()); // size
        h.extend_from_slice(&name_len.to_le_bytes());
        h.extend_from_slice(&extra_len.to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        if zip64 {
            h.extend_from_slice(&1u16.to_le_bytes());
            h.extend_from_slice(&16u16.to_le_bytes());
            h.extend_from_slice(&size.to_le_bytes());
            h.extend_from_slice(&size.to_le_bytes());
        }
        h.extend_from_slice(b"FB");
        h.extend_from_slice(&(pad as u16).to_le_bytes());
        h.resize(h.len() + pad as usize, b'Z');
        self.put(&h)?;
        debug_assert_eq!(self.offset % ALIGNMENT, 0);
        self.put(data)?;
        self.entries.push(CentralEntry {
            name: name.to_string(),
            crc32,
            size,
            offset,
        });
        Ok(())
    }

    /// Writes the central directory and the end records, and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        let cd_start = self.offset;
        let entries = std::mem::take(&mut self.entries);
        for e in &entries {
            let big_size = self.force_zip64 || e.size >= ZIP64_LIMIT;
            let big_offset = self.force_zip64 || e.offset >= ZIP64_LIMIT;
            let mut extra = Vec::new();
            if big_size || big_offset {
                let mut fields = Vec::new();
                if big_size {
                    fields.extend_from_slice(&e.size.to_le_bytes());
                    fields.extend_from_slice(&e.size.to_le_bytes());
                }
                if big_offset {
                    fields.extend_from_slice(&e.offset.to_le_bytes());
                }
                extra.extend_from_slice(&1u16.to_le_bytes());
                extra.extend_from_slice(&(fields.len() as u16).to_le_bytes());
                extra.extend_from_slice(&fields);
            }
            let zip64 = !extra.is_empty();
            let mut h = Vec::with_capacity(46 + e.name.len() + extra.len());
            h.extend_from_slice(b"PK\x01\x02");
            // Made by: Unix (3), spec version of the features used.
            h.extend_from_slice(&(0x0300 | version_needed(zip64)).to_le_bytes());
            h.extend_from_slice(&version_needed(zip64).to_le_bytes());
            h.extend_from_slice(&FLAGS.to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            h.extend_from_slice(&DOS_TIME.to_le_bytes());
            h.extend_from_slice(&DOS_DATE.to_le_bytes());
            h.extend_from_slice(&e.crc32.to_le_bytes());
            let small_size = if big_size {
                ZIP64_LIMIT as u32
            } else {
                e.size as u32
            };
            h.extend_from_slice(&small_size.to_le_bytes());
            h.extend_from_slice(&small_size.to_le_bytes());
            h.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes()); // comment
            h.extend_from_slice(&0u16.to_le_bytes()); // disk
            h.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
            h.extend_from_slice(&(0o100644u32 << 16).to_le_bytes()); // -rw-r--r--
            let small_offset = if big_offset {
                ZIP64_LIMIT as u32
            } else {
                e.offset as u32
            };
            h.extend_from_slice(&small_offset.to_le_bytes());
            h.extend_from_slice(e.name.as_bytes());
            h.extend_from_slice(&extra);
            self.put(&h)?;
        }
        let cd_end = self.offset;
        let cd_size = cd_end - cd_start;
        let count = entries.len() as u64;
        let zip64_end = self.force_zip64
            || count >= 0xFFFF
            || cd_size >= ZIP64_LIMIT
            || cd_start >= ZIP64_LIMIT;
        if zip64_end {
            let mut r = Vec::with_capacity(56 + 20);
            r.extend_from_slice(b"PK\x06\x06");
            r.extend_from_slice(&44u64.to_le_bytes());
            r.extend_from_slice(&(0x0300 | version_needed(true)).to_le_bytes());
            r.extend_from_slice(&version_needed(true).to_le_bytes());
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&count.to_le_bytes());
            r.extend_from_slice(&count.to_le_bytes());
            r.extend_from_slice(&cd_size.to_le_bytes());
            r.extend_from_slice(&cd_start.to_le_bytes());
            // Locator.
            r.extend_from_slice(b"PK\x06\x07");
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&cd_end.to_le_bytes());
            r.extend_from_slice(&1u32.to_le_bytes());
            self.put(&r)?;
        }
        let mut r = Vec::with_capacity(22);
        r.extend_from_slice(b"PK\x05\x06");
        r.extend_from_slice(&0u16.to_le_bytes());
        r.extend_from_slice(&0u16.to_le_bytes());
        let small_count = count.min(0xFFFF) as u16;
        r.extend_from_slice(&small_count.to_le_bytes());
        r.extend_from_slice(&small_count.to_le_bytes());
        r.extend_from_slice(&(cd_size.min(ZIP64_LIMIT) as u32).to_le_bytes());
        r.extend_from_slice(&(cd_start.min(ZIP64_LIMIT) as u32).to_le_bytes());
        r.extend_from_slice(&0u16.to_le_bytes());
        self.put(&r)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// "Version needed to extract": 2.0 for stored entries, 4.5 with zip64.
fn version_needed(zip64: bool) -> u16 {
    if zip64 { 45 } else { 20 }
}

//! Telling formats apart by content (magic bytes), never by file name, and opening
//! whatever a path holds.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::safetensors::SafetensorsFile;
use crate::shard::ShardedSet;
use crate::torch::TorchFile;
use crate::{Error, Result, ResultExt, TensorCollection};

/// A tensor file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// safetensors.
    Safetensors,
    /// PyTorch zip checkpoint (`torch.save` since 1.6: `pytorch_model.bin`, `*.pt`).
    PyTorch,
}

impl Format {
    /// Lower-case name (`"safetensors"`, `"pytorch"`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::PyTorch => "pytorch",
        }
    }

    /// The file name Hugging Face gives a single-file model in this format.
    pub fn hf_weights_name(self) -> &'static str {
        match self {
            Format::Safetensors => "model.safetensors",
            Format::PyTorch => "pytorch_model.bin",
        }
    }

    /// The name of the shard index Hugging Face writes for this format.
    pub fn hf_index_name(self) -> &'static str {
        match self {
            Format::Safetensors => "model.safetensors.index.json",
            Format::PyTorch => "pytorch_model.bin.index.json",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a path holds, judged from its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A single tensor file.
    File(Format),
    /// A Hugging Face shard index (`*.index.json` with a `weight_map`).
    ShardIndex,
    /// A GGUF file (llama.cpp's format).
    Gguf,
    /// A folder.
    Directory,
}

/// Looks at the first bytes of `path` and says what it holds.
///
/// Legacy PyTorch files (pre-1.6 raw pickles and tar archives) and unknown content are
/// errors that say so.
pub fn detect(path: &Path) -> Result<Kind> {
    let meta = std::fs::metadata(path).in_file(path)?;
    if meta.is_dir() {
        return Ok(Kind::Directory);
    }
    let mut head = Vec::with_capacity(512);
    File::open(path)
        .in_file(path)?
        .take(512)
        .read_to_end(&mut head)
        .in_file(path)?;
    kind_of_bytes(&head).in_file(path)
}

/// Classifies the first bytes (up to 512) of a file.
pub fn kind_of_bytes(head: &[u8]) -> Result<Kind> {
    if head.starts_with(crate::gguf::MAGIC) {
        return Ok(Kind::Gguf);
    }
    if head.starts_with(b"PK\x03\x04") {
        return Ok(Kind::File(Format::PyTorch));
    }
    if head.len() >= 9 && head[8] == b'{' {
        return Ok(Kind::File(Format::Safetensors));
    }
    if head.len() > 262 && &head[257..262] == b"ustar" {
        return Err(legacy("a tar archive"));
    }
    if head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        return Err(legacy("a raw pickle"));
    }
    let text = head.trim_ascii_start();
    if text.starts_with(b"{") && contains(head, b"\"weight_map\"") {
        return Ok(Kind::ShardIndex);
    }
    if head.is_empty() {
        return Err(Error::Unsupported("empty file".into()));
    }
    Err(Error::Unsupported(
        "not a safetensors file, a PyTorch zip checkpoint, a GGUF file nor a shard index".into(),
    ))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn legacy(what: &str) -> Error {
    Error::Unsupported(format!(
        "{what}: unsupported legacy PyTorch format (before 1.6), re-save with torch>=1.6"
    ))
}

/// The weights file of a model folder, in Hugging Face's order of precedence:
/// `model.safetensors`, its index, `pytorch_model.bin`, its index; then, for a peft
/// adapter folder, `adapter_model.safetensors` and `adapter_model.bin`.
pub fn model_weights_path(dir: &Path) -> Result<PathBuf> {
    for format in [Format::Safetensors, Format::PyTorch] {
        for name in [format.hf_weights_name(), format.hf_index_name()] {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    // A peft adapter folder (weights of the adapter only).
    for name in ["adapter_model.safetensors", "adapter_model.bin"] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::File {
        path: dir.to_path_buf(),
        source: Box::new(Error::NotFound(
            "model.safetensors, pytorch_model.bin, a shard index or adapter_model.safetensors"
                .into(),
        )),
    })
}

/// Opens a safetensors file, a PyTorch file, a GGUF file, a shard index or a model folder as one
/// collection, detecting the format from the bytes.
pub fn open(path: impl AsRef<Path>) -> Result<Box<dyn TensorCollection>> {
    let path = path.as_ref();
    match detect(path)? {
        Kind::Directory => open(model_weights_path(path)?),
        Kind::ShardIndex => Ok(Box::new(ShardedSet::open(path)?)),
        Kind::Gguf => Ok(Box::new(crate::gguf::GgufFile::open(path)?)),
        Kind::File(Format::Safetensors) => Ok(Box::new(SafetensorsFile::open(path)?)),
        Kind::File(Format::PyTorch) => Ok(Box::new(TorchFile::open(path)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_magic_bytes() {
        assert_eq!(
            kind_of_bytes(b"PK\x03\x04rest").unwrap(),
            Kind::File(Format::PyTorch)
        );
        assert_eq!(
            kind_of_bytes(b"\x08\0\0\0\0\0\0\0{}      ").unwrap(),
            Kind::File(Format::Safetensors)
        );
        assert_eq!(
            kind_of_bytes(b" {\"weight_map\": {}}").unwrap(),
            Kind::ShardIndex
        );
        let e = kind_of_bytes(b"\x80\x02}q\0.").unwrap_err().to_string();
        assert!(e.contains("legacy"), "{e}");
        let mut tar = vec![0u8; 512];
        tar[257..262].copy_from_slice(b"ustar");
        assert!(kind_of_bytes(&tar).unwrap_err().to_string().contains("tar"));
        assert!(kind_of_bytes(b"").is_err());
        assert!(kind_of_bytes(b"hello world").is_err());
    }
}

//! Converting between formats, file to file or model folder to model folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::detect::{Kind, detect};
use crate::shard::{SavedWeights, is_weights_file, save_sharded};
use crate::{Error, Format, Result, ResultExt, TensorCollection, TensorInfo, TensorView};

/// Transformers' default `max_shard_size` (4.x): `"5GB"`.
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

/// Where a conversion writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// One file; the format comes from the extension unless given.
    File(PathBuf),
    /// A model folder with Hugging Face names (`model.safetensors`, shards + index).
    Folder(PathBuf),
}

impl Target {
    /// Decides from the path: an existing folder, a path ending in `/`, or a path without
    /// an extension is a folder; anything else a file.
    pub fn from_path(path: &Path) -> Target {
        let text = path.to_string_lossy();
        if path.is_dir() || text.ends_with('/') || path.extension().is_none() {
            Target::Folder(path.to_path_buf())
        } else {
            Target::File(path.to_path_buf())
        }
    }
}

/// The format a file name asks for: `.safetensors`, or `.bin`/`.pt`/`.pth` for PyTorch.
pub fn format_from_extension(path: &Path) -> Option<Format> {
    match path.extension()?.to_str()? {
        "safetensors" => Some(Format::Safetensors),
        "bin" | "pt" | "pth" => Some(Format::PyTorch),
        _ => None,
    }
}

/// What a conversion did.
#[derive(Clone, Debug)]
pub struct Converted {
    /// The format written.
    pub format: Format,
    /// Weight files written (and the index, if any).
    pub written: Vec<PathBuf>,
    /// Other files of a model folder copied alongside (config, tokenizer, …).
    pub copied: Vec<PathBuf>,
    /// Entries of the input folder that were not copied, with the reason.
    pub skipped: Vec<(PathBuf, &'static str)>,
    /// Weight files of an earlier save in the output folder that were removed.
    pub removed: Vec<PathBuf>,
    /// Number of tensors.
    pub tensors: usize,
}

/// A collection with extra metadata entries laid over the source's.
struct WithMetadata<'a> {
    inner: &'a dyn TensorCollection,
    metadata: BTreeMap<String, String>,
}

impl TensorCollection for WithMetadata<'_> {
    fn format(&self) -> Option<Format> {
        self.inner.format()
    }
    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    fn tensors(&self) -> &[TensorInfo] {
        self.inner.tensors()
    }
    fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        self.inner.tensor(name)
    }
}

/// Converts `input` (a file, a shard index or a model folder) to `target` in `format`
/// (default: the output file's extension; safetensors for a folder).
///
/// Names, dtypes, shapes and bytes are kept exactly; safetensors metadata is kept
/// (PyTorch files have none to keep or receive). Tensors that share storage in a
/// PyTorch file become separate copies in safetensors, which cannot alias. A folder
/// output gets `{"format": "pt"}` metadata as `save_pretrained` writes it, shards over
/// `max_shard_size`, and copies of the input folder's other regular files; symbolic
/// links are never followed or copied, so a folder cannot smuggle in files from
/// outside it.
pub fn convert(
    input: &Path,
    target: &Target,
    format: Option<Format>,
    max_shard_size: Option<u64>,
) -> Result<Converted> {
    let source = crate::open(input)?;
    match target {
        Target::File(out) => {
            let format = format
                .or_else(|| format_from_extension(out))
                .ok_or_else(|| {
                    Error::Argument(format!(
                        "{}: cannot tell the format from the extension; use --to safetensors|bin",
                        out.display()
                    ))
                })?;
            if max_shard_size.is_some() {
                return Err(Error::Argument(
                    "a shard size needs a folder as output, not a file".into(),
                ));
            }
            match format {
                Format::Safetensors => crate::safetensors::save(out, source.as_ref())?,
                Format::PyTorch => crate::torch::save(out, source.as_ref())?,
            }
            Ok(Converted {
                format,
                written: vec![out.clone()],
                copied: vec![],
                skipped: vec![],
                removed: vec![],
                tensors: source.tensors().len(),
            })
        }
        Target::Folder(out) => {
            let format = format.unwrap_or(Format::Safetensors);
            let mut metadata = source.metadata().clone();
            if format == Format::Safetensors {
                metadata
                    .entry("format".into())
                    .or_insert_with(|| "pt".into());
            }
            let with_meta = WithMetadata {
                inner: source.as_ref(),
                metadata,
            };
            let SavedWeights {
                mut files,
                index,
                removed,
            } = save_sharded(
                out,
                format,
                &with_meta,
                max_shard_size.unwrap_or(DEFAULT_MAX_SHARD_SIZE),
            )?;
            files.extend(index);
            let (copied, skipped) = if detect(input)? == Kind::Directory {
                copy_companions(input, out)?
            } else {
                (vec![], vec![])
            };
            Ok(Converted {
                format,
                written: files,
                copied,
                skipped,
                removed,
                tensors: source.tensors().len(),
            })
        }
    }
}

type Copies = (Vec<PathBuf>, Vec<(PathBuf, &'static str)>);

/// Copies the regular files of model folder `from` that are not weights into `to`.
fn copy_companions(from: &Path, to: &Path) -> Result<Copies> {
    let mut copied = Vec::new();
    let mut skipped = Vec::new();
    let same = std::fs::canonicalize(from).ok() == std::fs::canonicalize(to).ok();
    let mut entries: Vec<_> = std::fs::read_dir(from)
        .in_file(from)?
        .collect::<std::io::Result<_>>()
        .in_file(from)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let kind = entry.file_type().in_file(&path)?; // does not follow symlinks
        let name = entry.file_name();
        if is_weights_file(&name.to_string_lossy()) || same {
            continue;
        }
        if kind.is_symlink() {
            skipped.push((path, "symbolic link, not followed"));
        } else if !kind.is_file() {
            skipped.push((path, "not a regular file"));
        } else {
            let dest = to.join(&name);
            std::fs::copy(&path, &dest).in_file(&dest)?;
            copied.push(dest);
        }
    }
    Ok((copied, skipped))
}

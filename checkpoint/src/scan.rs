//! Finding checkpoints in an output folder, telling complete from incomplete, cleaning
//! the leftovers of a crash, and verifying a checkpoint's content.
//!
//! # What counts as a checkpoint
//!
//! A directory directly under the output folder whose name matches
//! `^checkpoint-[0-9]+$` (transformers' `get_last_checkpoint` pattern; the step must
//! fit in a `u64`). Symbolic links are skipped even when they point to a directory:
//! they are not this run's folders, and rotation must never delete through one (pass a
//! linked checkpoint's path explicitly to resume from it). Entries are ordered by step
//! (then name, for `checkpoint-7` vs `checkpoint-007`), never by modification time.
//! A missing output folder holds no checkpoints (an empty list, not an error).
//!
//! # Completeness
//!
//! - [`Completeness::Complete`]: kiln's manifest ([`MANIFEST_NAME`]) is present,
//!   parses, names the folder's step, and every file it lists exists as a plain file
//!   of the listed size. Files the manifest does not list are tolerated (and counted
//!   in the size): they cannot make the listed content wrong.
//! - [`Completeness::Foreign`]: no manifest, but what transformers' Trainer writes:
//!   a `trainer_state.json` that parses (Trainer writes it last) and weights
//!   (`model.safetensors`, `pytorch_model.bin`, an adapter, or an index whose shards
//!   are all present). kiln resumes such checkpoints. This is transformers' own
//!   criterion and no stronger: a kiln checkpoint whose manifest was lost (or not yet
//!   copied) but that holds those files is taken for a foreign one.
//! - [`Completeness::Incomplete`]: anything else, with the reason (e.g. "copied in
//!   half: manifest lists optimizer.safetensors, missing"). Never returned by
//!   [`last_checkpoint`], never counted nor deleted by rotation.
//!
//! I/O errors other than "not found" while checking are errors, not "incomplete": an
//! unreadable newest checkpoint must not silently make a run resume from an older one.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use kiln_formats::{ResultExt, TensorCollection as _};

use crate::commit::{MANIFEST_NAME, Manifest, StdFs, recover_old};
use crate::error::IoContext;
use crate::{Error, Result};

/// Whether a checkpoint folder can be resumed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completeness {
    /// Committed by kiln, and the folder agrees with its manifest.
    Complete,
    /// No kiln manifest, but a whole transformers checkpoint (trainer state and
    /// weights).
    Foreign,
    /// Not usable, and why.
    Incomplete(String),
}

impl Completeness {
    /// Complete or foreign: a checkpoint that can be resumed from.
    pub fn is_complete(&self) -> bool {
        !matches!(self, Completeness::Incomplete(_))
    }
}

/// One `checkpoint-<step>` folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointEntry {
    /// The step in its name.
    pub step: u64,
    /// Its path (`output_dir` joined with its name).
    pub path: PathBuf,
    /// Total bytes of its files (recursively, links not followed).
    pub bytes: u64,
    /// Whether it is complete.
    pub completeness: Completeness,
}

impl CheckpointEntry {
    /// Complete or foreign.
    pub fn is_complete(&self) -> bool {
        self.completeness.is_complete()
    }
}

/// The step of a folder name `checkpoint-<digits>`, if it is one.
pub fn parse_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("checkpoint-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The step of a hidden leftover `.checkpoint-<digits><suffix>`.
fn parse_leftover(name: &str, suffix: &str) -> Option<u64> {
    parse_step(name.strip_prefix('.')?.strip_suffix(suffix)?)
}

/// Every folder named `checkpoint-<digits>` under `output_dir`, ordered by step.
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<CheckpointEntry>> {
    let mut out = Vec::new();
    for (name, path) in dir_entries(output_dir)? {
        let Some(step) = parse_step(&name) else {
            continue;
        };
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(&path, e)),
        }
        let completeness = completeness(&path)?;
        let bytes = dir_bytes(&path)?;
        out.push((
            name,
            CheckpointEntry {
                step,
                path,
                bytes,
                completeness,
            },
        ));
    }
    out.sort_by(|a, b| a.1.step.cmp(&b.1.step).then_with(|| a.0.cmp(&b.0)));
    Ok(out.into_iter().map(|(_, e)| e).collect())
}

/// The complete (or foreign-complete) checkpoint with the highest step, if any.
pub fn last_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(output_dir)?
        .into_iter()
        .rev()
        .find(CheckpointEntry::is_complete)
        .map(|e| e.path))
}

/// The newest checkpoint that is complete and whose files match their manifest's
/// digests ([`verify_digests`]), and the newer ones passed over with why (incomplete, or
/// a file that differs): resume's `last`. Nothing is deleted.
pub fn last_sound_checkpoint(output_dir: &Path) -> Result<(Option<PathBuf>, Vec<Error>)> {
    let mut passed_over = Vec::new();
    for e in list_checkpoints(output_dir)?.into_iter().rev() {
        let verdict = match &e.completeness {
            Completeness::Incomplete(reason) => Err(Error::Incomplete {
                path: e.path.clone(),
                reason: reason.clone(),
            }),
            Completeness::Complete => {
                Manifest::read(&e.path).and_then(|m| verify_digests(&e.path, &m))
            }
            Completeness::Foreign => Ok(()),
        };
        match verdict {
            Ok(()) => return Ok((Some(e.path), passed_over)),
            Err(err) => passed_over.push(err),
        }
    }
    Ok((None, passed_over))
}

/// Whether a complete kiln checkpoint's files match its manifest's digests (a foreign
/// checkpoint has none to check and passes).
pub fn sound(dir: &Path) -> bool {
    match Manifest::read(dir) {
        Ok(m) => verify_digests(dir, &m).is_ok(),
        Err(_) => !dir.join(MANIFEST_NAME).exists(),
    }
}

/// The entries of a folder with UTF-8 names (others are never kiln's). A missing
/// folder has none.
fn dir_entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.at(dir)?;
        if let Ok(name) = entry.file_name().into_string() {
            out.push((name, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Total size of the plain files under `path` (or of `path` itself if it is a file);
/// links are not followed, entries that vanish meanwhile are skipped.
pub(crate) fn dir_bytes(path: &Path) -> Result<u64> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(path, e)),
    };
    if meta.is_file() {
        return Ok(meta.len());
    }
    if !meta.is_dir() {
        return Ok(0);
    }
    let mut total = 0u64;
    let rd = match fs::read_dir(path) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(path, e)),
    };
    for entry in rd {
        total = total.saturating_add(dir_bytes(&entry.at(path)?.path())?);
    }
    Ok(total)
}

/// Whether the folder `dir` is a complete checkpoint (see the module docs).
pub fn completeness(dir: &Path) -> Result<Completeness> {
    let mpath = dir.join(MANIFEST_NAME);
    let text = match fs::read(&mpath) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return foreign_completeness(dir),
        Err(e) => return Err(Error::io(&mpath, e)),
    };
    let manifest: Manifest = match serde_json::from_slice(&text) {
        Ok(m) => m,
        Err(e) => {
            return Ok(Completeness::Incomplete(format!(
                "{MANIFEST_NAME} does not parse: {e}"
            )));
        }
    };
    let name_step = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_step);
    if let Some(step) = name_step
        && step != manifest.step
    {
        return Ok(Completeness::Incomplete(format!(
            "{MANIFEST_NAME} is for step {}, the folder's name says {step}",
            manifest.step
        )));
    }
    if let Some(extra) = manifest
        .blake3
        .keys()
        .find(|k| !manifest.files.contains_key(*k))
    {
        return Ok(Completeness::Incomplete(format!(
            "{MANIFEST_NAME} has a digest for {extra:?}, which is not one of its files"
        )));
    }
    for (name, &size) in &manifest.files {
        let rel = Path::new(name);
        if rel.components().count() == 0
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Ok(Completeness::Incomplete(format!(
                "{MANIFEST_NAME} lists {name:?}, which is not a path inside the folder"
            )));
        }
        let path = dir.join(rel);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() && m.len() == size => {}
            Ok(m) if m.is_file() => {
                return Ok(Completeness::Incomplete(format!(
                    "{name} has {} bytes, {MANIFEST_NAME} says {size}",
                    m.len()
                )));
            }
            Ok(_) => {
                return Ok(Completeness::Incomplete(format!(
                    "{name} is not a plain file"
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Completeness::Incomplete(format!(
                    "{MANIFEST_NAME} lists {name}, missing"
                )));
            }
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    Ok(Completeness::Complete)
}

/// Weight files whose presence makes a transformers checkpoint resumable (Trainer's
/// `_load_from_checkpoint` accepts any of them).
const HF_WEIGHTS: [&str; 4] = [
    "model.safetensors",
    "pytorch_model.bin",
    "adapter_model.safetensors",
    "adapter_model.bin",
];
const HF_INDEXES: [&str; 2] = [
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
];

fn foreign_completeness(dir: &Path) -> Result<Completeness> {
    let incomplete = |s: String| Ok(Completeness::Incomplete(s));
    let state = dir.join("trainer_state.json");
    match fs::read(&state) {
        Ok(text) => {
            if let Err(e) = parse_json(&text) {
                return incomplete(format!("trainer_state.json does not parse: {e}"));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return incomplete(format!(
                "no {MANIFEST_NAME} (interrupted save or copy) and no trainer_state.json"
            ));
        }
        Err(e) => return Err(Error::io(&state, e)),
    }
    if HF_WEIGHTS.iter().any(|w| dir.join(w).is_file()) {
        return Ok(Completeness::Foreign);
    }
    for index in HF_INDEXES {
        let path = dir.join(index);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(&path, e)),
        };
        let shards = match index_shards(&text) {
            Ok(s) => s,
            Err(e) => return incomplete(format!("{index} does not parse: {e}")),
        };
        for shard in shards {
            if !dir.join(&shard).is_file() {
                return incomplete(format!("{index} lists {shard}, missing"));
            }
        }
        return Ok(Completeness::Foreign);
    }
    incomplete(format!(
        "no {MANIFEST_NAME}, and trainer_state.json without weights \
         (model.safetensors, pytorch_model.bin or an index)"
    ))
}

/// The distinct shard file names of an index's `weight_map`.
fn index_shards(text: &[u8]) -> std::result::Result<Vec<String>, String> {
    let v = parse_json(text)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or("no weight_map object")?;
    let mut out: Vec<String> = Vec::new();
    for f in map.values() {
        let f = f.as_str().ok_or("a weight_map value is not a string")?;
        let mut c = Path::new(f).components();
        if !matches!((c.next(), c.next()), (Some(Component::Normal(_)), None)) {
            return Err(format!("weight_map names {f:?}, not a file in the folder"));
        }
        if !out.iter().any(|o| o == f) {
            out.push(f.to_string());
        }
    }
    Ok(out)
}

/// Parses JSON as Python's `json` module writes it: bare `NaN`, `Infinity` and
/// `-Infinity` (which transformers writes into `trainer_state.json` for a diverged
/// loss or gradient norm) are read as `null`.
pub(crate) fn parse_json(text: &[u8]) -> std::result::Result<serde_json::Value, String> {
    match serde_json::from_slice(text) {
        Ok(v) => Ok(v),
        Err(first) => {
            let Some(fixed) = replace_python_constants(text) else {
                return Err(first.to_string());
            };
            serde_json::from_slice(&fixed).map_err(|_| first.to_string())
        }
    }
}

/// Replaces bare `NaN`, `Infinity`, `-Infinity` outside strings by `null`; `None` if
/// there are none.
fn replace_python_constants(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let (mut in_str, mut escaped, mut changed) = (false, false, false);
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        if in_str {
            out.push(b);
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        let rest = &text[i..];
        let token = [&b"-Infinity"[..], b"Infinity", b"NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        if let Some(t) = token {
            out.extend_from_slice(b"null");
            i += t.len();
            changed = true;
            continue;
        }
        if b == b'"' {
            in_str = true;
        }
        out.push(b);
        i += 1;
    }
    changed.then_some(out)
}

/// What [`clean_leftovers`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cleanup {
    /// Removed the staging folder of an interrupted save (`.checkpoint-N.tmp-kiln`).
    RemovedStaging(PathBuf),
    /// Removed the previous copy of a re-saved checkpoint (`.checkpoint-N.old-kiln`),
    /// whose replacement had been committed.
    RemovedOld(PathBuf),
    /// Renamed the previous copy of a checkpoint back to its final name: its
    /// replacement had not been committed.
    Restored {
        /// The hidden `.checkpoint-N.old-kiln`.
        from: PathBuf,
        /// `checkpoint-N`.
        to: PathBuf,
    },
    /// Removed a checkpoint whose deletion by rotation was interrupted
    /// (`.checkpoint-N.del-kiln`).
    RemovedDeleted(PathBuf),
}

/// Cleans what an interrupted save or rotation left in `output_dir`: removes staging
/// folders (`.checkpoint-N.tmp-kiln`) and half-deleted checkpoints
/// (`.checkpoint-N.del-kiln`); for a `.checkpoint-N.old-kiln`, restores it as
/// `checkpoint-N` if that does not exist, and removes it otherwise.
///
/// Call it at startup, on the main process only, before any save of this run (it
/// would remove the staging folder of a save in progress).
pub fn clean_leftovers(output_dir: &Path) -> Result<Vec<Cleanup>> {
    let mut done = Vec::new();
    let mut olds = Vec::new();
    for (name, path) in dir_entries(output_dir)? {
        let is_dir = match fs::symlink_metadata(&path) {
            Ok(m) => m.is_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(&path, e)),
        };
        if !is_dir {
            continue;
        }
        if parse_leftover(&name, ".tmp-kiln").is_some() {
            fs::remove_dir_all(&path).at(&path)?;
            done.push(Cleanup::RemovedStaging(path));
        } else if parse_leftover(&name, ".del-kiln").is_some() {
            fs::remove_dir_all(&path).at(&path)?;
            done.push(Cleanup::RemovedDeleted(path));
        } else if let Some(step) = parse_leftover(&name, ".old-kiln") {
            olds.push((step, path));
        }
    }
    for (step, old) in olds {
        let final_dir = output_dir.join(crate::commit::checkpoint_name(step));
        match recover_old(&StdFs, &final_dir, &old)? {
            Some(true) => done.push(Cleanup::Restored {
                from: old,
                to: final_dir,
            }),
            Some(false) => done.push(Cleanup::RemovedOld(old)),
            None => {}
        }
    }
    Ok(done)
}

/// What [`verify_checkpoint`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The folder.
    pub path: PathBuf,
    /// [`Completeness::Complete`] or [`Completeness::Foreign`].
    pub completeness: Completeness,
    /// Tensor files and indexes opened and read in full.
    pub tensor_files: Vec<PathBuf>,
    /// Number of tensors read (over the files above; a sharded set counts once).
    pub tensors: usize,
    /// JSON files parsed.
    pub json_files: usize,
    /// Total bytes of the folder.
    pub bytes: u64,
}

/// Checks a checkpoint folder in depth (`kiln verify`): it must be complete (or a
/// complete transformers checkpoint), every file must match the BLAKE3 digest its
/// manifest recorded when it was written ([`verify_digests`]), every tensor file must
/// open and read back in full, and every `*.json` must parse (Python's
/// `NaN`/`Infinity` accepted).
///
/// Tensor files: every `*.safetensors`, the PyTorch weights (`pytorch_model*.bin`,
/// `adapter_model.bin`) and shard indexes (`*.index.json`, whose shards are then read
/// once, through the index). transformers' `optimizer.pt`, `scheduler.pt` and
/// `scaler.pt` are parsed and checked against the weights ([`crate::torch_state`]).
/// Other files, such as `training_args.bin`, `optimizer.bin` (accelerate FSDP) or
/// `rng_state.pth`, are pickles of general objects: they are checked for presence
/// and size only, through the manifest.
pub fn verify_checkpoint(dir: &Path) -> Result<Verified> {
    let completeness = completeness(dir)?;
    if let Completeness::Incomplete(reason) = completeness {
        return Err(Error::Incomplete {
            path: dir.to_path_buf(),
            reason,
        });
    }
    if completeness == Completeness::Complete {
        verify_digests(dir, &Manifest::read(dir)?)?;
    }
    let mut files = Vec::new();
    list_files(dir, &mut files)?;
    let mut verified = Verified {
        path: dir.to_path_buf(),
        completeness,
        tensor_files: Vec::new(),
        tensors: 0,
        json_files: 0,
        bytes: 0,
    };
    let mut covered: HashSet<PathBuf> = HashSet::new();
    for path in &files {
        let name = file_name(path);
        if name.ends_with(".json") {
            let text = fs::read(path).at(path)?;
            parse_json(&text).map_err(|e| Error::json(path, e))?;
            verified.json_files += 1;
            if name.ends_with(".index.json") {
                let set = kiln_formats::shard::ShardedSet::open(path)?;
                set.verify().in_file(path)?;
                covered.extend(set.shard_paths().into_iter().map(Path::to_path_buf));
                verified.tensors += set.tensors().len();
                verified.tensor_files.push(path.clone());
            }
        }
    }
    for path in &files {
        let name = file_name(path);
        let tensor_file = name.ends_with(".safetensors")
            || (name.ends_with(".bin")
                && (name.starts_with("pytorch_model") || name == "adapter_model.bin"));
        if !tensor_file || covered.contains(path) {
            continue;
        }
        let collection = kiln_formats::open(path).in_file(path)?;
        collection.verify().in_file(path)?;
        verified.tensors += collection.tensors().len();
        verified.tensor_files.push(path.clone());
    }
    verify_torch_state(dir, &files, &mut verified)?;
    verified.bytes = dir_bytes(dir)?;
    Ok(verified)
}

/// The training state of transformers' layout, parsed with the weights-only reader:
/// `scheduler.pt` and `scaler.pt` must be torch's state dicts, and `optimizer.pt` a
/// state kiln's optimizers can continue whose moments have shapes of the folder's
/// weights (as many parameters as weights when every weight is trained).
/// `rng_state*.pth` holds numpy objects outside torch's default allowlist: it is
/// checked for presence and digest only.
fn verify_torch_state(dir: &Path, files: &[PathBuf], verified: &mut Verified) -> Result<()> {
    use crate::torch_state::{
        OPTIMIZER_PT_NAME, SCALER_PT_NAME, SCHEDULER_PT_NAME, TorchOptimizer, TorchScheduler,
        load_scaler_pt,
    };
    for path in files {
        match file_name(path) {
            SCHEDULER_PT_NAME => {
                TorchScheduler::load(path)?;
            }
            SCALER_PT_NAME => {
                load_scaler_pt(path)?;
            }
            OPTIMIZER_PT_NAME => {
                let opt = TorchOptimizer::load(path)?;
                let weights = kiln_formats::open(dir).in_file(dir)?;
                let mut shapes: Vec<Vec<usize>> =
                    weights.tensors().iter().map(|t| t.shape.clone()).collect();
                let params: usize = opt.groups.iter().map(|g| g.params.len()).sum();
                if params > shapes.len() {
                    return Err(Error::json(
                        path,
                        format!(
                            "its groups hold {params} parameters, the folder has {} weights",
                            shapes.len()
                        ),
                    ));
                }
                for (index, s) in &opt.state {
                    let shape = s.exp_avg.shape().to_vec();
                    let found = shapes.iter().position(|w| *w == shape);
                    if s.exp_avg_sq.shape() != shape.as_slice() || found.is_none() {
                        return Err(Error::json(
                            path,
                            format!(
                                "the state of parameter {index} (shape {shape:?}) fits no weight of the folder"
                            ),
                        ));
                    }
                    if let Some(i) = found {
                        shapes.swap_remove(i);
                    }
                }
                verified.tensors += 2 * opt.state.len();
                verified.tensor_files.push(path.clone());
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks every file against the digest the manifest recorded when it was written, in
/// name order: the first that differs is an [`Error::Corrupt`] naming it. Manifests
/// without digests (kiln before content hashes) pass.
pub fn verify_digests(dir: &Path, manifest: &Manifest) -> Result<()> {
    for (rel, want) in &manifest.blake3 {
        let safe = Path::new(rel).components().count() > 0
            && Path::new(rel)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !safe || !manifest.files.contains_key(rel) {
            return Err(Error::Incomplete {
                path: dir.to_path_buf(),
                reason: format!(
                    "{MANIFEST_NAME} has a digest for {rel:?}, which is not one of its files"
                ),
            });
        }
        let path = dir.join(rel);
        let got = kiln_formats::digest::hash_file(&path).at(&path)?;
        if &got != want {
            return Err(Error::Corrupt {
                path,
                reason: format!(
                    "its BLAKE3 is {}…, the manifest recorded {}… when it was written",
                    &got[..12],
                    &want[..want.len().min(12)]
                ),
            });
        }
    }
    Ok(())
}

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// Plain files under `dir`, recursively, sorted; links are not followed.
fn list_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).at(dir)? {
        entries.push(entry.at(dir)?.path());
    }
    entries.sort();
    for path in entries {
        let meta = fs::symlink_metadata(&path).at(&path)?;
        if meta.is_dir() {
            list_files(&path, out)?;
        } else if meta.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names() {
        assert_eq!(parse_step("checkpoint-12"), Some(12));
        assert_eq!(parse_step("checkpoint-007"), Some(7));
        assert_eq!(parse_step("checkpoint-"), None);
        assert_eq!(parse_step("checkpoint-abc"), None);
        assert_eq!(parse_step("checkpoint-5.bak"), None);
        assert_eq!(parse_step("checkpoint--5"), None);
        assert_eq!(parse_step("checkpoint-+5"), None);
        assert_eq!(parse_step("checkpoint-99999999999999999999999"), None);
        assert_eq!(
            parse_leftover(".checkpoint-5.tmp-kiln", ".tmp-kiln"),
            Some(5)
        );
        assert_eq!(parse_leftover("checkpoint-5.tmp-kiln", ".tmp-kiln"), None);
    }

    #[test]
    fn python_json_constants() {
        let v = parse_json(br#"{"a": NaN, "b": [Infinity, -Infinity], "c": "NaN \" Infinity"}"#)
            .unwrap();
        assert!(v["a"].is_null());
        assert!(v["b"][0].is_null() && v["b"][1].is_null());
        assert_eq!(v["c"], "NaN \" Infinity");
        assert!(parse_json(b"{\"a\": 1").is_err());
    }
}

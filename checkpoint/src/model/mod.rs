//! Model folders: the equivalent of transformers' `save_pretrained` and
//! `from_pretrained`, so that what [`save_pretrained`] writes `transformers` loads, and
//! what `transformers` wrote [`load_pretrained`] reads.
//!
//! A model folder holds:
//!
//! - `config.json`: the architecture's Hugging Face config keys (`model_type` and
//!   `architectures` are required), plus `dtype` (the torch name of the weights' first
//!   floating-point dtype, unless the config gives one) and `kiln_version`, written as
//!   transformers writes it: `json.dumps(config, indent=2, sort_keys=True) + "\n"`;
//! - `generation_config.json` for generative models, written the same way, as given;
//! - the weights: `model.safetensors` (or `pytorch_model.bin`), or shards
//!   (`model-00001-of-00003.safetensors`) and an index when they exceed
//!   [`SaveOptions::max_shard_size`], split in the order of the model's parameters as
//!   `huggingface_hub` splits them;
//! - tokenizer files, written byte for byte as given, and `training_args.json`.
//!
//! # Decisions
//!
//! - **Tied weights.** safetensors cannot store two names on one buffer, so for
//!   safetensors the tied name (GPT-2's `lm_head.weight`) is left out of the files and of
//!   the index's `weight_map`, exactly as transformers leaves it out, and it is re-tied on
//!   load. For `.bin`, both names are written on one storage, as transformers' `.bin`
//!   keeps them: the tied name goes into its source's shard and is not counted again
//!   in shard sizes nor in the index totals. A tied name missing from the weights handed
//!   to a save is added back for `.bin` (viewing its source's storage).
//! - **Aliasing is checked, never silently resolved.** Two tensors whose bytes overlap
//!   in memory (as the collection lends them) must be a declared tie, and a declared tie
//!   whose two tensors differ in dtype, shape or bytes is refused: saving either one
//!   would lose the other.
//! - **Stale files.** A save removes the weights of an earlier save in the same folder:
//!   old shards, an old single file when the new save is sharded and vice versa, old
//!   indexes, and the other format's files (transformers leaves a stale
//!   `model.safetensors` that then wins on load); an adapter's files (`adapter_config.json`,
//!   `adapter_model.*`) go too, and an adapter save removes a full model's weights and
//!   `config.json`. Other files of an earlier save
//!   (`generation_config.json`, tokenizer files) are left alone, as transformers does.
//! - **Atomicity per file.** Every file is written to a hidden temporary sibling, synced
//!   and renamed into place, and the folder is synced at the end; a crash leaves each
//!   file old or new, never torn. Making the whole folder appear at once is the commit
//!   protocol's job ([`crate::commit`]).
//! - **Loading** opens the weights in transformers' order of precedence
//!   (`model.safetensors`, its index, `pytorch_model.bin`, its index) and checks them
//!   against the tensors the model expects: a shape or dtype that differs is an error
//!   naming the tensor; missing and unexpected names are reported, as
//!   `output_loading_info=True` reports them; an expected name that is absent but tied
//!   to a tensor that is present is re-tied (it reads that tensor's bytes), not missing.
//!   A tied name that is present reads its own bytes.
//!
//! ```no_run
//! use kiln_checkpoint::model::{self, ModelSave, SaveOptions};
//! use kiln_formats::{DType, TensorMap, TensorView, TensorCollection};
//! # fn main() -> kiln_checkpoint::Result<()> {
//! let mut weights = TensorMap::new();
//! weights.insert("transformer.wte.weight", TensorView::new(DType::F32, vec![4, 2], vec![0u8; 32])?)?;
//! let config = serde_json::json!({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]});
//! let save = ModelSave::new(config, &weights).with_tied("lm_head.weight", "transformer.wte.weight");
//! model::save_pretrained("out", &save, &SaveOptions::default())?;
//!
//! let expected = weights.tensors().to_vec();
//! let tied = [("lm_head.weight".to_string(), "transformer.wte.weight".to_string())];
//! let loaded = model::load_pretrained("out", &expected, &tied)?;
//! assert!(loaded.report.missing.is_empty() && loaded.report.unexpected.is_empty());
//! # Ok(()) }
//! ```

mod adapter;
mod bin;
mod tied;

pub use adapter::{
    ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_BIN_NAME, ADAPTER_WEIGHTS_NAME, adapter_weights_path,
    is_adapter_config, is_adapter_folder, read_adapter_config,
};

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use kiln_formats::shard::{self, SavedWeights};
use kiln_formats::{Format, TensorCollection, TensorInfo, pyjson};
use serde_json::{Map, Value};

use crate::error::IoContext;
use crate::{Error, Result};
use tied::{Inner, Selection, Ties};

/// The model's configuration file.
pub const CONFIG_NAME: &str = "config.json";
/// The generation configuration of a generative model.
pub const GENERATION_CONFIG_NAME: &str = "generation_config.json";
/// The training arguments, as JSON (transformers pickles them to `training_args.bin`,
/// which only Python can read).
pub const TRAINING_ARGS_NAME: &str = "training_args.json";

/// Everything [`save_pretrained`] writes into a model folder.
pub struct ModelSave<'a> {
    /// The architecture's Hugging Face config keys; must hold `model_type` and
    /// `architectures`.
    pub config: Value,
    /// The generation config of a generative model.
    pub generation_config: Option<Value>,
    /// The weights, in the model's parameter order (sharding follows it).
    pub weights: &'a dyn TensorCollection,
    /// Tied weights: (tied name, source name), e.g.
    /// `("lm_head.weight", "transformer.wte.weight")`.
    pub tied: Vec<(String, String)>,
    /// Tokenizer files (`tokenizer.json`, `tokenizer_config.json`,
    /// `special_tokens_map.json`, vocab files): plain file names and their bytes.
    pub tokenizer_files: Vec<(String, Vec<u8>)>,
    /// The training arguments, written to `training_args.json`.
    pub training_args: Option<Value>,
}

impl std::fmt::Debug for ModelSave<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSave")
            .field("config", &self.config)
            .field("generation_config", &self.generation_config)
            .field("weights", &self.weights.tensors().len())
            .field("tied", &self.tied)
            .field(
                "tokenizer_files",
                &self
                    .tokenizer_files
                    .iter()
                    .map(|f| &f.0)
                    .collect::<Vec<_>>(),
            )
            .field("training_args", &self.training_args.is_some())
            .finish()
    }
}

impl<'a> ModelSave<'a> {
    /// A model with a config and weights, and nothing else.
    pub fn new(config: Value, weights: &'a dyn TensorCollection) -> Self {
        ModelSave {
            config,
            generation_config: None,
            weights,
            tied: Vec::new(),
            tokenizer_files: Vec::new(),
            training_args: None,
        }
    }

    /// Sets the generation config.
    pub fn with_generation_config(mut self, generation_config: Value) -> Self {
        self.generation_config = Some(generation_config);
        self
    }

    /// Declares `tied` to be tied to `source`.
    pub fn with_tied(mut self, tied: impl Into<String>, source: impl Into<String>) -> Self {
        self.tied.push((tied.into(), source.into()));
        self
    }

    /// Adds a tokenizer file.
    pub fn with_tokenizer_file(
        mut self,
        name: impl Into<String>,
        bytes: impl Into<Vec<u8>>,
    ) -> Self {
        self.tokenizer_files.push((name.into(), bytes.into()));
        self
    }

    /// Sets the training arguments.
    pub fn with_training_args(mut self, training_args: Value) -> Self {
        self.training_args = Some(training_args);
        self
    }
}

/// How [`save_pretrained`] writes the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaveOptions {
    /// safetensors (the default) or PyTorch `.bin`.
    pub safetensors: bool,
    /// The largest shard, in bytes (decimal units as transformers: 5 GB = 5·10⁹).
    pub max_shard_size: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            safetensors: true,
            max_shard_size: 5_000_000_000,
        }
    }
}

impl SaveOptions {
    /// Writes safetensors (`true`) or `.bin` (`false`).
    pub fn with_safetensors(mut self, safetensors: bool) -> Self {
        self.safetensors = safetensors;
        self
    }

    /// Sets the largest shard in bytes ([`kiln_formats::shard::parse_size`] reads "5GB").
    pub fn with_max_shard_size(mut self, max_shard_size: u64) -> Self {
        self.max_shard_size = max_shard_size;
        self
    }

    /// The weights format.
    pub fn format(&self) -> Format {
        if self.safetensors {
            Format::Safetensors
        } else {
            Format::PyTorch
        }
    }
}

/// What [`save_pretrained`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedModel {
    /// `config.json`.
    pub config: PathBuf,
    /// `generation_config.json`, if written.
    pub generation_config: Option<PathBuf>,
    /// The weight files and index, and the stale weight files removed.
    pub weights: SavedWeights,
    /// Tied names left out of the weight files (safetensors).
    pub dropped_tied: Vec<String>,
    /// The tokenizer files.
    pub tokenizer_files: Vec<PathBuf>,
    /// `training_args.json`, if written.
    pub training_args: Option<PathBuf>,
}

impl SavedModel {
    /// Every file the save wrote (config, weights, index, tokenizer files, training
    /// arguments), for a manifest.
    pub fn files(&self) -> Vec<&Path> {
        std::iter::once(self.config.as_path())
            .chain(self.generation_config.as_deref())
            .chain(self.weights.files.iter().map(PathBuf::as_path))
            .chain(self.weights.index.as_deref())
            .chain(self.tokenizer_files.iter().map(PathBuf::as_path))
            .chain(self.training_args.as_deref())
            .collect()
    }
}

/// Writes a model folder that `transformers`' `from_pretrained` loads (see the
/// [module documentation](self) for what goes where).
///
/// Everything is checked before anything is written: the config, the ties, aliasing,
/// the tokenizer file names.
pub fn save_pretrained(
    dir: impl AsRef<Path>,
    model: &ModelSave<'_>,
    options: &SaveOptions,
) -> Result<SavedModel> {
    let dir = dir.as_ref();
    if options.max_shard_size == 0 {
        return Err(Error::Invalid(
            "max_shard_size must be at least 1 byte".into(),
        ));
    }
    if is_adapter_config(&model.config) {
        return adapter::save(dir, model, options);
    }
    let config = model_config(&model.config, model.weights)?;
    for (what, value) in [
        ("generation config", &model.generation_config),
        ("training arguments", &model.training_args),
    ] {
        if matches!(value, Some(v) if !v.is_object()) {
            return Err(Error::Invalid(format!("the {what} must be a JSON object")));
        }
    }
    check_file_names(&model.tokenizer_files)?;
    let ties = Ties::new(&model.tied)?;
    tied::check_save(model.weights, &ties)?;

    std::fs::create_dir_all(dir).at(dir)?;
    let config_path = dir.join(CONFIG_NAME);
    write_json(&config_path, &config)?;
    let generation_config = match &model.generation_config {
        Some(g) => {
            let p = dir.join(GENERATION_CONFIG_NAME);
            write_json(&p, g)?;
            Some(p)
        }
        None => None,
    };

    let format = options.format();
    let (weights, dropped_tied) = weights_to_write(model.weights, &ties, format);
    let mut saved = match format {
        Format::Safetensors => shard::save_sharded(dir, format, &weights, options.max_shard_size)?,
        Format::PyTorch => bin::save(dir, &weights, &ties, options.max_shard_size)?,
    };
    saved.removed.extend(adapter::remove_stale_adapter(dir)?);

    let (tokenizer_files, training_args) = write_extras(dir, model)?;
    sync_dir(dir)?;
    Ok(SavedModel {
        config: config_path,
        generation_config,
        weights: saved,
        dropped_tied,
        tokenizer_files,
        training_args,
    })
}

/// Writes a save's tokenizer files and `training_args.json`; their paths.
pub(super) fn write_extras(
    dir: &Path,
    model: &ModelSave<'_>,
) -> Result<(Vec<PathBuf>, Option<PathBuf>)> {
    let mut tokenizer_files = Vec::with_capacity(model.tokenizer_files.len());
    for (name, bytes) in &model.tokenizer_files {
        let p = dir.join(name);
        write_atomic(&p, bytes)?;
        tokenizer_files.push(p);
    }
    let training_args = match &model.training_args {
        Some(a) => {
            let p = dir.join(TRAINING_ARGS_NAME);
            write_json(&p, a)?;
            Some(p)
        }
        None => None,
    };
    Ok((tokenizer_files, training_args))
}

/// The tensors a save writes in `format`, in parameter order: for safetensors without
/// the tied names (which are returned), for `.bin` with every tied name (those the
/// weights lack read from their source, after the weights).
fn weights_to_write<'a>(
    weights: &'a dyn TensorCollection,
    ties: &Ties,
    format: Format,
) -> (Selection<'a>, Vec<String>) {
    let mut dropped = Vec::new();
    match format {
        Format::Safetensors => {
            let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
            let mut sel = Selection::new(Inner::Borrowed(weights), metadata);
            for info in weights.tensors() {
                if ties.is_tied(&info.name) {
                    dropped.push(info.name.clone());
                } else {
                    sel.push(info.clone(), &info.name);
                }
            }
            (sel, dropped)
        }
        Format::PyTorch => {
            let mut sel = Selection::new(Inner::Borrowed(weights), BTreeMap::new());
            for info in weights.tensors() {
                sel.push(info.clone(), &info.name);
            }
            let present = tied::name_set(weights.tensors());
            for (t, s) in ties.pairs() {
                if let (false, Some(src)) = (present.contains(t), weights.info(s)) {
                    let info = TensorInfo {
                        name: t.to_string(),
                        ..src.clone()
                    };
                    sel.push(info, s);
                }
            }
            (sel, dropped)
        }
    }
}

/// The config as written: the model's keys, `dtype` unless given, and `kiln_version`.
fn model_config(config: &Value, weights: &dyn TensorCollection) -> Result<Value> {
    let Value::Object(map) = config else {
        return Err(Error::Invalid(
            "the model config must be a JSON object".into(),
        ));
    };
    if !matches!(map.get("model_type"), Some(Value::String(s)) if !s.is_empty()) {
        return Err(Error::Invalid(
            "the model config has no \"model_type\" (a string such as \"gpt2\")".into(),
        ));
    }
    let architectures_ok = matches!(map.get("architectures"),
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(|v| matches!(v, Value::String(s) if !s.is_empty())));
    if !architectures_ok {
        return Err(Error::Invalid(
            "the model config has no \"architectures\" (a list of class names such as [\"GPT2LMHeadModel\"])"
                .into(),
        ));
    }
    let mut map: Map<String, Value> = map.clone();
    if !map.contains_key("dtype") {
        let float = weights
            .tensors()
            .iter()
            .map(|t| t.dtype)
            .find(|d| d.is_float());
        if let Some(d) = float {
            map.insert("dtype".into(), Value::from(d.torch_name()));
        }
    }
    map.insert(
        "kiln_version".into(),
        Value::from(env!("CARGO_PKG_VERSION")),
    );
    Ok(Value::Object(map))
}

/// Tokenizer file names must be plain, distinct file names that are not the names of
/// the files the save itself writes.
pub(super) fn check_file_names(files: &[(String, Vec<u8>)]) -> Result<()> {
    let mut seen = HashSet::new();
    for (name, _) in files {
        let mut comps = Path::new(name).components();
        let plain = matches!(
            (comps.next(), comps.next()),
            (Some(Component::Normal(_)), None)
        ) && !name.contains(['/', '\\', '\0'])
            && !name.starts_with('.');
        if !plain {
            return Err(Error::Invalid(format!(
                "tokenizer file {name:?} is not a plain file name"
            )));
        }
        let weights_like = (name.starts_with("model") && name.ends_with(".safetensors"))
            || (name.starts_with("pytorch_model") && name.ends_with(".bin"))
            || name.ends_with(".index.json");
        let ours =
            [CONFIG_NAME, GENERATION_CONFIG_NAME, TRAINING_ARGS_NAME].contains(&name.as_str());
        if weights_like || ours {
            return Err(Error::Invalid(format!(
                "tokenizer file {name:?} would overwrite a file of the model itself"
            )));
        }
        if !seen.insert(name.as_str()) {
            return Err(Error::Invalid(format!(
                "tokenizer file {name:?} is given twice"
            )));
        }
    }
    Ok(())
}

/// Writes `value` as transformers does: `json.dumps(value, indent=2, sort_keys=True) + "\n"`.
pub(super) fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = pyjson::dumps(value) + "\n";
    write_atomic(path, text.as_bytes())
}

/// Writes `bytes` into a hidden temporary sibling of `path`, syncs it and renames it
/// over `path` (the folder is synced once, at the end of the save).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .at(dir)?;
    tmp.write_all(bytes).at(path)?;
    tmp.as_file().sync_all().at(path)?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    // Inside a checkpoint save: the manifest's digest, from the bytes just written.
    kiln_formats::digest::note_bytes(path, bytes);
    Ok(())
}

/// Syncs a folder so that the renames into it are durable.
pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .at(dir)?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Reads a model folder's `config.json` (a JSON object).
pub fn read_config(dir: impl AsRef<Path>) -> Result<Value> {
    let dir = dir.as_ref();
    let path = dir.join(CONFIG_NAME);
    if !path.is_file() {
        return Err(Error::Incomplete {
            path: dir.to_path_buf(),
            reason: format!("no {CONFIG_NAME}"),
        });
    }
    read_json_object(&path)
}

pub(super) fn read_json_object(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).at(path)?;
    let value: Value = serde_json::from_str(&text).map_err(|e| Error::json(path, e))?;
    if !value.is_object() {
        return Err(Error::json(path, "not a JSON object"));
    }
    Ok(value)
}

/// What loading found, as transformers' `output_loading_info=True` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Expected tensors that are neither in the files nor re-tied.
    pub missing: Vec<String>,
    /// Tensors in the files that the model does not expect.
    pub unexpected: Vec<String>,
    /// Expected tied tensors absent from the files, read from the tensor they are tied to.
    pub retied: Vec<String>,
}

impl LoadReport {
    /// Whether nothing is missing nor unexpected.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty()
    }
}

/// A model folder read by [`load_pretrained`].
pub struct LoadedModel {
    /// `config.json`.
    pub config: Value,
    /// `generation_config.json`, if the folder has one.
    pub generation_config: Option<Value>,
    /// The weights: the expected tensors found or re-tied, in the order expected, then
    /// the unexpected ones in file order. Bytes are read lazily from the files.
    pub weights: Box<dyn TensorCollection>,
    /// The weights file or index they were opened from.
    pub weights_path: PathBuf,
    /// Missing, unexpected and re-tied names.
    pub report: LoadReport,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("config", &self.config)
            .field("generation_config", &self.generation_config)
            .field("weights", &self.weights.tensors().len())
            .field("weights_path", &self.weights_path)
            .field("report", &self.report)
            .finish()
    }
}

/// Reads the model folder `dir` for a model whose parameters are `expected` (name,
/// dtype, shape) and whose tied weights are `tied` ((tied name, source name) pairs).
///
/// The weights are opened in transformers' order of precedence. A tensor whose shape or
/// dtype differs from the expected one is an error naming it; missing and unexpected
/// names are reported, and an expected name that is absent but tied to a tensor that is
/// present reads that tensor's bytes (and is reported as re-tied).
pub fn load_pretrained(
    dir: impl AsRef<Path>,
    expected: &[TensorInfo],
    tied: &[(String, String)],
) -> Result<LoadedModel> {
    load(dir.as_ref(), expected, tied, true)
}

/// [`load_pretrained`] that takes each found tensor's dtype from the files, for a
/// caller that converts dtypes itself ([`crate::candle::load_varmap`]).
#[cfg(feature = "candle")]
pub(crate) fn load_pretrained_any_dtype(
    dir: &Path,
    expected: &[TensorInfo],
    tied: &[(String, String)],
) -> Result<LoadedModel> {
    load(dir, expected, tied, false)
}

/// [`load_pretrained`], checking dtypes only with `exact_dtype`.
fn load(
    dir: &Path,
    expected: &[TensorInfo],
    tied: &[(String, String)],
    exact_dtype: bool,
) -> Result<LoadedModel> {
    let ties = Ties::new(tied)?;
    if is_adapter_folder(dir) {
        let config = read_adapter_config(dir)?;
        let weights_path = adapter_weights_path(dir)?;
        return load_weights(config, None, weights_path, expected, &ties, exact_dtype);
    }
    let config = read_config(dir)?;
    let gen_path = dir.join(GENERATION_CONFIG_NAME);
    let generation_config = if gen_path.is_file() {
        Some(read_json_object(&gen_path)?)
    } else {
        None
    };
    let weights_path = kiln_formats::detect::model_weights_path(dir)?;
    load_weights(
        config,
        generation_config,
        weights_path,
        expected,
        &ties,
        exact_dtype,
    )
}

/// Opens `weights_path` as [`load`] describes.
fn load_weights(
    config: Value,
    generation_config: Option<Value>,
    weights_path: PathBuf,
    expected: &[TensorInfo],
    ties: &Ties,
    exact_dtype: bool,
) -> Result<LoadedModel> {
    let file = kiln_formats::open(&weights_path)?;

    let mut report = LoadReport::default();
    // (name in the view, name in the files)
    let mut entries: Vec<(TensorInfo, String)> = Vec::with_capacity(expected.len());
    let mut seen = HashSet::new();
    for want in expected {
        if !seen.insert(want.name.as_str()) {
            return Err(Error::Invalid(format!(
                "tensor {:?} is expected twice",
                want.name
            )));
        }
        let (from, retied) = match file.info(&want.name) {
            Some(found) => (found, false),
            None => match ties
                .partners(&want.name)
                .into_iter()
                .find_map(|p| file.info(p))
            {
                Some(found) => (found, true),
                None => {
                    report.missing.push(want.name.clone());
                    continue;
                }
            },
        };
        check_matches(want, from, exact_dtype)?;
        if retied {
            report.retied.push(want.name.clone());
        }
        let info = TensorInfo {
            dtype: from.dtype,
            ..want.clone()
        };
        entries.push((info, from.name.clone()));
    }
    for info in file.tensors() {
        if !seen.contains(info.name.as_str()) {
            report.unexpected.push(info.name.clone());
            entries.push((info.clone(), info.name.clone()));
        }
    }
    let metadata = file.metadata().clone();
    let mut weights = Selection::new(Inner::Owned(file), metadata);
    for (info, from) in entries {
        weights.push(info, &from);
    }
    Ok(LoadedModel {
        config,
        generation_config,
        weights: Box::new(weights),
        weights_path,
        report,
    })
}

/// A tensor found for `want` must have its shape (and its dtype with `exact_dtype`).
fn check_matches(want: &TensorInfo, found: &TensorInfo, exact_dtype: bool) -> Result<()> {
    if want.shape != found.shape {
        return Err(Error::Shape {
            name: want.name.clone(),
            expected: want.shape.clone(),
            found: found.shape.clone(),
        });
    }
    if exact_dtype && want.dtype != found.dtype {
        return Err(Error::Invalid(format!(
            "tensor {:?}: expected dtype {}, found {}",
            want.name, want.dtype, found.dtype
        )));
    }
    Ok(())
}

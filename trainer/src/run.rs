//! Whole runs as the `kiln` command drives them: `kiln train`, `kiln eval` and
//! `kiln predict` are thin wrappers around [`train`], [`evaluate`] and [`predict`].
//!
//! A run is described by a TOML config with three tables, spelled as transformers
//! spells things:
//!
//! ```toml
//! [model]
//! architecture = "BertForSequenceClassification"   # or "GPT2LMHeadModel"
//! hidden_size = 64                                 # any key of that config.json
//! # init_from = "path/to/a/saved/model"            # instead: fine-tune a saved model
//!
//! [data]                                           # kiln_trainer::data::DataArgs
//! train_file = "data/sentiment/train.jsonl"
//! validation_file = "data/sentiment/validation.jsonl"
//!
//! [training]                                       # TrainingArguments fields
//! output_dir = "out"
//! ```
//!
//! Every field can also be set with a flag (`--save_steps 10`, `--train_file x.jsonl`,
//! `--hidden_size 32`): a `TrainingArguments` field first, then a `[data]` key, else a
//! `[model]` key. Relative paths resolve against the current directory, as in
//! transformers' example scripts — except in the bundled default run
//! ([`RunConfig::bundled_default`]), whose data files resolve against the kiln source
//! tree so that `kiln train` works from anywhere in a checkout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde_json::{Map, Value, json};

use crate::data::{CollatedDataset, Collator, DataArgs, Labels, RawData, Task};
use crate::model::{Batch, Model};
use crate::models::{BertConfig, BertForSequenceClassification, Gpt2Config, Gpt2LMHeadModel};
use crate::rng::Rng;
use crate::tokenize::{Tokenizer, TokenizerKind, TokenizerTrainer};
use crate::trainer::{TrainOutput, Trainer, accuracy};
use crate::{Error, Result, TrainingArguments};

/// The bundled default config (`data/configs/bert-sentiment.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../data/configs/bert-sentiment.toml");

/// The `[model]` table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelSection {
    /// The transformers class name (`BertForSequenceClassification`, `GPT2LMHeadModel`).
    pub architecture: Option<String>,
    /// A saved model folder to start from (its config and weights; its tokenizer too).
    pub init_from: Option<String>,
    /// The other keys: that architecture's `config.json` keys.
    pub keys: Map<String, Value>,
}

/// A whole run: model, data and training arguments.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunConfig {
    /// `[model]`.
    pub model: ModelSection,
    /// `[data]`.
    pub data: DataArgs,
    /// `[training]`.
    pub training: TrainingArguments,
}

fn toml_to_json(v: toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => json!(i),
        toml::Value::Float(f) => json!(f),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect())
        }
    }
}

impl RunConfig {
    /// Parses a config's text (`origin` names it in errors).
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let table: toml::Table = text
            .parse()
            .map_err(|e| Error::Config(format!("{origin}: {}", one_line(&e))))?;
        let mut cfg = RunConfig::default();
        for (section, value) in table {
            let toml::Value::Table(t) = value else {
                return Err(Error::Config(format!(
                    "{origin}: {section} must be a table ([{section}])"
                )));
            };
            let obj: Map<String, Value> =
                t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect();
            match section.as_str() {
                "model" => {
                    let mut keys = obj;
                    let take = |keys: &mut Map<String, Value>, k: &str| -> Result<Option<String>> {
                        match keys.remove(k) {
                            None => Ok(None),
                            Some(Value::String(s)) => Ok(Some(s)),
                            Some(v) => Err(Error::Config(format!(
                                "{origin}: [model] {k} must be a string, got {v}"
                            ))),
                        }
                    };
                    cfg.model.architecture = take(&mut keys, "architecture")?;
                    cfg.model.init_from = take(&mut keys, "init_from")?;
                    cfg.model.keys = keys;
                }
                "data" => {
                    cfg.data = serde_json::from_value(Value::Object(obj))
                        .map_err(|e| Error::Config(format!("{origin}: [data]: {e}")))?;
                }
                "training" => {
                    cfg.training = serde_json::from_value(Value::Object(obj))
                        .map_err(|e| Error::Config(format!("{origin}: [training]: {e}")))?;
                }
                other => {
                    return Err(Error::Config(format!(
                        "{origin}: unknown table [{other}]; a config has [model], [data] and [training]"
                    )));
                }
            }
        }
        Ok(cfg)
    }

    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The bundled default: a small BERT sentiment classifier on `data/sentiment`.
    pub fn bundled_default() -> Result<Self> {
        let mut cfg = Self::from_toml(DEFAULT_CONFIG, "data/configs/bert-sentiment.toml")?;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for file in [&mut cfg.data.train_file, &mut cfg.data.validation_file] {
            if let Some(f) = file
                && !Path::new(f).exists()
            {
                *f = root.join(&*f).display().to_string();
            }
        }
        Ok(cfg)
    }

    /// Sets one field from a flag: a training argument, else a `[data]` key, else
    /// (`init_from`, `architecture` or) a `[model]` key.
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        if TrainingArguments::has_field(name) {
            return self.training.set(name, value);
        }
        let data = serde_json::to_value(&self.data).map_err(|e| Error::Config(e.to_string()))?;
        if let Some(current) = data.get(name) {
            let parsed = parse_json_like(current, value);
            let mut obj = data.as_object().cloned().unwrap_or_default();
            obj.insert(name.to_string(), parsed);
            self.data = serde_json::from_value(Value::Object(obj))
                .map_err(|e| Error::Config(format!("--{name} {value}: {e}")))?;
            return Ok(());
        }
        match name {
            "architecture" => self.model.architecture = Some(value.to_string()),
            "init_from" => self.model.init_from = Some(value.to_string()),
            _ if self.model.keys.contains_key(name) || is_model_config_key(name) => {
                let current = self.model.keys.get(name).cloned().unwrap_or(Value::Null);
                self.model
                    .keys
                    .insert(name.to_string(), parse_json_like(&current, value));
            }
            _ => {
                return Err(Error::Config(format!(
                    "unknown flag --{name}: not a training argument, a [data] key nor a key of the model's config"
                )));
            }
        }
        Ok(())
    }
}

/// Whether `name` is a `config.json` key of an architecture kiln trains (BertConfig,
/// GPT2Config, and the keys every transformers config has), so that a mistyped flag is
/// an error rather than a silently ignored model key.
fn is_model_config_key(name: &str) -> bool {
    const COMMON: [&str; 8] = [
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
    ];
    let known = |v: Value| v.get(name).is_some();
    COMMON.contains(&name)
        || BertConfig::from_json(&json!({})).is_ok_and(|c| known(c.to_json()))
        || Gpt2Config::from_json(&json!({})).is_ok_and(|c| known(c.to_json()))
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A flag's text as JSON: a number, a boolean, JSON, or else a string.
fn parse_json_like(current: &Value, text: &str) -> Value {
    if current.is_string() {
        return Value::String(text.to_string());
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// The device `spec` names (`auto`, `cpu`, `cuda`, `cuda:1`, `metal`), chosen through
/// the backend registry: only backends linked into the program are found, and an
/// unavailable one is an error that says why.
pub fn device(spec: &str) -> Result<Device> {
    kiln_backend::resolve(spec).map_err(|e| Error::Config(format!("device: {e}")))
}

/// The device `args.device` names, with its backend, once the backend is known to
/// compute in the dtype of `bf16`/`fp16` (checked before any work).
fn select_device(spec: &str, args: &TrainingArguments) -> Result<kiln_backend::Selected> {
    let selected = kiln_backend::select(spec).map_err(|e| Error::Config(format!("device: {e}")))?;
    crate::precision::check_device(selected.backend, args)?;
    Ok(selected)
}

/// What [`train`] did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The folder the final model was saved to.
    pub output_dir: PathBuf,
    /// The training outcome.
    pub train: TrainOutput,
    /// The final evaluation's metrics (when there is validation data).
    pub eval: Option<BTreeMap<String, f64>>,
    /// The architecture trained.
    pub architecture: String,
    /// This process's rank (0 alone); only rank 0 reports a multi-process run.
    pub rank: usize,
}

/// Everything a run needs before training: data, tokenizer and the model's config.
struct Prepared {
    task: Task,
    architecture: String,
    tokenizer: Tokenizer,
    train: Option<Arc<CollatedDataset>>,
    eval: Option<Arc<CollatedDataset>>,
    labels: Option<Labels>,
}

fn prepare(cfg: &RunConfig) -> Result<Prepared> {
    let init_config = match &cfg.model.init_from {
        Some(dir) => Some(kiln_checkpoint::model::read_config(Path::new(dir))?),
        None => None,
    };
    let architecture = cfg
        .model
        .architecture
        .clone()
        .or_else(|| {
            init_config.as_ref()?["architectures"]
                .as_array()?
                .first()?
                .as_str()
                .map(String::from)
        })
        .ok_or_else(|| Error::Config("[model] needs architecture (or init_from)".into()))?;
    let task = Task::for_architecture(&architecture).ok_or_else(|| {
        Error::Config(format!(
            "architecture {architecture:?} is not supported; use BertForSequenceClassification or GPT2LMHeadModel"
        ))
    })?;
    let raw = RawData::read(&cfg.data, task)?;
    let tokenizer_dir = cfg
        .model
        .init_from
        .clone()
        .or_else(|| cfg.data.tokenizer_name.clone());
    let tokenizer = match tokenizer_dir {
        Some(dir) if Path::new(&dir).join("tokenizer.json").exists() => Tokenizer::from_dir(&dir)?,
        _ => {
            let kind = TokenizerKind::for_architecture(&architecture).ok_or_else(|| {
                Error::Config(format!("no tokenizer to train for {architecture}"))
            })?;
            TokenizerTrainer::new(kind, cfg.data.vocab_size).train(raw.train_texts())?
        }
    };
    let labels = match &init_config {
        Some(c) if task == Task::SequenceClassification && c.get("id2label").is_some() => {
            Some(Labels::from_config(c)?)
        }
        _ => None,
    };
    let data = raw.tokenize(&tokenizer, &cfg.data, labels)?;
    let collator = Collator::for_tokenizer(&tokenizer);
    let wrap = |d: Option<crate::data::Dataset>| {
        d.map(|d| Arc::new(CollatedDataset::new(d, collator.clone())))
    };
    Ok(Prepared {
        task,
        architecture,
        train: wrap(data.train),
        eval: wrap(data.validation),
        labels: data.labels,
        tokenizer,
    })
}

/// The `config.json` of a new model: the `[model]` keys, the tokenizer's vocabulary and
/// special ids, and the labels.
fn new_model_config(cfg: &RunConfig, p: &Prepared) -> Value {
    let mut keys = cfg.model.keys.clone();
    keys.insert("vocab_size".into(), json!(p.tokenizer.vocab_size()));
    match p.task {
        Task::SequenceClassification => {
            keys.entry("pad_token_id")
                .or_insert(json!(p.tokenizer.padding_id()));
            if let Some(l) = &p.labels {
                keys.extend(l.config_entries());
            }
        }
        Task::CausalLm => {
            if let Some(eos) = p.tokenizer.eos_id() {
                keys.entry("bos_token_id").or_insert(json!(eos));
                keys.entry("eos_token_id").or_insert(json!(eos));
            }
        }
    }
    Value::Object(keys)
}

/// Trains as `kiln train` does: reads the data, trains or loads the tokenizer, builds
/// (or loads) the model, trains, evaluates, and ends like transformers' example
/// scripts: `save_model()` into `output_dir` and `save_state()`.
///
/// Under an MPI launcher (`mpirun -np N kiln train …`, feature `mpi`) every process runs
/// this as one rank of a data-parallel run ([`crate::dist`]); `cuda` then means
/// `cuda:<local rank>`. A rank that fails prints its error and ends every rank
/// (`MPI_Abort`), so that none waits for it forever.
pub fn train(cfg: &RunConfig, quiet: bool) -> Result<RunSummary> {
    cfg.training.validate()?;
    let dist = crate::dist::from_env(std::time::Duration::from_secs(cfg.training.ddp_timeout))?;
    let result = train_with(cfg, quiet, dist.clone());
    if let Err(e) = &result
        && dist.world_size() > 1
    {
        eprintln!("kiln: rank {} of {}: {e}", dist.rank(), dist.world_size());
        dist.abort(1);
    }
    result
}

fn train_with(
    cfg: &RunConfig,
    quiet: bool,
    dist: Arc<dyn crate::dist::Collective>,
) -> Result<RunSummary> {
    let spec = match cfg.training.device.as_str() {
        "cuda" if dist.world_size() > 1 => format!("cuda:{}", dist.local_rank()),
        // NCCL runs on GPUs only: `auto` would put every rank on cuda:0.
        "auto" if dist.name() == "nccl" => format!("cuda:{}", dist.local_rank()),
        other => other.to_string(),
    };
    let selected = select_device(&spec, &cfg.training)?;
    let device = selected.device.clone();
    let p = prepare(cfg)?;
    let mut rng = Rng::seed_from_u64(cfg.training.seed);
    match p.architecture.as_str() {
        "BertForSequenceClassification" => {
            let model = match &cfg.model.init_from {
                Some(dir) => {
                    BertForSequenceClassification::from_pretrained(dir, &mut rng, &device)?.0
                }
                None => BertForSequenceClassification::new(
                    BertConfig::from_json(&new_model_config(cfg, &p))?,
                    &mut rng,
                    &device,
                )?,
            };
            run_trainer(cfg, p, model, selected.backend, quiet, dist)
        }
        "GPT2LMHeadModel" => {
            let model = match &cfg.model.init_from {
                Some(dir) => Gpt2LMHeadModel::from_pretrained(dir, &mut rng, &device)?.0,
                None => Gpt2LMHeadModel::new(
                    Gpt2Config::from_json(&new_model_config(cfg, &p))?,
                    &mut rng,
                    &device,
                )?,
            };
            run_trainer(cfg, p, model, selected.backend, quiet, dist)
        }
        other => Err(Error::Config(format!(
            "architecture {other:?} is not supported"
        ))),
    }
}

fn run_trainer<M: Model>(
    cfg: &RunConfig,
    p: Prepared,
    model: M,
    backend: &'static dyn kiln_backend::Backend,
    quiet: bool,
    dist: Arc<dyn crate::dist::Collective>,
) -> Result<RunSummary> {
    let rank = dist.rank();
    let train = p
        .train
        .ok_or_else(|| Error::Config("[data] needs train_file".into()))?;
    let mut trainer = Trainer::new(model, cfg.training.clone())
        .with_backend(backend)
        .with_train_dataset(train)
        .with_tokenizer(p.tokenizer.files()?)
        .with_quiet(quiet)
        .with_collective(dist);
    if p.task == Task::SequenceClassification {
        trainer = trainer.with_compute_metrics(accuracy);
    }
    if let Some(eval) = p.eval.clone() {
        trainer = trainer.with_eval_dataset(eval);
    }
    let out = match trainer.train(None) {
        Ok(out) => out,
        // Only rank 0 holds the files; the others' copies are the same weights.
        Err(e) if rank != 0 => return Err(e),
        Err(e) => return Err(emergency_save(&trainer, e)),
    };
    let eval = match p.eval {
        Some(_) => Some(trainer.evaluate()?),
        None => None,
    };
    let output_dir = trainer.save_model(None)?;
    trainer.save_state()?;
    Ok(RunSummary {
        output_dir,
        train: out,
        eval,
        architecture: p.architecture,
        rank,
    })
}

/// After a failed training run, saves the model that is still in memory to a fresh
/// folder under the system's temporary directory (the output folder may be the problem:
/// full, read-only, …) and adds where it went — or that this failed too — to the error.
fn emergency_save<M: Model>(trainer: &Trainer<M>, e: Error) -> Error {
    let step = trainer.state().global_step;
    if step == 0 {
        return e;
    }
    let dir =
        std::env::temp_dir().join(format!("kiln-emergency-{}-step{step}", std::process::id()));
    match trainer.save_model(Some(&dir)) {
        Ok(_) => Error::Config(format!(
            "{e} (the model in memory at step {step} was saved to {})",
            dir.display()
        )),
        Err(e2) => Error::Config(format!(
            "{e} (saving the model in memory to {} failed too: {e2})",
            dir.display()
        )),
    }
}

/// Evaluates the saved model `cfg.model.init_from` on `cfg.data.validation_file`, as
/// `kiln eval` does; returns the `eval_` metrics.
pub fn evaluate(cfg: &RunConfig) -> Result<BTreeMap<String, f64>> {
    if cfg.model.init_from.is_none() {
        return Err(Error::Config(
            "kiln eval needs a saved model: --model DIR".into(),
        ));
    }
    if cfg.data.validation_file.is_none() {
        return Err(Error::Config("kiln eval needs --validation_file".into()));
    }
    // Evaluation reads no training file; the tokenizer and labels come from the model.
    let mut cfg = cfg.clone();
    cfg.data.train_file = None;
    let selected = select_device(&cfg.training.device, &cfg.training)?;
    let device = selected.device.clone();
    let p = prepare(&cfg)?;
    let mut rng = Rng::seed_from_u64(cfg.training.seed);
    let dir = cfg.model.init_from.clone().unwrap_or_default();
    let eval = p
        .eval
        .clone()
        .ok_or_else(|| Error::Config("no validation data".into()))?;
    let mut args = cfg.training.clone();
    args.output_dir = std::env::temp_dir().join("kiln-eval").display().to_string();
    macro_rules! eval_with {
        ($model:expr) => {{
            let mut t = Trainer::new($model, args)
                .with_backend(selected.backend)
                .with_eval_dataset(eval)
                .with_quiet(true);
            if p.task == Task::SequenceClassification {
                t = t.with_compute_metrics(accuracy);
            }
            t.evaluate()
        }};
    }
    match p.architecture.as_str() {
        "BertForSequenceClassification" => {
            eval_with!(BertForSequenceClassification::from_pretrained(&dir, &mut rng, &device)?.0)
        }
        "GPT2LMHeadModel" => {
            eval_with!(Gpt2LMHeadModel::from_pretrained(&dir, &mut rng, &device)?.0)
        }
        other => Err(Error::Config(format!(
            "architecture {other:?} is not supported"
        ))),
    }
}

/// Runs a saved model on texts, as `kiln predict` does: for a classifier
/// `{"input_ids", "logits", "predictions"}`; for GPT-2 `{"input_ids", "logits"}` (of the
/// last position) and, with `max_new_tokens`, greedily generated text under
/// `"generated"`.
pub fn predict(
    dir: &Path,
    texts: &[String],
    max_new_tokens: Option<usize>,
    device_spec: &str,
) -> Result<Value> {
    if texts.is_empty() {
        return Err(Error::Config("give at least one --text".into()));
    }
    let config = kiln_checkpoint::model::read_config(dir)?;
    let architecture = config["architectures"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let tokenizer = Tokenizer::from_dir(dir)?;
    let device = device(device_spec)?;
    let mut rng = Rng::seed_from_u64(0);
    let encoded: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| {
            tokenizer
                .encode(t, tokenizer.model_max_length())
                .map(|e| e.input_ids)
        })
        .collect::<Result<_>>()?;
    let as_batch = |ids: &[u32]| -> Result<Batch> {
        Ok(Batch {
            input_ids: Tensor::new(ids, &device)?.unsqueeze(0)?,
            attention_mask: None,
            token_type_ids: None,
            labels: None,
        })
    };
    let to_f32 = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?)
    };
    match architecture.as_str() {
        "BertForSequenceClassification" => {
            let (model, _) =
                BertForSequenceClassification::from_pretrained(dir, &mut rng, &device)?;
            let labels = Labels::from_config(&config).ok();
            let mut logits = Vec::new();
            let mut predictions = Vec::new();
            for ids in &encoded {
                let l = to_f32(&model.forward(&as_batch(ids)?, None)?.logits)?;
                let best = l
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i)
                    .unwrap_or(0);
                let name = labels
                    .as_ref()
                    .and_then(|l| l.id2label().get(best).cloned());
                predictions.push(name.map(Value::String).unwrap_or(json!(best)));
                logits.push(l);
            }
            Ok(json!({"input_ids": encoded, "logits": logits, "predictions": predictions}))
        }
        "GPT2LMHeadModel" => {
            let (model, _) = Gpt2LMHeadModel::from_pretrained(dir, &mut rng, &device)?;
            let mut logits = Vec::new();
            let mut generated = Vec::new();
            for ids in &encoded {
                let out = model.forward(&as_batch(ids)?, None)?.logits;
                let t = out.dim(1)?;
                logits.push(to_f32(&out.narrow(1, t - 1, 1)?)?);
                if let Some(n) = max_new_tokens {
                    let ids_t = Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?;
                    let all: Vec<u32> =
                        model.generate_greedy(&ids_t, n)?.flatten_all()?.to_vec1()?;
                    generated.push(tokenizer.decode(&all, true)?);
                }
            }
            let mut v = json!({"input_ids": encoded, "logits": logits});
            if max_new_tokens.is_some() {
                v["generated"] = json!(generated);
            }
            Ok(v)
        }
        other => Err(Error::Config(format!(
            "{}: architecture {other:?} is not supported",
            dir.display()
        ))),
    }
}

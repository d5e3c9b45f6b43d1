//! Whole runs as the `kiln` command drives them: `kiln train`, `kiln eval` and
//! `kiln predict` are thin wrappers around [`train`], [`evaluate`] and [`predict`].
//!
//! The architecture is `[model] architecture`, or the first of `architectures` in the
//! `config.json` of `init_from`, resolved through [`kiln_models::registry`]: its task
//! decides how the data is read and what `predict` prints, its tokenizer family which
//! tokenizer is trained when the model folder brings none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use kiln_checkpoint::lock::OutputDirLock;
use kiln_data::tokenize::{Tokenizer, TokenizerKind, TokenizerTrainer};
use kiln_data::{CollatedDataset, Collator, Dataset, Labels, RawData};
use kiln_dist::Collective;
use kiln_models::registry::{self, Architecture, TaskModel};
use kiln_trainer::args::LogLevel;
use kiln_trainer::model::{Batch, Model};
use kiln_trainer::rng::Rng;
use kiln_trainer::stop::StopRequest;
use kiln_trainer::{BatchSource, Task, TrainOutput, Trainer, TrainingArguments, accuracy};
use serde_json::{Value, json};

use crate::config::RunConfig;
use crate::error::{Error, Result};

/// The device `spec` names (`auto`, `cpu`, `cuda`, `cuda:1`, `metal`), chosen through
/// the backend registry: only backends linked into the program are found, and an
/// unavailable one is an error that says why.
pub fn device(spec: &str) -> Result<Device> {
    Ok(kiln_backend::resolve(spec)?)
}

/// The device `args.device` names, with its backend, once the backend is known to
/// compute in the dtype of `bf16`/`fp16` (checked before any work).
fn select_device(spec: &str, args: &TrainingArguments) -> Result<kiln_backend::Selected> {
    let selected = kiln_backend::select(spec)?;
    kiln_trainer::precision::check_device(selected.backend, args)?;
    Ok(selected)
}

/// What [`train`] did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Where the model was saved.
    pub output_dir: PathBuf,
    /// The training result (`None` when `do_train` was not among the stages set).
    pub train: Option<TrainOutput>,
    /// The final evaluation, when there is validation data (or `do_eval`).
    pub eval: Option<BTreeMap<String, f64>>,
    /// Whether `predict_results.txt` was written (`do_predict`).
    pub predicted: bool,
    /// The architecture trained.
    pub architecture: String,
    /// This process's rank (0 alone).
    pub rank: usize,
}

/// Everything a run needs before training: data, tokenizer and the model's config.
struct Prepared {
    architecture: &'static Architecture,
    tokenizer: Tokenizer,
    train: Option<Arc<CollatedDataset>>,
    eval: Option<Arc<CollatedDataset>>,
    test: Option<Arc<CollatedDataset>>,
    labels: Option<Labels>,
}

/// The registered architecture a run config names (or its `init_from` folder's), and
/// that folder's `config.json`.
fn resolve_architecture(cfg: &RunConfig) -> Result<(&'static Architecture, Option<Value>)> {
    // An adapter folder's architecture and config are its base model's.
    let config_dir = match &cfg.model.init_from {
        Some(dir) if kiln_peft::folder::is_adapter(Path::new(dir)) => Some(adapter_base(cfg, dir)?),
        Some(dir) => Some(PathBuf::from(dir)),
        None => None,
    };
    let init_config = match &config_dir {
        Some(dir) => Some(kiln_checkpoint::model::read_config(dir)?),
        None => None,
    };
    let name = match (&cfg.model.architecture, &init_config, &config_dir) {
        (Some(name), _, _) => name.clone(),
        (None, Some(c), Some(dir)) => registry::folder_architecture(c, dir)?,
        _ => {
            return Err(Error::Config(
                "[model] needs architecture (or init_from)".into(),
            ));
        }
    };
    Ok((registry::find(&name)?, init_config))
}

/// The base model folder of the adapter folder `dir`: `--base`, else its
/// `base_model_name_or_path`.
fn adapter_base(cfg: &RunConfig, dir: &str) -> Result<PathBuf> {
    Ok(kiln_peft::folder::base_dir(
        Path::new(dir),
        cfg.base.as_deref().map(Path::new),
    )?)
}

/// The folder whose tokenizer a run uses: `init_from` when it has one (an adapter
/// folder kiln saved has), else an adapter's base model, else `tokenizer_name`.
fn tokenizer_dir(cfg: &RunConfig) -> Result<Option<PathBuf>> {
    let has = |d: &Path| d.join("tokenizer.json").exists();
    if let Some(dir) = &cfg.model.init_from {
        let dir = Path::new(dir);
        if has(dir) {
            return Ok(Some(dir.to_path_buf()));
        }
        if kiln_peft::folder::is_adapter(dir) {
            let base = adapter_base(cfg, &dir.display().to_string())?;
            if has(&base) {
                return Ok(Some(base));
            }
        }
    }
    Ok(cfg
        .data
        .tokenizer_name
        .as_ref()
        .map(PathBuf::from)
        .filter(|d| has(d)))
}

fn prepare(cfg: &RunConfig) -> Result<Prepared> {
    let (architecture, init_config) = resolve_architecture(cfg)?;
    prepare_with(cfg, architecture, init_config)
}

/// [`prepare`] for an architecture already resolved ([`resolve_architecture`]).
fn prepare_with(
    cfg: &RunConfig,
    architecture: &'static Architecture,
    init_config: Option<Value>,
) -> Result<Prepared> {
    let task = architecture.task;
    let raw = RawData::read(&cfg.data, task)?;
    let tokenizer = match tokenizer_dir(cfg)? {
        Some(dir) => Tokenizer::from_dir(&dir)?,
        None => {
            let kind = TokenizerKind::for_architecture(architecture.tokenizer).ok_or_else(|| {
                Error::Config(format!(
                    "{} asks for a {:?} tokenizer, which kiln cannot train; give one with tokenizer_name",
                    architecture.name, architecture.tokenizer
                ))
            })?;
            TokenizerTrainer::new(kind, cfg.data.vocab_size).train(raw.train_texts())?
        }
    };
    let tokenizer = match &cfg.data.chat_template_path {
        Some(path) => tokenizer.with_chat_template(read_chat_template(Path::new(path))?),
        None => tokenizer,
    };
    let labels = match &init_config {
        Some(c) if task == Task::SequenceClassification && c.get("id2label").is_some() => {
            Some(Labels::from_config(c)?)
        }
        _ => None,
    };
    let data = raw.tokenize(&tokenizer, &cfg.data, labels)?;
    // Causal-LM batches are padded on the right whatever the tokenizer's padding_side
    // (TRL's collator does the same): labels of padding are -100 either way.
    let collator = Collator::for_tokenizer(&tokenizer)
        .with_pad_left(task == Task::SequenceClassification && tokenizer.pads_left());
    let wrap = |d: Option<Dataset>| d.map(|d| Arc::new(CollatedDataset::new(d, collator.clone())));
    Ok(Prepared {
        architecture,
        train: wrap(data.train),
        eval: wrap(data.validation),
        test: wrap(data.test),
        labels: data.labels,
        tokenizer,
    })
}

/// The chat template at `path` (`data.chat_template_path`): a template file, or a
/// tokenizer folder with `chat_template.jinja` or a `chat_template` in its
/// `tokenizer_config.json`.
fn read_chat_template(path: &Path) -> Result<String> {
    let file = if path.is_dir() {
        let jinja = path.join(kiln_data::tokenize::CHAT_TEMPLATE_FILE);
        if !jinja.exists() {
            let config = path.join(kiln_data::tokenize::TOKENIZER_CONFIG_FILE);
            let text = std::fs::read(&config).map_err(|e| {
                Error::Config(format!("chat_template_path {}: {e}", config.display()))
            })?;
            let value: Value = serde_json::from_slice(&text)
                .map_err(|e| Error::Config(format!("{}: {e}", config.display())))?;
            return value
                .get("chat_template")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "chat_template_path {}: no chat_template.jinja and no chat_template in \
                         tokenizer_config.json",
                        path.display()
                    ))
                });
        }
        jinja
    } else {
        path.to_path_buf()
    };
    std::fs::read_to_string(&file)
        .map_err(|e| Error::Config(format!("chat_template_path {}: {e}", file.display())))
}

/// The `config.json` of a new model: the `[model]` keys, the tokenizer's vocabulary and
/// special ids, and the labels.
fn new_model_config(cfg: &RunConfig, p: &Prepared) -> Value {
    let mut keys = cfg.model.keys.clone();
    keys.insert("vocab_size".into(), json!(p.tokenizer.vocab_size()));
    match p.architecture.task {
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

/// The `[model]` keys that override a loaded folder's config: the user's keys, and for
/// a classifier the labels of the data when the folder has none of its own.
fn init_overrides(cfg: &RunConfig, p: &Prepared) -> serde_json::Map<String, Value> {
    let mut keys = cfg.model.keys.clone();
    if p.architecture.task == Task::SequenceClassification
        && !keys.contains_key("num_labels")
        && !keys.contains_key("id2label")
        && let Some(l) = &p.labels
    {
        keys.extend(l.config_entries());
    }
    keys
}

/// Trains as `kiln train` does: reads the data, trains or loads the tokenizer, builds
/// (or loads) the model, trains, evaluates, and ends like transformers' example
/// scripts: `save_model()` into `output_dir` and `save_state()`.
///
/// Under a launcher (`mpirun -np N kiln train …` with feature `mpi`, torchrun with
/// `cuda`) every process runs this as one rank of a data-parallel run (kiln-dist);
/// `cuda` then means `cuda:<local rank>`. A rank that fails prints its error and ends
/// every rank, so that none waits for it forever; a panicking rank does too.
pub fn train(cfg: &RunConfig, quiet: bool) -> Result<RunSummary> {
    train_until(cfg, quiet, None)
}

/// [`train`], stopping early with a checkpoint when `stop` is set (the `kiln` command
/// sets it on SIGTERM and SIGINT: [`install_stop_signals`]). A stopped run is
/// `kiln_trainer::Error::Stopped` on every rank, none aborting the others.
pub fn train_until(cfg: &RunConfig, quiet: bool, stop: Option<StopRequest>) -> Result<RunSummary> {
    cfg.training.validate()?;
    let options = kiln_dist::Options::new(std::time::Duration::from_secs(cfg.training.ddp_timeout))
        .with_abort_on_panic(true);
    let dist = kiln_dist::from_env(&options)?;
    let result = train_with(cfg, quiet, dist.clone(), stop);
    let stopped = matches!(&result, Err(Error::Trainer(e)) if matches!(**e, kiln_trainer::Error::Stopped { .. }));
    if let Err(e) = &result
        && dist.world_size() > 1
        && !stopped
    {
        eprintln!("kiln: rank {} of {}: {e}", dist.rank(), dist.world_size());
        dist.abort(1);
    }
    result
}

/// Makes SIGTERM and SIGINT ask the run to stop ([`kiln_trainer::stop`]); a second one
/// exits at once with 128 + the signal (the commit protocol keeps checkpoints whole).
pub fn install_stop_signals() -> Result<StopRequest> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = StopRequest::new();
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fail = |e: std::io::Error| Error::Config(format!("cannot install signal handlers: {e}"));
    for signal in [SIGTERM, SIGINT] {
        // The order matters: the exit is armed by the first signal, acted on by the second.
        signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, armed.clone())
            .map_err(fail)?;
        signal_hook::flag::register_usize(signal, stop.flag(), signal as usize).map_err(fail)?;
        signal_hook::flag::register(signal, armed.clone()).map_err(fail)?;
    }
    Ok(stop)
}

fn train_with(
    cfg: &RunConfig,
    quiet: bool,
    dist: Arc<dyn Collective>,
    stop: Option<StopRequest>,
) -> Result<RunSummary> {
    let spec = match cfg.training.device_spec() {
        "cuda" if dist.world_size() > 1 => format!("cuda:{}", dist.local_rank()),
        // NCCL runs on GPUs only: `auto` would put every rank on cuda:0.
        "auto" if dist.name() == "nccl" => format!("cuda:{}", dist.local_rank()),
        other => other.to_string(),
    };
    // A device that cannot do what the run asks, or an architecture that is not
    // registered, is refused before anything is written.
    let selected = select_device(&spec, &cfg.training)?;
    let main = dist.rank() == 0;
    let say = |level: LogLevel, line: &str| {
        if !quiet && main && cfg.training.prints(level, true) {
            eprintln!("{line}");
        }
    };
    for n in cfg.notices.iter().chain(&cfg.training.notes()) {
        say(LogLevel::Warning, &format!("note: {n}"));
    }
    let (architecture, init_config) = resolve_architecture(cfg)?;
    let stages = Stages::of(cfg, architecture.task)?;
    let device = selected.device.clone();
    // The run owns its output_dir from before any work to the end (the model saved):
    // rank 0 holds the lock, or with save_on_each_node the first process of each node.
    let writes = if cfg.training.save_on_each_node {
        dist.local_rank() == 0
    } else {
        dist.rank() == 0
    };
    let _lock = match writes {
        true => Some(OutputDirLock::acquire(Path::new(&cfg.training.output_dir))?),
        false => None,
    };
    let p = prepare_with(cfg, architecture, init_config)?;
    let mut rng = Rng::seed_from_u64(cfg.training.seed);
    let adapter_dir = cfg
        .model
        .init_from
        .as_deref()
        .filter(|d| kiln_peft::folder::is_adapter(Path::new(d)));
    // peft's print_trainable_parameters line, for a LoRA run.
    let mut counts = None;
    let model: Box<dyn TaskModel> = match (&cfg.model.init_from, adapter_dir) {
        (_, Some(dir)) => {
            check_adapter_init(cfg, dir)?;
            let base = adapter_base(cfg, dir)?;
            let overrides = init_overrides(cfg, &p);
            let peft = kiln_peft::folder::load_with(
                Path::new(dir),
                Some(&base),
                &overrides,
                &mut rng,
                &device,
            )?
            .model;
            counts = Some(peft.counts());
            Box::new(peft)
        }
        (Some(dir), None) => {
            let loaded = registry::load_with(
                p.architecture,
                Path::new(dir),
                &init_overrides(cfg, &p),
                &mut rng,
                &device,
            )?;
            for note in &loaded.notes {
                say(LogLevel::Info, &format!("note: {note}"));
            }
            loaded.model
        }
        (None, None) => (p.architecture.build)(&new_model_config(cfg, &p), &mut rng, &device)?,
    };
    let model = match (adapter_dir, cfg.peft.enabled()) {
        (None, true) => {
            let lora = cfg.peft.lora_config()?;
            let base_dir = cfg.model.init_from.clone();
            let peft =
                kiln_peft::PeftModel::new(model, lora, p.architecture.task, base_dir, &mut rng)?;
            counts = Some(peft.counts());
            Box::new(peft)
        }
        _ => model,
    };
    if let Some(c) = counts {
        say(LogLevel::Info, &c.to_string());
    }
    let rank = dist.rank();
    let mut trainer = Trainer::new(model, cfg.training.clone())
        .with_backend(selected.backend)
        .with_tokenizer(p.tokenizer.files()?)
        .with_quiet(quiet)
        .with_collective(dist);
    if let Some(stop) = stop {
        trainer = trainer.with_stop_request(stop);
    }
    if p.architecture.task == Task::SequenceClassification {
        trainer = trainer.with_compute_metrics(accuracy);
    }
    if let Some(train) = p.train.clone() {
        trainer = trainer.with_train_dataset(train);
    }
    if let Some(eval) = p.eval.clone() {
        trainer = trainer.with_eval_dataset(eval);
    }
    let out = match stages.train {
        false => None,
        true => match trainer.train(None) {
            Ok(out) => Some(out),
            // Only rank 0 holds the files; the others' copies are the same weights.
            Err(e) if rank != 0 => return Err(e.into()),
            // Stopped on a signal: the checkpoint of the step reached is saved.
            Err(e @ kiln_trainer::Error::Stopped { .. }) => return Err(e.into()),
            Err(e) => return Err(emergency_save(&trainer, e)),
        },
    };
    let eval = match stages.eval {
        true => Some(trainer.evaluate()?),
        false => None,
    };
    let output_dir = PathBuf::from(&cfg.training.output_dir);
    if let Some(out) = &out {
        trainer.save_model(None)?;
        trainer.save_state()?;
        if main {
            let mut metrics = out.metrics.clone();
            if let Some(train) = &p.train {
                metrics.insert("train_samples".into(), train.len() as f64);
            }
            crate::results::save_metrics(&output_dir, "train", &metrics)?;
        }
    }
    if let (Some(metrics), true) = (&eval, main) {
        let mut metrics = metrics.clone();
        if let Some(eval) = &p.eval {
            metrics.insert("eval_samples".into(), eval.len() as f64);
        }
        // run_clm.py's perplexity.
        if let (Task::CausalLm, Some(loss)) = (p.architecture.task, metrics.get("eval_loss")) {
            metrics.insert("perplexity".into(), loss.exp());
        }
        crate::results::save_metrics(&output_dir, "eval", &metrics)?;
    }
    if stages.predict {
        let test = p
            .test
            .clone()
            .ok_or_else(|| Error::Config("do_predict needs test_file".into()))?;
        let logits = trainer.predict(test.as_ref())?.logits;
        if main {
            let rows = logits
                .to_dtype(candle_core::DType::F32)
                .and_then(|t| t.to_vec2::<f32>())
                .map_err(kiln_models::Error::from)?;
            crate::results::save_predictions(&output_dir, &trainer.model().config(), &rows)?;
        }
    }
    Ok(RunSummary {
        output_dir,
        train: out,
        eval,
        predicted: stages.predict,
        architecture: p.architecture.name.to_string(),
        rank,
    })
}

/// The stages of `kiln train`, as transformers' example scripts read `do_train`,
/// `do_eval` and `do_predict`: none set means train, then evaluate when there is
/// validation data (kiln's default run); otherwise the stages set (`do_eval` also
/// when `eval_strategy` is not `no`, as transformers sets it).
#[derive(Clone, Copy, Debug)]
struct Stages {
    train: bool,
    eval: bool,
    predict: bool,
}

impl Stages {
    /// Checked against the data before any work: a stage needs its file.
    fn of(cfg: &RunConfig, task: Task) -> Result<Stages> {
        let a = &cfg.training;
        let chosen = a.do_train || a.do_eval || a.do_predict;
        let has_eval = cfg.data.validation_file.is_some();
        let stages = match chosen {
            false => Stages {
                train: true,
                eval: has_eval,
                predict: false,
            },
            true => Stages {
                train: a.do_train,
                eval: a.do_eval || a.eval_strategy != kiln_trainer::args::Strategy::No,
                predict: a.do_predict,
            },
        };
        if stages.train && cfg.data.train_file.is_none() {
            return Err(Error::Config("[data] needs train_file".into()));
        }
        if stages.eval && !has_eval {
            return Err(Error::Config(
                "do_eval (or an eval_strategy other than no) needs validation_file".into(),
            ));
        }
        if stages.predict {
            if task != Task::SequenceClassification {
                return Err(Error::Config(
                    "do_predict writes the classes a classifier predicts for test_file; for a causal LM, \
                     evaluate test_file with kiln eval --validation_file, or generate with kiln predict"
                        .into(),
                ));
            }
            if cfg.data.test_file.is_none() {
                return Err(Error::Config("do_predict needs test_file".into()));
            }
        }
        Ok(stages)
    }
}

/// `init_from` is an adapter folder: its `adapter_config.json` decides the LoRA
/// options, so a `[peft]` table beside it is refused (`[model]` keys apply to its base
/// model, as to any folder).
fn check_adapter_init(cfg: &RunConfig, dir: &str) -> Result<()> {
    if cfg.peft.use_peft == Some(false) {
        return Err(Error::Config(format!(
            "init_from {dir} is a LoRA adapter and use_peft is false: to train every weight, merge it first \
             (kiln merge {dir} MERGED) and fine-tune MERGED"
        )));
    }
    if !cfg.peft.keys.is_empty() {
        return Err(Error::Config(format!(
            "init_from {dir} is a LoRA adapter: its adapter_config.json sets the LoRA options; leave out [peft] \
             and the --lora_* flags"
        )));
    }
    Ok(())
}

/// After a failed training run, saves the model that is still in memory to a fresh
/// folder under the system's temporary directory (the output folder may be the problem:
/// full, read-only, …) and adds where it went — or that this failed too — to the error.
fn emergency_save<M: Model>(trainer: &Trainer<M>, e: kiln_trainer::Error) -> Error {
    let step = trainer.state().global_step;
    // A checkpoint that cannot be resumed fails before any step: nothing to save.
    if step == 0 || matches!(e, kiln_trainer::Error::Resume { .. }) {
        return e.into();
    }
    let dir =
        std::env::temp_dir().join(format!("kiln-emergency-{}-step{step}", std::process::id()));
    let note = match trainer.save_model(Some(&dir)) {
        Ok(_) => format!(
            "the model in memory at step {step} was saved to {}",
            dir.display()
        ),
        Err(e2) => format!(
            "saving the model in memory to {} failed too: {e2}",
            dir.display()
        ),
    };
    Error::Interrupted {
        source: Box::new(e.into()),
        note,
    }
}

/// Evaluates the saved model `cfg.model.init_from` on `cfg.data.validation_file`, as
/// `kiln eval` does; returns the `eval_` metrics.
pub fn evaluate(cfg: &RunConfig) -> Result<BTreeMap<String, f64>> {
    let Some(dir) = cfg.model.init_from.clone() else {
        return Err(Error::Config(
            "kiln eval needs a saved model: --model DIR".into(),
        ));
    };
    if cfg.data.validation_file.is_none() {
        return Err(Error::Config("kiln eval needs --validation_file".into()));
    }
    // Evaluation reads no training file; the tokenizer and labels come from the model.
    let mut cfg = cfg.clone();
    cfg.data.train_file = None;
    let selected = select_device(cfg.training.device_spec(), &cfg.training)?;
    let device = selected.device.clone();
    let p = prepare(&cfg)?;
    let mut rng = Rng::seed_from_u64(cfg.training.seed);
    let eval = p
        .eval
        .clone()
        .ok_or_else(|| Error::Config("no validation data".into()))?;
    let mut args = cfg.training.clone();
    args.output_dir = std::env::temp_dir().join("kiln-eval").display().to_string();
    let model = load_any(
        Path::new(&dir),
        cfg.base.as_deref().map(Path::new),
        &mut rng,
        &device,
    )?
    .0;
    let mut t = Trainer::new(model, args)
        .with_backend(selected.backend)
        .with_eval_dataset(eval)
        .with_quiet(true);
    if p.architecture.task == Task::SequenceClassification {
        t = t.with_compute_metrics(accuracy);
    }
    Ok(t.evaluate()?)
}

/// Runs a saved model on texts, as `kiln predict` does: for a classifier
/// `{"input_ids", "logits", "predictions"}`; for a causal LM `{"input_ids", "logits"}`
/// (of the last position) and, with `max_new_tokens`, greedily generated text under
/// `"generated"`.
pub fn predict(
    dir: &Path,
    base: Option<&Path>,
    texts: &[String],
    max_new_tokens: Option<usize>,
    device_spec: &str,
) -> Result<Value> {
    if texts.is_empty() {
        return Err(Error::Config("give at least one --text".into()));
    }
    let device = device(device_spec)?;
    let mut rng = Rng::seed_from_u64(0);
    let (model, architecture, config_dir) = load_any(dir, base, &mut rng, &device)?;
    let config = kiln_checkpoint::model::read_config(&config_dir)?;
    let tokenizer = match dir.join("tokenizer.json").exists() {
        true => Tokenizer::from_dir(dir)?,
        false => Tokenizer::from_dir(&config_dir)?,
    };
    let encoded: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| {
            tokenizer
                .encode(t, tokenizer.model_max_length())
                .map(|e| e.input_ids)
        })
        .collect::<kiln_data::Result<_>>()?;
    match architecture.task {
        Task::SequenceClassification => classify(model.as_ref(), &config, &encoded, &device),
        Task::CausalLm => continue_texts(
            model.as_ref(),
            &tokenizer,
            &encoded,
            max_new_tokens,
            &device,
        ),
    }
}

/// A saved model folder, or an adapter folder on its base model (`base`, else its
/// `base_model_name_or_path`); with the folder holding the model's `config.json`.
fn load_any(
    dir: &Path,
    base: Option<&Path>,
    rng: &mut Rng,
    device: &Device,
) -> Result<(Box<dyn TaskModel>, &'static Architecture, PathBuf)> {
    if kiln_peft::folder::is_adapter(dir) {
        let loaded = kiln_peft::folder::load(dir, base, rng, device)?;
        return Ok((Box::new(loaded.model), loaded.architecture, loaded.base_dir));
    }
    let config = kiln_checkpoint::model::read_config(dir)?;
    let architecture = registry::find(&registry::folder_architecture(&config, dir)?)?;
    let (model, _) = (architecture.load)(dir, rng, device)?;
    Ok((model, architecture, dir.to_path_buf()))
}

/// `kiln merge`: the adapter folder `dir` merged into its base model (`base`, else its
/// `base_model_name_or_path`), saved to `out` as a full model folder that
/// `from_pretrained` loads, with the tokenizer (the adapter's, else the base's).
pub fn merge(dir: &Path, out: &Path, base: Option<&Path>) -> Result<PathBuf> {
    if !kiln_peft::folder::is_adapter(dir) {
        return Err(Error::Config(format!(
            "{} is not an adapter folder (no adapter_config.json, or a config.json beside it)",
            dir.display()
        )));
    }
    if out.exists() && std::fs::canonicalize(out).ok() == std::fs::canonicalize(dir).ok() {
        return Err(Error::Config(format!(
            "kiln merge would write the merged model over the adapter in {}; give another OUTPUT",
            dir.display()
        )));
    }
    let mut rng = Rng::seed_from_u64(0);
    let loaded = kiln_peft::folder::load(dir, base, &mut rng, &Device::Cpu)?;
    let tokenizer = [dir, loaded.base_dir.as_path()]
        .into_iter()
        .find(|d| d.join("tokenizer.json").exists())
        .map(Tokenizer::from_dir)
        .transpose()?;
    let merged = loaded.model.merge_and_unload()?;
    let export = kiln_trainer::weights::export(&merged)?;
    let mut save = export.model_save();
    if let Some(t) = &tokenizer {
        for (name, bytes) in t.files()? {
            save = save.with_tokenizer_file(name, bytes);
        }
    }
    kiln_checkpoint::model::save_pretrained(out, &save, &Default::default())?;
    Ok(out.to_path_buf())
}

/// One text as a batch of one.
fn as_batch(ids: &[u32], device: &Device) -> Result<Batch> {
    Ok(Batch {
        input_ids: Tensor::new(ids, device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(kiln_models::Error::from)?,
        attention_mask: None,
        token_type_ids: None,
        labels: None,
    })
}

fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()
        .and_then(|t| t.to_dtype(candle_core::DType::F32))
        .and_then(|t| t.to_vec1())
        .map_err(kiln_models::Error::from)?)
}

/// A classifier's logits and predicted label for every text.
fn classify(
    model: &dyn TaskModel,
    config: &Value,
    encoded: &[Vec<u32>],
    device: &Device,
) -> Result<Value> {
    let labels = Labels::from_config(config).ok();
    let mut logits = Vec::new();
    let mut predictions = Vec::new();
    for ids in encoded {
        let out = model
            .forward(&as_batch(ids, device)?, None)
            .map_err(kiln_models::Error::from)?;
        let l = to_f32(&out.logits)?;
        let best = l
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0);
        // Names only when the config's labels are the model's (an adapter trained on
        // new labels has a head of another size than its base's config names).
        let name = labels
            .as_ref()
            .filter(|lab| lab.id2label().len() == l.len())
            .and_then(|lab| lab.id2label().get(best).cloned());
        predictions.push(name.map(Value::String).unwrap_or(json!(best)));
        logits.push(l);
    }
    Ok(json!({"input_ids": encoded, "logits": logits, "predictions": predictions}))
}

/// A language model's last-position logits for every text, and its greedy
/// continuation when `max_new_tokens` is given.
fn continue_texts(
    model: &dyn TaskModel,
    tokenizer: &Tokenizer,
    encoded: &[Vec<u32>],
    max_new_tokens: Option<usize>,
    device: &Device,
) -> Result<Value> {
    let candle = |e: candle_core::Error| Error::from(kiln_models::Error::from(e));
    let mut logits = Vec::new();
    let mut generated = Vec::new();
    for ids in encoded {
        // An empty text starts from BOS, as `generate` does without input ids.
        let bos;
        let ids = if ids.is_empty() {
            bos = [tokenizer.special_token_id("bos_token").ok_or_else(|| {
                Error::Config(
                    "--text is empty and the tokenizer has no BOS token to start from; give some text"
                        .into(),
                )
            })?];
            &bos[..]
        } else {
            ids
        };
        let out = model
            .forward(&as_batch(ids, device)?, None)
            .map_err(candle)?
            .logits;
        let t = out.dim(1).map_err(candle)?;
        logits.push(to_f32(&out.narrow(1, t - 1, 1).map_err(candle)?)?);
        if let Some(n) = max_new_tokens {
            let prompt = as_batch(ids, device)?.input_ids;
            let all: Vec<u32> = model
                .generate_greedy(&prompt, n)
                .and_then(|t| t.flatten_all()?.to_vec1())
                .map_err(candle)?;
            generated.push(tokenizer.decode(&all, true)?);
        }
    }
    let mut v = json!({"input_ids": encoded, "logits": logits});
    if max_new_tokens.is_some() {
        v["generated"] = json!(generated);
    }
    Ok(v)
}

//! `TrainingArguments`: transformers' field names, defaults and validation (5.x, with
//! 4.57's `warmup_ratio` still accepted), plus kiln's `device`, `async_save`, `on_save_error`, `save_on_signal` and `zero_stage`.
//!
//! `bf16` and `fp16` train in mixed precision as transformers does: f32 master weights
//! that the optimizer updates and checkpoints hold, the forward and backward passes in
//! the 16-bit dtype, dynamic loss scaling for fp16 (see [`crate::precision`]). The
//! device must support the dtype (`kiln backends` lists what each one offers).
//!
//! Every field can be set by name from text (`args.set("save_steps", "10")`), which is
//! how `kiln train --save_steps 10` and the `[training]` table of a config reach it.
//! The values some fields take are in `values`, activation checkpointing's options in
//! `checkpointing`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};
use kiln_optim::{OptimKind, Schedule};

mod checkpointing;
mod values;

pub use values::{LogLevel, SamplingStrategy, SaveErrorPolicy, Strategy, TokensSeen};

/// The arguments of a training run, as transformers' `TrainingArguments` names them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingArguments {
    /// Where checkpoints and the final model go.
    pub output_dir: String,
    /// Allow training into an `output_dir` that already holds checkpoints (they are
    /// kept; new saves replace those of the same step).
    pub overwrite_output_dir: bool,
    /// Epochs to train (ignored when `max_steps` > 0).
    pub num_train_epochs: f64,
    /// Optimizer steps to train; -1 means "from num_train_epochs".
    pub max_steps: i64,
    /// Training batch size per device.
    pub per_device_train_batch_size: usize,
    /// Evaluation batch size per device.
    pub per_device_eval_batch_size: usize,
    /// Micro-batches accumulated per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Initial learning rate.
    pub learning_rate: f64,
    /// Decoupled weight decay (not applied to biases and normalisation weights).
    pub weight_decay: f64,
    /// AdamW beta1.
    pub adam_beta1: f64,
    /// AdamW beta2.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_epsilon: f64,
    /// Gradient clipping by global norm; 0 disables it.
    pub max_grad_norm: f64,
    /// `adamw` (also accepted: `adamw_torch`, `adamw_torch_fused`) or `sgd`.
    pub optim: String,
    /// A name from [`Schedule::NAMES`].
    pub lr_scheduler_type: String,
    /// Extra parameters of the schedule.
    pub lr_scheduler_kwargs: Map<String, Value>,
    /// Warmup steps; a value below 1 is a ratio of the total steps (transformers 5).
    pub warmup_steps: f64,
    /// Warmup as a ratio of the total steps (transformers 4; used when warmup_steps is 0).
    pub warmup_ratio: f64,
    /// When to log.
    pub logging_strategy: Strategy,
    /// Log every N steps (a value below 1 is a ratio of max_steps).
    pub logging_steps: f64,
    /// Also log after the first step.
    pub logging_first_step: bool,
    /// When to evaluate.
    pub eval_strategy: Strategy,
    /// Evaluate every N steps (default: logging_steps).
    pub eval_steps: Option<f64>,
    /// No evaluation before this many steps (or epochs, with the epoch strategy).
    pub eval_delay: f64,
    /// When to save checkpoints.
    pub save_strategy: Strategy,
    /// Save every N steps (a value below 1 is a ratio of max_steps).
    pub save_steps: f64,
    /// Keep at most this many checkpoints (never deleting the best nor the newest).
    pub save_total_limit: Option<usize>,
    /// Checkpoints hold the model only (no optimizer, scheduler, RNG, data state):
    /// smaller, but a run cannot resume from them exactly.
    pub save_only_model: bool,
    /// Weights as safetensors (else PyTorch `.bin`).
    pub save_safetensors: bool,
    /// In multi-node runs, save on the main process of every node (local rank 0), for
    /// nodes that do not share a file system; on one node it changes nothing.
    pub save_on_each_node: bool,
    /// Load the best checkpoint's weights at the end of training.
    pub load_best_model_at_end: bool,
    /// The metric that decides the best checkpoint (`eval_` prefix optional).
    pub metric_for_best_model: Option<String>,
    /// Whether a larger metric is better (default: unless the name ends in "loss").
    pub greater_is_better: Option<bool>,
    /// Seed of initialisation and dropout.
    pub seed: u64,
    /// Seed of data shuffling (default: `seed`).
    pub data_seed: Option<u64>,
    /// `last` (the newest complete checkpoint in output_dir) or a checkpoint folder.
    pub resume_from_checkpoint: Option<String>,
    /// On resume, do not skip the batches already seen in the current epoch.
    pub ignore_data_skip: bool,
    /// Drop the last incomplete batch of each epoch.
    pub dataloader_drop_last: bool,
    /// No progress bar (it is also off when stderr is not a terminal).
    pub disable_tqdm: bool,
    /// The run's name (transformers gives it to its trackers); default `output_dir`
    /// ([`TrainingArguments::run_name`]). Saved with the arguments.
    pub run_name: Option<String>,
    /// Evaluate once before the first step (at the step training starts from, also
    /// when resuming), as a sanity check of the evaluation.
    pub eval_on_start: bool,
    /// Count the training tokens the model took (`all`: every position of
    /// `input_ids`; `non_padding`: the attention mask's ones; `no`); `true`/`false`
    /// mean `all`/`no`. The count goes into `num_input_tokens_seen` of every log entry
    /// and the state, summed over ranks, with `train_tokens_per_second` in train logs.
    pub include_num_input_tokens_seen: TokensSeen,
    /// A non-finite training loss is logged as the mean of the logged interval's other
    /// steps, as transformers does (default true); false logs it as it is. Gradients
    /// are never affected.
    pub logging_nan_inf_filter: bool,
    /// Train on the CPU whatever devices exist (as `device = "cpu"`).
    pub use_cpu: bool,
    /// The order of training examples: `random` (a seeded shuffle each epoch, the
    /// default), `sequential` (the data's order), or `group_by_length` (transformers'
    /// `LengthGroupedSampler` over the shuffle: batches of similar lengths,
    /// [`crate::data::length_grouped`]).
    pub train_sampling_strategy: SamplingStrategy,
    /// transformers 4's spelling of `train_sampling_strategy = "group_by_length"`.
    pub group_by_length: bool,
    /// NEFTune: while training, uniform noise of `±alpha / sqrt(seq · hidden)` on the
    /// input embeddings' output ([`crate::Model::set_neftune_noise_alpha`]); off in
    /// evaluation and after training, as transformers turns its hook off.
    pub neftune_noise_alpha: Option<f64>,
    /// A causal LM's loss with gradient accumulation or several processes is the mean
    /// over every label token of the accumulated batch on all ranks, as transformers 5
    /// normalises by `num_items_in_batch` (default true); false: over this rank's only.
    pub average_tokens_across_devices: bool,
    /// Evaluation computes the loss only: `compute_metrics` is not called (as
    /// transformers, whose prediction step then returns no logits).
    pub prediction_loss_only: bool,
    /// ε of transformers' `LabelSmoother` (0 = off): the training and evaluation loss
    /// mixes the cross-entropy with the mean over classes ([`crate::smoothing`]).
    pub label_smoothing_factor: f64,
    /// Where the logs go besides `trainer_state.json` and the printed lines: `none`
    /// (the default, as in transformers 5), `tensorboard` (event files,
    /// [`crate::report`]) or `all` (every integration kiln has: TensorBoard). A name, a
    /// comma-separated list or a list.
    #[serde(deserialize_with = "report_to_list")]
    pub report_to: Vec<String>,
    /// The TensorBoard folder (transformers 4's `logging_dir`); default
    /// `TENSORBOARD_LOGGING_DIR`, else `output_dir/runs/<Mon DD_HH-MM-SS>_<host>`.
    pub logging_dir: Option<String>,
    /// Mixed precision in bf16: f32 master weights, forward and backward in bf16
    /// (evaluation too). Needs a device whose backend offers bf16.
    pub bf16: bool,
    /// Mixed precision in f16 with dynamic loss scaling (torch's `GradScaler`
    /// defaults): f32 master weights, forward and backward in f16 (evaluation too), a
    /// step whose gradients overflow is skipped. Needs a device that offers f16.
    pub fp16: bool,
    /// Activation checkpointing: backward recomputes each transformer layer's
    /// activations instead of keeping them from the forward pass ([`crate::recompute`]):
    /// less memory for one more forward pass of every layer, the same gradients bit for
    /// bit. `None` means false (or `gradient_checkpointing`, when that is set).
    pub activation_checkpointing: Option<bool>,
    /// Its options: `every_n_layers` (checkpoint layers 0, n, 2n, …; default 1),
    /// `offload` (changes nothing on the CPU, refused elsewhere), and the options of
    /// torch's `checkpoint` (`use_reentrant`, `preserve_rng_state`, `determinism_check`,
    /// `debug`), which change nothing here ([`TrainingArguments::checkpoint_every`]).
    pub activation_checkpointing_kwargs: Map<String, Value>,
    /// transformers 4's name of `activation_checkpointing`, read when that is not set.
    pub gradient_checkpointing: Option<bool>,
    /// transformers 4's name of `activation_checkpointing_kwargs`, read when that is
    /// empty.
    pub gradient_checkpointing_kwargs: Map<String, Value>,
    /// `kiln train` trains (as transformers' example scripts read it). When none of
    /// `do_train`, `do_eval`, `do_predict` is set, `kiln train` trains and evaluates
    /// on the validation data if there is some; when one is set, it runs the stages set.
    /// The Trainer itself does not read them, as transformers' does not.
    pub do_train: bool,
    /// `kiln train` evaluates the final model on the validation data (also set by an
    /// `eval_strategy` other than `no`, as transformers sets it) and writes
    /// `eval_results.json`.
    pub do_eval: bool,
    /// `kiln train` predicts the classes of `test_file`'s rows with the final model and
    /// writes `predict_results.txt` (`index<TAB>prediction`, as `run_classification.py`).
    pub do_predict: bool,
    /// How much the main process prints ([`LogLevel`]; `passive`: informational lines
    /// and up).
    pub log_level: LogLevel,
    /// How much the other processes of a multi-process run print (`passive` and the
    /// default: warnings and up), each line prefixed with the rank.
    pub log_level_replica: LogLevel,
    /// Move what an evaluation predicted to host memory every N batches instead of
    /// keeping it on the device to the end (transformers' `eval_accumulation_steps`); on
    /// the CPU it is in host memory already. Must be at least 1.
    pub eval_accumulation_steps: Option<usize>,
    /// The batch entries that hold labels (transformers' default for kiln's models:
    /// `["labels"]`, the only one their batches have). As in transformers, an
    /// evaluation has labels only when every name given is one the batches hold: any
    /// other list (`[]`, `["label"]`) evaluates without labels (no `eval_loss`, metrics
    /// without labels). Training is unaffected. A name, a comma-separated list or a list.
    #[serde(deserialize_with = "optional_names")]
    pub label_names: Option<Vec<String>>,
    /// On resume, give the callbacks the state the checkpoint saved for them
    /// (`stateful_callbacks`: early stopping's patience, threshold and counter), as
    /// transformers does; false (the default) starts them afresh, and says so when the
    /// checkpoint holds such a state.
    pub restore_callback_states_from_checkpoint: bool,
    /// Leave out the memory metrics (default true); false adds transformers'
    /// `*_mem_cpu_alloc_delta` / `*_mem_cpu_peaked_delta` to the training summary and to
    /// what `evaluate` returns ([`crate::memory`]).
    pub skip_memory_metrics: bool,
    /// kiln: the device (`auto`, `cpu`, `cuda`, `cuda:N`, `metal`).
    pub device: String,
    /// kiln: write checkpoints in the background (CPU parameters are copied to host
    /// memory in the background too, the next optimizer step waiting for that copy;
    /// a device's parameters are copied before training goes on).
    pub async_save: bool,
    /// kiln: `stop` (default) or `continue` when a checkpoint save fails.
    pub on_save_error: SaveErrorPolicy,
    /// kiln: on SIGTERM or SIGINT, finish the optimizer step, save `checkpoint-<step>`
    /// and exit (143 / 130), instead of dying at once (default true; [`crate::stop`]).
    pub save_on_signal: bool,
    /// Seconds a process of a multi-process run waits for the others, at a checkpoint
    /// barrier or in a training collective (MPI), before failing instead of hanging
    /// (transformers' `ddp_timeout`).
    pub ddp_timeout: u64,
    /// Size of the gradient buckets all-reduced together in multi-process runs, in MiB
    /// (default 25, torch DDP's).
    pub ddp_bucket_cap_mb: Option<u64>,
    /// kiln: 1 shards the optimizer state over the processes of a data-parallel run
    /// (ZeRO stage 1: each keeps and saves the state of its own parameters); 0 keeps it
    /// whole on every process.
    pub zero_stage: u8,
}

impl Default for TrainingArguments {
    fn default() -> Self {
        TrainingArguments {
            output_dir: "trainer_output".into(),
            overwrite_output_dir: false,
            num_train_epochs: 3.0,
            max_steps: -1,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-5,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            optim: "adamw".into(),
            lr_scheduler_type: "linear".into(),
            lr_scheduler_kwargs: Map::new(),
            warmup_steps: 0.0,
            warmup_ratio: 0.0,
            logging_strategy: Strategy::Steps,
            logging_steps: 500.0,
            logging_first_step: false,
            eval_strategy: Strategy::No,
            eval_steps: None,
            eval_delay: 0.0,
            save_strategy: Strategy::Steps,
            save_steps: 500.0,
            save_total_limit: None,
            save_only_model: false,
            save_safetensors: true,
            save_on_each_node: false,
            load_best_model_at_end: false,
            metric_for_best_model: None,
            greater_is_better: None,
            seed: 42,
            data_seed: None,
            resume_from_checkpoint: None,
            ignore_data_skip: false,
            dataloader_drop_last: false,
            disable_tqdm: false,
            run_name: None,
            eval_on_start: false,
            include_num_input_tokens_seen: TokensSeen::No,
            logging_nan_inf_filter: true,
            use_cpu: false,
            label_smoothing_factor: 0.0,
            prediction_loss_only: false,
            average_tokens_across_devices: true,
            neftune_noise_alpha: None,
            train_sampling_strategy: SamplingStrategy::Random,
            group_by_length: false,
            report_to: Vec::new(),
            logging_dir: None,
            bf16: false,
            fp16: false,
            activation_checkpointing: None,
            activation_checkpointing_kwargs: Map::new(),
            gradient_checkpointing: None,
            gradient_checkpointing_kwargs: Map::new(),
            do_train: false,
            do_eval: false,
            do_predict: false,
            log_level: LogLevel::Passive,
            log_level_replica: LogLevel::Warning,
            eval_accumulation_steps: None,
            label_names: None,
            restore_callback_states_from_checkpoint: false,
            skip_memory_metrics: true,
            device: "auto".into(),
            async_save: true,
            on_save_error: SaveErrorPolicy::Stop,
            save_on_signal: true,
            ddp_timeout: 1800,
            ddp_bucket_cap_mb: None,
            zero_stage: 0,
        }
    }
}

fn interval_error(name: &str, v: f64) -> Option<String> {
    if !(v > 0.0 && v.is_finite()) {
        Some(format!(
            "{name} must be > 0 (a count, or a ratio below 1), got {v}"
        ))
    } else if v > 1.0 && v.fract() != 0.0 {
        Some(format!(
            "{name} must be a whole number when greater than 1, got {v}"
        ))
    } else {
        None
    }
}

impl TrainingArguments {
    /// Arguments with `output_dir` and transformers' defaults otherwise.
    pub fn new(output_dir: impl Into<String>) -> Self {
        TrainingArguments {
            output_dir: output_dir.into(),
            ..Default::default()
        }
    }

    /// Sets field `name` from text, parsed as that field's type (`"10"`, `"true"`,
    /// `"cosine"`, a JSON object for `lr_scheduler_kwargs`, `"none"` for an optional).
    pub fn set(&mut self, name: &str, text: &str) -> Result<()> {
        let mut obj = match serde_json::to_value(&*self) {
            Ok(Value::Object(o)) => o,
            _ => return Err(Error::Config("cannot represent TrainingArguments".into())),
        };
        let current = obj
            .get(name)
            .ok_or_else(|| Error::Config(format!("unknown training argument {name:?}")))?;
        // `none` clears an optional field (metric_for_best_model, save_total_limit, …).
        let none = text.trim().eq_ignore_ascii_case("none") || text.trim() == "null";
        let value = if none
            && serde_json::from_value::<TrainingArguments>(Value::Object({
                let mut o = obj.clone();
                o.insert(name.to_string(), Value::Null);
                o
            }))
            .is_ok()
        {
            Value::Null
        } else {
            parse_like(current, name, text)?
        };
        obj.insert(name.to_string(), value);
        *self = serde_json::from_value(Value::Object(obj))
            .map_err(|e| Error::Config(format!("--{name} {text}: {e}")))?;
        Ok(())
    }

    /// Whether `name` is a field.
    pub fn has_field(name: &str) -> bool {
        serde_json::to_value(TrainingArguments::default())
            .ok()
            .and_then(|v| v.get(name).map(|_| ()))
            .is_some()
    }

    /// The optimizer selected by `optim`.
    pub fn optim_kind(&self) -> Result<OptimKind> {
        OptimKind::from_name(&self.optim).ok_or_else(|| {
            Error::Config(format!(
                "optim {:?} is not supported; use adamw or sgd",
                self.optim
            ))
        })
    }

    /// The metric that decides the best model: `metric_for_best_model`, or `loss` when
    /// `load_best_model_at_end` is set (transformers' default).
    pub fn best_metric_name(&self) -> Option<String> {
        self.metric_for_best_model
            .clone()
            .or_else(|| self.load_best_model_at_end.then(|| "loss".to_string()))
    }

    /// Whether a larger best metric is better.
    pub fn is_greater_better(&self) -> bool {
        self.greater_is_better
            .unwrap_or_else(|| !self.best_metric_name().is_some_and(|m| m.ends_with("loss")))
    }

    /// The dtype of mixed-precision training: `BF16` with `bf16`, `F16` with `fp16`,
    /// `None` for f32 training; both set is an error.
    pub fn mixed_precision(&self) -> Result<Option<candle_core::DType>> {
        match (self.bf16, self.fp16) {
            (false, false) => Ok(None),
            (true, false) => Ok(Some(candle_core::DType::BF16)),
            (false, true) => Ok(Some(candle_core::DType::F16)),
            (true, true) => Err(Error::Config(
                "bf16 and fp16 are both set; choose one".into(),
            )),
        }
    }

    /// `run_name`, or `output_dir` when it is not set (transformers' default).
    pub fn run_name(&self) -> &str {
        self.run_name.as_deref().unwrap_or(&self.output_dir)
    }

    /// The device to train on: `cpu` with `use_cpu`, else `device`.
    pub fn device_spec(&self) -> &str {
        if self.use_cpu { "cpu" } else { &self.device }
    }

    /// The sampling strategy, `group_by_length` counting as `group_by_length`.
    pub fn sampling(&self) -> SamplingStrategy {
        if self.group_by_length {
            SamplingStrategy::GroupByLength
        } else {
            self.train_sampling_strategy
        }
    }

    /// Whether a line of `level` is printed by the main process (`main`) or another one.
    pub fn prints(&self, level: LogLevel, main: bool) -> bool {
        let threshold = match (main, self.log_level, self.log_level_replica) {
            (true, LogLevel::Passive, _) => LogLevel::Info,
            (true, l, _) => l,
            (false, _, LogLevel::Passive) => LogLevel::Warning,
            (false, _, l) => l,
        };
        level >= threshold.min(LogLevel::Error)
    }

    /// Whether evaluations see the batches' labels: `label_names` unset, or naming
    /// only `labels`.
    pub fn evaluation_has_labels(&self) -> bool {
        self.label_names
            .as_ref()
            .is_none_or(|n| !n.is_empty() && n.iter().all(|n| n == "labels"))
    }

    /// The data shuffling seed.
    pub fn shuffle_seed(&self) -> u64 {
        self.data_seed.unwrap_or(self.seed)
    }

    /// Checks everything that can be checked without the data; each message says what
    /// to change.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::Config(m));
        if let Some(r) = self
            .report_to
            .iter()
            .find(|r| !["none", "all", "tensorboard"].contains(&r.as_str()))
        {
            return fail(format!(
                "report_to {r:?}: kiln reports to tensorboard (event files) only; give tensorboard, all or none"
            ));
        }
        if self.train_sampling_strategy == SamplingStrategy::BatchRebalance {
            return fail(
                "train_sampling_strategy batch_rebalance is not implemented in kiln yet; use random, sequential or group_by_length".into(),
            );
        }
        if self.group_by_length && self.train_sampling_strategy == SamplingStrategy::Sequential {
            return fail("group_by_length and train_sampling_strategy sequential contradict each other; drop one".into());
        }
        if let Some(a) = self
            .neftune_noise_alpha
            .filter(|a| !(a.is_finite() && *a > 0.0))
        {
            return fail(format!("neftune_noise_alpha must be > 0, got {a}"));
        }
        if !(0.0..1.0).contains(&self.label_smoothing_factor) {
            return fail(format!(
                "label_smoothing_factor must be in [0, 1), got {}",
                self.label_smoothing_factor
            ));
        }
        if self.use_cpu && !matches!(self.device.as_str(), "auto" | "cpu") {
            return fail(format!(
                "use_cpu is set but device is {:?}; drop one of them",
                self.device
            ));
        }
        if self.output_dir.trim().is_empty() {
            return fail("output_dir is empty; give a folder".into());
        }
        if self.per_device_train_batch_size == 0 || self.per_device_eval_batch_size == 0 {
            return fail("batch sizes must be at least 1".into());
        }
        if self.zero_stage > 1 {
            return fail(format!(
                "zero_stage must be 0 or 1 (optimizer state sharding), got {}",
                self.zero_stage
            ));
        }
        if self.ddp_timeout == 0 || self.ddp_bucket_cap_mb == Some(0) {
            return fail("ddp_timeout and ddp_bucket_cap_mb must be at least 1".into());
        }
        if self.eval_accumulation_steps == Some(0) {
            return fail("eval_accumulation_steps must be at least 1".into());
        }
        if self.gradient_accumulation_steps == 0 {
            return fail("gradient_accumulation_steps must be at least 1".into());
        }
        if self.max_steps <= 0 && self.max_steps != -1 {
            return fail(format!(
                "max_steps must be > 0, or -1 to train by epochs; got {}",
                self.max_steps
            ));
        }
        if self.max_steps == -1
            && self.num_train_epochs.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        {
            return fail("num_train_epochs must be > 0 when max_steps is -1".into());
        }
        let non_negative = |x: f64| x.is_finite() && x >= 0.0;
        if !non_negative(self.learning_rate) || !non_negative(self.weight_decay) {
            return fail("learning_rate and weight_decay must be >= 0".into());
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            return fail("adam_beta1 and adam_beta2 must be in [0, 1)".into());
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return fail(format!(
                "warmup_ratio must be in [0, 1], got {}",
                self.warmup_ratio
            ));
        }
        if !non_negative(self.warmup_steps) {
            return fail(format!(
                "warmup_steps must be >= 0, got {}",
                self.warmup_steps
            ));
        }
        self.optim_kind()?;
        self.mixed_precision()?;
        self.checkpoint_every()?;
        Schedule::from_name(
            &self.lr_scheduler_type,
            &self.lr_scheduler_kwargs,
            self.learning_rate,
        )?;
        if self.logging_strategy == Strategy::Best || self.eval_strategy == Strategy::Best {
            return fail("\"best\" is a save_strategy only".into());
        }
        let mut intervals = vec![];
        if self.logging_strategy == Strategy::Steps {
            intervals.push(("logging_steps", self.logging_steps));
        }
        if self.save_strategy == Strategy::Steps {
            intervals.push(("save_steps", self.save_steps));
        }
        if self.eval_strategy == Strategy::Steps {
            intervals.push(("eval_steps", self.eval_steps()));
        }
        for (name, v) in intervals {
            if let Some(m) = interval_error(name, v) {
                return fail(m);
            }
        }
        let metric = self.best_metric_name();
        if self.save_strategy == Strategy::Best && metric.is_none() {
            return fail("save_strategy \"best\" needs metric_for_best_model".into());
        }
        if (self.save_strategy == Strategy::Best || metric.is_some())
            && self.eval_strategy == Strategy::No
        {
            return fail(format!(
                "{} needs evaluations: set eval_strategy to steps or epoch",
                if self.save_strategy == Strategy::Best {
                    "save_strategy \"best\""
                } else {
                    "metric_for_best_model"
                }
            ));
        }
        if let Some(m) = metric
            .as_deref()
            .filter(|m| self.prediction_loss_only && !m.ends_with("loss"))
        {
            return fail(format!(
                "metric_for_best_model {m} is a metric, and prediction_loss_only leaves only the loss; drop one of them"
            ));
        }
        if self.load_best_model_at_end && self.save_strategy != Strategy::Best {
            if self.save_strategy != self.eval_strategy {
                return fail(format!(
                    "load_best_model_at_end needs matching strategies: save_strategy is {:?} but eval_strategy is {:?}; set both to the same",
                    self.save_strategy.name(),
                    self.eval_strategy.name()
                ));
            }
            if self.save_strategy == Strategy::Steps {
                let (save, eval) = (self.save_steps, self.eval_steps());
                if (save < 1.0) != (eval < 1.0) {
                    return fail("save_steps and eval_steps must both be counts or both be ratios with load_best_model_at_end".into());
                }
                let (s, e) = if save < 1.0 {
                    ((save * 1e6).round(), (eval * 1e6).round())
                } else {
                    (save, eval)
                };
                if s % e != 0.0 {
                    return fail(format!(
                        "load_best_model_at_end needs save_steps to be a multiple of eval_steps: {save} is not a multiple of {eval}"
                    ));
                }
            }
        }
        if self.save_strategy == Strategy::No && self.load_best_model_at_end {
            return fail("load_best_model_at_end needs checkpoints: set save_strategy".into());
        }
        Ok(())
    }

    /// `eval_steps`, defaulting to `logging_steps`.
    pub fn eval_steps(&self) -> f64 {
        self.eval_steps.unwrap_or(self.logging_steps)
    }

    /// Warmup steps for a run of `total` steps: `warmup_steps` if it is at least 1, a
    /// ratio of `total` if below 1, else `ceil(total * warmup_ratio)`.
    pub fn warmup_steps_for(&self, total: u64) -> u64 {
        if self.warmup_steps >= 1.0 {
            self.warmup_steps as u64
        } else if self.warmup_steps > 0.0 {
            (total as f64 * self.warmup_steps).ceil() as u64
        } else {
            (total as f64 * self.warmup_ratio).ceil() as u64
        }
    }

    /// The arguments as the `training_args.json` of a saved model: every field, as
    /// transformers' `to_json_string` writes its own.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Resolves an interval that may be a ratio of `max_steps` (`ceil(max_steps * ratio)`).
pub fn resolve_steps(v: f64, max_steps: u64) -> u64 {
    if v < 1.0 {
        ((max_steps as f64) * v).ceil().max(1.0) as u64
    } else {
        v as u64
    }
}

/// `report_to` as a list: a string (`"tensorboard"`, `"none"`, `"a,b"`), a list, or null.
fn report_to_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let names = match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => s.split(',').map(|n| n.trim().to_string()).collect(),
        Some(OneOrMany::Many(v)) => v,
    };
    Ok(names
        .into_iter()
        .filter(|n| !n.is_empty() && n != "none")
        .collect())
}

impl TrainingArguments {
    /// Whether the run writes TensorBoard event files (`report_to` names `tensorboard` or
    /// `all`).
    pub fn reports_to_tensorboard(&self) -> bool {
        self.report_to
            .iter()
            .any(|r| r == "tensorboard" || r == "all")
    }
}

/// An optional list of names: null, a list, or a string (comma-separated).
fn optional_names<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => None,
        Some(OneOrMany::One(s)) => Some(
            s.split(',')
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect(),
        ),
        Some(OneOrMany::Many(v)) => Some(v),
    })
}

/// Parses `text` as a value of the same JSON type as `current`.
fn parse_like(current: &Value, name: &str, text: &str) -> Result<Value> {
    let bad = |what: &str| Error::Config(format!("--{name}: expected {what}, got {text:?}"));
    let t = text.trim();
    Ok(match current {
        Value::Bool(_) => match t.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Value::Bool(true),
            "false" | "0" | "no" => Value::Bool(false),
            _ => return Err(bad("true or false")),
        },
        Value::Number(_) => serde_json::from_str::<serde_json::Number>(t)
            .map(Value::Number)
            .map_err(|_| bad("a number"))?,
        Value::String(_) => Value::String(t.to_string()),
        Value::Object(_) => serde_json::from_str::<Map<String, Value>>(t)
            .map(Value::Object)
            .map_err(|_| bad("a JSON object"))?,
        Value::Null | Value::Array(_) => {
            if t.eq_ignore_ascii_case("none") || t == "null" {
                Value::Null
            } else if let Ok(n) = serde_json::from_str::<serde_json::Number>(t) {
                Value::Number(n)
            } else if let Ok(b) = t.parse::<bool>() {
                Value::Bool(b)
            } else {
                Value::String(t.to_string())
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_transformers_defaults() {
        let a = TrainingArguments::default();
        assert_eq!(
            (a.learning_rate, a.num_train_epochs, a.max_steps),
            (5e-5, 3.0, -1)
        );
        assert_eq!((a.logging_steps, a.save_steps, a.seed), (500.0, 500.0, 42));
        assert_eq!(a.lr_scheduler_type, "linear");
        assert!(a.save_safetensors && a.async_save);
        assert!(!a.bf16 && !a.fp16);
        assert_eq!(a.mixed_precision().unwrap(), None);
        a.validate().unwrap();
    }

    #[test]
    fn set_parses_by_field_type() {
        let mut a = TrainingArguments::default();
        a.set("save_steps", "10").unwrap();
        a.set("load_best_model_at_end", "true").unwrap();
        a.set("eval_strategy", "steps").unwrap();
        a.set("save_total_limit", "2").unwrap();
        a.set("metric_for_best_model", "accuracy").unwrap();
        a.set("lr_scheduler_kwargs", "{\"num_cycles\": 2}").unwrap();
        a.set("data_seed", "none").unwrap();
        assert_eq!(a.save_steps, 10.0);
        assert_eq!(a.save_total_limit, Some(2));
        assert_eq!(a.metric_for_best_model.as_deref(), Some("accuracy"));
        assert!(
            a.set("nope", "1")
                .unwrap_err()
                .to_string()
                .contains("unknown training argument")
        );
        assert!(a.set("save_steps", "ten").is_err());
        assert!(a.set("eval_strategy", "sometimes").is_err());
        assert!(TrainingArguments::has_field("warmup_ratio"));
        a.set("bf16", "true").unwrap();
        assert_eq!(a.mixed_precision().unwrap(), Some(candle_core::DType::BF16));
        a.set("bf16", "false").unwrap();
        a.set("fp16", "true").unwrap();
        assert_eq!(a.mixed_precision().unwrap(), Some(candle_core::DType::F16));
    }

    #[test]
    fn invalid_combinations_say_what_to_change() {
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (
                vec![
                    ("load_best_model_at_end", "true"),
                    ("eval_strategy", "epoch"),
                ],
                "matching strategies",
            ),
            (
                vec![
                    ("load_best_model_at_end", "true"),
                    ("eval_strategy", "steps"),
                    ("eval_steps", "30"),
                    ("save_steps", "50"),
                ],
                "multiple of eval_steps",
            ),
            (
                vec![("save_strategy", "best")],
                "needs metric_for_best_model",
            ),
            (
                vec![("save_strategy", "best"), ("metric_for_best_model", "loss")],
                "eval_strategy",
            ),
            (vec![("save_steps", "2.5")], "whole number"),
            (vec![("lr_scheduler_type", "bogus")], "not supported"),
            (vec![("optim", "lion")], "adamw or sgd"),
            (vec![("max_steps", "0")], "max_steps"),
            (vec![("gradient_accumulation_steps", "0")], "at least 1"),
            (vec![("bf16", "true"), ("fp16", "true")], "choose one"),
        ];
        for (sets, want) in cases {
            let mut a = TrainingArguments::default();
            for (k, v) in &sets {
                a.set(k, v).unwrap();
            }
            let e = a.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{sets:?}: {e}");
        }
        let mut ok = TrainingArguments::default();
        for (k, v) in [
            ("load_best_model_at_end", "true"),
            ("eval_strategy", "steps"),
            ("eval_steps", "25"),
            ("save_steps", "50"),
        ] {
            ok.set(k, v).unwrap();
        }
        ok.validate().unwrap();
        assert_eq!(ok.best_metric_name().as_deref(), Some("loss"));
        assert!(!ok.is_greater_better());
    }

    #[test]
    fn warmup_and_ratios() {
        let mut a = TrainingArguments::default();
        assert_eq!(a.warmup_steps_for(100), 0);
        a.warmup_ratio = 0.1;
        assert_eq!(a.warmup_steps_for(95), 10);
        a.warmup_steps = 0.05;
        assert_eq!(a.warmup_steps_for(100), 5);
        a.warmup_steps = 7.0;
        assert_eq!(a.warmup_steps_for(100), 7);
        assert_eq!(resolve_steps(0.25, 10), 3);
        assert_eq!(resolve_steps(4.0, 10), 4);
    }
}

//! The loop: epochs of micro-batches, one optimizer update per accumulated group, and
//! the log/evaluate/save decisions after each; the summary at the end.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::Var;
use kiln_optim::{Grads, Optimizer};

use super::Trainer;
use super::checkpointing::Position;
use super::logging::{py, round_to};
use super::plan::Plan;
use crate::args::{SamplingStrategy, Strategy, TokensSeen};
use crate::callback::{TrainerControl, default_flow_on_epoch_end, default_flow_on_step_end};
use crate::data::{BatchSource, epoch_order, length_grouped};
use crate::model::{Batch, Model};
use crate::{Error, Result};

/// What [`Trainer::train`] returns.
#[derive(Debug, Clone)]
pub struct TrainOutput {
    /// Optimizer steps taken in total.
    pub global_step: u64,
    /// Mean training loss over the steps of this call.
    pub training_loss: f64,
    /// `train_runtime`, `train_samples_per_second`, `train_steps_per_second`,
    /// `total_flos`, `train_loss`, `epoch`.
    pub metrics: BTreeMap<String, f64>,
}

/// The variables of a run: those the optimizer updates (f32 masters in mixed
/// precision), those the model computes with (their 16-bit copies, or the same), and
/// the rank that keeps each one's optimizer state (ZeRO-1; this rank otherwise).
struct Params {
    vars: Vec<Var>,
    sources: Vec<Var>,
    owners: Vec<usize>,
}

impl<M: Model> Trainer<M> {
    /// Trains; `resume` is `"last"` or a checkpoint folder (overriding
    /// `resume_from_checkpoint`).
    pub fn train(&mut self, resume: Option<&str>) -> Result<TrainOutput> {
        let every = self.args.checkpoint_every()?;
        if every.is_some() && !self.model.set_activation_checkpointing(every) {
            return Err(Error::Config(
                "activation_checkpointing: this model does not implement Model::set_activation_checkpointing"
                    .into(),
            ));
        }
        if let Some(note) = self.memory_note.take() {
            self.say_at(crate::args::LogLevel::Warning, &format!("note: {note}"));
        }
        self.memory.start("train");
        let alpha = self.args.neftune_noise_alpha;
        let out = if alpha.is_some() && !self.model.set_neftune_noise_alpha(alpha) {
            Err(Error::Config(
                "neftune_noise_alpha: this model does not implement Model::set_neftune_noise_alpha"
                    .into(),
            ))
        } else {
            self.train_run(resume)
        };
        // As transformers: NEFTune is off again once training ends.
        if alpha.is_some() {
            self.model.set_neftune_noise_alpha(None);
        }
        if every.is_some() {
            self.model.set_activation_checkpointing(None);
        }
        if out.is_err() {
            self.memory.cancel();
        }
        out
    }

    fn train_run(&mut self, resume: Option<&str>) -> Result<TrainOutput> {
        let (train, resume_dir) = self.prepare_run(resume)?;
        let plan = self.plan(train.len())?;
        let vars: Vec<Var> = self.parameters().into_iter().map(|(_, v)| v).collect();
        let sources: Vec<Var> = self
            .model
            .parameters()
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        let owners = if self.sharded_optimizer() {
            let counts: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
            kiln_dist::partition(&counts, plan.world)
        } else {
            vec![plan.rank; vars.len()]
        };
        let mut optimizer = self.make_optimizer(&owners)?;
        if self.sharded_optimizer() && self.args.save_strategy != Strategy::No {
            self.say(
                "zero_stage 1: checkpoints keep the optimizer state in per-rank shards, which \
                 kiln resumes with any number of processes but transformers' Trainer cannot; \
                 kiln convert --consolidate makes a copy it can resume",
            );
        }
        let mut position = Position::START;
        self.state = self.fresh_state(&plan);
        self.tr_loss = 0.0;
        self.total_loss = 0.0;
        self.loss_counted_from = 0;
        self.last_logged = 0;
        self.saved_steps.clear();
        self.scaler = self.args.fp16.then(crate::precision::GradScaler::new);
        self.skipped_steps = 0;
        if let Some(dir) = &resume_dir {
            position = self.restore(dir, &mut optimizer, &owners, &plan)?;
            self.say(&format!(
                "resuming from {} at step {}",
                dir.display(),
                self.state.global_step
            ));
        }
        self.next_lr = self.lr_at(&plan, self.state.global_step - self.skipped_steps);
        // The same initial weights everywhere (as DDP): rank 0's.
        self.broadcast_parameters(&vars)?;
        let params = Params {
            vars,
            sources,
            owners,
        };
        let start_step = self.state.global_step;
        let start = Instant::now();
        self.control = TrainerControl::default();
        self.add_reporting();
        self.each_callback(|cb, a, s, c| cb.on_train_begin(a, s, c));
        let bar = self.progress_bar(plan.max_steps, start_step);
        if let Some(signal) = self.stop_signal()? {
            return Err(Error::Stopped {
                signal,
                step: start_step,
                checkpoint: None,
            });
        }
        self.tokens_pending = 0;
        self.session = Some((start, self.state.num_input_tokens_seen));
        if self.args.eval_on_start {
            self.evaluate_inner(bar.as_ref())?;
        }

        if self.state.global_step >= plan.max_steps {
            // A finished run resumed with the same length, as transformers: no step.
            self.say(&format!(
                "nothing to train: the run is at step {} of {}; give a larger max_steps or \
                 num_train_epochs to train on",
                self.state.global_step, plan.max_steps
            ));
            self.control.should_training_stop = true;
        }
        let mut epoch = position.epoch;
        while epoch < plan.num_epochs && !self.control.should_training_stop {
            if epoch == position.epoch && position.epoch_end_done {
                epoch += 1;
                continue;
            }
            let skip = if epoch == position.epoch && !self.args.ignore_data_skip {
                position.micro_batches_done as usize
            } else {
                0
            };
            self.train_epoch(
                train.as_ref(),
                &plan,
                &params,
                &mut optimizer,
                epoch,
                skip,
                bar.as_ref(),
            )?;
            epoch += 1;
        }
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        self.finish_training(&plan, start_step, start)
    }

    /// One epoch from micro-batch `skip` on, then the epoch's end.
    #[allow(clippy::too_many_arguments)]
    fn train_epoch(
        &mut self,
        train: &dyn BatchSource,
        plan: &Plan,
        params: &Params,
        optimizer: &mut Optimizer,
        epoch: u64,
        skip: usize,
        bar: Option<&indicatif::ProgressBar>,
    ) -> Result<()> {
        let order = match self.args.sampling() {
            SamplingStrategy::Sequential => (0..plan.n).collect(),
            SamplingStrategy::GroupByLength => {
                let lengths = train.lengths().ok_or_else(|| {
                    Error::Config(
                        "group_by_length: the training data cannot give its examples' lengths"
                            .into(),
                    )
                })?;
                let shuffled = epoch_order(plan.n, self.args.shuffle_seed(), epoch);
                let group =
                    self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps;
                length_grouped(&shuffled, &lengths, group)
            }
            _ => epoch_order(plan.n, self.args.shuffle_seed(), epoch),
        };
        let order = kiln_dist::shard_indices(&order, plan.rank, plan.world);
        let batches: Vec<&[usize]> = order
            .chunks(plan.batch_size)
            .take(plan.batches_per_epoch)
            .collect();
        self.control.should_epoch_stop = false;
        self.each_callback(|cb, a, s, c| cb.on_epoch_begin(a, s, c));
        let device = self.device();
        let mut grads: Grads = Vec::new();
        // The micro-batches of the accumulation group being taken, with their loss
        // weights ([`Trainer::loss_weights`]), fetched when the group starts.
        let mut group: std::collections::VecDeque<(Batch, f64)> = Default::default();
        let mut consumed = skip.min(batches.len());
        for i in skip..batches.len() {
            if group.is_empty() {
                let end = ((i / plan.ga + 1) * plan.ga).min(batches.len());
                let fetched = batches[i..end]
                    .iter()
                    .map(|idx| train.batch(idx, &device))
                    .collect::<Result<Vec<_>>>()?;
                let weights = self.loss_weights(&fetched, plan.world)?;
                group = fetched.into_iter().zip(weights).collect();
            }
            let Some((batch, weight)) = group.pop_front() else {
                unreachable!("a group holds a micro-batch for every index it spans")
            };
            let local = self.micro_step(&batch, weight, params)?;
            Optimizer::accumulate(&mut grads, local)?;
            let sync = (i + 1) % plan.ga == 0 || i + 1 == batches.len();
            if !sync {
                continue;
            }
            consumed = i + 1;
            let (grad_norm, lr) = self.update(&mut grads, plan, params, optimizer)?;
            self.count_tokens_seen()?;
            self.state.global_step += 1;
            self.state.epoch = Some(epoch as f64 + (i + 1) as f64 / batches.len() as f64);
            let pos = Position {
                epoch,
                micro_batches_done: (i + 1) as u64,
                epoch_end_done: false,
            };
            self.control.should_log = false;
            self.control.should_evaluate = false;
            self.control.should_save = false;
            default_flow_on_step_end(&self.args, &self.state, &mut self.control);
            self.each_callback(|cb, a, s, c| cb.on_step_end(a, s, c));
            if let Some(b) = bar {
                b.set_position(self.state.global_step);
            }
            self.maybe_log_save_evaluate(Some(grad_norm), Some(lr), optimizer, pos, bar)?;
            if let Some(signal) = self.stop_signal()? {
                return self.stop_at_signal(signal, optimizer, pos, bar);
            }
            if self.control.should_epoch_stop || self.control.should_training_stop {
                break;
            }
        }
        self.control.should_log = false;
        self.control.should_evaluate = false;
        self.control.should_save = false;
        default_flow_on_epoch_end(&self.args, &self.state, &mut self.control);
        self.each_callback(|cb, a, s, c| cb.on_epoch_end(a, s, c));
        // A run that reached max_steps inside the epoch ends it here (as transformers
        // does: its end is logged, evaluated and saved); a resume with a larger max_steps
        // takes the epoch's remaining batches, as the longer run would have.
        let stopped_inside = self.control.should_training_stop && consumed < batches.len();
        let pos = Position {
            epoch,
            micro_batches_done: consumed as u64,
            epoch_end_done: !stopped_inside,
        };
        self.maybe_log_save_evaluate(None, None, optimizer, pos, bar)
    }

    /// The model's output on `batch`, with the loss transformers' `compute_loss` gives:
    /// the model's own, or with `label_smoothing_factor` the smoothed one computed from
    /// the logits (the model then runs without labels).
    pub(super) fn loss_of(
        model: &M,
        eps: f64,
        batch: &Batch,
        train: Option<&mut crate::rng::Rng>,
    ) -> Result<(Option<candle_core::Tensor>, candle_core::Tensor)> {
        let Some(labels) = batch.labels.as_ref().filter(|_| eps > 0.0) else {
            let out = model.forward(batch, train)?;
            return Ok((out.loss, out.logits));
        };
        let unlabelled = Batch {
            labels: None,
            ..batch.clone()
        };
        let out = model.forward(&unlabelled, train)?;
        let loss = crate::smoothing::smoothed_loss(&out.logits, labels, eps)?;
        Ok((Some(loss), out.logits))
    }

    /// The signal that asked this run to stop, agreed over the ranks (a rank that got
    /// none learns of the others' through one all-reduce per step).
    fn stop_signal(&self) -> Result<Option<i32>> {
        let Some(stop) = self.stop.as_ref().filter(|_| self.args.save_on_signal) else {
            return Ok(None);
        };
        let mine = stop.requested();
        if self.dist.world_size() == 1 {
            return Ok(mine);
        }
        // [SIGTERM seen, SIGINT seen, another signal seen]: every rank decides alike.
        let mut seen = [0.0f64; 3];
        match mine {
            Some(15) => seen[0] = 1.0,
            Some(2) => seen[1] = 1.0,
            Some(_) => seen[2] = 1.0,
            None => {}
        }
        self.dist.all_reduce_f64(&mut seen)?;
        Ok(if seen[0] > 0.0 {
            Some(15)
        } else if seen[1] > 0.0 {
            Some(2)
        } else if seen[2] > 0.0 {
            Some(mine.unwrap_or(15))
        } else {
            None
        })
    }

    /// Saves `checkpoint-<step>` for the step just taken (unless this step was saved
    /// already), waits for every save in flight, and ends the run with
    /// [`Error::Stopped`].
    fn stop_at_signal(
        &mut self,
        signal: i32,
        optimizer: &Optimizer,
        pos: Position,
        bar: Option<&indicatif::ProgressBar>,
    ) -> Result<()> {
        let step = self.state.global_step;
        if self.saved_steps.last() != Some(&step) {
            self.save_checkpoint(optimizer, pos, bar)?;
        }
        self.finish_saves()?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let checkpoint = self.output_dir().join(format!("checkpoint-{step}"));
        if self.writer().is_main() && !checkpoint.is_dir() {
            // on_save_error = continue let the save fail (and said so).
            return Err(Error::Config(format!(
                "stopped by {} after step {step}, but its checkpoint could not be saved; \
                 --resume_from_checkpoint last continues from the newest complete one",
                crate::stop::signal_name(signal)
            )));
        }
        Err(Error::Stopped {
            signal,
            step,
            checkpoint: Some(checkpoint),
        })
    }

    /// The weight of each micro-batch's mean loss in its accumulation group's loss, as
    /// transformers 5 normalises it. A causal LM's loss is the mean over every label
    /// token of the group (transformers' `num_items_in_batch`): micro-batch j weighs
    /// `n_j / N`, its label tokens over the group's, with N summed over the ranks and
    /// the weight times the ranks (whose gradients are averaged) when
    /// `average_tokens_across_devices`. Other models' losses are averaged over the
    /// group's micro-batches (`1 / len`), where transformers 5.25 — which takes any
    /// model whose forward has `**kwargs` as normalising itself — leaves a classifier's
    /// loss undivided, so its logged loss and gradients with accumulation are that many
    /// times kiln's.
    pub(super) fn loss_weights(&self, group: &[Batch], world: usize) -> Result<Vec<f64>> {
        let token_labels: Option<Vec<&candle_core::Tensor>> = group
            .iter()
            .map(|b| {
                b.labels
                    .as_ref()
                    .filter(|l| l.rank() == 2 && matches!(l.dtype(), candle_core::DType::I64))
            })
            .collect();
        let Some(token_labels) = token_labels else {
            return Ok(vec![1.0 / group.len() as f64; group.len()]);
        };
        let counts = token_labels
            .into_iter()
            .map(crate::smoothing::label_tokens)
            .collect::<Result<Vec<f64>>>()?;
        let mut total = [counts.iter().sum::<f64>()];
        let across = self.args.average_tokens_across_devices && world > 1;
        if across {
            self.dist.all_reduce_f64(&mut total)?;
        }
        let factor = if across { world as f64 } else { 1.0 };
        Ok(counts
            .iter()
            .map(|n| {
                if total[0] > 0.0 {
                    n * factor / total[0]
                } else {
                    0.0
                }
            })
            .collect())
    }

    /// Forward and backward of one micro-batch: its loss (times its weight in the
    /// accumulation group, [`Trainer::loss_weights`]) joins the logged loss, and its
    /// gradients come back in the dtype of the parameters the optimizer updates. A
    /// micro-batch of weight 0 (no label token) is counted but not run.
    fn micro_step(&mut self, batch: &Batch, weight: f64, params: &Params) -> Result<Grads> {
        self.current_flos += self.model.floating_point_ops(batch);
        self.tokens_pending += tokens_of(batch, self.args.include_num_input_tokens_seen)?;
        if weight == 0.0 {
            return Ok(vec![None; params.vars.len()]);
        }
        let eps = self.args.label_smoothing_factor;
        let loss = Self::loss_of(&self.model, eps, batch, Some(&mut self.rng))?
            .0
            .ok_or_else(|| {
                Error::Config(
                    "the model returned no loss: do the training data have labels?".into(),
                )
            })?;
        let loss = if weight != 1.0 {
            loss.affine(weight, 0.0)?
        } else {
            loss
        };
        let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if value.is_finite() || !self.args.logging_nan_inf_filter {
            self.tr_loss += value;
        } else {
            // transformers' logging_nan_inf_filter
            self.tr_loss += self.tr_loss / (1 + self.state.global_step - self.last_logged) as f64;
        }
        let loss = match &self.scaler {
            Some(s) => s.scale_loss(&loss)?,
            None => loss,
        };
        // Gradients of what the model computed with (the 16-bit working copy in mixed
        // precision), in the dtype of the parameters the optimizer updates.
        let store = crate::recompute::backward(&loss)?;
        params
            .sources
            .iter()
            .zip(&params.vars)
            .map(|(src, master)| {
                store
                    .get(src.as_tensor())
                    .map(|g| g.to_dtype(master.dtype()))
                    .transpose()
                    .map_err(Error::from)
            })
            .collect()
    }

    /// One optimizer update from the accumulated gradients: reduced over ranks,
    /// unscaled (fp16), clipped, stepped at the schedule's rate. Returns the gradient
    /// norm and the learning rate.
    fn update(
        &mut self,
        grads: &mut Grads,
        plan: &Plan,
        params: &Params,
        optimizer: &mut Optimizer,
    ) -> Result<(f64, f64)> {
        // A background save may still be copying the parameters and moments this step
        // updates in place.
        self.finish_snapshot_copy();
        self.reduce_gradients(grads, &params.vars)?;
        let found_inf = match &self.scaler {
            Some(s) => s.unscale(grads)?,
            None => false,
        };
        let grad_norm = if self.args.max_grad_norm > 0.0 {
            Optimizer::clip(grads, self.args.max_grad_norm)?
        } else {
            Optimizer::grad_norm(grads)?
        };
        // The schedule counts the steps taken (fp16 skips those that overflow).
        let lr = self.lr_at(plan, self.state.global_step - self.skipped_steps);
        if found_inf {
            self.skipped_steps += 1;
        } else if plan.world > 1 && self.sharded_optimizer() {
            let mine: Grads = grads
                .iter()
                .zip(&params.owners)
                .filter(|(_, o)| **o == plan.rank)
                .map(|(g, _)| g.clone())
                .collect();
            optimizer.step(&mine, lr)?;
            self.share_updated_parameters(&params.vars, &params.owners)?;
        } else {
            optimizer.step(grads, lr)?;
        }
        if let Some(s) = &mut self.scaler {
            s.update(found_inf);
        }
        grads.clear();
        self.next_lr = self.lr_at(plan, self.state.global_step + 1 - self.skipped_steps);
        Ok((grad_norm, lr))
    }

    /// The learning rate after `taken` steps of the schedule.
    pub(super) fn lr_at(&self, plan: &Plan, taken: u64) -> f64 {
        let base = self.args.learning_rate;
        base * plan
            .schedule
            .factor(taken, plan.warmup, plan.max_steps, base)
    }

    /// After the last step: the saves finished, the summary metrics logged, the best
    /// model loaded back (`load_best_model_at_end`).
    fn finish_training(
        &mut self,
        plan: &Plan,
        start_step: u64,
        start: Instant,
    ) -> Result<TrainOutput> {
        self.finish_saves()?;
        self.tr_loss = self.mean_over_ranks(self.tr_loss)?;
        let runtime = start.elapsed().as_secs_f64();
        let steps = self.state.global_step - start_step;
        // As transformers: the loss not yet logged joins the total, divided by every
        // step of the run (kiln restores the total on resume, so this is the whole run's).
        self.total_loss += self.tr_loss;
        self.tr_loss = 0.0;
        self.store_flos()?;
        let counted = self.state.global_step - self.loss_counted_from;
        let train_loss = self.total_loss / (counted.max(1)) as f64;
        let samples = steps as f64 * (plan.batch_size * plan.ga * plan.world) as f64;
        let mut metrics = BTreeMap::from([
            ("train_runtime".to_string(), round_to(runtime, 4)),
            (
                "train_samples_per_second".to_string(),
                round_to(samples / runtime.max(1e-9), 3),
            ),
            (
                "train_steps_per_second".to_string(),
                round_to(steps as f64 / runtime.max(1e-9), 3),
            ),
            ("total_flos".to_string(), self.state.total_flos),
            ("train_loss".to_string(), train_loss),
        ]);
        self.memory.stop("train", &mut metrics);
        self.log(
            metrics
                .iter()
                .map(|(k, v)| (k.clone(), metric_value(k, *v)))
                .collect(),
            None,
        );
        metrics.insert("epoch".into(), self.state.epoch.unwrap_or(0.0));
        if self.args.load_best_model_at_end
            && let Some(best) = self.state.best_model_checkpoint.clone()
        {
            let score = match self.state.best_metric {
                Some(m) => format!(" (score: {m})"),
                None => String::new(),
            };
            self.say(&format!("loading best model from {best}{score}"));
            self.load_weights(Path::new(&best))?;
        }
        self.each_callback(|cb, a, s, c| cb.on_train_end(a, s, c));
        Ok(TrainOutput {
            global_step: self.state.global_step,
            training_loss: train_loss,
            metrics,
        })
    }

    /// What the default flow and the callbacks asked for after a step or an epoch:
    /// log, evaluate (and track the best), save.
    fn maybe_log_save_evaluate(
        &mut self,
        grad_norm: Option<f64>,
        lr: Option<f64>,
        optimizer: &Optimizer,
        pos: Position,
        bar: Option<&indicatif::ProgressBar>,
    ) -> Result<()> {
        if self.control.should_log && self.state.global_step > self.last_logged {
            self.tr_loss = self.mean_over_ranks(self.tr_loss)?;
            let steps = (self.state.global_step - self.last_logged) as f64;
            let mut logs =
                BTreeMap::from([("loss".to_string(), py(round_to(self.tr_loss / steps, 4)))]);
            if let Some(g) = grad_norm {
                logs.insert("grad_norm".into(), py(g));
            }
            if let Some(lr) = lr {
                logs.insert("learning_rate".into(), py(lr));
            }
            if let Some((start, tokens)) = self.session
                && self.args.include_num_input_tokens_seen != TokensSeen::No
            {
                // transformers' speed_metrics("train", start_time, num_tokens=…).
                let runtime = start.elapsed().as_secs_f64();
                logs.insert("train_runtime".into(), py(round_to(runtime, 4)));
                if runtime > 0.0 {
                    let n = (self.state.num_input_tokens_seen - tokens) as f64;
                    logs.insert(
                        "train_tokens_per_second".into(),
                        py(round_to(n / runtime, 3)),
                    );
                }
            }
            self.total_loss += self.tr_loss;
            self.tr_loss = 0.0;
            self.last_logged = self.state.global_step;
            self.log(logs, bar);
        }
        if self.control.should_evaluate {
            let metrics = self.evaluate_inner(bar)?;
            let improved = self.update_best(&metrics)?;
            if self.args.save_strategy == Strategy::Best {
                self.control.should_save = improved;
            }
        }
        if self.control.should_save {
            self.save_checkpoint(optimizer, pos, bar)?;
            self.each_callback(|cb, a, s, c| cb.on_save(a, s, c));
        }
        Ok(())
    }
}

/// A summary metric as transformers logs it: memory metrics are whole bytes.
pub(super) fn metric_value(key: &str, v: f64) -> kiln_formats::pyjson::PyValue {
    if key.contains("_mem_") {
        kiln_formats::pyjson::PyValue::Int(v as i64)
    } else {
        py(v)
    }
}

/// The training tokens of `batch` that `include_num_input_tokens_seen` counts.
fn tokens_of(batch: &Batch, what: TokensSeen) -> Result<u64> {
    Ok(match (what, &batch.attention_mask) {
        (TokensSeen::No, _) => 0,
        (TokensSeen::NonPadding, Some(mask)) => mask
            .to_dtype(candle_core::DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()? as u64,
        (TokensSeen::All | TokensSeen::NonPadding, _) => batch.input_ids.elem_count() as u64,
    })
}

//! What a run will do, decided before its first step: the checks of the arguments, the
//! data and `output_dir`, the checkpoint to resume, and the numbers of batches, updates,
//! epochs and steps (as transformers computes them, per process).

use std::path::PathBuf;
use std::sync::Arc;

use kiln_checkpoint::async_save::AsyncSaver;
use kiln_checkpoint::state::TrainerState;
use kiln_formats::pyjson::PyValue;
use kiln_optim::Schedule;

use super::Trainer;
use crate::args::{Strategy, resolve_steps};
use crate::data::BatchSource;
use crate::model::Model;
use crate::{Error, Result};

/// The shape of a training run.
#[derive(Debug)]
pub(super) struct Plan {
    /// Training examples.
    pub n: usize,
    /// Processes of the run, and this one's rank.
    pub world: usize,
    pub rank: usize,
    /// Examples per micro-batch on each process.
    pub batch_size: usize,
    /// Micro-batches per epoch on each process.
    pub batches_per_epoch: usize,
    /// Micro-batches per optimizer update (`gradient_accumulation_steps`).
    pub ga: usize,
    /// Optimizer updates per epoch.
    pub updates_per_epoch: u64,
    /// Optimizer updates in all, and the epochs they span.
    pub max_steps: u64,
    pub num_epochs: u64,
    /// The learning-rate schedule and its warm-up steps.
    pub schedule: Schedule,
    pub warmup: u64,
}

impl<M: Model> Trainer<M> {
    /// Checks what training needs (arguments, data, `output_dir`), cleans leftovers of
    /// a crash, and finds the checkpoint to resume: the training data and that folder.
    pub(super) fn prepare_run(
        &mut self,
        resume: Option<&str>,
    ) -> Result<(Arc<dyn BatchSource>, Option<PathBuf>)> {
        self.args.validate()?;
        let train = self
            .train_data
            .clone()
            .ok_or_else(|| Error::Config("no training data: call with_train_dataset".into()))?;
        if train.is_empty() {
            return Err(Error::Config("the training data is empty".into()));
        }
        if self.args.eval_strategy != Strategy::No && self.eval_data.is_none() {
            return Err(Error::Config(
                "eval_strategy needs evaluation data (validation_file)".into(),
            ));
        }
        if self.args.eval_on_start && self.eval_data.is_none() {
            return Err(Error::Config(
                "eval_on_start needs evaluation data (validation_file)".into(),
            ));
        }
        self.prepare_precision()?;
        let resuming = resume
            .or(self.args.resume_from_checkpoint.as_deref())
            .is_some();
        self.check_output_dir(resuming)?;
        if self.writer().is_main() {
            kiln_checkpoint::scan::clean_leftovers(&self.output_dir())?;
        }
        // The other ranks look for checkpoints only once the clean-up (which may put a
        // checkpoint back) is done, so that every rank resumes the same one.
        self.sync()?;
        let resume_dir = self.resolve_resume(resume)?;
        if let Some(dir) = &resume_dir {
            self.check_resume_kind(dir)?;
        }
        self.saver = AsyncSaver::new(1);
        Ok((train, resume_dir))
    }

    /// The plan for `n` training examples under this trainer's arguments.
    pub(super) fn plan(&self, n: usize) -> Result<Plan> {
        let a = &self.args;
        let world = self.dist.world_size();
        let batch_size = a.per_device_train_batch_size;
        // Each rank's share of an epoch (DistributedSampler pads to a multiple of world).
        let n_rank = n.div_ceil(world);
        let batches_per_epoch = if a.dataloader_drop_last {
            n_rank / batch_size
        } else {
            n_rank.div_ceil(batch_size)
        };
        if batches_per_epoch == 0 {
            return Err(Error::Config(format!(
                "{n_rank} training examples per process make no full batch of {batch_size} with dataloader_drop_last"
            )));
        }
        let ga = a.gradient_accumulation_steps;
        let updates_per_epoch = (batches_per_epoch.div_ceil(ga)).max(1) as u64;
        let max_steps = if a.max_steps > 0 {
            a.max_steps as u64
        } else {
            (a.num_train_epochs * updates_per_epoch as f64).ceil() as u64
        };
        let num_epochs = max_steps.div_ceil(updates_per_epoch);
        let schedule = Schedule::from_name(
            &a.lr_scheduler_type,
            &a.lr_scheduler_kwargs,
            a.learning_rate,
        )?;
        Ok(Plan {
            n,
            world,
            rank: self.dist.rank(),
            batch_size,
            batches_per_epoch,
            ga,
            updates_per_epoch,
            max_steps,
            num_epochs,
            schedule,
            warmup: a.warmup_steps_for(max_steps),
        })
    }

    /// The state a run starts from (a resumed run then takes the checkpoint's).
    pub(super) fn fresh_state(&self, plan: &Plan) -> TrainerState {
        let a = &self.args;
        TrainerState {
            max_steps: plan.max_steps,
            logging_steps: resolve_steps(a.logging_steps, plan.max_steps),
            eval_steps: resolve_steps(a.eval_steps(), plan.max_steps),
            save_steps: resolve_steps(a.save_steps, plan.max_steps),
            train_batch_size: Some((plan.batch_size * plan.world) as u64),
            num_train_epochs: PyValue::Int(plan.num_epochs as i64),
            is_local_process_zero: self.dist.local_rank() == 0,
            is_world_process_zero: self.dist.is_main(),
            epoch: Some(0.0),
            ..TrainerState::default()
        }
    }

    /// The checkpoint folder to resume: `"last"` (or `"true"`) finds the newest one in
    /// `output_dir` that is complete and matches its manifest's digests, saying in one
    /// line each which newer ones it passed over and why (they are left in place); an
    /// explicit folder that fails the digests is refused.
    fn resolve_resume(&self, resume: Option<&str>) -> Result<Option<PathBuf>> {
        let out = self.output_dir();
        match resume.or(self.args.resume_from_checkpoint.as_deref()) {
            None => Ok(None),
            Some("last") | Some("true") => {
                let (sound, passed_over) = kiln_checkpoint::scan::last_sound_checkpoint(&out)?;
                for e in &passed_over {
                    self.say_at(
                        crate::args::LogLevel::Warning,
                        &format!("not resuming from it: {e}; left in place"),
                    );
                }
                sound.map(Some).ok_or_else(|| {
                    Error::Config(format!(
                        "no complete checkpoint to resume in {}",
                        out.display()
                    ))
                })
            }
            Some(p) => {
                let dir = PathBuf::from(p);
                if dir.join(kiln_checkpoint::commit::MANIFEST_NAME).is_file() {
                    let manifest = kiln_checkpoint::commit::Manifest::read(&dir)?;
                    kiln_checkpoint::scan::verify_digests(&dir, &manifest).map_err(
                        |e| match e {
                            kiln_checkpoint::Error::Corrupt { path, reason } => Error::Resume {
                                path,
                                reason: format!("corrupt: {reason}; not resuming from it"),
                            },
                            e => e.into(),
                        },
                    )?;
                }
                Ok(Some(dir))
            }
        }
    }

    /// A LoRA run resumes an adapter checkpoint, a full run a full one: the other kind
    /// is refused in one line, before any step.
    fn check_resume_kind(&self, dir: &std::path::Path) -> Result<()> {
        let adapter_run = kiln_checkpoint::model::is_adapter_config(&self.model.config());
        let adapter_ckpt = kiln_checkpoint::model::is_adapter_folder(dir);
        let reason = match (adapter_run, adapter_ckpt) {
            (false, true) => {
                "it holds a LoRA adapter (adapter_config.json); resume it with the run's LoRA options (--use_peft true, [peft])"
            }
            (true, false) => {
                "it holds a full model, not a LoRA adapter; resume it without --use_peft / [peft]"
            }
            _ => return Ok(()),
        };
        Err(Error::Resume {
            path: dir.to_path_buf(),
            reason: reason.to_string(),
        })
    }

    /// `output_dir` must be a writable folder, without checkpoints unless resuming or
    /// `overwrite_output_dir`.
    fn check_output_dir(&self, resuming: bool) -> Result<()> {
        let out = self.output_dir();
        if out.exists() && !out.is_dir() {
            return Err(Error::Config(format!(
                "output_dir {} is a file; give a folder",
                out.display()
            )));
        }
        std::fs::create_dir_all(&out).map_err(|e| {
            Error::Config(format!(
                "output_dir {} cannot be created: {e}",
                out.display()
            ))
        })?;
        // One probe per process: the ranks of a run check the same folder at once.
        let probe = out.join(format!(".kiln-write-test-{}", std::process::id()));
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| {
                Error::Config(format!("output_dir {} is not writable: {e}", out.display()))
            })?;
        if !resuming && !self.args.overwrite_output_dir {
            let existing = kiln_checkpoint::scan::list_checkpoints(&out)?;
            if let Some(c) = existing.first() {
                return Err(Error::Config(format!(
                    "output_dir {} already holds checkpoints ({}); pass --resume_from_checkpoint last to continue, --overwrite_output_dir true to train anew there, or choose another output_dir",
                    out.display(),
                    c.path.display()
                )));
            }
        }
        Ok(())
    }
}

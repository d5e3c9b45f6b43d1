//! `kiln plot`: a run's curves from its `trainer_state.json` (train loss, eval loss and
//! metrics, learning rate, one panel each, step on the x axis), with its checkpoints and
//! the best one marked; several output folders on one figure to compare runs.
//!
//! A folder's state is the newer (by `global_step`) of `output_dir/trainer_state.json`,
//! written at the end of training, and its newest complete checkpoint's, so a run that
//! crashed or is still going plots up to its last save. A checkpoint folder or a
//! `trainer_state.json` file can be given directly too.

mod draw;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use kiln_checkpoint::scan::list_checkpoints;
use kiln_checkpoint::state::{LogEntry, TRAINER_STATE_NAME, TrainerState};

use crate::Error;

pub use draw::{Image, render};

/// Keys of `log_history` entries that are not curves: the x axes, the run's counters and
/// the timings of evaluation loops.
const NOT_CURVES: &[&str] = &[
    "step",
    "epoch",
    "total_flos",
    "num_input_tokens_seen",
    "train_runtime",
    "eval_runtime",
    "eval_samples_per_second",
    "eval_steps_per_second",
    "eval_model_preparation_time",
];

/// One run to draw: its name in the legend, logged values and saves.
#[derive(Debug, Clone)]
pub struct Run {
    /// The legend's name: the output folder's name.
    pub name: String,
    /// `log_history` without the end-of-training summary entry.
    pub history: Vec<LogEntry>,
    /// Steps of its complete `checkpoint-<step>` folders.
    pub checkpoints: Vec<u64>,
    /// The best checkpoint's step and `best_metric`, as the state records them.
    pub best: Option<(u64, Option<f64>)>,
    /// The run's last step (`global_step`).
    pub global_step: u64,
}

impl Run {
    /// Reads a run from an output folder, a checkpoint folder or a `trainer_state.json`.
    pub fn load(path: &Path) -> Result<Run, Error> {
        let (state, checkpoints) = if path.is_file() {
            (TrainerState::load(path)?, Vec::new())
        } else if path.is_dir() {
            let complete: Vec<_> = list_checkpoints(path)?
                .into_iter()
                .filter(|c| c.is_complete())
                .collect();
            let candidates = [
                Some(path.join(TRAINER_STATE_NAME)),
                complete.last().map(|c| c.path.join(TRAINER_STATE_NAME)),
            ];
            let mut newest: Option<TrainerState> = None;
            for file in candidates.into_iter().flatten().filter(|f| f.is_file()) {
                let s = TrainerState::load(&file)?;
                if newest
                    .as_ref()
                    .is_none_or(|n| s.global_step > n.global_step)
                {
                    newest = Some(s);
                }
            }
            let Some(state) = newest else {
                return Err(Error::Usage(format!(
                    "{}: no {TRAINER_STATE_NAME} (neither in the folder nor in a complete \
                     checkpoint-<step> folder)",
                    path.display()
                )));
            };
            (state, complete.iter().map(|c| c.step).collect())
        } else {
            return Err(Error::Usage(format!(
                "{}: no such file or folder",
                path.display()
            )));
        };
        Ok(Run::from_state(&run_name(path), state, checkpoints))
    }

    /// A run from a state already read.
    pub fn from_state(name: &str, state: TrainerState, checkpoints: Vec<u64>) -> Run {
        let best = state
            .best_global_step
            .or_else(|| {
                let b = state.best_model_checkpoint.as_deref()?;
                kiln_checkpoint::scan::parse_step(Path::new(b).file_name()?.to_str()?)
            })
            .map(|s| (s, state.best_metric));
        let history = state
            .log_history
            .into_iter()
            // The end-of-training summary (train logs may hold train_runtime too, with
            // include_num_input_tokens_seen).
            .filter(|e| !e.contains_key("train_loss"))
            .collect();
        Run {
            name: name.to_string(),
            history,
            checkpoints,
            best,
            global_step: state.global_step,
        }
    }

    /// The curve of `metric`: (step, value) of each entry that logged a finite value.
    pub fn series(&self, metric: &str) -> Vec<(f64, f64)> {
        self.history
            .iter()
            .filter_map(|e| {
                let step = e.get("step")?.as_f64()?;
                let v = e.get(metric)?.as_f64()?;
                v.is_finite().then_some((step, v))
            })
            .collect()
    }

    /// Every key that logged a number somewhere, except the axes and timings.
    pub fn metrics(&self) -> BTreeSet<String> {
        self.history
            .iter()
            .flat_map(|e| e.iter())
            .filter(|(k, v)| !NOT_CURVES.contains(&k.as_str()) && v.as_f64().is_some())
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// The legend's name of a path: its folder's name (the parent's for a file).
fn run_name(path: &Path) -> String {
    let p = if path.is_file() {
        path.parent().unwrap_or(path)
    } else {
        path
    };
    let abs = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    abs.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// The panels to draw: `asked` (log_history keys, e.g. `loss`, `eval_accuracy`), each
/// logged by at least one run; or, when none are asked, `loss`, `eval_loss`, the other
/// evaluation metrics and `learning_rate`, those that were logged.
pub fn choose_metrics(runs: &[Run], asked: &[String]) -> Result<Vec<String>, Error> {
    let logged: BTreeSet<String> = runs.iter().flat_map(Run::metrics).collect();
    if !asked.is_empty() {
        if let Some(m) = asked.iter().find(|m| !logged.contains(*m)) {
            let list: Vec<&str> = logged.iter().map(String::as_str).collect();
            return Err(Error::Usage(format!(
                "--metric {m}: not logged by any run; logged: {}",
                if list.is_empty() {
                    "nothing".to_string()
                } else {
                    list.join(", ")
                }
            )));
        }
        let mut seen = BTreeSet::new();
        return Ok(asked.iter().filter(|m| seen.insert(*m)).cloned().collect());
    }
    let mut out: Vec<String> = ["loss", "eval_loss"]
        .into_iter()
        .filter(|m| logged.contains(*m))
        .map(String::from)
        .collect();
    out.extend(
        logged
            .iter()
            .filter(|m| m.starts_with("eval_") && *m != "eval_loss")
            .cloned(),
    );
    if logged.contains("learning_rate") {
        out.push("learning_rate".to_string());
    }
    if out.is_empty() {
        return Err(Error::Usage(
            "nothing to plot: the runs logged no loss, evaluation metric or learning rate \
             (pass --metric NAME for another logged value)"
                .to_string(),
        ));
    }
    Ok(out)
}

/// The image format, from the output's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// A PNG (RGB, 8 bits).
    Png,
    /// An SVG.
    Svg,
}

impl ImageFormat {
    /// `.png` or `.svg` (any case); anything else is refused.
    pub fn of(path: &Path) -> Result<ImageFormat, Error> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("png") => Ok(ImageFormat::Png),
            Some("svg") => Ok(ImageFormat::Svg),
            _ => Err(Error::Usage(format!(
                "--out {}: the file must end in .png or .svg",
                path.display()
            ))),
        }
    }
}

/// Pixels of one panel's height, and of the whole figure's width, by default.
pub const PANEL_HEIGHT: u32 = 280;
/// The default width.
pub const WIDTH: u32 = 1000;

/// `kiln plot`: reads the runs, draws the figure into `out` (default: the first run's
/// folder `/training_curves.png`) and says what it drew.
pub(crate) fn plot_cmd(
    dirs: &[PathBuf],
    out: Option<&Path>,
    metrics: &[String],
    size: Option<(u32, u32)>,
) -> crate::CmdResult {
    let runs = dirs
        .iter()
        .map(|d| Run::load(d))
        .collect::<Result<Vec<_>, _>>()?;
    let out = match out {
        Some(o) => o.to_path_buf(),
        None if dirs[0].is_dir() => dirs[0].join("training_curves.png"),
        None => dirs[0].with_file_name("training_curves.png"),
    };
    let format = ImageFormat::of(&out)?;
    let metrics = choose_metrics(&runs, metrics)?;
    let n = u32::try_from(metrics.len()).unwrap_or(u32::MAX);
    let (w, h) = size.unwrap_or((WIDTH, PANEL_HEIGHT.saturating_mul(n)));
    let image = render(&runs, &metrics, format, w, h)?;
    std::fs::write(&out, image.bytes()).map_err(|e| kiln_formats::Error::io(&out, e))?;
    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    crate::ok(format!(
        "wrote {} ({w}x{h}): {} of {}\n",
        out.display(),
        metrics.join(", "),
        names.join(", ")
    ))
}

/// Where the best checkpoint's marker goes on `metric`'s curve: at its step, when the
/// curve holds `best_metric` there (the curve of `metric_for_best_model`).
pub(crate) fn best_point(run: &Run, metric: &str) -> Option<(f64, f64)> {
    let (step, value) = run.best?;
    let value = value?;
    run.series(metric)
        .into_iter()
        .find(|&(s, v)| s == step as f64 && (v - value).abs() <= 1e-12 * value.abs().max(1.0))
}

/// Lower and upper bounds with a margin, never empty.
pub(crate) fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    if span <= f64::EPSILON * hi.abs().max(1.0) {
        let d = if hi == 0.0 { 1.0 } else { hi.abs() * 0.05 };
        return (lo - d, hi + d);
    }
    (lo - span * 0.05, hi + span * 0.05)
}

#[cfg(test)]
mod tests;

//! Log entries (`log_history`, the printed line), callbacks and the progress bar.

use std::collections::BTreeMap;

use kiln_checkpoint::state::TrainerState;
use kiln_formats::pyjson::PyValue;

use super::Trainer;
use crate::args::TrainingArguments;
use crate::callback::{TrainerCallback, TrainerControl};
use crate::model::Model;

pub(super) fn py(x: f64) -> PyValue {
    PyValue::Float(x)
}

pub(super) fn round_to(x: f64, places: i32) -> f64 {
    let m = 10f64.powi(places);
    (x * m).round() / m
}

impl<M: Model> Trainer<M> {
    /// `report_to`'s integrations, on the main process (once per trainer).
    pub(super) fn add_reporting(&mut self) {
        let added = self
            .callbacks
            .iter()
            .any(|c| c.name() == "TensorBoardCallback");
        if !self.args.reports_to_tensorboard() || added || !self.writer().is_main() {
            return;
        }
        let dir = match &self.args.logging_dir {
            Some(d) => std::path::PathBuf::from(d),
            None => match std::env::var_os("TENSORBOARD_LOGGING_DIR") {
                Some(d) => std::path::PathBuf::from(d),
                None => crate::report::default_logging_dir(&self.output_dir()),
            },
        };
        let config = serde_json::to_string_pretty(&self.model.config()).ok();
        self.callbacks
            .push(Box::new(crate::report::TensorBoardCallback::new(
                dir, config,
            )));
    }

    pub(super) fn progress_bar(&self, max_steps: u64, at: u64) -> Option<indicatif::ProgressBar> {
        use std::io::IsTerminal;
        if self.quiet
            || self.args.disable_tqdm
            || !self.dist.is_main()
            || !std::io::stderr().is_terminal()
        {
            return None;
        }
        let bar = indicatif::ProgressBar::new(max_steps);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{wide_bar} {pos}/{len} [{elapsed}<{eta}, {per_sec}]",
        ) {
            bar.set_style(style);
        }
        bar.set_position(at);
        Some(bar)
    }

    pub(super) fn each_callback(
        &mut self,
        mut f: impl FnMut(
            &mut dyn TrainerCallback,
            &TrainingArguments,
            &TrainerState,
            &mut TrainerControl,
        ),
    ) {
        for cb in &mut self.callbacks {
            f(cb.as_mut(), &self.args, &self.state, &mut self.control);
        }
    }

    pub(super) fn log(
        &mut self,
        mut logs: BTreeMap<String, PyValue>,
        bar: Option<&indicatif::ProgressBar>,
    ) {
        if let Some(e) = self.state.epoch {
            logs.insert("epoch".into(), py(e));
        }
        if self.args.include_num_input_tokens_seen != crate::args::TokensSeen::No {
            let n = self.state.num_input_tokens_seen;
            logs.insert("num_input_tokens_seen".into(), PyValue::Int(n as i64));
        }
        let line = log_line(&logs);
        // At every log level, as transformers' progress callbacks print the logs.
        match bar {
            Some(b) => b.println(line),
            None if !self.quiet && self.dist.is_main() => eprintln!("{line}"),
            None => {}
        }
        let mut entry = logs.clone();
        entry.insert("step".into(), PyValue::Int(self.state.global_step as i64));
        self.state.log_history.push(entry);
        let mut control = self.control;
        for cb in &mut self.callbacks {
            cb.on_log(&self.args, &self.state, &mut control, &logs);
        }
        self.control = control;
    }
}

/// One log entry as a line: `{"loss": 0.6931, "learning_rate": 5e-05, "epoch": 0.5}`.
fn log_line(logs: &BTreeMap<String, PyValue>) -> String {
    let items: Vec<String> = logs
        .iter()
        .map(|(k, v)| {
            let v = match v {
                PyValue::Float(f) => kiln_formats::pyjson::float_repr(*f),
                other => kiln_formats::pyjson::dumps_py(other),
            };
            format!("{k:?}: {v}")
        })
        .collect();
    format!("{{{}}}", items.join(", "))
}

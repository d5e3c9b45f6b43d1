//! Callbacks: hooks into the training loop that can steer it, as transformers'
//! `TrainerCallback` and `TrainerControl`; the flow that decides when to log, evaluate
//! and save ([`default_flow_on_step_end`], [`default_flow_on_epoch_end`], as
//! transformers' `DefaultFlowCallback` in 5.x); and [`EarlyStoppingCallback`].

use std::collections::BTreeMap;

use kiln_checkpoint::state::TrainerState;
use kiln_formats::pyjson::PyValue;

use crate::args::{Strategy, TrainingArguments};

/// What the loop should do next; callbacks set these flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrainerControl {
    /// Stop training after this step.
    pub should_training_stop: bool,
    /// Stop the current epoch.
    pub should_epoch_stop: bool,
    /// Save a checkpoint now.
    pub should_save: bool,
    /// Evaluate now.
    pub should_evaluate: bool,
    /// Log now.
    pub should_log: bool,
}

impl TrainerControl {
    /// The state transformers saves under `stateful_callbacks.TrainerControl`.
    pub fn to_state(&self) -> PyValue {
        let args = [
            ("should_epoch_stop", self.should_epoch_stop),
            ("should_evaluate", self.should_evaluate),
            ("should_log", self.should_log),
            ("should_save", self.should_save),
            ("should_training_stop", self.should_training_stop),
        ];
        callback_state(args.iter().map(|(k, v)| (*k, PyValue::Bool(*v))), [])
    }
}

/// `{"args": {...}, "attributes": {...}}`, the form of a saved callback state.
pub fn callback_state<'a>(
    args: impl IntoIterator<Item = (&'a str, PyValue)>,
    attributes: impl IntoIterator<Item = (&'a str, PyValue)>,
) -> PyValue {
    let dict = |items: &mut dyn Iterator<Item = (&'a str, PyValue)>| {
        PyValue::Dict(items.map(|(k, v)| (k.to_string(), v)).collect())
    };
    PyValue::Dict(BTreeMap::from([
        ("args".to_string(), dict(&mut args.into_iter())),
        ("attributes".to_string(), dict(&mut attributes.into_iter())),
    ]))
}

/// A hook into the training loop. Every method has an empty default.
#[allow(unused_variables)]
pub trait TrainerCallback: Send {
    /// The key of this callback's state in `stateful_callbacks` (its class name in
    /// transformers, e.g. `EarlyStoppingCallback`).
    fn name(&self) -> &str;
    /// Before the first step.
    fn on_train_begin(
        &mut self,
        args: &TrainingArguments,
        state: &TrainerState,
        control: &mut TrainerControl,
    ) {
    }
    /// After the last step.
    fn on_train_end(
        &mut self,
        args: &TrainingArguments,
        state: &TrainerState,
        control: &mut TrainerControl,
    ) {
    }
    /// At the start of an epoch.
    fn on_epoch_begin(
        &mut self,
        args: &TrainingArguments,
        state: &TrainerState,
        control: &mut TrainerControl,
    ) {
    }
    /// At the end of an epoch.
    fn on_epoch_end(
        &mut self,
        args: &TrainingArguments,
        state: &TrainerState,
        control: &mut TrainerControl,
    ) {
    }
    /// After each optimizer step.
    fn on_step_end(
        &mut self,
        args: &TrainingArguments,
        state: &TrainerState,
        control: &mut TrainerControl,
    ) {
    }
    /// After an entry is added to the log.
    fn on_log(
        &mut self,
        args: &TrainingArguments,
        state: &TrainerState,
        control: &mut TrainerControl,
        logs: &BTreeMap<String, PyValue>,
    ) {
    }
    /// After an evaluation, with its metrics (`eval_loss`, `eval_accuracy`, …).
    fn on_evaluate(
        &mut self,
        args: &TrainingArguments,
        state: &TrainerState,
        control: &mut TrainerControl,
        metrics: &BTreeMap<String, f64>,
    ) {
    }
    /// After a checkpoint was handed to the writer.
    fn on_save(
        &mut self,
        args: &TrainingArguments,
        state: &TrainerState,
        control: &mut TrainerControl,
    ) {
    }
    /// State to keep in checkpoints (`stateful_callbacks`), if any.
    fn state(&self) -> Option<PyValue> {
        None
    }
    /// Restores what [`state`](Self::state) saved.
    fn load_state(&mut self, state: &PyValue) {}
}

/// transformers' `DefaultFlowCallback.on_step_end` (5.x): log, evaluate, save flags, and
/// the end of training at `max_steps` (with a final evaluation and save).
pub fn default_flow_on_step_end(
    args: &TrainingArguments,
    state: &TrainerState,
    c: &mut TrainerControl,
) {
    let step = state.global_step;
    if step == 1 && args.logging_first_step {
        c.should_log = true;
    }
    if args.logging_strategy == Strategy::Steps
        && state.logging_steps > 0
        && step.is_multiple_of(state.logging_steps)
    {
        c.should_log = true;
    }
    let eval_due = state.eval_steps > 0 && step.is_multiple_of(state.eval_steps);
    if args.eval_strategy == Strategy::Steps && eval_due && args.eval_delay <= step as f64 {
        c.should_evaluate = true;
    }
    if args.save_strategy == Strategy::Steps
        && state.save_steps > 0
        && step.is_multiple_of(state.save_steps)
    {
        c.should_save = true;
    }
    if step >= state.max_steps {
        c.should_training_stop = true;
        if args.eval_strategy == Strategy::Steps && !eval_due && args.eval_delay <= step as f64 {
            c.should_evaluate = true;
        }
        if args.save_strategy == Strategy::Steps {
            c.should_save = true;
        }
    }
}

/// transformers' `DefaultFlowCallback.on_epoch_end`.
pub fn default_flow_on_epoch_end(
    args: &TrainingArguments,
    state: &TrainerState,
    c: &mut TrainerControl,
) {
    if args.logging_strategy == Strategy::Epoch {
        c.should_log = true;
    }
    if args.eval_strategy == Strategy::Epoch && args.eval_delay <= state.epoch.unwrap_or(0.0) {
        c.should_evaluate = true;
    }
    if args.save_strategy == Strategy::Epoch {
        c.should_save = true;
    }
}

/// Stops training when the best metric has not improved by more than `threshold` for
/// `patience` evaluations (transformers' `EarlyStoppingCallback`). Needs
/// `metric_for_best_model` (or `load_best_model_at_end`) and evaluations.
#[derive(Debug, Clone)]
pub struct EarlyStoppingCallback {
    /// Evaluations without improvement before stopping.
    pub patience: u64,
    /// Minimum improvement that counts.
    pub threshold: f64,
    counter: u64,
}

impl EarlyStoppingCallback {
    /// Stops after `patience` evaluations without an improvement above `threshold`.
    pub fn new(patience: u64, threshold: f64) -> Self {
        EarlyStoppingCallback {
            patience,
            threshold,
            counter: 0,
        }
    }

    /// Evaluations since the last improvement.
    pub fn counter(&self) -> u64 {
        self.counter
    }
}

impl TrainerCallback for EarlyStoppingCallback {
    fn name(&self) -> &str {
        "EarlyStoppingCallback"
    }

    fn on_evaluate(
        &mut self,
        args: &TrainingArguments,
        state: &TrainerState,
        control: &mut TrainerControl,
        metrics: &BTreeMap<String, f64>,
    ) {
        let Some(name) = args.best_metric_name() else {
            return;
        };
        let key = if name.starts_with("eval_") {
            name
        } else {
            format!("eval_{name}")
        };
        let Some(&value) = metrics.get(&key) else {
            return;
        };
        let better = |a: f64, b: f64| {
            if args.is_greater_better() {
                a > b
            } else {
                a < b
            }
        };
        match state.best_metric {
            Some(best) if !(better(value, best) && (value - best).abs() > self.threshold) => {
                self.counter += 1
            }
            _ => self.counter = 0,
        }
        if self.counter >= self.patience {
            control.should_training_stop = true;
        }
    }

    fn state(&self) -> Option<PyValue> {
        Some(callback_state(
            [
                (
                    "early_stopping_patience",
                    PyValue::Int(self.patience as i64),
                ),
                ("early_stopping_threshold", PyValue::Float(self.threshold)),
            ],
            [(
                "early_stopping_patience_counter",
                PyValue::Int(self.counter as i64),
            )],
        ))
    }

    /// As transformers re-creates the callback: the saved arguments (patience,
    /// threshold) and the counter.
    fn load_state(&mut self, state: &PyValue) {
        let PyValue::Dict(d) = state else {
            return;
        };
        let value = |table: &str, key: &str| match d.get(table) {
            Some(PyValue::Dict(t)) => t.get(key).cloned(),
            _ => None,
        };
        if let Some(p) = value("args", "early_stopping_patience").and_then(|v| v.as_i64()) {
            self.patience = p.max(0) as u64;
        }
        if let Some(t) = value("args", "early_stopping_threshold").and_then(|v| v.as_f64()) {
            self.threshold = t;
        }
        if let Some(c) =
            value("attributes", "early_stopping_patience_counter").and_then(|v| v.as_i64())
        {
            self.counter = c.max(0) as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_decides_like_transformers() {
        let args = TrainingArguments {
            eval_strategy: Strategy::Steps,
            ..Default::default()
        };
        let mut st = TrainerState {
            logging_steps: 5,
            eval_steps: 10,
            save_steps: 20,
            max_steps: 25,
            ..Default::default()
        };
        let flags = |st: &TrainerState| {
            let mut c = TrainerControl::default();
            default_flow_on_step_end(&args, st, &mut c);
            (
                c.should_log,
                c.should_evaluate,
                c.should_save,
                c.should_training_stop,
            )
        };
        st.global_step = 5;
        assert_eq!(flags(&st), (true, false, false, false));
        st.global_step = 20;
        assert_eq!(flags(&st), (true, true, true, false));
        st.global_step = 25;
        assert_eq!(flags(&st), (true, true, true, true));
    }

    #[test]
    fn early_stopping_counts_and_round_trips() {
        let args = TrainingArguments {
            metric_for_best_model: Some("loss".into()),
            ..Default::default()
        };
        let mut cb = EarlyStoppingCallback::new(2, 0.0);
        let mut st = TrainerState::default();
        let mut c = TrainerControl::default();
        let m = |v: f64| BTreeMap::from([("eval_loss".to_string(), v)]);
        cb.on_evaluate(&args, &st, &mut c, &m(1.0));
        st.best_metric = Some(1.0);
        cb.on_evaluate(&args, &st, &mut c, &m(1.0));
        assert_eq!(cb.counter(), 1);
        assert!(!c.should_training_stop);
        let saved = cb.state().unwrap();
        let mut other = EarlyStoppingCallback::new(2, 0.0);
        other.load_state(&saved);
        other.on_evaluate(&args, &st, &mut c, &m(1.5));
        assert!(c.should_training_stop);
    }
}

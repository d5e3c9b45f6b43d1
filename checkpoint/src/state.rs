//! `trainer_state.json`, in transformers' `TrainerState` schema, key for key.
//!
//! The file is written as `TrainerState.save_to_json` writes it:
//! `json.dumps(asdict(state), indent=2, sort_keys=True) + "\n"`, so floats read like
//! Python's `repr` (`3.875e-05`, `1.0`), a NaN `grad_norm` is the bare token `NaN`,
//! integers stay integers, and non-ASCII is escaped. A diff against a file transformers
//! wrote shows only real differences, and `TrainerState.load_from_json` reads it.
//!
//! Keys this version does not know (a newer transformers may add some) are kept and
//! written back unchanged rather than dropped.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_formats::pyjson::{self, PyValue};

use crate::error::IoContext;
use crate::{Error, Result};

/// One entry of `log_history`: `{"loss": 2.3412, "grad_norm": …, "step": 10, …}`.
pub type LogEntry = BTreeMap<String, PyValue>;

/// The state of a training run, as transformers' `TrainerState` holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerState {
    /// Fractional epoch reached (`epoch_idx + (step + 1) / steps_in_epoch`).
    pub epoch: Option<f64>,
    /// Optimizer steps taken.
    pub global_step: u64,
    /// Total optimizer steps of the run.
    pub max_steps: u64,
    /// Logging interval in steps.
    pub logging_steps: u64,
    /// Evaluation interval in steps.
    pub eval_steps: u64,
    /// Save interval in steps.
    pub save_steps: u64,
    /// Per-device train batch size × devices.
    pub train_batch_size: Option<u64>,
    /// Epochs the run was configured for (an integer or a float in transformers' files).
    pub num_train_epochs: PyValue,
    /// Input tokens seen (0 unless counted).
    pub num_input_tokens_seen: u64,
    /// Floating-point operations so far.
    pub total_flos: f64,
    /// Every log, evaluation and final-metrics entry, in order.
    pub log_history: Vec<LogEntry>,
    /// The best value of `metric_for_best_model` so far.
    pub best_metric: Option<f64>,
    /// The step at which it was reached.
    pub best_global_step: Option<u64>,
    /// The checkpoint folder of that step, if one was saved.
    pub best_model_checkpoint: Option<String>,
    /// Whether this process is local rank 0.
    pub is_local_process_zero: bool,
    /// Whether this process is global rank 0.
    pub is_world_process_zero: bool,
    /// Whether this run is a hyper-parameter search trial.
    pub is_hyper_param_search: bool,
    /// Trial name, during a search.
    pub trial_name: Option<String>,
    /// Trial parameters, during a search.
    pub trial_params: Option<PyValue>,
    /// Saved state of stateful callbacks: `{"TrainerControl": {"args": …, "attributes": …}}`.
    pub stateful_callbacks: BTreeMap<String, PyValue>,
    /// Keys not in the schema above, kept as read.
    pub extra: BTreeMap<String, PyValue>,
}

impl Default for TrainerState {
    /// transformers' defaults.
    fn default() -> Self {
        TrainerState {
            epoch: None,
            global_step: 0,
            max_steps: 0,
            logging_steps: 500,
            eval_steps: 500,
            save_steps: 500,
            train_batch_size: None,
            num_train_epochs: PyValue::Int(0),
            num_input_tokens_seen: 0,
            total_flos: 0.0,
            log_history: Vec::new(),
            best_metric: None,
            best_global_step: None,
            best_model_checkpoint: None,
            is_local_process_zero: true,
            is_world_process_zero: true,
            is_hyper_param_search: false,
            trial_name: None,
            trial_params: None,
            stateful_callbacks: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }
}

/// The name transformers gives the file.
pub const TRAINER_STATE_NAME: &str = "trainer_state.json";

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> PyValue) -> PyValue {
    v.map(f).unwrap_or(PyValue::Null)
}

fn int(x: u64) -> PyValue {
    PyValue::Int(i64::try_from(x).unwrap_or(i64::MAX))
}

impl TrainerState {
    /// The state as a Python-style JSON value.
    pub fn to_value(&self) -> PyValue {
        let mut d = self.extra.clone();
        let mut put = |k: &str, v: PyValue| {
            d.insert(k.to_string(), v);
        };
        put("epoch", opt(self.epoch, PyValue::Float));
        put("global_step", int(self.global_step));
        put("max_steps", int(self.max_steps));
        put("logging_steps", int(self.logging_steps));
        put("eval_steps", int(self.eval_steps));
        put("save_steps", int(self.save_steps));
        put("train_batch_size", opt(self.train_batch_size, int));
        put("num_train_epochs", self.num_train_epochs.clone());
        put("num_input_tokens_seen", int(self.num_input_tokens_seen));
        put("total_flos", total_flos_value(self.total_flos));
        put(
            "log_history",
            PyValue::List(
                self.log_history
                    .iter()
                    .map(|e| PyValue::Dict(e.clone()))
                    .collect(),
            ),
        );
        put("best_metric", opt(self.best_metric, PyValue::Float));
        put("best_global_step", opt(self.best_global_step, int));
        put(
            "best_model_checkpoint",
            opt(self.best_model_checkpoint.clone(), PyValue::Str),
        );
        put(
            "is_local_process_zero",
            PyValue::Bool(self.is_local_process_zero),
        );
        put(
            "is_world_process_zero",
            PyValue::Bool(self.is_world_process_zero),
        );
        put(
            "is_hyper_param_search",
            PyValue::Bool(self.is_hyper_param_search),
        );
        put("trial_name", opt(self.trial_name.clone(), PyValue::Str));
        put(
            "trial_params",
            self.trial_params.clone().unwrap_or(PyValue::Null),
        );
        put(
            "stateful_callbacks",
            PyValue::Dict(self.stateful_callbacks.clone()),
        );
        PyValue::Dict(d)
    }

    /// The file's text: `json.dumps(..., indent=2, sort_keys=True) + "\n"`.
    pub fn to_json(&self) -> String {
        pyjson::dumps_py(&self.to_value()) + "\n"
    }

    /// Parses the text of a `trainer_state.json` (kiln's or transformers').
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let value = pyjson::loads(text).map_err(|e| format!("not JSON: {e}"))?;
        let PyValue::Dict(mut d) = value else {
            return Err("not a JSON object".into());
        };
        let mut s = TrainerState::default();
        let mut take = |k: &str| d.remove(k);
        fn u(k: &str, v: PyValue) -> std::result::Result<u64, String> {
            match v {
                PyValue::Int(i) if i >= 0 => Ok(i as u64),
                other => Err(format!(
                    "{k}: expected a non-negative integer, got {other:?}"
                )),
            }
        }
        fn f(k: &str, v: PyValue) -> std::result::Result<f64, String> {
            v.as_f64()
                .ok_or_else(|| format!("{k}: expected a number, got {v:?}"))
        }
        fn string(k: &str, v: PyValue) -> std::result::Result<String, String> {
            match v {
                PyValue::Str(s) => Ok(s),
                other => Err(format!("{k}: expected a string, got {other:?}")),
            }
        }
        fn boolean(k: &str, v: PyValue) -> std::result::Result<bool, String> {
            match v {
                PyValue::Bool(b) => Ok(b),
                other => Err(format!("{k}: expected true or false, got {other:?}")),
            }
        }
        fn nullable<T>(
            k: &str,
            v: Option<PyValue>,
            conv: fn(&str, PyValue) -> std::result::Result<T, String>,
        ) -> std::result::Result<Option<T>, String> {
            match v {
                None | Some(PyValue::Null) => Ok(None),
                Some(v) => conv(k, v).map(Some),
            }
        }
        s.epoch = nullable("epoch", take("epoch"), f)?;
        for (k, slot) in [
            ("global_step", &mut s.global_step),
            ("max_steps", &mut s.max_steps),
            ("logging_steps", &mut s.logging_steps),
            ("eval_steps", &mut s.eval_steps),
            ("save_steps", &mut s.save_steps),
            ("num_input_tokens_seen", &mut s.num_input_tokens_seen),
        ] {
            if let Some(v) = take(k) {
                *slot = u(k, v)?;
            }
        }
        s.train_batch_size = nullable("train_batch_size", take("train_batch_size"), u)?;
        if let Some(v) = take("num_train_epochs") {
            f("num_train_epochs", v.clone())?;
            s.num_train_epochs = v;
        }
        if let Some(v) = take("total_flos") {
            s.total_flos = f("total_flos", v)?;
        }
        match take("log_history") {
            None | Some(PyValue::Null) => {}
            Some(PyValue::List(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        PyValue::Dict(e) => s.log_history.push(e),
                        other => return Err(format!("log_history[{i}]: not an object: {other:?}")),
                    }
                }
            }
            Some(other) => return Err(format!("log_history: expected a list, got {other:?}")),
        }
        s.best_metric = nullable("best_metric", take("best_metric"), f)?;
        s.best_global_step = nullable("best_global_step", take("best_global_step"), u)?;
        s.best_model_checkpoint = nullable(
            "best_model_checkpoint",
            take("best_model_checkpoint"),
            string,
        )?;
        for (k, slot) in [
            ("is_local_process_zero", &mut s.is_local_process_zero),
            ("is_world_process_zero", &mut s.is_world_process_zero),
            ("is_hyper_param_search", &mut s.is_hyper_param_search),
        ] {
            if let Some(v) = take(k) {
                *slot = boolean(k, v)?;
            }
        }
        s.trial_name = nullable("trial_name", take("trial_name"), string)?;
        s.trial_params = match take("trial_params") {
            None | Some(PyValue::Null) => None,
            Some(v) => Some(v),
        };
        match take("stateful_callbacks") {
            None | Some(PyValue::Null) => {}
            Some(PyValue::Dict(m)) => s.stateful_callbacks = m,
            Some(other) => {
                return Err(format!(
                    "stateful_callbacks: expected an object, got {other:?}"
                ));
            }
        }
        s.extra = d;
        Ok(s)
    }

    /// Writes `path` (`trainer_state.json`).
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json()).at(path)
    }

    /// Reads `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
        TrainerState::from_json(&text).map_err(|m| Error::json(path, m))
    }
}

/// transformers keeps `total_flos` as an int until the first `store_flos` makes it a
/// float; kiln always counts in floats but writes an untouched 0 as `0`, as the default.
fn total_flos_value(x: f64) -> PyValue {
    if x == 0.0 && x.is_sign_positive() {
        PyValue::Int(0)
    } else {
        PyValue::Float(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../tests/fixtures/trainer_state_example.json");

    #[test]
    fn transformers_file_round_trips_byte_for_byte() {
        let s = TrainerState::from_json(EXAMPLE).unwrap();
        assert_eq!(s.global_step, 20);
        assert_eq!(
            s.best_model_checkpoint.as_deref(),
            Some("out/checkpoint-20")
        );
        assert_eq!(s.log_history[0]["learning_rate"], PyValue::Float(3.875e-05));
        assert_eq!(s.num_train_epochs, PyValue::Int(2));
        assert!(s.extra.is_empty());
        assert_eq!(s.to_json(), EXAMPLE);
    }

    #[test]
    fn default_state_is_what_transformers_writes() {
        let text = TrainerState::default().to_json();
        assert!(text.ends_with("}\n"));
        assert!(text.contains("\"epoch\": null,"));
        assert!(text.contains("\"logging_steps\": 500,"));
        assert!(text.contains("\"total_flos\": 0,"));
        assert!(text.contains("\"log_history\": [],"));
        assert_eq!(
            TrainerState::from_json(&text).unwrap(),
            TrainerState::default()
        );
    }

    #[test]
    fn nan_and_unknown_keys_survive() {
        let mut s = TrainerState::default();
        s.log_history.push(BTreeMap::from([
            ("grad_norm".to_string(), PyValue::Float(f64::NAN)),
            ("loss".to_string(), PyValue::Float(2.5)),
            ("step".to_string(), PyValue::Int(1)),
        ]));
        s.extra
            .insert("future_key".into(), PyValue::Str("é".into()));
        let text = s.to_json();
        assert!(text.contains("\"grad_norm\": NaN"), "{text}");
        assert!(text.contains("\"future_key\": \"\\u00e9\""), "{text}");
        let back = TrainerState::from_json(&text).unwrap();
        assert!(back.log_history[0]["grad_norm"].as_f64().unwrap().is_nan());
        assert_eq!(back.to_json(), text);
    }

    #[test]
    fn bad_files_give_one_line_reasons() {
        for (text, want) in [
            ("[]", "not a JSON object"),
            ("{\"global_step\": -1}", "global_step"),
            ("{\"log_history\": [1]}", "log_history[0]"),
            ("{\"epoch\": \"x\"}", "epoch"),
            ("{", "not JSON"),
        ] {
            let e = TrainerState::from_json(text).unwrap_err();
            assert!(e.contains(want) && !e.contains('\n'), "{text}: {e}");
        }
    }
}

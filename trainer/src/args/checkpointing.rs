//! `activation_checkpointing` and its kwargs as transformers resolves them (with
//! transformers 4's `gradient_checkpointing` names), and the notes of the options that
//! change nothing here.

use serde_json::{Map, Value};

use super::TrainingArguments;
use crate::{Error, Result};

impl TrainingArguments {
    /// Activation checkpointing as transformers resolves it (`activation_checkpointing`,
    /// else `gradient_checkpointing`, with the matching kwargs): `Some(n)` to
    /// checkpoint every n-th layer, `None` when off. Options kiln cannot honour are
    /// refused with what to do instead.
    pub fn checkpoint_every(&self) -> Result<Option<usize>> {
        let on = self
            .activation_checkpointing
            .or(self.gradient_checkpointing)
            .unwrap_or(false);
        let (name, kwargs) = self.checkpointing_kwargs();
        let mut every = 1;
        for (key, value) in kwargs {
            let bad = |what: &str| {
                Err(Error::Config(format!(
                    "{name} {key}: expected {what}, got {value}"
                )))
            };
            match key.as_str() {
                "every_n_layers" => match value.as_u64() {
                    Some(n) if n >= 1 => every = n as usize,
                    _ => return bad("a whole number of at least 1"),
                },
                "offload" => match value.as_bool() {
                    Some(false) => {}
                    Some(true) if self.device_spec() == "cpu" => {}
                    Some(true) => {
                        return Err(Error::Config(format!(
                            "{name} offload: kiln keeps the checkpointed layers' inputs on the device; \
                             drop offload (on the CPU it changes nothing)"
                        )));
                    }
                    None => return bad("true or false"),
                },
                "use_reentrant" | "preserve_rng_state" | "debug" => {
                    if !value.is_boolean() {
                        return bad("true or false");
                    }
                }
                "determinism_check" => {
                    if !value.is_string() {
                        return bad("a string");
                    }
                }
                _ => {
                    return Err(Error::Config(format!(
                        "{name}: unknown option {key:?}; kiln takes every_n_layers, offload, \
                         use_reentrant, preserve_rng_state, determinism_check and debug"
                    )));
                }
            }
        }
        Ok(on.then_some(every))
    }

    /// The checkpointing options in force and the name they were given under.
    fn checkpointing_kwargs(&self) -> (&'static str, &Map<String, Value>) {
        if self.activation_checkpointing_kwargs.is_empty()
            && !self.gradient_checkpointing_kwargs.is_empty()
        {
            (
                "gradient_checkpointing_kwargs",
                &self.gradient_checkpointing_kwargs,
            )
        } else {
            (
                "activation_checkpointing_kwargs",
                &self.activation_checkpointing_kwargs,
            )
        }
    }

    /// One line for each option that is set but changes nothing here, saying why
    /// (`kiln train` prints them when the run starts).
    pub fn notes(&self) -> Vec<String> {
        let (name, kwargs) = self.checkpointing_kwargs();
        kwargs
            .iter()
            .filter_map(|(key, value)| {
                let why = match key.as_str() {
                    "use_reentrant" | "debug" | "determinism_check" => {
                        "kiln has one recomputation, which needs none of torch's checkpoint variants"
                    }
                    "preserve_rng_state" => {
                        "kiln always replays the dropout generator, so recomputed layers draw the same masks"
                    }
                    "offload" if value.as_bool() == Some(true) => {
                        "on the CPU the checkpointed inputs are in host memory already"
                    }
                    _ => return None,
                };
                Some(format!("{name} {key} {value} changes nothing here: {why}"))
            })
            .collect()
    }
}

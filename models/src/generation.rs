//! Greedy decoding's bookkeeping, shared by the causal LMs: which tokens end a
//! sequence and which pad the finished ones, as transformers' `generate(do_sample=False)`
//! takes them from the generation config (or the model config).

use std::path::Path;

use candle_core::{D, Result, Tensor};
use serde_json::Value;

use crate::config::TokenIds;

/// The state of a greedy generation over a batch.
pub(crate) struct Greedy {
    eos: Vec<u32>,
    pad: Option<u32>,
    finished: Vec<bool>,
}

impl Greedy {
    /// For `batch` sequences: end tokens from `generation`'s `eos_token_id` (else
    /// `eos`), padding from its `pad_token_id` (else `pad`, else the first end token).
    pub(crate) fn new(
        generation: Option<&Value>,
        eos: Option<&TokenIds>,
        pad: Option<u32>,
        batch: usize,
    ) -> Self {
        let token_ids = |key: &str| -> Option<Vec<u32>> {
            generation
                .and_then(|g| g.get(key))
                .and_then(|v| serde_json::from_value::<Option<TokenIds>>(v.clone()).ok())
                .flatten()
                .map(|ids| ids.ids())
        };
        let eos = token_ids("eos_token_id")
            .or_else(|| eos.map(TokenIds::ids))
            .unwrap_or_default();
        let pad = token_ids("pad_token_id")
            .and_then(|p| p.first().copied())
            .or(pad)
            .or_else(|| eos.first().copied());
        Greedy {
            eos,
            pad,
            finished: vec![false; batch],
        }
    }

    /// The next token of every sequence (`[b, 1]`) from the logits of its last position
    /// (`[b, vocab]`): the argmax, or padding once the sequence has ended.
    pub(crate) fn next(&mut self, last_logits: &Tensor) -> Result<Tensor> {
        let best = last_logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let next: Vec<u32> = best
            .into_iter()
            .zip(self.finished.iter_mut())
            .map(|(token, done)| {
                if *done {
                    self.pad.unwrap_or(token)
                } else {
                    *done = self.eos.contains(&token);
                    token
                }
            })
            .collect();
        let b = next.len();
        Tensor::from_vec(next, (b, 1), last_logits.device())
    }

    /// Whether every sequence has produced an end token.
    pub(crate) fn done(&self) -> bool {
        !self.eos.is_empty() && self.finished.iter().all(|d| *d)
    }
}

/// A folder's `generation_config.json`, if it has one (kept and saved again).
pub(crate) fn read_generation_config(dir: &Path) -> crate::Result<Option<Value>> {
    let path = dir.join(kiln_checkpoint::model::GENERATION_CONFIG_NAME);
    if !path.is_file() {
        return Ok(None);
    }
    let bad = |e: &dyn std::fmt::Display| crate::Error::Config(format!("{}: {e}", path.display()));
    let text = std::fs::read_to_string(&path).map_err(|e| bad(&e))?;
    let g: Value = serde_json::from_str(&text).map_err(|e| bad(&e))?;
    Ok(g.is_object().then_some(g))
}

/// Refuses an empty prompt (there is no position whose logits to continue from).
pub(crate) fn check_prompt(t: usize) -> Result<()> {
    if t == 0 {
        candle_core::bail!(
            "the prompt is empty: give some text (or a tokenizer that adds a BOS token)"
        )
    }
    Ok(())
}

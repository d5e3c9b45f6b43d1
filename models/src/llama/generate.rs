//! Greedy generation with a key/value cache: the prompt runs once, then each new token
//! attends to the cached keys and values of every earlier position.

use candle_core::{DType, IndexOp, Tensor};

use super::{KvCache, LlamaForCausalLM};
use crate::generation::{self, Greedy};

pub(super) use crate::generation::read_generation_config;

impl LlamaForCausalLM {
    /// Greedy decoding, as transformers' `generate(do_sample=False)` with the model's
    /// generation config: appends up to `max_new_tokens` argmax tokens to `input_ids`
    /// (u32 `[b, t]`, no padding), stops once every sequence has produced an
    /// end-of-sequence token, and pads those that finished early. Returns
    /// `[b, t + generated]`. Each step runs only the new token, against the cache.
    pub fn generate_greedy(
        &self,
        input_ids: &Tensor,
        max_new_tokens: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        generation::check_prompt(t)?;
        let c = &self.config;
        let limit = c.max_position_embeddings;
        if t + max_new_tokens > limit && c.rope_parameters.rope_type != "dynamic" {
            candle_core::bail!(
                "{t} tokens and {max_new_tokens} new ones exceed the model's {limit} positions"
            )
        }
        let mut greedy = Greedy::new(
            self.generation_config.as_ref(),
            c.eos_token_id.as_ref(),
            c.pad_token_id,
            b,
        );
        let mut cache: KvCache = vec![None; self.layers.len()];
        let mut ids = input_ids.to_dtype(DType::U32)?;
        let mut step = ids.clone();
        let mut start = 0;
        for _ in 0..max_new_tokens {
            let n = step.dim(1)?;
            let logits = self.run(&step, None, start, Some(&mut cache), None)?;
            start += n;
            let next = greedy.next(&logits.i((.., n - 1, ..))?)?;
            ids = Tensor::cat(&[&ids, &next], 1)?;
            step = next;
            if greedy.done() {
                break;
            }
        }
        Ok(ids)
    }
}

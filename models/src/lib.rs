//! transformers' architectures in candle, interchangeable with transformers: the same
//! parameter names in the same order, the same `config.json`, the same initialisation
//! scheme, the same forward pass and losses.
//!
//! - [`BertForSequenceClassification`] with [`BertConfig`];
//! - [`Gpt2LMHeadModel`] (transformers' `GPT2LMHeadModel`) with [`Gpt2Config`], and
//!   greedy generation;
//! - [`LlamaForCausalLM`] for the Llama family (transformers' `LlamaForCausalLM`,
//!   `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`) with [`LlamaConfig`],
//!   and greedy generation with a key/value cache;
//! - [`registry`]: each architecture registered under its class name, for `kiln train`
//!   and for plugin crates that add their own.
//!
//! Every parameter is a [`candle_core::Var`] (f32), so the trainer takes gradients and
//! an optimizer updates them in place. Initialisation, like dropout, draws from kiln's
//! [`Rng`](kiln_trainer::rng::Rng): the same seed gives the same weights.
//!
//! ```no_run
//! use kiln_trainer::model::{Batch, Model};
//! use kiln_models::{BertConfig, BertForSequenceClassification};
//! use kiln_trainer::rng::Rng;
//! # fn main() -> kiln_models::Result<()> {
//! let device = candle_core::Device::Cpu;
//! let mut rng = Rng::seed_from_u64(42);
//! // A folder transformers wrote (a base BERT gets a fresh classifier head).
//! let (model, info) = BertForSequenceClassification::from_pretrained("bert-tiny", &mut rng, &device)?;
//! println!("new head: {:?}, unused: {:?}", info.fresh, info.unexpected);
//! let ids = candle_core::Tensor::new(&[[101u32, 7592, 102]], &device)?;
//! let batch = Batch { input_ids: ids, attention_mask: None, token_type_ids: None, labels: None };
//! let logits = model.forward(&batch, None)?.logits;
//! kiln_trainer::weights::save_pretrained(&model, "out", &Default::default())?;
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

mod bert;
mod config;
mod error;
mod fused;
mod generation;
pub mod gguf;
mod gpt2;
mod layers;
mod llama;
mod loss;
pub mod registry;

pub use bert::{BertConfig, BertForSequenceClassification};
pub use config::{ProblemType, TokenIds};
pub use error::{Error, Result};
pub use gpt2::{Gpt2Config, Gpt2LMHeadModel};
pub use llama::{LlamaConfig, LlamaForCausalLM, LlamaVariant, RopeParameters};
pub use registry::{Architecture, TaskModel};

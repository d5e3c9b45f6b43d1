//! LoRA fine-tuning for kiln's models, interchangeable with peft.
//!
//! - [`LoraConfig`]: peft's `LoraConfig` names, defaults and checks; read from a run's
//!   `[peft]` table or from peft's `adapter_config.json`.
//! - [`PeftModel`]: a model with LoRA adapters on its dense layers and the rest frozen;
//!   the trainer trains, checkpoints and saves it as peft's adapter folder
//!   (`adapter_model.safetensors` + `adapter_config.json`), and
//!   [`PeftModel::merge_and_unload`] folds the adapters into the base weights.
//! - [`folder`]: adapter folders (kiln's or peft's) loaded onto their base model.
//!
//! Any model that implements [`Model::visit_dense`](kiln_trainer::Model::visit_dense)
//! and [`Model::freeze`](kiln_trainer::Model::freeze) takes adapters: kiln's BERT,
//! GPT-2 and Llama family do.
//!
//! ```no_run
//! use kiln_peft::{LoraConfig, PeftModel, Targets};
//! use kiln_trainer::rng::Rng;
//! # fn main() -> kiln_peft::Result<()> {
//! let mut rng = Rng::seed_from_u64(42);
//! let device = candle_core::Device::Cpu;
//! let base = kiln_models::registry::find("LlamaForCausalLM")?;
//! let (model, _) = (base.load)("llama-base".as_ref(), &mut rng, &device)?;
//! let config = LoraConfig { r: 16, lora_alpha: 32.0, target_modules: Some(Targets::Pattern("all-linear".into())), ..Default::default() };
//! let model = PeftModel::new(model, config, base.task, Some("llama-base".into()), &mut rng)?;
//! println!("{}", model.counts());
//! kiln_trainer::weights::save_pretrained(&model, "adapter", &Default::default())?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod config;
pub mod folder;
mod lora;
mod model;

pub use config::{ALL_LINEAR, InitLoraWeights, LoraConfig, Resolved, Targets, default_targets};
pub use lora::LoraAdapter;
pub use model::{PREFIX, ParameterCounts, PeftModel};

/// What can go wrong making, loading or merging adapters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Options that cannot work on this model, or an adapter kiln cannot read.
    #[error("{0}")]
    Config(String),
    /// A tensor operation failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading or writing files failed.
    #[error(transparent)]
    Checkpoint(#[from] kiln_checkpoint::Error),
    /// Reading a tensor file failed.
    #[error(transparent)]
    Formats(#[from] kiln_formats::Error),
    /// Building or loading the base model failed.
    #[error(transparent)]
    Models(#[from] kiln_models::Error),
    /// The trainer's model interface refused.
    #[error(transparent)]
    Trainer(Box<kiln_trainer::Error>),
}

impl From<kiln_trainer::Error> for Error {
    fn from(e: kiln_trainer::Error) -> Self {
        Error::Trainer(Box::new(e))
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

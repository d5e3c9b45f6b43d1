//! Model folders for any [`Model`](crate::model::Model): [`export`](mod@export) turns its
//! parameters into what `save_pretrained` writes, [`load`](mod@load) reads a folder that
//! transformers (or kiln) wrote back into them, following transformers' rules.

pub mod export;
pub mod load;

pub use export::{HostWeights, ModelExport, export, export_parameters, save_pretrained};
pub use load::{LoadInfo, LoadRules, load_into};

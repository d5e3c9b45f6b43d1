//! `DataArgs`: the `[data]` table of a kiln config, with the names of transformers'
//! example scripts (`run_glue`, `run_classification`, `run_clm`) and of TRL's
//! `SFTConfig` where they have one.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where the data is and how to tokenize it.
///
/// ```toml
/// [data]
/// train_file = "cli/bundled/sentiment/train.jsonl"
/// validation_file = "cli/bundled/sentiment/validation.jsonl"
/// text_column = "text"
/// label_column = "label"
/// max_length = 64
/// vocab_size = 2000
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataArgs {
    /// Training data: `.jsonl`/`.json` (JSON Lines), `.csv`, `.tsv`, or `.txt` (causal
    /// LM only; one text per line).
    pub train_file: Option<String>,
    /// Evaluation data, same formats.
    pub validation_file: Option<String>,
    /// Prediction data, same formats; labels optional.
    pub test_file: Option<String>,
    /// The text column; unset: `text`, or else `sentence`.
    pub text_column: Option<String>,
    /// The label column (classification and regression).
    pub label_column: String,
    /// Longest tokenized example, special tokens included; unset: 128 for classification
    /// (`run_glue`'s `max_seq_length`), 1024 for prompt/completion and chat rows (TRL's
    /// `max_length`); capped at the tokenizer's `model_max_length`.
    pub max_length: Option<usize>,
    /// Prompt/completion and chat rows longer than `max_length` are cut (TRL); `false`
    /// makes such a row an error instead.
    pub truncation: bool,
    /// Which end of a cut row is kept: `keep_start` (TRL's default) or `keep_end`.
    pub truncation_mode: String,
    /// Loss only on the completion of prompt/completion rows; unset: on (TRL's default).
    pub completion_only_loss: Option<bool>,
    /// Loss only on what the chat template marks with `{% generation %}` (the
    /// assistant's turns).
    pub assistant_only_loss: bool,
    /// Join prompt/completion and chat rows and cut them into `max_length` blocks,
    /// instead of padding each batch.
    pub packing: bool,
    /// How rows are packed: `wrapped` (kiln's default). TRL's default `bfd` needs
    /// attention that keeps packed rows apart (flash-attention varlen), which kiln's
    /// models do not have, so it is refused rather than run with rows that see each
    /// other.
    pub packing_strategy: String,
    /// A chat template to use instead of the tokenizer's (TRL's `chat_template_path`): a
    /// `.jinja` file, or a tokenizer folder holding one; saved with the tokenizer.
    pub chat_template_path: Option<String>,
    /// Tokens per causal-LM block; unset: `min(1024, model_max_length)` as in `run_clm`;
    /// capped at `model_max_length`.
    pub block_size: Option<usize>,
    /// Vocabulary size of a tokenizer trained on the training texts.
    pub vocab_size: usize,
    /// A folder holding `tokenizer.json` to use instead of training one (transformers'
    /// `tokenizer_name`).
    pub tokenizer_name: Option<String>,
    /// Keep only the first N training examples (blocks, for causal LM).
    pub max_train_samples: Option<usize>,
    /// Keep only the first N evaluation examples (blocks, for causal LM).
    pub max_eval_samples: Option<usize>,
    /// Plain-text files: keep each line's line break in its text (`run_clm`).
    pub keep_linebreaks: bool,
}

impl Default for DataArgs {
    fn default() -> Self {
        DataArgs {
            train_file: None,
            validation_file: None,
            test_file: None,
            text_column: None,
            label_column: "label".into(),
            max_length: None,
            truncation: true,
            truncation_mode: "keep_start".into(),
            completion_only_loss: None,
            assistant_only_loss: false,
            packing: false,
            packing_strategy: "wrapped".into(),
            chat_template_path: None,
            block_size: None,
            vocab_size: 8000,
            tokenizer_name: None,
            max_train_samples: None,
            max_eval_samples: None,
            keep_linebreaks: true,
        }
    }
}

impl DataArgs {
    /// Checks what can be checked without the files.
    pub fn validate(&self) -> Result<()> {
        if self.max_length == Some(0) {
            return Err(Error::Config("data.max_length must be at least 1".into()));
        }
        match self.packing_strategy.as_str() {
            "wrapped" => {}
            s @ ("bfd" | "bfd_split") => {
                return Err(Error::Config(format!(
                    "data.packing_strategy {s:?} needs attention that keeps packed rows apart, \
                     which kiln's models do not have; use \"wrapped\" or packing = false"
                )));
            }
            s => {
                return Err(Error::Config(format!(
                    "data.packing_strategy {s:?} is not one of \"wrapped\", \"bfd\""
                )));
            }
        }
        if !matches!(self.truncation_mode.as_str(), "keep_start" | "keep_end") {
            return Err(Error::Config(format!(
                "data.truncation_mode {:?} is not \"keep_start\" or \"keep_end\"",
                self.truncation_mode
            )));
        }
        if self.block_size == Some(0) {
            return Err(Error::Config("data.block_size must be at least 1".into()));
        }
        if self.vocab_size == 0 {
            return Err(Error::Config("data.vocab_size must be at least 1".into()));
        }
        if self.label_column.is_empty() {
            return Err(Error::Config("data.label_column must not be empty".into()));
        }
        Ok(())
    }

    /// `max_length` (or 128) for classification, capped at the tokenizer's
    /// `model_max_length`.
    pub fn effective_max_length(&self, model_max_length: Option<usize>) -> usize {
        let wanted = self.max_length.unwrap_or(128);
        model_max_length.map_or(wanted, |m| wanted.min(m))
    }

    /// `max_length` (or 1024, TRL's default) for prompt/completion and chat rows, capped
    /// at the tokenizer's `model_max_length`.
    pub fn effective_sft_max_length(&self, model_max_length: Option<usize>) -> usize {
        let wanted = self.max_length.unwrap_or(1024);
        model_max_length.map_or(wanted, |m| wanted.min(m))
    }

    /// `block_size` (or 1024), capped at the tokenizer's `model_max_length`.
    pub fn effective_block_size(&self, model_max_length: Option<usize>) -> usize {
        let wanted = self.block_size.unwrap_or(1024);
        model_max_length.map_or(wanted, |m| wanted.min(m))
    }
}

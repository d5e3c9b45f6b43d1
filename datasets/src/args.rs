//! `DataArgs`: the `[data]` table of a kiln config, with the names of transformers'
//! example scripts (`run_glue`, `run_classification`, `run_clm`) where they have one.

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
    /// Longest tokenized example for classification, special tokens included
    /// (`run_glue`'s `max_seq_length`); capped at the tokenizer's `model_max_length`.
    pub max_length: usize,
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
            max_length: 128,
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
        if self.max_length == 0 {
            return Err(Error::Config("data.max_length must be at least 1".into()));
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

    /// `max_length`, capped at the tokenizer's `model_max_length`.
    pub fn effective_max_length(&self, model_max_length: Option<usize>) -> usize {
        model_max_length.map_or(self.max_length, |m| self.max_length.min(m))
    }

    /// `block_size` (or 1024), capped at the tokenizer's `model_max_length`.
    pub fn effective_block_size(&self, model_max_length: Option<usize>) -> usize {
        let wanted = self.block_size.unwrap_or(1024);
        model_max_length.map_or(wanted, |m| wanted.min(m))
    }
}

//! kiln's data: files to tokenized datasets to padded batches, for kiln's trainer (a
//! [`CollatedDataset`] is a [`BatchSource`](kiln_trainer::BatchSource)) or any loop.
//!
//! - [`read`]: rows of JSON Lines, CSV/TSV and plain-text files, the columns named as
//!   `datasets` names them; every malformed row is an [`Error::Data`]
//!   with `file:line`.
//! - [`labels`]: integer class ids, string labels mapped through a sorted `label2id`, or
//!   float regression targets; [`Labels::config_entries`] gives `id2label`/`label2id`
//!   for `config.json`.
//! - [`dataset`]: tokenized examples for classification, and `run_clm`'s block grouping
//!   for causal LM.
//! - [`sft`]: prompt/completion and chat rows for causal LMs, tokenized as TRL's
//!   `SFTTrainer` does (completion-only and assistant-only loss, truncation, packing);
//!   [`chat`] renders chat templates as transformers' `apply_chat_template` does.
//! - [`loader`]: the per-epoch shuffle (a pure function of seed and epoch, the order the
//!   trainer uses) and a loader that starts at any batch.
//! - [`collate`]: dynamic padding into a [`Batch`](kiln_trainer::Batch) on a device, and
//!   [`CollatedDataset`], the trainer's
//!   [`BatchSource`](kiln_trainer::BatchSource).
//! - [`args`]: [`DataArgs`], the `[data]` table of a config.
//!
//! The usual path, for a config's `[data]` table:
//!
//! ```no_run
//! # fn main() -> kiln_data::Result<()> {
//! use kiln_data::{Collator, CollatedDataset, DataArgs, RawData, Task};
//! use kiln_data::tokenize::{TokenizerKind, TokenizerTrainer};
//!
//! let args = DataArgs {
//!     train_file: Some("cli/bundled/sentiment/train.jsonl".into()),
//!     validation_file: Some("cli/bundled/sentiment/validation.jsonl".into()),
//!     ..DataArgs::default()
//! };
//! let raw = RawData::read(&args, Task::SequenceClassification)?;
//! let tokenizer = TokenizerTrainer::new(TokenizerKind::Bert, args.vocab_size)
//!     .train(raw.train_texts())?;
//! let data = raw.tokenize(&tokenizer, &args, None)?;
//! let labels = data.labels.clone(); // id2label / label2id for config.json
//! let train = CollatedDataset::new(data.train.unwrap_or_default(), Collator::for_tokenizer(&tokenizer));
//! # let _ = (labels, train);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod args;
pub mod chat;
pub mod collate;
pub mod dataset;
mod error;
pub mod labels;
pub mod loader;
pub mod read;
pub mod sft;
pub mod tokenize;

use std::path::{Path, PathBuf};

pub use args::DataArgs;
pub use collate::{CollatedDataset, Collator, IGNORE_INDEX};
pub use dataset::{Dataset, Example, group_texts};
pub use kiln_trainer::epoch_order;
pub use labels::{Label, Labels};
pub use loader::{Batches, DataLoader};
pub use read::{Columns, FileFormat, RawLabel, ReadOptions, Record, read_records};
pub use sft::{SftOptions, SftRecord, SftRow};

use crate::chat::ChatTemplate;
use crate::tokenize::Tokenizer;

pub use error::{Error, Result};
/// The task decides how data is read and tokenized (the trainer's, re-exported).
pub use kiln_trainer::Task;

/// The rows of one file.
#[derive(Clone, Debug, PartialEq)]
pub struct RawSplit {
    /// The file.
    pub path: PathBuf,
    /// Its rows.
    pub rows: Rows,
}

/// The rows of a file: texts (with labels), or supervised fine-tuning rows.
#[derive(Clone, Debug, PartialEq)]
pub enum Rows {
    /// Texts, with labels for classification.
    Records(Vec<Record>),
    /// Prompt/completion or chat rows (causal LM).
    Sft(Vec<SftRecord>),
}

impl RawSplit {
    /// Reads `path`.
    pub fn read(path: impl AsRef<Path>, options: &ReadOptions<'_>) -> Result<Self> {
        let path = path.as_ref();
        Ok(RawSplit {
            path: path.to_path_buf(),
            rows: Rows::Records(read_records(path, options)?),
        })
    }

    /// Reads `path` for a causal LM: a JSON Lines file whose first row has `prompt`,
    /// `messages` or `conversations` gives SFT rows ([`sft::read_sft`]), any other file
    /// texts.
    pub fn read_causal_lm(path: impl AsRef<Path>, options: &ReadOptions<'_>) -> Result<Self> {
        let path = path.as_ref();
        let text = read::read_text(path)?;
        let sft = match options.columns.text {
            None if FileFormat::of(path)? == FileFormat::JsonLines => sft::read_sft(path, &text)?,
            _ => None,
        };
        let rows = match sft {
            Some(rows) => Rows::Sft(rows),
            None => Rows::Records(read::records_from_text(path, &text, options)?),
        };
        Ok(RawSplit {
            path: path.to_path_buf(),
            rows,
        })
    }

    /// The text rows (empty for SFT rows).
    pub fn records(&self) -> &[Record] {
        match &self.rows {
            Rows::Records(r) => r,
            Rows::Sft(_) => &[],
        }
    }

    /// The texts of the rows (to train a tokenizer on).
    fn texts(&self) -> Box<dyn Iterator<Item = &str> + Send + '_> {
        match &self.rows {
            Rows::Records(r) => Box::new(r.iter().map(|r| r.text.as_str())),
            Rows::Sft(rows) => Box::new(rows.iter().flat_map(|r| r.row.texts())),
        }
    }

    fn is_conversational(&self) -> bool {
        matches!(&self.rows, Rows::Sft(rows) if rows.iter().any(|r| r.row.is_conversational()))
    }
}

/// The rows of the training, validation and test files, read but not tokenized (a
/// tokenizer may first be trained on the training texts).
#[derive(Clone, Debug, PartialEq)]
pub struct RawData {
    /// What the data is for.
    pub task: Task,
    /// `train_file`'s rows.
    pub train: Option<RawSplit>,
    /// `validation_file`'s rows.
    pub validation: Option<RawSplit>,
    /// `test_file`'s rows (read without labels).
    pub test: Option<RawSplit>,
}

/// Tokenized splits, and the label scheme of classification data.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizedData {
    /// Training examples.
    pub train: Option<Dataset>,
    /// Evaluation examples.
    pub validation: Option<Dataset>,
    /// Prediction examples.
    pub test: Option<Dataset>,
    /// The label scheme (classification and regression).
    pub labels: Option<Labels>,
}

impl RawData {
    /// Reads the files `args` names, for `task`: classification files with their label
    /// column (the test file without), causal-LM files without labels.
    pub fn read(args: &DataArgs, task: Task) -> Result<RawData> {
        args.validate()?;
        let text = args.text_column.as_deref();
        let label = match task {
            Task::SequenceClassification => Some(args.label_column.as_str()),
            Task::CausalLm => None,
        };
        let labelled = ReadOptions {
            columns: Columns { text, label },
            keep_linebreaks: args.keep_linebreaks,
        };
        let unlabelled = ReadOptions {
            columns: Columns { text, label: None },
            ..labelled
        };
        let read = |file: &Option<String>, options: &ReadOptions<'_>| {
            file.as_deref()
                .map(|f| match task {
                    Task::CausalLm => RawSplit::read_causal_lm(f, options),
                    Task::SequenceClassification => RawSplit::read(f, options),
                })
                .transpose()
        };
        Ok(RawData {
            task,
            train: read(&args.train_file, &labelled)?,
            validation: read(&args.validation_file, &labelled)?,
            test: read(&args.test_file, &unlabelled)?,
        })
    }

    /// The training texts (to train a tokenizer on): texts, or the prompts, completions
    /// and message contents of SFT rows.
    pub fn train_texts(&self) -> impl Iterator<Item = &str> + Send {
        self.train.iter().flat_map(RawSplit::texts)
    }

    /// Whether some split has chat rows (which need a chat template).
    pub fn is_conversational(&self) -> bool {
        [&self.train, &self.validation, &self.test]
            .into_iter()
            .flatten()
            .any(RawSplit::is_conversational)
    }

    /// Tokenizes every split. For classification the label scheme is `labels` (e.g.
    /// [`Labels::from_config`] of the model being fine-tuned or evaluated), or else the
    /// one inferred from the training file; `max_train_samples` and `max_eval_samples`
    /// keep the first examples (blocks, for causal LM).
    pub fn tokenize(
        &self,
        tokenizer: &Tokenizer,
        args: &DataArgs,
        labels: Option<Labels>,
    ) -> Result<TokenizedData> {
        args.validate()?;
        let labels = match (self.task, labels) {
            (Task::CausalLm, _) => None,
            (Task::SequenceClassification, Some(l)) => Some(l),
            (Task::SequenceClassification, None) => {
                let train = self.train.as_ref().ok_or_else(|| {
                    Error::Config(
                        "classification needs train_file (or the model's labels) to know its \
                         labels"
                            .into(),
                    )
                })?;
                Some(Labels::infer(train.records(), &train.path)?)
            }
        };
        let model_max = tokenizer.model_max_length();
        let max_length = args.effective_max_length(model_max);
        let block_size = args.effective_block_size(model_max);
        let template = match (self.is_conversational(), tokenizer.chat_template()) {
            (true, Some(source)) => Some(ChatTemplate::new(source)?),
            (true, None) => {
                return Err(Error::Config(
                    "the data has chat rows but the tokenizer has no chat_template; set \
                     data.chat_template_path"
                        .into(),
                ));
            }
            (false, _) => None,
        };
        let sft_options = SftOptions {
            max_length: args.effective_sft_max_length(model_max),
            truncation: args.truncation,
            keep_end: args.truncation_mode == "keep_end",
            completion_only_loss: args.completion_only_loss.unwrap_or(true),
            assistant_only_loss: args.assistant_only_loss,
            packing: args.packing,
        };
        let split = |raw: &Option<RawSplit>, labelled: bool, keep: Option<usize>| {
            let Some(raw) = raw else {
                return Ok(None);
            };
            let mut dataset = match (self.task, &raw.rows) {
                (Task::CausalLm, Rows::Sft(rows)) => {
                    sft::tokenize_sft(rows, &raw.path, tokenizer, template.as_ref(), &sft_options)?
                }
                (Task::CausalLm, Rows::Records(records)) => {
                    Dataset::causal_lm(records, tokenizer, block_size)?
                }
                (Task::SequenceClassification, _) => Dataset::classification(
                    raw.records(),
                    &raw.path,
                    tokenizer,
                    Some(max_length),
                    labels.as_ref().filter(|_| labelled),
                )?,
            };
            if let Some(n) = keep {
                dataset.truncate(n);
            }
            Ok::<_, Error>(Some(dataset))
        };
        Ok(TokenizedData {
            train: split(&self.train, true, args.max_train_samples)?,
            validation: split(&self.validation, true, args.max_eval_samples)?,
            test: split(&self.test, false, None)?,
            labels,
        })
    }
}

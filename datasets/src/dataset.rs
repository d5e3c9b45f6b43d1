//! Tokenized datasets: examples for sequence classification and blocks for causal LM.

use std::path::Path;

use crate::labels::{Label, Labels};
use crate::read::Record;
use crate::tokenize::Tokenizer;
use crate::{Error, Result};

/// One tokenized example.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Token ids, special tokens included.
    pub input_ids: Vec<u32>,
    /// Segment ids, for models that take them (BERT).
    pub token_type_ids: Option<Vec<u32>>,
    /// The target.
    pub label: Label,
}

/// A list of tokenized examples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dataset {
    examples: Vec<Example>,
}

impl From<Vec<Example>> for Dataset {
    fn from(examples: Vec<Example>) -> Self {
        Dataset { examples }
    }
}

impl Dataset {
    /// A dataset of these examples.
    pub fn new(examples: Vec<Example>) -> Self {
        Dataset { examples }
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The example at `index`.
    pub fn get(&self, index: usize) -> Option<&Example> {
        self.examples.get(index)
    }

    /// All examples, in order.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// Keeps the first `n` examples (`max_train_samples`, `max_eval_samples`).
    pub fn truncate(&mut self, n: usize) {
        self.examples.truncate(n);
    }

    /// Tokenizes labelled (or, with `labels` `None`, unlabelled) rows for sequence
    /// classification or regression, keeping at most `max_length` tokens each.
    pub fn classification(
        records: &[Record],
        path: &Path,
        tokenizer: &Tokenizer,
        max_length: Option<usize>,
        labels: Option<&Labels>,
    ) -> Result<Dataset> {
        let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
        let encoded = tokenizer.encode_batch(&texts, max_length)?;
        let with_types = tokenizer.returns_token_type_ids();
        let mut examples = Vec::with_capacity(records.len());
        for (record, enc) in records.iter().zip(encoded) {
            let label = match (labels, &record.label) {
                (Some(scheme), Some(raw)) => scheme.encode(raw, path, record.line)?,
                (Some(_), None) => {
                    return Err(Error::Data(format!(
                        "{}:{}: no label",
                        path.display(),
                        record.line
                    )));
                }
                (None, _) => Label::None,
            };
            examples.push(Example {
                input_ids: enc.input_ids,
                token_type_ids: with_types.then_some(enc.token_type_ids),
                label,
            });
        }
        Ok(Dataset { examples })
    }

    /// Tokenizes a corpus for causal language modelling as `run_clm` does: every row is
    /// tokenized (no truncation), and each batch of [`GROUP_BATCH_ROWS`] rows (the batch
    /// `datasets.map(batched=True)` hands `group_texts`) is concatenated and cut into
    /// blocks of `block_size` tokens, its remainder dropped; a block's labels are its
    /// input ids (the model shifts them).
    pub fn causal_lm(
        records: &[Record],
        tokenizer: &Tokenizer,
        block_size: usize,
    ) -> Result<Dataset> {
        let mut examples = Vec::new();
        for rows in records.chunks(GROUP_BATCH_ROWS) {
            let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
            let encoded = tokenizer.encode_batch(&texts, None)?;
            let blocks = group_texts(encoded.into_iter().map(|e| e.input_ids), block_size)?;
            examples.extend(blocks.into_iter().map(|ids| Example {
                label: Label::Tokens(ids.iter().map(|&i| i64::from(i)).collect()),
                input_ids: ids,
                token_type_ids: None,
            }));
        }
        Ok(Dataset { examples })
    }
}

/// Rows grouped together by [`Dataset::causal_lm`] (`datasets`' default `map` batch size).
pub const GROUP_BATCH_ROWS: usize = 1000;

/// `run_clm`'s `group_texts`: concatenates the token lists and cuts them into blocks of
/// `block_size`, dropping the remainder (so a corpus shorter than one block gives none).
pub fn group_texts<I>(token_lists: I, block_size: usize) -> Result<Vec<Vec<u32>>>
where
    I: IntoIterator<Item = Vec<u32>>,
{
    if block_size == 0 {
        return Err(Error::Config("block_size must be at least 1".into()));
    }
    let all: Vec<u32> = token_lists.into_iter().flatten().collect();
    Ok(all.chunks_exact(block_size).map(<[u32]>::to_vec).collect())
}

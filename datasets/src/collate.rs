//! Dynamic padding: examples of different lengths into one [`Batch`].

use candle_core::{Device, Tensor};

use crate::dataset::{Dataset, Example};
use crate::labels::Label;
use crate::tokenize::Tokenizer;
use crate::{Error, Result};
use kiln_trainer::Batch;
use kiln_trainer::BatchSource;

/// The label of positions a language model does not predict (torch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Pads a batch to its longest example, as transformers' `DataCollatorWithPadding`
/// (and, for language-model labels, `DataCollatorForLanguageModeling(mlm=False)`) do:
/// - `input_ids` u32 `[b, t]`, padded with the tokenizer's padding id;
/// - `attention_mask` u32 `[b, t]`, 1 on tokens and 0 on padding;
/// - `token_type_ids` u32 `[b, t]` padded with 0, when the examples have them;
/// - `labels`: i64 `[b]` class ids, f32 `[b]` regression targets, or i64 `[b, t]`
///   token targets padded with -100.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Collator {
    pad_id: u32,
    pad_left: bool,
    pad_to_multiple_of: Option<usize>,
}

impl Collator {
    /// A collator that pads on the right with `pad_id`.
    pub fn new(pad_id: u32) -> Self {
        Collator {
            pad_id,
            pad_left: false,
            pad_to_multiple_of: None,
        }
    }

    /// A collator with the tokenizer's padding id and padding side.
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Self {
        Collator::new(tokenizer.padding_id()).with_pad_left(tokenizer.pads_left())
    }

    /// Pads on the left instead (`padding_side="left"`).
    pub fn with_pad_left(mut self, left: bool) -> Self {
        self.pad_left = left;
        self
    }

    /// Rounds the padded length up to a multiple of `n` (`pad_to_multiple_of`).
    pub fn with_pad_to_multiple_of(mut self, n: Option<usize>) -> Self {
        self.pad_to_multiple_of = n.filter(|&n| n > 1);
        self
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Pads `row` to `len` with `pad`, on the collator's side.
    fn pad<T: Copy>(&self, out: &mut Vec<T>, row: &[T], len: usize, pad: T) {
        let fill = len - row.len();
        if self.pad_left {
            out.extend(std::iter::repeat_n(pad, fill));
            out.extend_from_slice(row);
        } else {
            out.extend_from_slice(row);
            out.extend(std::iter::repeat_n(pad, fill));
        }
    }

    /// The batch of `examples`, on `device`.
    pub fn collate(&self, examples: &[&Example], device: &Device) -> Result<Batch> {
        let b = examples.len();
        if b == 0 {
            return Err(Error::Data("cannot collate an empty batch".into()));
        }
        let longest = examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .unwrap_or(0);
        let t = match self.pad_to_multiple_of {
            Some(m) => longest.div_ceil(m) * m,
            None => longest,
        };
        let mut ids = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t);
        for e in examples {
            self.pad(&mut ids, &e.input_ids, t, self.pad_id);
            self.pad(&mut mask, &vec![1u32; e.input_ids.len()], t, 0);
        }
        let input_ids = Tensor::from_vec(ids, (b, t), device)?;
        let attention_mask = Some(Tensor::from_vec(mask, (b, t), device)?);

        let typed = examples
            .iter()
            .filter(|e| e.token_type_ids.is_some())
            .count();
        let token_type_ids = if typed == 0 {
            None
        } else if typed < b {
            return Err(Error::Data(
                "some examples of the batch have token_type_ids and some do not".into(),
            ));
        } else {
            let mut types = Vec::with_capacity(b * t);
            for e in examples {
                let row = e.token_type_ids.as_deref().unwrap_or_default();
                if row.len() != e.input_ids.len() {
                    return Err(Error::Data(format!(
                        "token_type_ids has {} entries for {} tokens",
                        row.len(),
                        e.input_ids.len()
                    )));
                }
                self.pad(&mut types, row, t, 0);
            }
            Some(Tensor::from_vec(types, (b, t), device)?)
        };

        let labels = self.labels(examples, t, device)?;
        Ok(Batch {
            input_ids,
            attention_mask,
            token_type_ids,
            labels,
        })
    }

    fn labels(&self, examples: &[&Example], t: usize, device: &Device) -> Result<Option<Tensor>> {
        let b = examples.len();
        let mixed = || Error::Data("the examples of a batch have different kinds of label".into());
        match &examples[0].label {
            Label::None => {
                if examples.iter().any(|e| e.label != Label::None) {
                    return Err(mixed());
                }
                Ok(None)
            }
            Label::Class(_) => {
                let ids = examples
                    .iter()
                    .map(|e| match e.label {
                        Label::Class(c) => Ok(c),
                        _ => Err(mixed()),
                    })
                    .collect::<Result<Vec<i64>>>()?;
                Ok(Some(Tensor::from_vec(ids, b, device)?))
            }
            Label::Value(_) => {
                let values = examples
                    .iter()
                    .map(|e| match e.label {
                        Label::Value(v) => Ok(v),
                        _ => Err(mixed()),
                    })
                    .collect::<Result<Vec<f32>>>()?;
                Ok(Some(Tensor::from_vec(values, b, device)?))
            }
            Label::Tokens(_) => {
                let mut all = Vec::with_capacity(b * t);
                for e in examples {
                    let Label::Tokens(row) = &e.label else {
                        return Err(mixed());
                    };
                    if row.len() > t {
                        return Err(Error::Data(format!(
                            "{} token labels for at most {t} tokens",
                            row.len()
                        )));
                    }
                    self.pad(&mut all, row, t, IGNORE_INDEX);
                }
                Ok(Some(Tensor::from_vec(all, (b, t), device)?))
            }
        }
    }
}

/// A [`Dataset`] with its [`Collator`]: what the [`Trainer`](kiln_trainer::Trainer)
/// takes as training or evaluation data.
#[derive(Clone, Debug)]
pub struct CollatedDataset {
    dataset: Dataset,
    collator: Collator,
}

impl CollatedDataset {
    /// `dataset`, batched by `collator`.
    pub fn new(dataset: Dataset, collator: Collator) -> Self {
        CollatedDataset { dataset, collator }
    }

    /// The dataset.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// The collator.
    pub fn collator(&self) -> &Collator {
        &self.collator
    }
}

impl BatchSource for CollatedDataset {
    fn len(&self) -> usize {
        self.dataset.len()
    }

    fn batch(&self, indices: &[usize], device: &Device) -> kiln_trainer::Result<Batch> {
        let examples = indices
            .iter()
            .map(|&i| {
                self.dataset.get(i).ok_or_else(|| {
                    Error::Data(format!(
                        "example {i} asked of a dataset of {}",
                        self.dataset.len()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(self.collator.collate(&examples, device)?)
    }

    fn lengths(&self) -> Option<Vec<usize>> {
        Some(
            (0..self.dataset.len())
                .map(|i| self.dataset.get(i).map_or(0, |e| e.input_ids.len()))
                .collect(),
        )
    }
}

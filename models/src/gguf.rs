//! How a model folder becomes a GGUF file, per architecture, as llama.cpp's
//! `convert_hf_to_gguf.py` writes it: the architecture's metadata keys from
//! `config.json`, each Hugging Face tensor's GGUF name, and the rearrangement llama.cpp
//! expects (GPT-2's Conv1D weights transposed to `[out, in]`; Llama and Mistral's
//! q/k rows permuted from the half-split rotation to the interleaved one; Qwen2 and
//! Qwen3 rotate half-split natively and are copied as they are).
//!
//! An architecture registers its layout with
//! [`Architecture::with_gguf`](crate::registry::Architecture::with_gguf); the tokenizer's
//! keys come from kiln-data and the file from kiln-formats' [`gguf`](kiln_formats::gguf).

use kiln_formats::gguf::Value;
use serde_json::Value as Json;

use crate::{Error, Result};

/// Where one GGUF tensor comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A tensor of the folder, rearranged.
    Tensor {
        /// Its Hugging Face name.
        name: String,
        /// What to do to it.
        transform: Transform,
    },
    /// Values computed from the config (Llama 3's `rope_freqs.weight`).
    Computed(Vec<f32>),
}

/// A rearrangement of a row-major tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    /// As it is.
    Copy,
    /// A 2-D tensor transposed.
    Transpose,
    /// Rows regrouped from `[heads, 2, half, …]` to `[heads, half, 2, …]`, llama.cpp's
    /// `permute` of q and k (weights and biases).
    RopePermute {
        /// The heads the rows split into.
        heads: usize,
    },
}

impl Transform {
    /// Applies it to `x` of row-major `shape`; returns the new shape.
    pub fn apply(self, x: &mut Vec<f32>, shape: &[usize]) -> Result<Vec<usize>> {
        match self {
            Transform::Copy => Ok(shape.to_vec()),
            Transform::Transpose => {
                let [r, c] = shape else {
                    return Err(Error::Config(format!(
                        "transpose of a {}-D tensor",
                        shape.len()
                    )));
                };
                let (r, c) = (*r, *c);
                let mut out = vec![0f32; x.len()];
                for i in 0..r {
                    for j in 0..c {
                        out[j * r + i] = x[i * c + j];
                    }
                }
                *x = out;
                Ok(vec![c, r])
            }
            Transform::RopePermute { heads } => {
                let rows = shape.first().copied().unwrap_or(0);
                if heads == 0 || rows % (2 * heads) != 0 {
                    return Err(Error::Config(format!(
                        "{rows} rows do not split into {heads} heads of two halves"
                    )));
                }
                let width = x.len() / rows.max(1);
                let half = rows / heads / 2;
                let mut out = vec![0f32; x.len()];
                for h in 0..heads {
                    for k in 0..2 {
                        for i in 0..half {
                            let from = (h * 2 * half + k * half + i) * width;
                            let to = (h * 2 * half + i * 2 + k) * width;
                            out[to..to + width].copy_from_slice(&x[from..from + width]);
                        }
                    }
                }
                *x = out;
                Ok(shape.to_vec())
            }
        }
    }
}

/// One tensor of the GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensor {
    /// Its GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Where it comes from.
    pub source: Source,
}

/// An architecture's part of a GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufLayout {
    /// `general.architecture` (`llama`, `qwen2`, `qwen3`, `gpt2`).
    pub arch: &'static str,
    /// The architecture's keys (`llama.block_count`, …), in the converter's order.
    pub metadata: Vec<(String, Value)>,
    /// The tensors, in the folder's order (computed ones last).
    pub tensors: Vec<GgufTensor>,
    /// What the file cannot say that the folder does, one line each (a sliding window
    /// llama.cpp's architecture does not apply, a rope scaling it does not have).
    pub notes: Vec<String>,
}

/// Builds the layout from `config.json` and the names of the folder's tensors.
pub type GgufLayoutFn = fn(config: &Json, tensors: &[String]) -> Result<GgufLayout>;

/// A u32 metadata value from a size.
pub(crate) fn u32_of(key: &str, n: usize) -> Result<Value> {
    u32::try_from(n)
        .map(Value::U32)
        .map_err(|_| Error::Config(format!("{key} = {n} does not fit GGUF's u32")))
}

/// Maps each tensor name through `map` (`None`: not part of the model file, like
/// GPT-2's causal-mask buffers), refusing names it does not know, in one line.
pub(crate) fn map_names(
    tensors: &[String],
    mut map: impl FnMut(&str) -> Option<Option<(String, Transform)>>,
) -> Result<Vec<GgufTensor>> {
    let mut out = Vec::with_capacity(tensors.len());
    for t in tensors {
        match map(t) {
            None => {
                return Err(Error::Config(format!(
                    "tensor {t:?} has no GGUF name (llama.cpp's converter would refuse it too)"
                )));
            }
            Some(None) => {}
            Some(Some((name, transform))) => out.push(GgufTensor {
                name,
                source: Source::Tensor {
                    name: t.clone(),
                    transform,
                },
            }),
        }
    }
    Ok(out)
}

/// Splits `prefix.N.rest` into the block number and `rest`.
pub(crate) fn block<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('.')?;
    let (n, rest) = rest.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_permute_interleaves_the_halves_of_each_head() {
        // Two heads of four rows (two halves of two), one column: [h0: a0 a1 b0 b1, h1: …]
        // becomes [a0 b0 a1 b1, …], as convert_hf_to_gguf.py's permute.
        let mut x: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let shape = Transform::RopePermute { heads: 2 }
            .apply(&mut x, &[8, 1])
            .unwrap();
        assert_eq!(shape, vec![8, 1]);
        assert_eq!(x, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let mut t: Vec<f32> = (0..6).map(|v| v as f32).collect();
        assert_eq!(
            Transform::Transpose.apply(&mut t, &[2, 3]).unwrap(),
            vec![3, 2]
        );
        assert_eq!(t, vec![0., 3., 1., 4., 2., 5.]);
        assert!(
            Transform::RopePermute { heads: 3 }
                .apply(&mut x, &[8, 1])
                .is_err()
        );
    }
}

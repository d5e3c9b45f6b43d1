//! The rotary embedding's parameters (`rope_parameters`) and its inverse frequencies,
//! as transformers' `modeling_rope_utils.py` computes them for the rope types
//! `default`, `linear`, `dynamic` and `llama3` (in f32, in torch's order of operations).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// transformers 5's `rope_parameters` (4.x's `rope_scaling` with `rope_theta` folded in).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    /// `default`, `linear`, `dynamic` or `llama3` (4.x files may say `type`).
    #[serde(default = "default_type", alias = "type")]
    pub rope_type: String,
    /// The base period.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// The scaling factor (all types but `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// `llama3`: the low-frequency factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    /// `llama3`: the high-frequency factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    /// `llama3`: the pretraining context length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// The fraction of each head that rotates (only 1 is supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    /// Other keys, written back as read.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_type() -> String {
    "default".into()
}

fn default_theta() -> f64 {
    10_000.0
}

impl RopeParameters {
    /// transformers' `standardize_rope_params`: `llama3` takes the model's
    /// `max_position_embeddings` as its original length when the file gives none.
    pub(crate) fn standardize(&mut self, max_position_embeddings: usize) {
        if self.rope_type == "llama3" && self.original_max_position_embeddings.is_none() {
            self.original_max_position_embeddings = Some(max_position_embeddings);
        }
    }

    /// Checks the type and the keys it needs.
    pub(crate) fn validate(&self) -> Result<()> {
        let need = |v: Option<f64>, key: &str| {
            v.filter(|f| f.is_finite() && *f > 0.0).ok_or_else(|| {
                Error::Config(format!(
                    "rope_parameters: rope_type {:?} needs a positive {key}",
                    self.rope_type
                ))
            })
        };
        match self.rope_type.as_str() {
            "default" => {}
            "linear" | "dynamic" => {
                need(self.factor, "factor")?;
            }
            "llama3" => {
                need(self.factor, "factor")?;
                let (low, high) = (
                    need(self.low_freq_factor, "low_freq_factor")?,
                    need(self.high_freq_factor, "high_freq_factor")?,
                );
                if high <= low {
                    return Err(Error::Config(
                        "rope_parameters: high_freq_factor must exceed low_freq_factor".into(),
                    ));
                }
            }
            other => {
                return Err(Error::Config(format!(
                    "rope_type {other:?} is not supported (kiln has default, linear, dynamic, llama3)"
                )));
            }
        }
        if self.partial_rotary_factor.is_some_and(|f| f != 1.0) {
            return Err(Error::Config(
                "partial_rotary_factor other than 1 is not supported".into(),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::Config("rope_theta must be positive".into()));
        }
        Ok(())
    }

    /// The inverse frequencies (`head_dim / 2` of them) and the attention scaling of the
    /// cos/sin tables, for sequences of `seq_len` positions (only `dynamic` depends on it:
    /// past `max_position_embeddings` it raises the base, transformers'
    /// `dynamic_rope_update` without its cache of the longest length seen).
    pub(crate) fn inv_freq(
        &self,
        head_dim: usize,
        max_position_embeddings: usize,
        seq_len: usize,
    ) -> (Vec<f32>, f32) {
        let dim = head_dim;
        let mut base = self.rope_theta;
        if self.rope_type == "dynamic" && seq_len > max_position_embeddings {
            let factor = self.factor.unwrap_or(1.0);
            let ratio = factor * seq_len as f64 / max_position_embeddings as f64 - (factor - 1.0);
            base *= ratio.powf(dim as f64 / (dim as f64 - 2.0));
        }
        let base32 = base as f32;
        let mut inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / base32.powf(i as f32 / dim as f32))
            .collect();
        match self.rope_type.as_str() {
            "linear" => {
                let factor = self.factor.unwrap_or(1.0) as f32;
                inv.iter_mut().for_each(|f| *f /= factor);
            }
            "llama3" => llama3(&mut inv, self),
            _ => {}
        }
        (inv, 1.0)
    }
}

/// Llama 3.1's frequency-dependent scaling: long wavelengths divided by `factor`, short
/// ones kept, the band between interpolated.
fn llama3(inv: &mut [f32], p: &RopeParameters) {
    let factor = p.factor.unwrap_or(1.0) as f32;
    let low = p.low_freq_factor.unwrap_or(1.0) as f32;
    let high = p.high_freq_factor.unwrap_or(4.0) as f32;
    let old = p.original_max_position_embeddings.unwrap_or(8192) as f32;
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    for f in inv.iter_mut() {
        let wavelen = 2.0 * std::f32::consts::PI / *f;
        let scaled = if wavelen > low_wavelen {
            *f / factor
        } else {
            *f
        };
        // Wavelengths are finite and positive, so `!(a < b)` is `a >= b`.
        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
        *f = if medium {
            let smooth = (old / wavelen - low) / (high - low);
            (1.0 - smooth) * scaled / factor + smooth * scaled
        } else {
            scaled
        };
    }
}

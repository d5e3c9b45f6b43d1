//! One LoRA adapter on a dense layer, with peft's maths:
//! `y = base(x) + lora_B(lora_A(dropout(x))) · scaling`.

use candle_core::{Result, Tensor, Var};
use kiln_trainer::adapter::{DenseAdapter, DenseLayer, LowRank};
use kiln_trainer::rng::Rng;

use crate::config::InitLoraWeights;

/// A LoRA adapter: `lora_A` `[r, in]`, `lora_B` `[out, r]` (whatever the layer's own
/// weight layout), a scaling and an input dropout.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// `lora_A.weight`, `[r, in_features]`.
    pub a: Var,
    /// `lora_B.weight`, `[out_features, r]`.
    pub b: Var,
    /// `lora_alpha / r` (or `/ √r`).
    pub scaling: f64,
    /// Dropout probability on the adapter's input.
    pub dropout: f64,
}

impl LoraAdapter {
    /// A fresh adapter of rank `r` for `layer`, initialised as peft's
    /// `reset_lora_parameters` does, drawing from `rng`: A kaiming-uniform with
    /// a = √5 (uniform in ±1/√in) and B zero (`true`); A normal(0, 1/r) and B zero
    /// (`"gaussian"`); or both as `nn.Linear` initialises them (`false`: B uniform in
    /// ±1/√r).
    pub fn new(
        layer: &DenseLayer,
        r: usize,
        scaling: f64,
        dropout: f64,
        init: &InitLoraWeights,
        rng: &mut Rng,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let (i, o) = (layer.in_features, layer.out_features);
        let uniform = |n: usize, bound: f64, rng: &mut Rng| -> Vec<f32> {
            (0..n)
                .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                .collect()
        };
        let a = match init {
            InitLoraWeights::Name(_) => {
                let std = 1.0 / r as f64;
                (0..r * i).map(|_| (std * rng.normal()) as f32).collect()
            }
            InitLoraWeights::Bool(_) => uniform(r * i, 1.0 / (i as f64).sqrt(), rng),
        };
        let b = match init {
            InitLoraWeights::Bool(false) => uniform(o * r, 1.0 / (r as f64).sqrt(), rng),
            _ => vec![0f32; o * r],
        };
        Ok(LoraAdapter {
            a: Var::from_vec(a, (r, i), device)?,
            b: Var::from_vec(b, (o, r), device)?,
            scaling,
            dropout,
        })
    }

    /// `B @ A · scaling`, `[out, in]`: what merging adds to an `nn.Linear` weight (its
    /// transpose for `Conv1D`).
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b
            .as_tensor()
            .matmul(self.a.as_tensor())?
            .affine(self.scaling, 0.0)
    }
}

impl DenseAdapter for LoraAdapter {
    fn low_rank(&self) -> Option<LowRank<'_>> {
        Some(LowRank {
            a: self.a.as_tensor(),
            b: self.b.as_tensor(),
            scaling: self.scaling,
            dropout: self.dropout,
        })
    }

    fn forward(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let x = x.to_dtype(self.a.dtype())?;
        let x = match rng {
            Some(rng) if self.dropout > 0.0 => {
                let mask = rng.dropout_values(x.elem_count(), self.dropout);
                let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
                (x * mask)?
            }
            _ => x,
        };
        let dims = x.dims().to_vec();
        let (last, lead) = dims.split_last().ok_or_else(|| {
            candle_core::Error::Msg("a LoRA adapter's input needs a feature dimension".into())
        })?;
        let rows: usize = lead.iter().product();
        let flat = x.reshape((rows, *last))?;
        let h = flat.matmul(&self.a.as_tensor().t()?)?;
        let y = h
            .matmul(&self.b.as_tensor().t()?)?
            .affine(self.scaling, 0.0)?;
        let mut shape = lead.to_vec();
        shape.push(self.b.dims()[0]);
        y.reshape(shape)
    }
}

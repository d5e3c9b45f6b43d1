//! The layers kiln's models are made of, holding their parameters as `Var`s, with
//! transformers' initialisation drawn from kiln's [`Rng`].
//!
//! Every operation here has a backward pass: candle-nn's fused `layer_norm` and
//! `softmax_last_dim` have none (`apply_op*_no_bwd`), so kiln has its own fused CPU
//! kernels with backward passes ([`super::fused`]) and the written-out forms for other
//! devices and dtypes.
//!
//! The layers run in the dtype of their parameters, so that bf16/fp16 training (a
//! working copy of the parameters in that dtype, [`Model::map_parameters`]) computes in
//! it; as torch's autocast does, LayerNorm and the attention softmax (with its additive
//! mask) compute in f32 and cast back, and the losses take f32 logits. In f32 every
//! cast is the identity, so f32 results are unchanged.
//!
//! [`Model::map_parameters`]: kiln_trainer::model::Model::map_parameters

use candle_core::{D, DType, Device, Result, Tensor, Var};

use crate::fused;
use kiln_trainer::rng::Rng;

/// Parameters collected with their full names, in state_dict order.
pub(crate) type Params = Vec<(String, Var)>;

/// What [`kiln_trainer::model::Model::map_parameters`] applies to each variable.
pub(crate) type MapFn<'a> = &'a mut dyn FnMut(&str, &Var) -> Result<Var>;

/// Replaces `var` by `f`'s variable for `name`.
pub(crate) fn map_var(var: &mut Var, name: &str, f: MapFn<'_>) -> Result<()> {
    *var = f(name, var)?;
    Ok(())
}

pub(crate) use kiln_trainer::precision::upcast;

/// A variable of normal(0, std) entries.
pub(crate) fn normal(shape: &[usize], std: f64, rng: &mut Rng, device: &Device) -> Result<Var> {
    Var::from_tensor(&rng.normal_tensor(shape, 0.0, std, device)?)
}

/// A variable of zeros.
pub(crate) fn zeros(shape: &[usize], device: &Device) -> Result<Var> {
    Var::zeros(shape, DType::F32, device)
}

/// A dense layer: torch's `nn.Linear` (weight `[out, in]`) or GPT-2's `Conv1D`
/// (weight `[in, out]`), with a bias.
#[derive(Debug)]
pub(crate) struct Linear {
    weight: Var,
    bias: Option<Var>,
    transposed: bool,
}

impl Linear {
    /// `nn.Linear(input, output)`: weight normal(0, std), bias zero.
    pub(crate) fn new(
        input: usize,
        output: usize,
        bias: bool,
        std: f64,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        Ok(Linear {
            weight: normal(&[output, input], std, rng, device)?,
            bias: if bias {
                Some(zeros(&[output], device)?)
            } else {
                None
            },
            transposed: false,
        })
    }

    /// GPT-2's `Conv1D(output, input)`: weight `[input, output]` normal(0, std), bias zero.
    pub(crate) fn conv1d(
        input: usize,
        output: usize,
        std: f64,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        Ok(Linear {
            weight: normal(&[input, output], std, rng, device)?,
            bias: Some(zeros(&[output], device)?),
            transposed: true,
        })
    }

    /// `x @ W^T + b` (`x @ W + b` for Conv1D) over the last dimension.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        fused::linear(
            x,
            self.weight.as_tensor(),
            self.bias.as_ref().map(|b| b.as_tensor()),
            self.transposed,
        )
    }

    pub(crate) fn push(&self, prefix: &str, out: &mut Params) {
        out.push((format!("{prefix}.weight"), self.weight.clone()));
        if let Some(b) = &self.bias {
            out.push((format!("{prefix}.bias"), b.clone()));
        }
    }

    pub(crate) fn map(&mut self, prefix: &str, f: MapFn<'_>) -> Result<()> {
        map_var(&mut self.weight, &format!("{prefix}.weight"), f)?;
        if let Some(b) = &mut self.bias {
            map_var(b, &format!("{prefix}.bias"), f)?;
        }
        Ok(())
    }
}

pub(crate) use crate::fused::written_out::matmul_last;

/// `nn.LayerNorm`: weight one, bias zero.
#[derive(Debug)]
pub(crate) struct LayerNorm {
    weight: Var,
    bias: Var,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn new(size: usize, eps: f64, device: &Device) -> Result<Self> {
        Ok(LayerNorm {
            weight: Var::ones(size, DType::F32, device)?,
            bias: zeros(&[size], device)?,
            eps,
        })
    }

    /// Normalises over the last dimension (biased variance, as torch), in f32 for
    /// 16-bit inputs (the result has `x`'s dtype).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = upcast(x)?;
        let (w, b) = (
            upcast(self.weight.as_tensor())?,
            upcast(self.bias.as_tensor())?,
        );
        fused::layer_norm(&x, &w, &b, self.eps)?.to_dtype(dtype)
    }

    pub(crate) fn push(&self, prefix: &str, out: &mut Params) {
        out.push((format!("{prefix}.weight"), self.weight.clone()));
        out.push((format!("{prefix}.bias"), self.bias.clone()));
    }

    pub(crate) fn map(&mut self, prefix: &str, f: MapFn<'_>) -> Result<()> {
        map_var(&mut self.weight, &format!("{prefix}.weight"), f)?;
        map_var(&mut self.bias, &format!("{prefix}.bias"), f)
    }
}

/// `nn.Embedding`: normal(0, std), the `padding_idx` row zero.
#[derive(Debug)]
pub(crate) struct Embedding {
    weight: Var,
}

impl Embedding {
    pub(crate) fn new(
        count: usize,
        size: usize,
        std: f64,
        padding_idx: Option<u32>,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let mut data: Vec<f32> = (0..count * size)
            .map(|_| (std * rng.normal()) as f32)
            .collect();
        if let Some(p) = padding_idx.map(|p| p as usize).filter(|p| *p < count) {
            data[p * size..(p + 1) * size].fill(0.0);
        }
        let weight = Var::from_vec(data, (count, size), device)?;
        Ok(Embedding { weight })
    }

    /// The rows of `ids` (any integer dtype, any shape): shape `ids.shape + [size]`.
    pub(crate) fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (count, size) = self.weight.dims2()?;
        check_ids(ids, count)?;
        let mut shape = ids.dims().to_vec();
        shape.push(size);
        self.weight
            .as_tensor()
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(shape)
    }

    /// The first `n` rows (positions 0..n).
    pub(crate) fn first_rows(&self, n: usize) -> Result<Tensor> {
        let count = self.weight.dim(0)?;
        if n > count {
            candle_core::bail!(
                "sequence of {n} tokens is longer than the {count} positions the model has"
            )
        }
        self.weight.as_tensor().narrow(0, 0, n)
    }

    pub(crate) fn weight(&self) -> &Var {
        &self.weight
    }

    pub(crate) fn push(&self, name: &str, out: &mut Params) {
        out.push((format!("{name}.weight"), self.weight.clone()));
    }

    pub(crate) fn map(&mut self, name: &str, f: MapFn<'_>) -> Result<()> {
        map_var(&mut self.weight, &format!("{name}.weight"), f)
    }
}

/// Ids must lie in `0..count` (candle's `index_select` would read out of bounds or
/// panic); checked on the host, ids are small.
fn check_ids(ids: &Tensor, count: usize) -> Result<()> {
    let max = match ids.dtype() {
        DType::U8 | DType::U32 | DType::I64 | DType::I32 | DType::I16 => {
            ids.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?
        }
        other => candle_core::bail!("token ids must be integers, got {other:?}"),
    };
    if let Some(bad) = max.iter().find(|&&i| i < 0 || i as usize >= count) {
        candle_core::bail!("token id {bad} is out of range for an embedding of {count} rows")
    }
    Ok(())
}

/// transformers' activations (`ACT2FN`) that kiln's models accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Activation {
    /// `gelu`: exact, with erf.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    Relu,
    Silu,
    Tanh,
    /// `quick_gelu`: x · sigmoid(1.702 x).
    QuickGelu,
}

impl Activation {
    pub(crate) fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" | "gelu_python" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            "tanh" => Activation::Tanh,
            "quick_gelu" => Activation::QuickGelu,
            _ => return None,
        })
    }

    pub(crate) fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => fused::gelu(x, false),
            Activation::GeluTanh => fused::gelu(x, true),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
            Activation::Tanh => x.tanh(),
            Activation::QuickGelu => x * sigmoid(&(x * 1.702)?)?,
        }
    }
}

/// 1 / (1 + e^-x).
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    x.neg()?.exp()?.affine(1.0, 1.0)?.recip()
}

/// Inverted dropout with a mask from `rng`; the identity without one (evaluation) or
/// when `p` is 0.
pub(crate) fn dropout(x: &Tensor, p: f64, rng: Option<&mut Rng>) -> Result<Tensor> {
    match rng {
        Some(rng) if p > 0.0 => {
            if p >= 1.0 {
                return x.zeros_like();
            }
            fused::mul_mask(x, rng.dropout_values(x.elem_count(), p))
        }
        _ => Ok(x.clone()),
    }
}

/// Log-softmax over the last dimension.
pub(crate) fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Scaled dot-product attention as transformers' eager implementation computes it:
/// softmax(q kᵀ · scale + bias), dropout on the probabilities, times v, for `heads`
/// query heads of `q` `[b, t, heads·d]` and `kv_heads` key/value heads of `k`, `v`
/// `[b, t, kv_heads·d]` as the projections return them, and the heads merged back into
/// `[b, t, heads·d]`. Query head i attends with key/value head i / (heads / kv_heads)
/// (grouped-query attention, transformers' `repeat_kv`, without repeating them);
/// `kv_heads == heads` is multi-head attention. `bias` is additive (0 where attending
/// is allowed, the f32 minimum where not), f32, and broadcasts to `[b, heads, t, t]`;
/// the mask and the softmax are computed in f32 (as autocast does) and the
/// probabilities cast back to `v`'s dtype.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    bias: &Tensor,
    scale: f64,
    p: f64,
    rng: Option<&mut Rng>,
) -> Result<Tensor> {
    let scores = fused::attention_scores(q, k, heads, kv_heads)?;
    let probs = fused::softmax_scaled_biased(&upcast(&scores)?, scale, bias)?;
    let probs = dropout(&probs, p, rng)?;
    fused::attention_context(&probs.to_dtype(v.dtype())?, v, heads, kv_heads)
}

/// The additive bias for allowed (1) / masked (0) entries: 0 or the f32 minimum, as
/// transformers fills masked scores with `torch.finfo(float32).min`.
pub(crate) fn mask_to_bias(allowed: &Tensor) -> Result<Tensor> {
    allowed
        .to_dtype(DType::F32)?
        .affine(-1.0, 1.0)?
        .affine(f32::MIN as f64, 0.0)
}

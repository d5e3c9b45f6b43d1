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
use kiln_trainer::adapter::{AdapterSlot, DenseLayer, DenseVisitor};
use kiln_trainer::rng::Rng;

/// Parameters collected with their full names, in state_dict order.
pub(crate) type Params = Vec<(String, Var)>;

/// A parameter: its variable, and whether it is frozen (a constant of the forward
/// pass: [`Param::t`] detaches it, so backward computes no gradient for it).
#[derive(Clone, Debug)]
pub(crate) struct Param {
    var: Var,
    frozen: bool,
}

impl Param {
    pub(crate) fn new(var: Var) -> Self {
        Param { var, frozen: false }
    }

    /// The value the forward pass uses: detached when frozen.
    pub(crate) fn t(&self) -> Tensor {
        if self.frozen {
            self.var.as_tensor().detach()
        } else {
            self.var.as_tensor().clone()
        }
    }

    pub(crate) fn var(&self) -> &Var {
        &self.var
    }

    pub(crate) fn dims(&self) -> &[usize] {
        self.var.dims()
    }
}

/// What a model's `visit` walks: every parameter by its full name, and the adapter
/// slot of every dense layer. [`Model::map_parameters`], [`Model::freeze`] and
/// [`Model::visit_dense`] are visits.
///
/// [`Model::map_parameters`]: kiln_trainer::model::Model::map_parameters
/// [`Model::freeze`]: kiln_trainer::model::Model::freeze
/// [`Model::visit_dense`]: kiln_trainer::model::Model::visit_dense
pub(crate) trait Visitor {
    fn param(&mut self, name: &str, p: &mut Param) -> Result<()>;

    fn dense(&mut self, layer: &DenseLayer, slot: &mut AdapterSlot) -> Result<()> {
        let _ = (layer, slot);
        Ok(())
    }
}

/// The visitor a model's `visit` takes.
pub(crate) type Visit<'a> = &'a mut dyn Visitor;

/// Visits `p` as `name`.
pub(crate) fn visit_param(p: &mut Param, name: &str, f: Visit<'_>) -> Result<()> {
    f.param(name, p)
}

/// [`Model::map_parameters`](kiln_trainer::model::Model::map_parameters) as a visit:
/// each variable replaced by the closure's, the frozen flag kept.
pub(crate) struct MapVars<'a>(pub &'a mut dyn FnMut(&str, &Var) -> Result<Var>);

impl Visitor for MapVars<'_> {
    fn param(&mut self, name: &str, p: &mut Param) -> Result<()> {
        p.var = (self.0)(name, &p.var)?;
        Ok(())
    }
}

/// [`Model::freeze`](kiln_trainer::model::Model::freeze) as a visit.
pub(crate) struct Freeze<'a>(pub &'a dyn Fn(&str) -> bool);

impl Visitor for Freeze<'_> {
    fn param(&mut self, name: &str, p: &mut Param) -> Result<()> {
        p.frozen = (self.0)(name);
        Ok(())
    }
}

/// [`Model::visit_dense`](kiln_trainer::model::Model::visit_dense) as a visit.
pub(crate) struct Dense<'a, 'b>(pub &'a mut DenseVisitor<'b>);

impl Visitor for Dense<'_, '_> {
    fn param(&mut self, _: &str, _: &mut Param) -> Result<()> {
        Ok(())
    }

    fn dense(&mut self, layer: &DenseLayer, slot: &mut AdapterSlot) -> Result<()> {
        (self.0)(layer, slot)
    }
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
/// (weight `[in, out]`), with a bias, and optionally an adapter whose output is added
/// ([`kiln_trainer::adapter`]).
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    weight: Param,
    bias: Option<Param>,
    transposed: bool,
    adapter: AdapterSlot,
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
            weight: Param::new(normal(&[output, input], std, rng, device)?),
            bias: if bias {
                Some(Param::new(zeros(&[output], device)?))
            } else {
                None
            },
            transposed: false,
            adapter: None,
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
            weight: Param::new(normal(&[input, output], std, rng, device)?),
            bias: Some(Param::new(zeros(&[output], device)?)),
            transposed: true,
            adapter: None,
        })
    }

    /// `x @ W^T + b` (`x @ W + b` for Conv1D) over the last dimension, plus the
    /// adapter's output; `rng` (training) is the adapter's dropout generator.
    /// A low-rank adapter (LoRA) is fused into the layer's product where
    /// [`fused::lora_linear`] applies.
    pub(crate) fn forward(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let (w, b) = (self.weight.t(), self.bias.as_ref().map(|b| b.t()));
        let Some(adapter) = &self.adapter else {
            return fused::linear(x, &w, b.as_ref(), self.transposed);
        };
        if let Some(lr) = adapter.low_rank()
            && fused::lora_fits(x, &w, b.as_ref(), self.transposed, lr.a, lr.b)
        {
            let mask = match rng {
                Some(rng) if lr.dropout > 0.0 => {
                    Some(rng.dropout_values(x.elem_count(), lr.dropout))
                }
                _ => None,
            };
            let input = fused::LowRankInput {
                a: lr.a,
                b: lr.b,
                scaling: lr.scaling,
                mask,
            };
            return fused::lora_linear(x, &w, b.as_ref(), self.transposed, input);
        }
        let y = fused::linear(x, &w, b.as_ref(), self.transposed)?;
        y + adapter.forward(x, rng)?
    }

    /// The weight of a torch `Linear` without bias or adapter (what the fused
    /// multi-layer ops take), else None.
    pub(crate) fn plain_weight(&self) -> Option<Tensor> {
        let plain = self.adapter.is_none() && self.bias.is_none() && !self.transposed;
        plain.then(|| self.weight.t())
    }

    /// `act(self.forward(x))`; a GELU of a layer without adapter in the layer's op
    /// ([`fused::linear_gelu`]).
    pub(crate) fn forward_activated(
        &self,
        x: &Tensor,
        act: Activation,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let tanh = match act {
            Activation::Gelu => false,
            Activation::GeluTanh => true,
            _ => return act.forward(&self.forward(x, rng)?),
        };
        if self.adapter.is_some() {
            return act.forward(&self.forward(x, rng)?);
        }
        let b = self.bias.as_ref().map(|b| b.t());
        fused::linear_gelu(x, &self.weight.t(), b.as_ref(), self.transposed, tanh)
    }

    /// `dropout(self.forward(x), p)`: in the layer's op for a layer without adapter
    /// ([`fused::linear_dropout`]; dropout's values drawn as [`dropout`] draws them).
    pub(crate) fn forward_dropout(
        &self,
        x: &Tensor,
        p: f64,
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let fused_here = self.adapter.is_none() && p > 0.0 && p < 1.0;
        match rng.as_deref_mut() {
            Some(rng) if fused_here => {
                let output = self.weight.dims()[usize::from(self.transposed)];
                let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
                let mask = rng.dropout_values(rows * output, p);
                let b = self.bias.as_ref().map(|b| b.t());
                fused::linear_dropout(x, &self.weight.t(), b.as_ref(), self.transposed, mask)
            }
            _ => {
                let y = self.forward(x, rng.as_deref_mut())?;
                dropout(&y, p, rng)
            }
        }
    }

    /// `residual + self.forward(x)`: fused into the layer's product when the layer is
    /// [plain](Self::plain_weight) ([`fused::linear_residual`]).
    pub(crate) fn forward_onto(
        &self,
        x: &Tensor,
        residual: &Tensor,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        match self.plain_weight() {
            Some(w) => fused::linear_residual(x, &w, residual),
            None => residual + self.forward(x, rng)?,
        }
    }

    pub(crate) fn push(&self, prefix: &str, out: &mut Params) {
        out.push((format!("{prefix}.weight"), self.weight.var().clone()));
        if let Some(b) = &self.bias {
            out.push((format!("{prefix}.bias"), b.var().clone()));
        }
    }

    pub(crate) fn map(&mut self, prefix: &str, f: Visit<'_>) -> Result<()> {
        visit_param(&mut self.weight, &format!("{prefix}.weight"), f)?;
        if let Some(b) = &mut self.bias {
            visit_param(b, &format!("{prefix}.bias"), f)?;
        }
        let dims = self.weight.dims();
        let (in_features, out_features) = match self.transposed {
            true => (dims[0], dims[1]),
            false => (dims[1], dims[0]),
        };
        let layer = DenseLayer {
            name: prefix.to_string(),
            in_features,
            out_features,
            fan_in_fan_out: self.transposed,
            bias: self.bias.is_some(),
        };
        f.dense(&layer, &mut self.adapter)
    }
}

pub(crate) use crate::fused::written_out::matmul_last;

/// `nn.LayerNorm`: weight one, bias zero.
#[derive(Clone, Debug)]
pub(crate) struct LayerNorm {
    weight: Param,
    bias: Param,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn new(size: usize, eps: f64, device: &Device) -> Result<Self> {
        Ok(LayerNorm {
            weight: Param::new(Var::ones(size, DType::F32, device)?),
            bias: Param::new(zeros(&[size], device)?),
            eps,
        })
    }

    /// Normalises over the last dimension (biased variance, as torch), in f32 for
    /// 16-bit inputs (the result has `x`'s dtype).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = upcast(x)?;
        let (w, b) = (upcast(&self.weight.t())?, upcast(&self.bias.t())?);
        fused::layer_norm(&x, &w, &b, self.eps)?.to_dtype(dtype)
    }

    /// `self.forward(y + residual)`, the sum inside the norm's op for f32
    /// ([`fused::layer_norm_residual`]).
    pub(crate) fn forward_residual(&self, y: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (w, b) = (self.weight.t(), self.bias.t());
        if [y, residual, &w, &b]
            .iter()
            .any(|t| t.dtype() != DType::F32)
        {
            return self.forward(&(y + residual)?);
        }
        fused::layer_norm_residual(y, residual, &w, &b, self.eps)
    }

    pub(crate) fn push(&self, prefix: &str, out: &mut Params) {
        out.push((format!("{prefix}.weight"), self.weight.var().clone()));
        out.push((format!("{prefix}.bias"), self.bias.var().clone()));
    }

    pub(crate) fn map(&mut self, prefix: &str, f: Visit<'_>) -> Result<()> {
        visit_param(&mut self.weight, &format!("{prefix}.weight"), f)?;
        visit_param(&mut self.bias, &format!("{prefix}.bias"), f)
    }
}

/// `nn.Embedding`: normal(0, std), the `padding_idx` row zero.
#[derive(Debug)]
pub(crate) struct Embedding {
    weight: Param,
    /// NEFTune's alpha: noise on the output while training ([`Embedding::forward_train`]).
    neftune: Option<f64>,
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
        let weight = Param::new(Var::from_vec(data, (count, size), device)?);
        Ok(Embedding {
            weight,
            neftune: None,
        })
    }

    /// Turns NEFTune's noise on (`Some(alpha)`) or off.
    pub(crate) fn set_neftune(&mut self, alpha: Option<f64>) {
        self.neftune = alpha;
    }

    /// [`Embedding::forward`], plus NEFTune's noise when training (`rng` given) with an
    /// alpha set, as transformers' `neftune_post_forward_hook`: uniform in `±alpha /
    /// sqrt(d1 · d2)` of the output's second and third sizes (sequence and hidden).
    pub(crate) fn forward_train(&self, ids: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let x = self.forward(ids)?;
        let (Some(alpha), Some(rng)) = (self.neftune, rng) else {
            return Ok(x);
        };
        if x.rank() < 3 {
            return Ok(x);
        }
        let magnitude = alpha / ((x.dim(1)? * x.dim(2)?) as f64).sqrt();
        let noise: Vec<f32> = (0..x.elem_count())
            .map(|_| ((2.0 * rng.uniform() - 1.0) * magnitude) as f32)
            .collect();
        let noise = Tensor::from_vec(noise, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x + noise
    }

    /// The rows of `ids` (any integer dtype, any shape): shape `ids.shape + [size]`.
    pub(crate) fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (count, size) = self.weight.var().dims2()?;
        check_ids(ids, count)?;
        let mut shape = ids.dims().to_vec();
        shape.push(size);
        self.weight
            .t()
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(shape)
    }

    /// The first `n` rows (positions 0..n).
    pub(crate) fn first_rows(&self, n: usize) -> Result<Tensor> {
        let count = self.weight.var().dim(0)?;
        if n > count {
            candle_core::bail!(
                "sequence of {n} tokens is longer than the {count} positions the model has"
            )
        }
        self.weight.t().narrow(0, 0, n)
    }

    pub(crate) fn weight(&self) -> &Param {
        &self.weight
    }

    pub(crate) fn push(&self, name: &str, out: &mut Params) {
        out.push((format!("{name}.weight"), self.weight.var().clone()));
    }

    pub(crate) fn map(&mut self, name: &str, f: Visit<'_>) -> Result<()> {
        visit_param(&mut self.weight, &format!("{name}.weight"), f)
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

/// Whether layer `index` is checkpointed when every `every`-th one is
/// ([`kiln_trainer::model::Model::set_activation_checkpointing`]).
pub(crate) fn checkpointed(every: Option<usize>, index: usize) -> bool {
    every.is_some_and(|n| index.is_multiple_of(n))
}

/// Runs one repeated layer, `forward(x, rng)`: through
/// [`kiln_trainer::recompute::checkpoint`] when `checkpoint` is set (which runs it
/// plainly in evaluation, without `rng`).
pub(crate) fn run_layer(
    x: &Tensor,
    rng: Option<&mut Rng>,
    checkpoint: bool,
    forward: impl Fn(&Tensor, Option<&mut Rng>) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if checkpoint {
        kiln_trainer::recompute::checkpoint(x, rng, forward)
    } else {
        forward(x, rng)
    }
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
    attend((q, k, v), None, (heads, kv_heads), bias, scale, p, rng)
}

/// [`attention`] of queries and keys rotated first by rotary tables (the Llama
/// family's `apply_rotary_pos_emb`, [`fused::rope`]), in the same op where it applies.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rotary_attention(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    rotary: fused::Rotary<'_>,
    heads: usize,
    kv_heads: usize,
    bias: &Tensor,
    scale: f64,
    p: f64,
    rng: Option<&mut Rng>,
) -> Result<Tensor> {
    attend(
        (q, k, v),
        Some(rotary),
        (heads, kv_heads),
        bias,
        scale,
        p,
        rng,
    )
}

/// [`attention`] (with `rotary`: [`rotary_attention`]) of queries, keys and values
/// side by side in one tensor `[b, t, eq + ek + ev]` (`widths`), as a fused
/// projection (GPT-2's `c_attn`) returns them: in one op with one gradient for the whole tensor where
/// it applies, else over three views of it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn packed_attention(
    qkv: &Tensor,
    widths: fused::Widths,
    rotary: Option<fused::Rotary<'_>>,
    (heads, kv_heads): (usize, usize),
    bias: &Tensor,
    scale: f64,
    p: f64,
    rng: Option<&mut Rng>,
) -> Result<Tensor> {
    let h = (heads, kv_heads);
    if fused::sdpa_packed_fits(qkv, widths, h, bias, rotary) && p < 1.0 {
        let mask = attention_dropout(rng, qkv.dim(0)? * heads * qkv.dim(1)? * qkv.dim(1)?, p);
        return fused::sdpa_packed(qkv, widths, h, bias, scale, mask, rotary);
    }
    let (eq, ek, ev) = widths;
    let q = qkv.narrow(2, 0, eq)?;
    let k = qkv.narrow(2, eq, ek)?;
    let v = qkv.narrow(2, eq + ek, ev)?;
    attend((&q, &k, &v), rotary, h, bias, scale, p, rng)
}

/// Dropout's values for `n` attention probabilities while training with `p` > 0
/// (drawn as [`dropout`] draws them), else none.
fn attention_dropout(rng: Option<&mut Rng>, n: usize, p: f64) -> Option<Vec<f32>> {
    match rng {
        Some(rng) if p > 0.0 => Some(rng.dropout_values(n, p)),
        _ => None,
    }
}

fn attend(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    rotary: Option<fused::Rotary<'_>>,
    (heads, kv_heads): (usize, usize),
    bias: &Tensor,
    scale: f64,
    p: f64,
    rng: Option<&mut Rng>,
) -> Result<Tensor> {
    // One fused op where it applies (dropout's values drawn as `dropout` draws them).
    if fused::sdpa_fits(q, k, v, (heads, kv_heads), bias, rotary) && p < 1.0 {
        let mask = attention_dropout(rng, q.dim(0)? * heads * q.dim(1)? * k.dim(1)?, p);
        return fused::sdpa((q, k, v), (heads, kv_heads), bias, scale, mask, rotary);
    }
    if let Some(r) = rotary {
        let q = fused::rope(q, r.cos, r.sin, r.head_dim)?;
        let k = fused::rope(k, r.cos, r.sin, r.head_dim)?;
        return attend((&q, &k, v), None, (heads, kv_heads), bias, scale, p, rng);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// NEFTune's noise: only while training, inside ±alpha/sqrt(seq·hidden), spread
    /// over that range (uniform: mean ≈ 0, std ≈ bound/√3), the same for the same seed.
    #[test]
    fn neftune_noise_is_uniform_within_its_bound_and_only_in_training() {
        let d = Device::Cpu;
        let mut emb = Embedding::new(50, 64, 0.02, None, &mut Rng::seed_from_u64(1), &d).unwrap();
        let ids = Tensor::new(
            &[[1u32, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]],
            &d,
        )
        .unwrap();
        let plain = emb.forward(&ids).unwrap();
        emb.set_neftune(Some(5.0));
        let eval = emb.forward_train(&ids, None).unwrap();
        assert_eq!(
            eval.to_vec3::<f32>().unwrap(),
            plain.to_vec3::<f32>().unwrap()
        );
        let noisy = emb
            .forward_train(&ids, Some(&mut Rng::seed_from_u64(7)))
            .unwrap();
        let again = emb
            .forward_train(&ids, Some(&mut Rng::seed_from_u64(7)))
            .unwrap();
        assert_eq!(
            noisy.to_vec3::<f32>().unwrap(),
            again.to_vec3::<f32>().unwrap()
        );
        let noise: Vec<f32> = (noisy - &plain)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let bound = 5.0 / ((8 * 64) as f64).sqrt();
        let max = noise.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
        assert!(
            max <= bound * (1.0 + 1e-5) && max > 0.95 * bound,
            "max {max}, bound {bound}"
        );
        let n = noise.len() as f64;
        let mean = noise.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (noise
            .iter()
            .map(|&x| (x as f64 - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!(mean.abs() < 0.05 * bound, "mean {mean}");
        assert!(
            (std / (bound / 3f64.sqrt()) - 1.0).abs() < 0.05,
            "std {std}"
        );
        emb.set_neftune(None);
        let off = emb
            .forward_train(&ids, Some(&mut Rng::seed_from_u64(7)))
            .unwrap();
        assert_eq!(
            off.to_vec3::<f32>().unwrap(),
            plain.to_vec3::<f32>().unwrap()
        );
    }

    /// Side by side with transformers' own hook (`neftune_post_forward_hook`, in the
    /// venv): the same bound, and kiln's noise has transformers' distribution — every
    /// percentile within 5% of the bound (the noise itself cannot match: torch draws it
    /// from its own generator).
    #[test]
    fn neftune_noise_is_distributed_as_transformers_noise() {
        let (b, t, d, alpha) = (4usize, 64usize, 64usize, 5.0);
        let work = tempfile::tempdir().unwrap();
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_neftune.py");
        let job = serde_json::json!({"shape": [b, t, d], "alpha": alpha, "seed": 0});
        let Some(results) = kiln_test_support::run_checker(&script, &[job], work.path()) else {
            return;
        };
        let hf = &results[0];
        let dev = Device::Cpu;
        let mut emb = Embedding::new(8, d, 0.02, None, &mut Rng::seed_from_u64(1), &dev).unwrap();
        let ids = Tensor::zeros((b, t), DType::U32, &dev).unwrap();
        let plain = emb.forward(&ids).unwrap();
        emb.set_neftune(Some(alpha));
        let noisy = emb
            .forward_train(&ids, Some(&mut Rng::seed_from_u64(3)))
            .unwrap();
        let mut noise: Vec<f64> = (noisy - plain)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        noise.sort_by(f64::total_cmp);
        let bound = alpha / ((t * d) as f64).sqrt();
        assert!((hf["bound"].as_f64().unwrap() - bound).abs() < 1e-12);
        let theirs: Vec<f64> = hf["quantiles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q.as_f64().unwrap())
            .collect();
        let n = noise.len() - 1;
        for (k, q) in theirs.iter().enumerate() {
            // torch.quantile's linear interpolation.
            let pos = k as f64 / 100.0 * n as f64;
            let (lo, frac) = (pos.floor() as usize, pos.fract());
            let ours = noise[lo] + frac * (noise[(lo + 1).min(n)] - noise[lo]);
            assert!(
                (ours - q).abs() < 0.05 * bound,
                "percentile {k}: kiln {ours}, transformers {q} (bound {bound})"
            );
        }
        let max = noise[0].abs().max(noise[n].abs());
        assert!(max <= bound * (1.0 + 1e-5));
        assert!(hf["max_abs"].as_f64().unwrap() <= bound * (1.0 + 1e-5));
    }
}

//! transformers' Llama-family causal LMs — `LlamaForCausalLM`, `MistralForCausalLM`,
//! `Qwen2ForCausalLM`, `Qwen3ForCausalLM` — as one model with a [`LlamaVariant`]:
//! RMSNorm, rotary embeddings, grouped-query attention (K/V never repeated), a SwiGLU
//! MLP, optional sliding windows, Qwen2's q/k/v biases and Qwen3's per-head q/k norms.

mod config;
mod generate;
mod gguf;
mod rope;

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

pub use config::{LlamaConfig, LlamaVariant};
pub use rope::RopeParameters;

use crate::config as shared;
use crate::fused;
use crate::layers::{
    Dense, Embedding, Freeze, Linear, MapVars, Param, Params, Visit, attention, checkpointed,
    normal, rotary_attention, run_layer, visit_param,
};
use crate::loss;
use crate::{Error, Result};
use kiln_trainer::adapter::DenseVisitor;
use kiln_trainer::model::{Batch, Model, Output};
use kiln_trainer::rng::Rng;
use kiln_trainer::weights::{LoadInfo, LoadRules};

/// transformers' `LlamaRMSNorm` (weight one).
#[derive(Clone, Debug)]
struct RmsNorm {
    weight: Param,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, device: &Device) -> Result<Self> {
        Ok(RmsNorm {
            weight: Param::new(Var::ones(size, DType::F32, device)?),
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        fused::rms_norm(x, &self.weight.t(), self.eps)
    }
}

#[derive(Clone, Debug)]
struct Layer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Qwen3's per-head norms of queries and keys.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

/// transformers' Llama-family `…ForCausalLM`, with its parameter names
/// (`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, …,
/// `model.norm.weight`, `lm_head.weight`, tied to the embeddings when
/// `tie_word_embeddings`).
///
/// The forward pass is transformers' eager one: position ids `0..t`, a causal mask (with a
/// sliding window on sliding layers) combined with the batch's attention mask on the keys,
/// attention scaled by `head_dim^-½` with its softmax in f32, and the causal LM loss of
/// `logits[:, :-1]` against `labels[:, 1:]`, ignoring -100. Weights initialise as
/// transformers' `_init_weights`: normal(0, `initializer_range`), zero biases, norms one,
/// the `pad_token_id` row of the embedding zero.
#[derive(Debug)]
pub struct LlamaForCausalLM {
    config: LlamaConfig,
    generation_config: Option<Value>,
    /// The dtype of the folder's weights, saved in again ([`Model::saved_dtype`]).
    stored_dtype: Option<DType>,
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    /// Activation checkpointing: every how many layers one is checkpointed.
    checkpoint_every: Option<usize>,
    norm: RmsNorm,
    /// `lm_head.weight` `[vocab, hidden]` when not tied.
    lm_head: Option<Param>,
}

/// Per-layer keys and values of the positions seen so far, for generation.
pub(crate) type KvCache = Vec<Option<(Tensor, Tensor)>>;

impl LlamaForCausalLM {
    /// A model initialised as transformers initialises it, drawing from `rng`.
    pub fn new(config: LlamaConfig, rng: &mut Rng, device: &Device) -> Result<Self> {
        config.validate()?;
        shared::check_size(
            config.variant.architecture(),
            config.parameter_count(),
            device,
        )?;
        let std = config.initializer_range;
        let (e, d) = (config.hidden_size, config.head_size());
        let (h, kv, i) = (
            config.num_attention_heads,
            config.kv_heads(),
            config.intermediate_size,
        );
        let eps = config.rms_norm_eps;
        let pad = config.pad_token_id;
        let embed_tokens = Embedding::new(config.vocab_size, e, std, pad, rng, device)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            let (qkv_bias, o_bias) = (config.qkv_bias(), config.o_bias());
            let qk_norm = if config.variant == LlamaVariant::Qwen3 {
                Some((RmsNorm::new(d, eps, device)?, RmsNorm::new(d, eps, device)?))
            } else {
                None
            };
            layers.push(Layer {
                q_proj: Linear::new(e, h * d, qkv_bias, std, rng, device)?,
                k_proj: Linear::new(e, kv * d, qkv_bias, std, rng, device)?,
                v_proj: Linear::new(e, kv * d, qkv_bias, std, rng, device)?,
                o_proj: Linear::new(h * d, e, o_bias, std, rng, device)?,
                qk_norm,
                gate_proj: Linear::new(e, i, config.mlp_bias, std, rng, device)?,
                up_proj: Linear::new(e, i, config.mlp_bias, std, rng, device)?,
                down_proj: Linear::new(i, e, config.mlp_bias, std, rng, device)?,
                input_layernorm: RmsNorm::new(e, eps, device)?,
                post_attention_layernorm: RmsNorm::new(e, eps, device)?,
            });
        }
        let norm = RmsNorm::new(e, eps, device)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(Param::new(normal(
                &[config.vocab_size, e],
                std,
                rng,
                device,
            )?))
        };
        Ok(LlamaForCausalLM {
            config,
            generation_config: None,
            stored_dtype: None,
            embed_tokens,
            layers,
            checkpoint_every: None,
            norm,
            lm_head,
        })
    }

    /// Builds the model a folder's `config.json` describes (the variant from its
    /// `model_type`) and loads its weights: safetensors or `.bin`, one file or shards,
    /// any float dtype (converted to the f32 the trainer keeps), a base-model folder
    /// without `model.`. The folder's `generation_config.json` is kept and saved again.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<(Self, LoadInfo)> {
        let dir = dir.as_ref();
        let config = LlamaConfig::from_json(&kiln_checkpoint::model::read_config(dir)?)?;
        Self::from_pretrained_with(dir, config, rng, device)
    }

    /// [`LlamaForCausalLM::from_pretrained`] with the config already read (and perhaps
    /// changed, as `from_pretrained(dir, **kwargs)` does).
    pub fn from_pretrained_with(
        dir: &Path,
        config: LlamaConfig,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<(Self, LoadInfo)> {
        let mut model = Self::new(config, rng, device)?;
        let info = model.init_from(dir)?;
        model.generation_config = generate::read_generation_config(dir)?;
        model.stored_dtype = crate::registry::stored_dtype(&info);
        Ok((model, info))
    }

    /// The configuration.
    pub fn llama_config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The cos/sin tables `[t, head_dim/2]` for positions `start..start + t`.
    fn rope_tables(
        &self,
        start: usize,
        t: usize,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let c = &self.config;
        let (inv, scaling) =
            c.rope_parameters
                .inv_freq(c.head_size(), c.max_position_embeddings, start + t);
        fused::rope_tables(&inv, start..start + t, scaling, device)
    }

    /// The additive attention bias `[b or 1, 1, t, start + t]` for queries at positions
    /// `start..start + t` over keys `0..start + t`: causal, within `window` when given,
    /// and (with `mask` `[b, start + t]`) not on padding.
    fn bias(
        &self,
        start: usize,
        t: usize,
        window: Option<usize>,
        mask: Option<&Tensor>,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let total = start + t;
        let allowed: Vec<u8> = (0..t * total)
            .map(|n| {
                let (q, k) = (start + n / total, n % total);
                u8::from(k <= q && window.is_none_or(|w| q - k < w))
            })
            .collect();
        let allowed = Tensor::from_vec(allowed, (1, 1, t, total), device)?;
        let allowed = match mask {
            Some(mask) => {
                let b = mask.dim(0)?;
                allowed
                    .to_dtype(DType::F32)?
                    .broadcast_mul(&mask.to_dtype(DType::F32)?.reshape((b, 1, 1, total))?)?
            }
            None => allowed,
        };
        crate::layers::mask_to_bias(&allowed)
    }

    /// The logits `[b, t, vocab]` of `ids` at positions `start..start + t`, reading and
    /// extending `cache` when given (generation), and drawing dropout from `rng`.
    fn run(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        start: usize,
        mut cache: Option<&mut KvCache>,
        mut rng: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (_, t) = ids.dims2()?;
        let device = ids.device();
        let (h, kv, d) = (c.num_attention_heads, c.kv_heads(), c.head_size());
        let (cos, sin) = self.rope_tables(start, t, device)?;
        let scale = 1.0 / (d as f64).sqrt();
        let full = self.bias(start, t, None, attention_mask, device)?;
        let mut sliding: Option<Tensor> = None;
        let mut x = self.embed_tokens.forward_train(ids, rng.as_deref_mut())?;
        for (n, layer) in self.layers.iter().enumerate() {
            let bias = match c.window(n) {
                None => &full,
                Some(w) => {
                    if sliding.is_none() {
                        sliding = Some(self.bias(start, t, Some(w), attention_mask, device)?);
                    }
                    sliding.as_ref().unwrap_or(&full)
                }
            };
            let inputs = LayerInputs {
                cos: cos.clone(),
                sin: sin.clone(),
                bias: bias.clone(),
                heads: h,
                kv_heads: kv,
                head_dim: d,
                scale,
                dropout: c.attention_dropout,
            };
            x = match cache.as_deref_mut().and_then(|c| c.get_mut(n)) {
                Some(slot) => layer.forward(&x, &inputs, Some(slot), rng.as_deref_mut())?,
                None => {
                    let layer = layer.clone();
                    run_layer(
                        &x,
                        rng.as_deref_mut(),
                        checkpointed(self.checkpoint_every, n),
                        move |x, rng| layer.forward(x, &inputs, None, rng),
                    )?
                }
            };
        }
        let x = self.norm.forward(&x)?;
        let head = self.lm_head.as_ref().unwrap_or(self.embed_tokens.weight());
        fused::linear(&x, &head.t(), None, false)
    }

    /// Visits every parameter and dense layer, in [`Model::parameters`] order.
    fn visit(&mut self, f: Visit<'_>) -> candle_core::Result<()> {
        self.embed_tokens.map("model.embed_tokens", f)?;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.map(&format!("model.layers.{i}"), f)?;
        }
        visit_param(&mut self.norm.weight, "model.norm.weight", f)?;
        if let Some(head) = &mut self.lm_head {
            visit_param(head, "lm_head.weight", f)?;
        }
        Ok(())
    }

    /// The additive bias is causal over the keys the model has seen; a batch whose
    /// attention mask marks padding keeps it out of every query's view.
    fn logits(&self, batch: &Batch, rng: Option<&mut Rng>) -> candle_core::Result<Tensor> {
        let t = batch.input_ids.dim(1)?;
        if t > self.config.max_position_embeddings
            && self.config.rope_parameters.rope_type != "dynamic"
        {
            candle_core::bail!(
                "sequence of {t} tokens is longer than the {} positions the model has (max_position_embeddings)",
                self.config.max_position_embeddings
            )
        }
        self.run(
            &batch.input_ids,
            batch.attention_mask.as_ref(),
            0,
            None,
            rng,
        )
    }
}

/// What a layer's forward pass takes besides its input: the rotary tables, the
/// attention bias and the attention's sizes.
#[derive(Clone, Debug)]
struct LayerInputs {
    cos: Tensor,
    sin: Tensor,
    bias: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    dropout: f64,
}

impl Layer {
    /// The layer's output for `x`; with `cache` (generation) the keys and values of
    /// the positions seen so far are read from it and extended.
    fn forward(
        &self,
        x: &Tensor,
        inputs: &LayerInputs,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mut rng: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let (h, kv, d) = (inputs.heads, inputs.kv_heads, inputs.head_dim);
        let (cos, sin) = (&inputs.cos, &inputs.sin);
        let hidden = self.input_layernorm.forward(x)?;
        let (bias, scale, p) = (&inputs.bias, inputs.scale, inputs.dropout);
        let rotary = fused::Rotary {
            cos,
            sin,
            head_dim: d,
        };
        let mut q = self.q_proj.forward(&hidden, rng.as_deref_mut())?;
        let mut k = self.k_proj.forward(&hidden, rng.as_deref_mut())?;
        let v = self.v_proj.forward(&hidden, rng.as_deref_mut())?;
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            let (b, t, _) = q.dims3()?;
            q = q_norm
                .forward(&q.reshape((b, t, h, d))?)?
                .reshape((b, t, h * d))?;
            k = k_norm
                .forward(&k.reshape((b, t, kv, d))?)?
                .reshape((b, t, kv * d))?;
        }
        let context = match cache {
            // Training and scoring: the rotation inside the attention's op.
            None => {
                let qkv = (&q, &k, &v);
                rotary_attention(qkv, rotary, h, kv, bias, scale, p, rng.as_deref_mut())?
            }
            // Generation: the keys are rotated before they join the cache.
            Some(slot) => {
                let q = fused::rope(&q, cos, sin, d)?;
                let k = fused::rope(&k, cos, sin, d)?;
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                attention(&q, &k, &v, h, kv, bias, scale, p, rng.as_deref_mut())?
            }
        };
        self.mlp(&context, x, rng)
    }

    /// The rest of the layer from the attention's `context`: o_proj onto the residual
    /// `x`, then the MLP block.
    fn mlp(
        &self,
        context: &Tensor,
        x: &Tensor,
        mut rng: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let x = self.o_proj.forward_onto(context, x, rng.as_deref_mut())?;
        let hidden = self.post_attention_layernorm.forward(&x)?;
        let gated = match (self.gate_proj.plain_weight(), self.up_proj.plain_weight()) {
            (Some(wg), Some(wu)) => fused::swiglu_mlp(&hidden, &wg, &wu)?,
            _ => {
                let gate = self.gate_proj.forward(&hidden, rng.as_deref_mut())?;
                let up = self.up_proj.forward(&hidden, rng.as_deref_mut())?;
                fused::silu_mul(&gate, &up)?
            }
        };
        self.down_proj.forward_onto(&gated, &x, rng)
    }

    fn visit(&self, prefix: &str, out: &mut Params) {
        let a = format!("{prefix}.self_attn");
        self.q_proj.push(&format!("{a}.q_proj"), out);
        self.k_proj.push(&format!("{a}.k_proj"), out);
        self.v_proj.push(&format!("{a}.v_proj"), out);
        self.o_proj.push(&format!("{a}.o_proj"), out);
        if let Some((q, k)) = &self.qk_norm {
            out.push((format!("{a}.q_norm.weight"), q.weight.var().clone()));
            out.push((format!("{a}.k_norm.weight"), k.weight.var().clone()));
        }
        self.gate_proj.push(&format!("{prefix}.mlp.gate_proj"), out);
        self.up_proj.push(&format!("{prefix}.mlp.up_proj"), out);
        self.down_proj.push(&format!("{prefix}.mlp.down_proj"), out);
        out.push((
            format!("{prefix}.input_layernorm.weight"),
            self.input_layernorm.weight.var().clone(),
        ));
        out.push((
            format!("{prefix}.post_attention_layernorm.weight"),
            self.post_attention_layernorm.weight.var().clone(),
        ));
    }

    fn map(&mut self, prefix: &str, f: Visit<'_>) -> candle_core::Result<()> {
        let a = format!("{prefix}.self_attn");
        self.q_proj.map(&format!("{a}.q_proj"), f)?;
        self.k_proj.map(&format!("{a}.k_proj"), f)?;
        self.v_proj.map(&format!("{a}.v_proj"), f)?;
        self.o_proj.map(&format!("{a}.o_proj"), f)?;
        if let Some((q, k)) = &mut self.qk_norm {
            visit_param(&mut q.weight, &format!("{a}.q_norm.weight"), f)?;
            visit_param(&mut k.weight, &format!("{a}.k_norm.weight"), f)?;
        }
        self.gate_proj.map(&format!("{prefix}.mlp.gate_proj"), f)?;
        self.up_proj.map(&format!("{prefix}.mlp.up_proj"), f)?;
        self.down_proj.map(&format!("{prefix}.mlp.down_proj"), f)?;
        visit_param(
            &mut self.input_layernorm.weight,
            &format!("{prefix}.input_layernorm.weight"),
            f,
        )?;
        visit_param(
            &mut self.post_attention_layernorm.weight,
            &format!("{prefix}.post_attention_layernorm.weight"),
            f,
        )
    }
}

impl Model for LlamaForCausalLM {
    fn forward(&self, batch: &Batch, train: Option<&mut Rng>) -> candle_core::Result<Output> {
        let logits = self.logits(batch, train)?;
        let loss = match &batch.labels {
            Some(labels) => Some(loss::causal_lm(&logits, labels)?),
            None => None,
        };
        Ok(Output { loss, logits })
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        self.embed_tokens.push("model.embed_tokens", &mut out);
        for (i, layer) in self.layers.iter().enumerate() {
            layer.visit(&format!("model.layers.{i}"), &mut out);
        }
        out.push(("model.norm.weight".into(), self.norm.weight.var().clone()));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".into(), head.var().clone()));
        }
        out
    }

    fn map_parameters(
        &mut self,
        f: &mut dyn FnMut(&str, &Var) -> candle_core::Result<Var>,
    ) -> kiln_trainer::Result<()> {
        Ok(self.visit(&mut MapVars(f))?)
    }

    fn set_neftune_noise_alpha(&mut self, alpha: Option<f64>) -> bool {
        self.embed_tokens.set_neftune(alpha);
        true
    }

    fn set_activation_checkpointing(&mut self, every_n_layers: Option<usize>) -> bool {
        self.checkpoint_every = every_n_layers;
        true
    }

    fn freeze(&mut self, frozen: &dyn Fn(&str) -> bool) -> kiln_trainer::Result<()> {
        Ok(self.visit(&mut Freeze(frozen))?)
    }

    fn visit_dense(&mut self, mut f: DenseVisitor<'_>) -> kiln_trainer::Result<()> {
        Ok(self.visit(&mut Dense(&mut f))?)
    }

    fn config(&self) -> Value {
        let v = self.config.variant;
        shared::with_file_keys(v.architecture(), v.model_type(), self.config.to_json())
    }

    fn generation_config(&self) -> Option<Value> {
        Some(
            self.generation_config
                .clone()
                .unwrap_or_else(|| self.config.generation_config()),
        )
    }

    fn tied_weights(&self) -> Vec<(String, String)> {
        if self.lm_head.is_none() {
            vec![("lm_head.weight".into(), "model.embed_tokens.weight".into())]
        } else {
            Vec::new()
        }
    }

    /// Base-model folders (`embed_tokens.weight`, … without `model.`) load, and the
    /// rotary `inv_freq` buffers transformers 4.x saved are dropped.
    fn load_rules(&self) -> LoadRules {
        LoadRules::default()
            .with_base_model_prefix("model")
            .with_ignore(".rotary_emb.inv_freq")
    }

    fn saved_dtype(&self) -> Option<DType> {
        self.stored_dtype
    }

    /// transformers' `get_decay_parameter_names`: no decay for biases and norms
    /// (`…layernorm…`, `model.norm.…`, `…_norm.…`).
    fn no_weight_decay(&self, name: &str) -> bool {
        let lower = name.to_ascii_lowercase();
        lower.contains("bias")
            || lower.contains("layernorm")
            || lower.contains("rmsnorm")
            || lower.split('.').any(|part| part == "norm")
            || lower.split('.').any(|part| part.ends_with("_norm"))
    }
}

impl crate::registry::TaskModel for LlamaForCausalLM {
    fn generate_greedy(
        &self,
        input_ids: &Tensor,
        max_new_tokens: usize,
    ) -> candle_core::Result<Tensor> {
        LlamaForCausalLM::generate_greedy(self, input_ids, max_new_tokens)
    }

    fn set_generation_config(&mut self, generation_config: Value) {
        self.generation_config = Some(generation_config);
    }

    fn set_stored_dtype(&mut self, dtype: DType) {
        self.stored_dtype = Some(dtype);
    }
}

/// The registry entry of one variant.
macro_rules! register {
    ($variant:expr) => {
        inventory::submit! {
            crate::registry::Architecture::new(
                $variant.architecture(),
                kiln_trainer::Task::CausalLm,
                "gpt2",
                || LlamaConfig::default_for($variant).to_json(),
                |config, rng, device| {
                    let config = LlamaConfig::from_json_as(config, $variant)?;
                    Ok(Box::new(LlamaForCausalLM::new(config, rng, device)?))
                },
                |dir, rng, device| {
                    let (model, info) = LlamaForCausalLM::from_pretrained(dir, rng, device)?;
                    if model.config.variant != $variant {
                        return Err(Error::Config(format!(
                            "{}: config.json's model_type {:?} is not {}'s",
                            dir.display(),
                            model.config.variant.model_type(),
                            $variant.architecture()
                        )));
                    }
                    Ok((Box::new(model), info))
                },
            )
            .with_gguf(gguf::layout)
        }
    };
}

register!(LlamaVariant::Llama);
register!(LlamaVariant::Mistral);
register!(LlamaVariant::Qwen2);
register!(LlamaVariant::Qwen3);

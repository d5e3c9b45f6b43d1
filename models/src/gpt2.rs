//! transformers' `GPT2LMHeadModel`.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use kiln_trainer::adapter::DenseVisitor;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::config::{self, TokenIds, check};
use crate::fused;
use crate::generation::Greedy;
use crate::layers::{
    Activation, Dense, Embedding, Freeze, LayerNorm, Linear, MapVars, Param, Params, Visit,
    checkpointed, dropout, mask_to_bias, matmul_last, normal, packed_attention, run_layer,
    visit_param,
};
use crate::loss;
use crate::{Error, Result};
use kiln_trainer::model::{Batch, Model, Output};
use kiln_trainer::rng::Rng;
use kiln_trainer::weights::{LoadInfo, LoadRules};

/// transformers' `GPT2Config`: the names, defaults and JSON of transformers (5.x). Keys
/// kiln does not know (`task_specific_params`, `n_ctx`, …) are kept in
/// [`Gpt2Config::extra`] and written back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gpt2Config {
    /// Vocabulary size (50257).
    pub vocab_size: usize,
    /// Positions (1024).
    pub n_positions: usize,
    /// Hidden size (768).
    pub n_embd: usize,
    /// Number of blocks (12).
    pub n_layer: usize,
    /// Attention heads per block (12).
    pub n_head: usize,
    /// Feed-forward size (`None`: 4 × `n_embd`).
    pub n_inner: Option<usize>,
    /// Feed-forward activation (`"gelu_new"`, the tanh approximation).
    pub activation_function: String,
    /// Dropout on the blocks' residual branches (0.1).
    pub resid_pdrop: f64,
    /// Dropout on the embeddings (0.1).
    pub embd_pdrop: f64,
    /// Dropout on attention probabilities (0.1).
    pub attn_pdrop: f64,
    /// LayerNorm epsilon (1e-5).
    pub layer_norm_epsilon: f64,
    /// Standard deviation of the initial weights (0.02; the residual projections
    /// `c_proj` use `initializer_range / sqrt(2 · n_layer)`).
    pub initializer_range: f64,
    /// Sequence-summary head settings (unused by the LM head, kept for transformers).
    pub summary_type: String,
    /// See `summary_type`.
    pub summary_use_proj: bool,
    /// See `summary_type`.
    pub summary_activation: Option<String>,
    /// See `summary_type`.
    pub summary_proj_to_labels: bool,
    /// See `summary_type`.
    pub summary_first_dropout: f64,
    /// Scale attention scores by 1/sqrt(head size) (true).
    pub scale_attn_weights: bool,
    /// Kept for transformers (true).
    pub use_cache: bool,
    /// Beginning-of-sequence token id (50256).
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id(s) (50256).
    pub eos_token_id: Option<TokenIds>,
    /// Padding token id (none).
    pub pad_token_id: Option<u32>,
    /// Further divide attention scores by the layer number (false).
    pub scale_attn_by_inverse_layer_idx: bool,
    /// A numerical variant for mixed precision (false; kiln computes in f32 either way).
    pub reorder_and_upcast_attn: bool,
    /// Cross-attention layers (must be false here).
    pub add_cross_attention: bool,
    /// `lm_head.weight` is `transformer.wte.weight` (true).
    pub tie_word_embeddings: bool,
    /// Other keys of `config.json`, written back as read.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for Gpt2Config {
    fn default() -> Self {
        Gpt2Config {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: None,
            activation_function: "gelu_new".into(),
            resid_pdrop: 0.1,
            embd_pdrop: 0.1,
            attn_pdrop: 0.1,
            layer_norm_epsilon: 1e-5,
            initializer_range: 0.02,
            summary_type: "cls_index".into(),
            summary_use_proj: true,
            summary_activation: None,
            summary_proj_to_labels: true,
            summary_first_dropout: 0.1,
            scale_attn_weights: true,
            use_cache: true,
            bos_token_id: Some(50256),
            eos_token_id: Some(TokenIds::One(50256)),
            pad_token_id: None,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            add_cross_attention: false,
            tie_word_embeddings: true,
            extra: Map::new(),
        }
    }
}

impl Gpt2Config {
    /// Reads the `config.json` transformers wrote (extra keys are kept).
    pub fn from_json(json: &Value) -> Result<Self> {
        let c: Gpt2Config = config::read(json, "gpt2")?;
        c.validate()?;
        Ok(c)
    }

    /// Reads `dir/config.json`.
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_json(&kiln_checkpoint::model::read_config(dir)?)
    }

    /// The JSON transformers writes for this config (without `architectures` and
    /// `model_type`, which the model adds).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The number of parameters the model of this config has (`None` if it overflows a
    /// u64), as `Gpt2LMHeadModel` builds it (an untied head counted once more).
    pub fn parameter_count(&self) -> Option<u64> {
        let (e, i) = (self.n_embd, self.inner_size());
        let block = config::count(&[
            &[4, e],
            &[e, 3, e],
            &[3, e],
            &[e, e],
            &[e],
            &[2, e, i],
            &[i],
            &[e],
        ])?;
        let head = if self.tie_word_embeddings {
            0
        } else {
            config::count(&[&[self.vocab_size, e]])?
        };
        config::count(&[&[self.vocab_size, e], &[self.n_positions, e], &[2, e]])?
            .checked_add(block.checked_mul(self.n_layer as u64)?)?
            .checked_add(head)
    }

    /// The feed-forward size.
    pub fn inner_size(&self) -> usize {
        self.n_inner.unwrap_or(self.n_embd.saturating_mul(4))
    }

    /// Checks that kiln can build this config.
    pub fn validate(&self) -> Result<()> {
        check(self.n_embd > 0 && self.n_head > 0, || {
            "n_embd and n_head must be positive".into()
        })?;
        check(self.n_embd.is_multiple_of(self.n_head), || {
            format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            )
        })?;
        check(
            Activation::parse(&self.activation_function).is_some(),
            || {
                format!(
                    "activation_function {:?} is not supported",
                    self.activation_function
                )
            },
        )?;
        check(!self.add_cross_attention, || {
            "GPT-2 with cross-attention (add_cross_attention) is not supported".into()
        })?;
        for (name, p) in [
            ("resid_pdrop", self.resid_pdrop),
            ("embd_pdrop", self.embd_pdrop),
            ("attn_pdrop", self.attn_pdrop),
        ] {
            check((0.0..=1.0).contains(&p), || {
                format!("{name} must be in [0, 1], got {p}")
            })?;
        }
        Ok(())
    }

    /// `generation_config.json` as transformers derives it from the model config.
    pub fn generation_config(&self) -> Value {
        let mut g = json!({
            "_from_model_config": true,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "output_attentions": false,
            "output_hidden_states": false,
            "use_cache": self.use_cache,
        });
        if let (Some(pad), Value::Object(m)) = (self.pad_token_id, &mut g) {
            m.insert("pad_token_id".into(), Value::from(pad));
        }
        g
    }
}

#[derive(Clone, Debug)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_c_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_c_proj: Linear,
}

/// transformers' `GPT2LMHeadModel`, with its parameter names
/// (`transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight` in Conv1D's
/// `[in, out]` layout, …), `lm_head.weight` tied to `transformer.wte.weight` (unless
/// `tie_word_embeddings` is false).
///
/// The forward pass is transformers': position ids `0..t` (also with padding), a
/// causal mask combined with the batch's attention mask on the keys, token type ids
/// (when a batch has them) embedded with `wte` and added, and the causal LM loss of
/// `logits[:, :-1]` against `labels[:, 1:]`, ignoring -100.
#[derive(Debug)]
pub struct Gpt2LMHeadModel {
    config: Gpt2Config,
    generation_config: Option<Value>,
    activation: Activation,
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    /// Activation checkpointing: every how many blocks one is checkpointed.
    checkpoint_every: Option<usize>,
    ln_f: LayerNorm,
    /// `lm_head.weight` `[vocab, n_embd]` when not tied.
    lm_head: Option<Param>,
}

/// What a block's forward pass takes from the config.
#[derive(Clone, Copy, Debug)]
struct BlockSpec {
    heads: usize,
    embd: usize,
    scale: f64,
    attention_dropout: f64,
    residual_dropout: f64,
    activation: Activation,
}

impl Gpt2LMHeadModel {
    /// A model initialised as transformers initialises it (normal(0,
    /// initializer_range) weights, the `c_proj` weights normal(0, initializer_range /
    /// sqrt(2 · n_layer)), zero biases, LayerNorm 1/0), drawing from `rng`.
    pub fn new(config: Gpt2Config, rng: &mut Rng, device: &Device) -> Result<Self> {
        config.validate()?;
        config::check_size("GPT-2", config.parameter_count(), device)?;
        let std = config.initializer_range;
        let proj_std = std / (2.0 * config.n_layer as f64).sqrt();
        let e = config.n_embd;
        let eps = config.layer_norm_epsilon;
        let activation = Activation::parse(&config.activation_function).ok_or_else(|| {
            Error::Config(format!(
                "activation_function {:?}",
                config.activation_function
            ))
        })?;
        let wte = Embedding::new(config.vocab_size, e, std, None, rng, device)?;
        let wpe = Embedding::new(config.n_positions, e, std, None, rng, device)?;
        let mut blocks = Vec::with_capacity(config.n_layer);
        for _ in 0..config.n_layer {
            blocks.push(Block {
                ln_1: LayerNorm::new(e, eps, device)?,
                c_attn: Linear::conv1d(e, 3 * e, std, rng, device)?,
                attn_c_proj: Linear::conv1d(e, e, proj_std, rng, device)?,
                ln_2: LayerNorm::new(e, eps, device)?,
                c_fc: Linear::conv1d(e, config.inner_size(), std, rng, device)?,
                mlp_c_proj: Linear::conv1d(config.inner_size(), e, proj_std, rng, device)?,
            });
        }
        let ln_f = LayerNorm::new(e, eps, device)?;
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
        Ok(Gpt2LMHeadModel {
            config,
            generation_config: None,
            activation,
            wte,
            wpe,
            blocks,
            checkpoint_every: None,
            ln_f,
            lm_head,
        })
    }

    /// Builds the model a folder's `config.json` describes and loads its weights (see
    /// [`kiln_trainer::weights`]); a base GPT-2 folder (`wte.weight`, …, without
    /// `transformer.`) loads too. The folder's `generation_config.json`, if any, is
    /// kept and saved again.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<(Self, LoadInfo)> {
        let dir = dir.as_ref();
        let mut model = Self::new(Gpt2Config::from_pretrained(dir)?, rng, device)?;
        let info = model.init_from(dir)?;
        model.generation_config = crate::generation::read_generation_config(dir)?;
        Ok((model, info))
    }

    /// The configuration.
    pub fn gpt2_config(&self) -> &Gpt2Config {
        &self.config
    }

    /// The final hidden states `[b, t, n_embd]` and the logits `[b, t, vocab]`.
    fn logits(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
        mut rng: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        let device = ids.device();
        let words = self.wte.forward_train(ids, rng.as_deref_mut())?;
        let mut x = fused::add_trailing(&words, &self.wpe.first_rows(t)?)?;
        if let Some(tt) = token_type_ids {
            // transformers embeds GPT-2's token types with the word embeddings (its
            // NEFTune hook, on wte, noises them too).
            x = (x + self.wte.forward_train(tt, rng.as_deref_mut())?)?;
        }
        let mut x = dropout(&x, c.embd_pdrop, rng.as_deref_mut())?;

        // Causal and padding: query i sees key j <= i that is not padding.
        let causal: Vec<u8> = (0..t * t).map(|n| u8::from(n % t <= n / t)).collect();
        let causal = Tensor::from_vec(causal, (1, 1, t, t), device)?;
        let allowed = match attention_mask {
            Some(mask) => causal
                .to_dtype(DType::F32)?
                .broadcast_mul(&mask.to_dtype(DType::F32)?.reshape((b, 1, 1, t))?)?,
            None => causal,
        };
        let bias = mask_to_bias(&allowed)?;

        for (i, block) in self.blocks.iter().enumerate() {
            let mut scale = 1.0;
            if c.scale_attn_weights {
                scale /= ((c.n_embd / c.n_head) as f64).sqrt();
            }
            if c.scale_attn_by_inverse_layer_idx {
                scale /= (i + 1) as f64;
            }
            let spec = BlockSpec {
                heads: c.n_head,
                embd: c.n_embd,
                scale,
                attention_dropout: c.attn_pdrop,
                residual_dropout: c.resid_pdrop,
                activation: self.activation,
            };
            let (block, bias) = (block.clone(), bias.clone());
            x = run_layer(
                &x,
                rng.as_deref_mut(),
                checkpointed(self.checkpoint_every, i),
                move |x, rng| block.forward(x, &bias, spec, rng),
            )?;
        }
        let x = self.ln_f.forward(&x)?;
        let head = self.lm_head.as_ref().unwrap_or(self.wte.weight());
        matmul_last(&x, &head.t().t()?)
    }

    /// Visits every parameter and dense layer, in [`Model::parameters`] order.
    fn visit(&mut self, f: Visit<'_>) -> candle_core::Result<()> {
        self.wte.map("transformer.wte", f)?;
        self.wpe.map("transformer.wpe", f)?;
        for (i, block) in self.blocks.iter_mut().enumerate() {
            block.map(&format!("transformer.h.{i}"), f)?;
        }
        self.ln_f.map("transformer.ln_f", f)?;
        if let Some(head) = &mut self.lm_head {
            visit_param(head, "lm_head.weight", f)?;
        }
        Ok(())
    }

    /// Greedy decoding, as transformers' `generate(do_sample=False)` with the model's
    /// generation config: appends up to `max_new_tokens` argmax tokens to `input_ids`
    /// (u32 `[b, t]`, no padding), stops early once every sequence has produced an
    /// end-of-sequence token, and pads the sequences that finished before the others
    /// with `pad_token_id` (or the first `eos_token_id`). Returns `[b, t + generated]`.
    ///
    /// Each step runs the whole sequence again (GPT-2 has no key/value cache here; the
    /// Llama family's generation has one).
    pub fn generate_greedy(
        &self,
        input_ids: &Tensor,
        max_new_tokens: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        crate::generation::check_prompt(t)?;
        if t + max_new_tokens > self.config.n_positions {
            candle_core::bail!(
                "{t} tokens and {max_new_tokens} new ones exceed the model's {} positions",
                self.config.n_positions
            )
        }
        let mut greedy = Greedy::new(
            self.generation_config.as_ref(),
            self.config.eos_token_id.as_ref(),
            self.config.pad_token_id,
            b,
        );
        let mut ids = input_ids.to_dtype(DType::U32)?;
        for _ in 0..max_new_tokens {
            let len = ids.dim(1)?;
            let logits = self.logits(&ids, None, None, None)?;
            let next = greedy.next(&logits.i((.., len - 1, ..))?)?;
            ids = Tensor::cat(&[&ids, &next], 1)?;
            if greedy.done() {
                break;
            }
        }
        Ok(ids)
    }
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        spec: BlockSpec,
        mut rng: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let e = spec.embd;
        let h = self.ln_1.forward(x)?;
        let qkv = self.c_attn.forward(&h, rng.as_deref_mut())?;
        let context = packed_attention(
            &qkv,
            (e, e, e),
            None,
            (spec.heads, spec.heads),
            bias,
            spec.scale,
            spec.attention_dropout,
            rng.as_deref_mut(),
        )?;
        let p = spec.residual_dropout;
        let attended = self
            .attn_c_proj
            .forward_dropout(&context, p, rng.as_deref_mut())?;
        let x = (x + attended)?;
        let h = self.ln_2.forward(&x)?;
        let inner = self
            .c_fc
            .forward_activated(&h, spec.activation, rng.as_deref_mut())?;
        x + self.mlp_c_proj.forward_dropout(&inner, p, rng)?
    }

    fn map(&mut self, prefix: &str, f: Visit<'_>) -> candle_core::Result<()> {
        self.ln_1.map(&format!("{prefix}.ln_1"), f)?;
        self.c_attn.map(&format!("{prefix}.attn.c_attn"), f)?;
        self.attn_c_proj.map(&format!("{prefix}.attn.c_proj"), f)?;
        self.ln_2.map(&format!("{prefix}.ln_2"), f)?;
        self.c_fc.map(&format!("{prefix}.mlp.c_fc"), f)?;
        self.mlp_c_proj.map(&format!("{prefix}.mlp.c_proj"), f)
    }

    fn push(&self, prefix: &str, out: &mut Params) {
        self.ln_1.push(&format!("{prefix}.ln_1"), out);
        self.c_attn.push(&format!("{prefix}.attn.c_attn"), out);
        self.attn_c_proj.push(&format!("{prefix}.attn.c_proj"), out);
        self.ln_2.push(&format!("{prefix}.ln_2"), out);
        self.c_fc.push(&format!("{prefix}.mlp.c_fc"), out);
        self.mlp_c_proj.push(&format!("{prefix}.mlp.c_proj"), out);
    }
}

impl Model for Gpt2LMHeadModel {
    fn forward(&self, batch: &Batch, train: Option<&mut Rng>) -> candle_core::Result<Output> {
        let logits = self.logits(
            &batch.input_ids,
            batch.attention_mask.as_ref(),
            batch.token_type_ids.as_ref(),
            train,
        )?;
        let loss = match &batch.labels {
            Some(labels) => Some(loss::causal_lm(&logits, labels)?),
            None => None,
        };
        Ok(Output { loss, logits })
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        self.wte.push("transformer.wte", &mut out);
        self.wpe.push("transformer.wpe", &mut out);
        for (i, block) in self.blocks.iter().enumerate() {
            block.push(&format!("transformer.h.{i}"), &mut out);
        }
        self.ln_f.push("transformer.ln_f", &mut out);
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

    fn set_activation_checkpointing(&mut self, every_n_layers: Option<usize>) -> bool {
        self.checkpoint_every = every_n_layers;
        true
    }

    fn set_neftune_noise_alpha(&mut self, alpha: Option<f64>) -> bool {
        self.wte.set_neftune(alpha);
        true
    }

    fn freeze(&mut self, frozen: &dyn Fn(&str) -> bool) -> kiln_trainer::Result<()> {
        Ok(self.visit(&mut Freeze(frozen))?)
    }

    fn visit_dense(&mut self, mut f: DenseVisitor<'_>) -> kiln_trainer::Result<()> {
        Ok(self.visit(&mut Dense(&mut f))?)
    }

    fn config(&self) -> Value {
        config::with_file_keys("GPT2LMHeadModel", "gpt2", self.config.to_json())
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
            vec![("lm_head.weight".into(), "transformer.wte.weight".into())]
        } else {
            Vec::new()
        }
    }

    /// Base-model folders (`wte.weight`, … without `transformer.`), an untied
    /// `lm_head` initialised afresh when the folder has none, and the causal-mask
    /// buffers older transformers saved (`attn.bias`, `attn.masked_bias`), dropped.
    fn load_rules(&self) -> LoadRules {
        let rules = LoadRules::default()
            .with_base_model_prefix("transformer")
            .with_ignore(".attn.bias")
            .with_ignore(".attn.masked_bias");
        if self.lm_head.is_some() {
            rules.with_fresh("lm_head.")
        } else {
            rules
        }
    }
}

/// Generates greedily for `kiln predict --max_new_tokens`.
impl crate::registry::TaskModel for Gpt2LMHeadModel {
    fn generate_greedy(
        &self,
        input_ids: &Tensor,
        max_new_tokens: usize,
    ) -> candle_core::Result<Tensor> {
        Gpt2LMHeadModel::generate_greedy(self, input_ids, max_new_tokens)
    }

    fn set_generation_config(&mut self, generation_config: Value) {
        self.generation_config = Some(generation_config);
    }
}

/// GPT-2 in GGUF as convert_hf_to_gguf.py writes it (`gpt2`): the Conv1D weights
/// transposed to `[out, in]`, the causal-mask buffers and the tied `lm_head` left out.
fn gguf_layout(config: &Value, tensors: &[String]) -> Result<crate::gguf::GgufLayout> {
    use crate::gguf::{Transform, block, map_names, u32_of};
    use kiln_formats::gguf::Value as V;
    let c = Gpt2Config::from_json(config)?;
    let metadata = vec![
        (
            "gpt2.block_count".to_string(),
            u32_of("n_layer", c.n_layer)?,
        ),
        (
            "gpt2.context_length".to_string(),
            u32_of("n_positions", c.n_positions)?,
        ),
        (
            "gpt2.embedding_length".to_string(),
            u32_of("n_embd", c.n_embd)?,
        ),
        (
            "gpt2.feed_forward_length".to_string(),
            u32_of("n_inner", c.inner_size())?,
        ),
        (
            "gpt2.attention.head_count".to_string(),
            u32_of("n_head", c.n_head)?,
        ),
        (
            "gpt2.attention.layer_norm_epsilon".to_string(),
            V::F32(c.layer_norm_epsilon as f32),
        ),
    ];
    let tensors = map_names(tensors, |name| {
        let name = name.strip_prefix("transformer.").unwrap_or(name);
        let leaf = |n: &str| Some(Some((n.to_string(), Transform::Copy)));
        match name {
            "wte.weight" => return leaf("token_embd.weight"),
            "wpe.weight" => return leaf("position_embd.weight"),
            "ln_f.weight" => return leaf("output_norm.weight"),
            "ln_f.bias" => return leaf("output_norm.bias"),
            // Tied to wte (GPT2LMHeadModel always ties).
            "lm_head.weight" => return Some(None),
            _ => {}
        }
        let (n, rest) = block(name, "h")?;
        let (module, suffix) = rest.rsplit_once('.')?;
        if module == "attn" && matches!(suffix, "bias" | "masked_bias") {
            return Some(None);
        }
        let gguf = match module {
            "ln_1" => "attn_norm",
            "attn.c_attn" => "attn_qkv",
            "attn.c_proj" => "attn_output",
            "ln_2" => "ffn_norm",
            "mlp.c_fc" => "ffn_up",
            "mlp.c_proj" => "ffn_down",
            _ => return None,
        };
        let transform = match (module, suffix) {
            ("ln_1" | "ln_2", _) | (_, "bias") => Transform::Copy,
            (_, "weight") => Transform::Transpose,
            _ => return None,
        };
        Some(Some((format!("blk.{n}.{gguf}.{suffix}"), transform)))
    })?;
    Ok(crate::gguf::GgufLayout {
        arch: "gpt2",
        metadata,
        tensors,
        notes: Vec::new(),
    })
}

inventory::submit! {
    crate::registry::Architecture::new(
        "GPT2LMHeadModel",
        kiln_trainer::Task::CausalLm,
        "gpt2",
        || Gpt2Config::default().to_json(),
        |config, rng, device| {
            let model = Gpt2LMHeadModel::new(Gpt2Config::from_json(config)?, rng, device)?;
            Ok(Box::new(model))
        },
        |dir, rng, device| {
            let (model, info) = Gpt2LMHeadModel::from_pretrained(dir, rng, device)?;
            Ok((Box::new(model), info))
        },
    )
    .with_gguf(gguf_layout)
}

//! transformers' `BertForSequenceClassification`.

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use kiln_trainer::adapter::DenseVisitor;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{self, ProblemType, TokenIds, check};
use crate::fused;
use crate::layers::{
    Activation, Dense, Embedding, Freeze, LayerNorm, Linear, MapVars, Params, Visit, attention,
    checkpointed, dropout, mask_to_bias, run_layer,
};
use crate::loss;
use crate::{Error, Result};
use kiln_trainer::model::{Batch, Model, Output};
use kiln_trainer::rng::Rng;
use kiln_trainer::weights::{LoadInfo, LoadRules};

/// transformers' `BertConfig` with the keys a sequence classifier uses: the names,
/// defaults and JSON of transformers (5.x). Keys kiln does not know are kept in
/// [`BertConfig::extra`] and written back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BertConfig {
    /// Vocabulary size (30522).
    pub vocab_size: usize,
    /// Hidden size (768).
    pub hidden_size: usize,
    /// Number of layers (12).
    pub num_hidden_layers: usize,
    /// Attention heads per layer (12).
    pub num_attention_heads: usize,
    /// Feed-forward size (3072).
    pub intermediate_size: usize,
    /// Feed-forward activation (`"gelu"`, the exact erf GELU).
    pub hidden_act: String,
    /// Dropout on embeddings and sub-layer outputs (0.1).
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities (0.1).
    pub attention_probs_dropout_prob: f64,
    /// Positions (512).
    pub max_position_embeddings: usize,
    /// Segment types (2).
    pub type_vocab_size: usize,
    /// Standard deviation of the initial weights (0.02).
    pub initializer_range: f64,
    /// LayerNorm epsilon (1e-12).
    pub layer_norm_eps: f64,
    /// Padding token id (0); its embedding row starts at zero.
    pub pad_token_id: Option<u32>,
    /// Beginning-of-sequence token id (none).
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id(s) (none).
    pub eos_token_id: Option<TokenIds>,
    /// Dropout before the classifier (`None`: `hidden_dropout_prob`).
    pub classifier_dropout: Option<f64>,
    /// Whether the model is a decoder (must be false here).
    pub is_decoder: bool,
    /// Cross-attention layers (must be false here).
    pub add_cross_attention: bool,
    /// Kept for transformers (true).
    pub use_cache: bool,
    /// Kept for transformers (true; a classifier has no tied weights).
    pub tie_word_embeddings: bool,
    /// The loss: `None` lets the first labels decide, as transformers does (one label:
    /// regression; integer labels: single-label; float labels: multi-label).
    pub problem_type: Option<ProblemType>,
    /// The class names, by class id (`id2label`); their number is `num_labels` (2).
    #[serde(skip)]
    pub labels: Vec<String>,
    /// Other keys of `config.json`, written back as read.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for BertConfig {
    fn default() -> Self {
        BertConfig {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: Some(0),
            bos_token_id: None,
            eos_token_id: None,
            classifier_dropout: None,
            is_decoder: false,
            add_cross_attention: false,
            use_cache: true,
            tie_word_embeddings: true,
            problem_type: None,
            labels: config::default_labels(2),
            extra: Map::new(),
        }
    }
}

impl BertConfig {
    /// Reads the `config.json` transformers wrote (any BERT architecture; extra keys are
    /// kept; `num_labels` comes from `num_labels` or `id2label`, else 2).
    pub fn from_json(json: &Value) -> Result<Self> {
        let mut c: BertConfig = config::read(json, "bert")?;
        c.labels = config::take_labels(&mut c.extra)?.unwrap_or_else(|| config::default_labels(2));
        if let Some(kind) = c.extra.get("position_embedding_type") {
            check(kind.as_str() == Some("absolute"), || {
                format!("position_embedding_type {kind} is not supported (only \"absolute\")")
            })?;
        }
        c.validate()?;
        Ok(c)
    }

    /// Reads `dir/config.json`.
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_json(&kiln_checkpoint::model::read_config(dir)?)
    }

    /// The number of classes.
    pub fn num_labels(&self) -> usize {
        self.labels.len()
    }

    /// Sets `num_labels` (labels `LABEL_0`, `LABEL_1`, …).
    pub fn with_num_labels(mut self, n: usize) -> Self {
        self.labels = config::default_labels(n);
        self
    }

    /// Sets the class names (their number is `num_labels`).
    pub fn with_labels(mut self, labels: Vec<String>) -> Self {
        self.labels = labels;
        self
    }

    /// The JSON transformers writes for this config (without `architectures` and
    /// `model_type`, which the model adds).
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            if self.problem_type.is_none() {
                m.remove("problem_type");
            }
            let (id2label, label2id) = config::label_maps(&self.labels);
            m.insert("id2label".into(), id2label);
            m.insert("label2id".into(), label2id);
        }
        v
    }

    /// The number of parameters the model of this config has (`None` if it overflows a
    /// u64): embeddings, layers, pooler and classifier, as
    /// `BertForSequenceClassification` builds them.
    pub fn parameter_count(&self) -> Option<u64> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let layer = config::count(&[&[4, h, h], &[4, h], &[2, h, i], &[i], &[h], &[4, h]])?;
        config::count(&[
            &[self.vocab_size, h],
            &[self.max_position_embeddings, h],
            &[self.type_vocab_size, h],
            &[2, h],
            &[h, h],
            &[h],
            &[h, self.num_labels()],
            &[self.num_labels()],
        ])?
        .checked_add(layer.checked_mul(self.num_hidden_layers as u64)?)
    }

    /// Checks that kiln can build this config.
    pub fn validate(&self) -> Result<()> {
        check(self.num_labels() >= 1, || {
            "num_labels must be at least 1".into()
        })?;
        check(self.hidden_size > 0 && self.num_attention_heads > 0, || {
            "hidden_size and num_attention_heads must be positive".into()
        })?;
        check(
            self.hidden_size.is_multiple_of(self.num_attention_heads),
            || {
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                )
            },
        )?;
        check(Activation::parse(&self.hidden_act).is_some(), || {
            format!("hidden_act {:?} is not supported", self.hidden_act)
        })?;
        check(!self.is_decoder && !self.add_cross_attention, || {
            "a BERT decoder (is_decoder / add_cross_attention) is not supported".into()
        })?;
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
            ("classifier_dropout", self.classifier_dropout.unwrap_or(0.0)),
        ] {
            check((0.0..=1.0).contains(&p), || {
                format!("{name} must be in [0, 1], got {p}")
            })?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// transformers' `BertForSequenceClassification`: BERT, the pooler (tanh of a dense
/// layer on the first token) and a linear classifier, with transformers' parameter
/// names (`bert.embeddings.word_embeddings.weight`, …, `classifier.bias`).
#[derive(Debug)]
pub struct BertForSequenceClassification {
    config: BertConfig,
    activation: Activation,
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<BertLayer>,
    /// Activation checkpointing: every how many layers one is checkpointed.
    checkpoint_every: Option<usize>,
    pooler: Linear,
    classifier: Linear,
    /// The problem type the first labels decided, when the config leaves it open
    /// (transformers writes it into the config then; so does [`Model::config`]).
    problem_type: OnceLock<ProblemType>,
}

impl BertForSequenceClassification {
    /// A model initialised as transformers initialises it (normal(0,
    /// initializer_range) weights, zero biases, LayerNorm 1/0, the padding row of the
    /// word embeddings zero), drawing from `rng`.
    pub fn new(config: BertConfig, rng: &mut Rng, device: &Device) -> Result<Self> {
        config.validate()?;
        config::check_size("BERT", config.parameter_count(), device)?;
        let std = config.initializer_range;
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let activation = Activation::parse(&config.hidden_act)
            .ok_or_else(|| Error::Config(format!("hidden_act {:?}", config.hidden_act)))?;
        let word_embeddings =
            Embedding::new(config.vocab_size, h, std, config.pad_token_id, rng, device)?;
        let position_embeddings =
            Embedding::new(config.max_position_embeddings, h, std, None, rng, device)?;
        let token_type_embeddings =
            Embedding::new(config.type_vocab_size, h, std, None, rng, device)?;
        let embeddings_norm = LayerNorm::new(h, eps, device)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            layers.push(BertLayer {
                query: Linear::new(h, h, true, std, rng, device)?,
                key: Linear::new(h, h, true, std, rng, device)?,
                value: Linear::new(h, h, true, std, rng, device)?,
                attention_output: Linear::new(h, h, true, std, rng, device)?,
                attention_norm: LayerNorm::new(h, eps, device)?,
                intermediate: Linear::new(h, config.intermediate_size, true, std, rng, device)?,
                output: Linear::new(config.intermediate_size, h, true, std, rng, device)?,
                output_norm: LayerNorm::new(h, eps, device)?,
            });
        }
        let pooler = Linear::new(h, h, true, std, rng, device)?;
        let classifier = Linear::new(h, config.num_labels(), true, std, rng, device)?;
        Ok(BertForSequenceClassification {
            config,
            activation,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_norm,
            layers,
            checkpoint_every: None,
            pooler,
            classifier,
            problem_type: OnceLock::new(),
        })
    }

    /// Builds the model a folder's `config.json` describes and loads its weights (see
    /// [`kiln_trainer::weights`]): a folder of a base BERT, or of BERT with another head, gets
    /// a fresh classifier (and pooler, if it has none) drawn from `rng`, listed in
    /// [`LoadInfo::fresh`].
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<(Self, LoadInfo)> {
        let dir = dir.as_ref();
        let model = Self::new(BertConfig::from_pretrained(dir)?, rng, device)?;
        let info = model.init_from(dir)?;
        Ok((model, info))
    }

    /// The configuration.
    pub fn bert_config(&self) -> &BertConfig {
        &self.config
    }

    /// The problem type: the config's, else the one the first labels decided.
    pub fn problem_type(&self) -> Option<ProblemType> {
        self.config
            .problem_type
            .or_else(|| self.problem_type.get().copied())
    }

    /// Visits every parameter and dense layer, in [`Model::parameters`] order.
    fn visit(&mut self, f: Visit<'_>) -> candle_core::Result<()> {
        self.word_embeddings
            .map("bert.embeddings.word_embeddings", f)?;
        self.position_embeddings
            .map("bert.embeddings.position_embeddings", f)?;
        self.token_type_embeddings
            .map("bert.embeddings.token_type_embeddings", f)?;
        self.embeddings_norm.map("bert.embeddings.LayerNorm", f)?;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.map(&format!("bert.encoder.layer.{i}"), f)?;
        }
        self.pooler.map("bert.pooler.dense", f)?;
        self.classifier.map("classifier", f)?;
        Ok(())
    }

    fn loss(&self, logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
        let n = self.config.num_labels();
        let problem = match self.config.problem_type {
            Some(p) => p,
            None => *self.problem_type.get_or_init(|| {
                if n == 1 {
                    ProblemType::Regression
                } else if labels.dtype().is_int() {
                    ProblemType::SingleLabelClassification
                } else {
                    ProblemType::MultiLabelClassification
                }
            }),
        };
        match problem {
            ProblemType::Regression if n == 1 => {
                loss::mse(&logits.flatten_all()?, &labels.flatten_all()?)
            }
            ProblemType::Regression => loss::mse(logits, labels),
            ProblemType::SingleLabelClassification => {
                loss::cross_entropy(logits, &labels.flatten_all()?)
            }
            ProblemType::MultiLabelClassification => loss::bce_with_logits(logits, labels),
        }
    }
}

/// What a BERT layer's forward pass takes from the config.
#[derive(Clone, Copy, Debug)]
struct LayerSpec {
    heads: usize,
    scale: f64,
    attention_dropout: f64,
    hidden_dropout: f64,
    activation: Activation,
}

impl BertLayer {
    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        spec: LayerSpec,
        mut rng: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let q = self.query.forward(x, rng.as_deref_mut())?;
        let k = self.key.forward(x, rng.as_deref_mut())?;
        let v = self.value.forward(x, rng.as_deref_mut())?;
        let (p, r) = (spec.attention_dropout, rng.as_deref_mut());
        let context = attention(&q, &k, &v, spec.heads, spec.heads, bias, spec.scale, p, r)?;
        let attended = self.attention_output.forward_dropout(
            &context,
            spec.hidden_dropout,
            rng.as_deref_mut(),
        )?;
        let x = self.attention_norm.forward_residual(&attended, x)?;
        let inner = self
            .intermediate
            .forward_activated(&x, spec.activation, rng.as_deref_mut())?;
        let out = self
            .output
            .forward_dropout(&inner, spec.hidden_dropout, rng)?;
        self.output_norm.forward_residual(&out, &x)
    }

    fn map(&mut self, prefix: &str, f: Visit<'_>) -> candle_core::Result<()> {
        self.query
            .map(&format!("{prefix}.attention.self.query"), f)?;
        self.key.map(&format!("{prefix}.attention.self.key"), f)?;
        self.value
            .map(&format!("{prefix}.attention.self.value"), f)?;
        self.attention_output
            .map(&format!("{prefix}.attention.output.dense"), f)?;
        self.attention_norm
            .map(&format!("{prefix}.attention.output.LayerNorm"), f)?;
        self.intermediate
            .map(&format!("{prefix}.intermediate.dense"), f)?;
        self.output.map(&format!("{prefix}.output.dense"), f)?;
        self.output_norm
            .map(&format!("{prefix}.output.LayerNorm"), f)
    }

    fn push(&self, prefix: &str, out: &mut Params) {
        self.query
            .push(&format!("{prefix}.attention.self.query"), out);
        self.key.push(&format!("{prefix}.attention.self.key"), out);
        self.value
            .push(&format!("{prefix}.attention.self.value"), out);
        self.attention_output
            .push(&format!("{prefix}.attention.output.dense"), out);
        self.attention_norm
            .push(&format!("{prefix}.attention.output.LayerNorm"), out);
        self.intermediate
            .push(&format!("{prefix}.intermediate.dense"), out);
        self.output.push(&format!("{prefix}.output.dense"), out);
        self.output_norm
            .push(&format!("{prefix}.output.LayerNorm"), out);
    }
}

impl Model for BertForSequenceClassification {
    fn forward(&self, batch: &Batch, mut train: Option<&mut Rng>) -> candle_core::Result<Output> {
        let c = &self.config;
        let ids = &batch.input_ids;
        let (b, t) = ids.dims2()?;
        let device = ids.device();
        let token_types = match &batch.token_type_ids {
            Some(tt) => tt.clone(),
            None => Tensor::zeros((b, t), DType::U32, device)?,
        };
        let x = fused::add_trailing(
            &(self
                .word_embeddings
                .forward_train(ids, train.as_deref_mut())?
                + self.token_type_embeddings.forward(&token_types)?)?,
            &self.position_embeddings.first_rows(t)?,
        )?;
        let x = self.embeddings_norm.forward(&x)?;
        let mut x = dropout(&x, c.hidden_dropout_prob, train.as_deref_mut())?;

        // Padded keys get the f32 minimum, as transformers' bidirectional mask.
        let bias = match &batch.attention_mask {
            Some(mask) => mask_to_bias(&mask.reshape((b, 1, 1, t))?)?,
            None => Tensor::zeros((1, 1, 1, t), DType::F32, device)?,
        };
        let spec = LayerSpec {
            heads: c.num_attention_heads,
            scale: 1.0 / ((c.hidden_size / c.num_attention_heads) as f64).sqrt(),
            attention_dropout: c.attention_probs_dropout_prob,
            hidden_dropout: c.hidden_dropout_prob,
            activation: self.activation,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let (layer, bias) = (layer.clone(), bias.clone());
            x = run_layer(
                &x,
                train.as_deref_mut(),
                checkpointed(self.checkpoint_every, i),
                move |x, rng| layer.forward(x, &bias, spec, rng),
            )?;
        }
        let pooled = self
            .pooler
            .forward(&x.i((.., 0))?, train.as_deref_mut())?
            .tanh()?;
        let p = c.classifier_dropout.unwrap_or(c.hidden_dropout_prob);
        let pooled = dropout(&pooled, p, train.as_deref_mut())?;
        let logits = self.classifier.forward(&pooled, train)?;
        let loss = match &batch.labels {
            Some(labels) => Some(self.loss(&logits, labels)?),
            None => None,
        };
        Ok(Output { loss, logits })
    }

    fn parameters(&self) -> Vec<(String, candle_core::Var)> {
        let mut out = Vec::new();
        self.word_embeddings
            .push("bert.embeddings.word_embeddings", &mut out);
        self.position_embeddings
            .push("bert.embeddings.position_embeddings", &mut out);
        self.token_type_embeddings
            .push("bert.embeddings.token_type_embeddings", &mut out);
        self.embeddings_norm
            .push("bert.embeddings.LayerNorm", &mut out);
        for (i, layer) in self.layers.iter().enumerate() {
            layer.push(&format!("bert.encoder.layer.{i}"), &mut out);
        }
        self.pooler.push("bert.pooler.dense", &mut out);
        self.classifier.push("classifier", &mut out);
        out
    }

    fn map_parameters(
        &mut self,
        f: &mut dyn FnMut(&str, &Var) -> candle_core::Result<Var>,
    ) -> kiln_trainer::Result<()> {
        Ok(self.visit(&mut MapVars(f))?)
    }

    fn set_neftune_noise_alpha(&mut self, alpha: Option<f64>) -> bool {
        self.word_embeddings.set_neftune(alpha);
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
        let mut keys = self.config.to_json();
        if let (Some(p), Value::Object(m)) = (self.problem_type(), &mut keys) {
            m.insert(
                "problem_type".into(),
                serde_json::to_value(p).unwrap_or(Value::Null),
            );
        }
        config::with_file_keys("BertForSequenceClassification", "bert", keys)
    }

    /// Base-model folders (`embeddings.…` without `bert.`), legacy LayerNorm names, a
    /// fresh classifier and pooler when the folder has none, and the position and token
    /// type buffers transformers before 4.31 saved, dropped.
    fn load_rules(&self) -> LoadRules {
        LoadRules::default()
            .with_base_model_prefix("bert")
            .with_fresh("classifier.")
            .with_fresh("bert.pooler.")
            .with_ignore("embeddings.position_ids")
            .with_ignore("embeddings.token_type_ids")
    }
}

/// Trains as transformers' `BertForSequenceClassification`; a fresh model takes its
/// `config.json` keys, a folder its `config.json` and weights.
impl crate::registry::TaskModel for BertForSequenceClassification {}

inventory::submit! {
    crate::registry::Architecture::new(
        "BertForSequenceClassification",
        kiln_trainer::Task::SequenceClassification,
        "bert",
        || BertConfig::default().to_json(),
        |config, rng, device| {
            let model = BertForSequenceClassification::new(BertConfig::from_json(config)?, rng, device)?;
            Ok(Box::new(model))
        },
        |dir, rng, device| {
            let (model, info) = BertForSequenceClassification::from_pretrained(dir, rng, device)?;
            Ok((Box::new(model), info))
        },
    )
}

//! What a model offers adapter methods (LoRA, kiln-peft): its dense layers, each of
//! which can carry a [`DenseAdapter`] whose output is added to the layer's, and frozen
//! parameters, which take part in the forward pass as constants (no gradient is
//! computed for them, so the optimizer never sees them).
//!
//! kiln's models implement [`Model::visit_dense`](crate::Model::visit_dense) and
//! [`Model::freeze`](crate::Model::freeze); a plugin model that implements them gets
//! LoRA fine-tuning, adapter files and merging from kiln-peft for free.

use candle_core::{Result, Tensor};

use crate::rng::Rng;

/// One dense layer of a model: torch's `nn.Linear`, or GPT-2's `Conv1D`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DenseLayer {
    /// The module name as transformers' `named_modules()` gives it
    /// (`bert.encoder.layer.0.attention.self.query`); its weight is `{name}.weight`.
    pub name: String,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// The weight is stored `[in, out]` (GPT-2's `Conv1D`) rather than `[out, in]`.
    pub fan_in_fan_out: bool,
    /// Whether the layer has a bias (`{name}.bias`).
    pub bias: bool,
}

/// An adapter on a dense layer: the layer computes `base(x) + adapter(x)`.
pub trait DenseAdapter: Send + Sync + std::fmt::Debug {
    /// The adapter's contribution for the layer's input `x` (`[.., in_features]`),
    /// shape `[.., out_features]`. `rng` is the training generator (dropout), `None`
    /// in evaluation.
    fn forward(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor>;

    /// The adapter as a low-rank update `scaling · B · A` on a dropout of the input, if
    /// it is one (LoRA): a layer may then fuse it into its own product, which holds
    /// less for backward than `base(x) + forward(x)` does. The fused result must equal
    /// [`DenseAdapter::forward`]'s; `None` (the default): not fusable.
    fn low_rank(&self) -> Option<LowRank<'_>> {
        None
    }
}

/// A low-rank update, as [`DenseAdapter::low_rank`] describes it.
#[derive(Clone, Copy, Debug)]
pub struct LowRank<'a> {
    /// `[r, in_features]`.
    pub a: &'a Tensor,
    /// `[out_features, r]`.
    pub b: &'a Tensor,
    /// The factor on `B · A`.
    pub scaling: f64,
    /// Dropout probability on the update's input, in training.
    pub dropout: f64,
}

/// The slot of a dense layer's adapter, as [`Model::visit_dense`](crate::Model::visit_dense)
/// lends it: read it, set it, or clear it.
pub type AdapterSlot = Option<std::sync::Arc<dyn DenseAdapter>>;

/// What [`Model::visit_dense`](crate::Model::visit_dense) calls for each dense layer.
pub type DenseVisitor<'a> = &'a mut dyn FnMut(&DenseLayer, &mut AdapterSlot) -> Result<()>;

//! Fused CPU kernels, with their backward passes, for the hot spots of training small
//! transformers on candle's CPU backend.
//!
//! Written out in candle's elementary ops, a LayerNorm is ten operations forward and
//! twenty backward, each a pass over memory and a fresh buffer; and the gradient of
//! every tensor broadcast over leading dimensions (a bias, LayerNorm's weight, the
//! position embeddings) is a sum over those dimensions, which candle's CPU backend
//! computes with a division per element. Profiling `kiln train` on the bundled data put
//! a quarter of the time in that sum alone (`benches/README.md`, "Training speed").
//!
//! Each function here computes the same values as its written-out form (candle's
//! elementary ops, [`written_out`] or the function's fallback; up to float rounding:
//! tested against it, values and gradients, and against torch's autograd in
//! `tests/hf_models.rs`), as one candle custom op whose backward is one more pass. They
//! apply to f32 tensors on the CPU; anything else (CUDA, Metal, 16-bit) takes the
//! written-out form, whose kernels those backends have. Every output is computed in an
//! order fixed by the sizes alone (large tensors in fixed blocks over rayon's threads,
//! [`rows_into`]), so results are the same on every run and machine, as bit-for-bit
//! resume needs.
//!
//! One op a file: `linear` (with bias adds), `attention` (grouped-query too),
//! `layer_norm`, `rms_norm`, `rope`, `softmax`, `gelu`, `swiglu` (SwiGLU's gate), `mlp`
//! (Llama's gate and up products with the gate), `sdpa` (attention's ops as one),
//! `cross_entropy` (the loss of rows of logits),
//! `mask`; `gemm` holds the one `unsafe` matrix product they share, `rows` the blocks
//! of rows the others split their work into, `written_out` the elementary-op forms.

mod attention;
mod cross_entropy;
mod gelu;
mod gemm;
mod layer_norm;
mod linear;
mod lora;
mod mask;
mod mlp;
mod rms_norm;
mod rope;
mod rows;
mod sdpa;
mod softmax;
mod swiglu;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_llama;
pub(crate) mod written_out;

pub(crate) use attention::{attention_context, attention_scores};
#[cfg(test)]
use attention::{merge_heads, split_heads};
pub(crate) use cross_entropy::{cross_entropy, cross_entropy_fits};
pub(crate) use gelu::gelu;
pub(crate) use layer_norm::{layer_norm, layer_norm_residual};
pub(crate) use linear::{add_trailing, linear, linear_dropout, linear_gelu, linear_residual};
pub(crate) use lora::{LowRankInput, lora_fits, lora_linear};
pub(crate) use mask::mul_mask;
pub(crate) use mlp::swiglu_mlp;
pub(crate) use rms_norm::rms_norm;
pub(crate) use rope::{rope, rope_tables};
#[cfg(test)]
use rows::PARALLEL_ELEMENTS;
use rows::{Out, rows_into};
pub(crate) use sdpa::{Rotary, Widths, sdpa, sdpa_fits, sdpa_packed, sdpa_packed_fits};
pub(crate) use softmax::softmax_scaled_biased;
pub(crate) use swiglu::silu_mul;

use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor};

/// Whether the fused kernels apply to these tensors.
pub(super) fn fusable(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

/// The f32 elements of a contiguous CPU storage.
pub(super) fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: the input is not contiguous"),
    }
}

/// A tensor's elements as a vector (one copy on the CPU).
pub(super) fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Calls `f` with a CPU f32 tensor's elements in row-major order: in place when the
/// tensor is contiguous, else from a copy. `f`'s errors pass through, so reads nest.
pub(super) fn read<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return f(&cpu.as_slice::<f32>()?[a..b]);
        }
    }
    f(&host(t)?)
}

/// Calls `f(elements, start, (s0, s1))` with a CPU f32 `[b, t, e]` tensor whose last
/// dimension is contiguous, in place; other layouts from a contiguous copy.
pub(super) fn read_strided<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32], usize, (usize, usize)) -> Result<R>,
) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((_, strides, start))) =
            (&*storage, bte_layout(layout))
        {
            return f(cpu.as_slice::<f32>()?, start, strides);
        }
    }
    let (_, t1, e) = t.dims3()?;
    f(&host(t)?, 0, (t1 * e, e))
}

/// Sums the rows of `x` seen as `[n / width, width]`: the gradient of a tensor
/// broadcast over `x`'s leading dimensions. Row by row, in order.
pub(super) fn sum_rows(x: &[f32], width: usize) -> Vec<f32> {
    let mut acc = vec![0f32; width];
    for row in x.chunks_exact(width) {
        for (a, v) in acc.iter_mut().zip(row) {
            *a += v;
        }
    }
    acc
}

/// A `[b, t, e]` tensor's shape, its first two strides (the last is 1) and its start.
pub(super) type BteLayout = ((usize, usize, usize), (usize, usize), usize);

/// The shape `[b, t, e]` and strides of a 3-D tensor whose last dimension is contiguous.
pub(super) fn bte_layout(l: &Layout) -> Option<BteLayout> {
    match (l.shape().dims(), l.stride()) {
        ([b, t, e], [s0, s1, 1]) => Some(((*b, *t, *e), (*s0, *s1), l.start_offset())),
        _ => None,
    }
}

//! Activation checkpointing (`activation_checkpointing`, transformers 4's
//! `gradient_checkpointing`): a block of a model (one transformer layer) runs forward
//! without keeping what its backward pass needs, and backward runs it again.
//!
//! A model wraps a block with [`checkpoint`]: the block runs on its input as a constant,
//! its graph is dropped, and only the input and a copy of the output stay in the graph,
//! joined by one custom op. When backward reaches that op it runs the block again on
//! the input (as a fresh variable, with the dropout generator replayed from where the
//! forward pass drew), backpropagates the gradient of the output through it, hands the
//! input's gradient back to candle and keeps the parameters' gradients aside.
//! [`backward`] runs a loss's backward pass and adds those kept gradients to candle's.
//!
//! The recomputed block is the same computation on the same values, and candle walks
//! its graph in the same order as inside the full graph, so every gradient is bit for
//! bit the one a run without checkpointing computes (`tests/gradient_checkpointing.rs`
//! trains both and compares the weights). What is saved: the activations inside every
//! block (attention scores and probabilities, the feed-forward's inner states), at the
//! cost of one more forward pass of each block.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, Layout, MetalStorage, Result, Shape, Storage, Tensor,
    TensorId, Var,
};

use crate::rng::Rng;

/// A block of a model: its output for an input, drawing dropout from the generator
/// when training.
pub type Block = dyn Fn(&Tensor, Option<&mut Rng>) -> Result<Tensor> + Send + Sync;

thread_local! {
    /// The parameters' gradients of the blocks recomputed by the backward pass that
    /// [`backward`] runs on this thread.
    static KEPT: RefCell<Option<Vec<(TensorId, Tensor)>>> = const { RefCell::new(None) };
}

/// `block(x, rng)`, checkpointed when training (`rng` given): nothing inside the block
/// stays in memory for backward, which recomputes it. Without `rng` (evaluation) the
/// block just runs. The gradients of a loss computed through it come from
/// [`backward`], not from `Tensor::backward`, which would lose the block's parameters'
/// gradients (and fails saying so).
pub fn checkpoint(
    x: &Tensor,
    rng: Option<&mut Rng>,
    block: impl Fn(&Tensor, Option<&mut Rng>) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let Some(rng) = rng else {
        return block(x, None);
    };
    let replay = rng.clone();
    let out = block(&x.detach(), Some(rng))?;
    if !out.track_op() {
        // Nothing in the block is trained: nothing to recompute.
        return Ok(out);
    }
    // The block's graph goes with `out`: only the output's values are kept.
    let out = out.detach();
    let out = if out.is_contiguous() && out.layout().start_offset() == 0 {
        out
    } else {
        out.force_contiguous()?
    };
    let op = Checkpoint {
        output: Mutex::new(Some(out)),
        block: Arc::new(block),
        replay,
    };
    // An input that is a constant (the output of frozen embeddings, under LoRA) would
    // leave the op out of the graph, and the block's parameters without gradients: the
    // op then hangs on a variable copy of it, as transformers' enable_input_require_grads
    // makes the input require gradients.
    let x = match x.track_op() {
        true => x.clone(),
        false => Var::from_tensor(x)?.into_inner(),
    };
    x.apply_op1_arc(Arc::new(Box::new(op)))
}

/// `loss.backward()` for a loss computed through [`checkpoint`]ed blocks: the
/// gradients of every tracked variable, the blocks' parameters included. For a loss
/// computed without any, the same as `loss.backward()`.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            KEPT.with(|k| k.borrow_mut().take());
        }
    }
    KEPT.with(|k| *k.borrow_mut() = Some(Vec::new()));
    let _reset = Reset;
    let mut grads = loss.backward()?;
    for (id, grad) in KEPT.with(|k| k.borrow_mut().take()).unwrap_or_default() {
        let sum = match grads.get_id(id) {
            Some(g) => g.add(&grad)?,
            None => grad,
        };
        grads.insert_id(id, sum);
    }
    Ok(grads)
}

/// The op that joins a checkpointed block's input to its output.
struct Checkpoint {
    /// The output computed forward, handed over once by the forward pass of the op.
    output: Mutex<Option<Tensor>>,
    block: Arc<Block>,
    /// The generator as the block found it.
    replay: Rng,
}

impl Checkpoint {
    /// The output's storage (moved out of the op, so only the op's result holds it).
    fn take_output(&self) -> Result<(Storage, Shape)> {
        let out = self
            .output
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("checkpoint: the output was taken".into()))?;
        let (storage, layout) = out.storage_and_layout();
        Ok((storage.try_clone(layout)?, layout.shape().clone()))
    }
}

fn wrong_device(found: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "checkpoint: the block's output is on another device than its input ({found})"
    ))
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.take_output()? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => Err(wrong_device("cpu")),
        }
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        match self.take_output()? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => Err(wrong_device("cuda")),
        }
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        match self.take_output()? {
            (Storage::Metal(s), shape) => Ok((s, shape)),
            _ => Err(wrong_device("metal")),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let input = Var::from_tensor(&arg.detach())?;
        let mut rng = self.replay.clone();
        let out = (self.block)(input.as_tensor(), Some(&mut rng))?;
        // The gradient of sum(out · g) with respect to out is exactly g.
        let root = (out * grad_res.detach())?.sum_all()?;
        let mut grads = root.backward()?;
        let input_grad = grads.remove(input.as_tensor());
        // The block's parameters' gradients, detached: a gradient candle computed from
        // an activation would otherwise keep the recomputed graph alive to the end.
        let params: Vec<(TensorId, Tensor)> = root
            .sorted_nodes()
            .into_iter()
            .filter(|t| t.is_variable())
            .filter_map(|t| Some((t.id(), grads.get(t)?.detach())))
            .collect();
        drop(grads);
        KEPT.with(|k| match k.borrow_mut().as_mut() {
            Some(kept) => {
                kept.extend(params);
                Ok(())
            }
            None => Err(candle_core::Error::Msg(
                "a checkpointed block's gradients need kiln_trainer::recompute::backward(&loss), \
                 not loss.backward()"
                    .into(),
            )),
        })?;
        Ok(input_grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two blocks of a small network with dropout: the same loss and the same gradients,
    /// bit for bit, with and without checkpointing; plain `backward` is refused.
    #[test]
    fn checkpointed_gradients_equal_plain_ones() {
        let d = Device::Cpu;
        let mut init = Rng::seed_from_u64(3);
        let w1 = Var::from_tensor(&init.normal_tensor(&[8, 8], 0.0, 0.5, &d).unwrap()).unwrap();
        let w2 = Var::from_tensor(&init.normal_tensor(&[8, 8], 0.0, 0.5, &d).unwrap()).unwrap();
        let x = Var::from_tensor(&init.normal_tensor(&[4, 8], 0.0, 1.0, &d).unwrap()).unwrap();
        let block = |w: Var| {
            move |x: &Tensor, rng: Option<&mut Rng>| -> Result<Tensor> {
                let h = x.matmul(w.as_tensor())?.tanh()?;
                let h = match rng {
                    Some(r) => {
                        let mask = r.dropout_values(h.elem_count(), 0.25);
                        (h * Tensor::from_vec(mask, (4, 8), x.device())?)?
                    }
                    None => h,
                };
                h + x
            }
        };
        let run = |ckpt: bool| -> (f32, Vec<Vec<f32>>) {
            let mut rng = Rng::seed_from_u64(9);
            let (b1, b2) = (block(w1.clone()), block(w2.clone()));
            let h = if ckpt {
                let h = checkpoint(x.as_tensor(), Some(&mut rng), b1).unwrap();
                checkpoint(&h, Some(&mut rng), b2).unwrap()
            } else {
                let h = b1(x.as_tensor(), Some(&mut rng)).unwrap();
                b2(&h, Some(&mut rng)).unwrap()
            };
            let loss = h.sqr().unwrap().mean_all().unwrap();
            let grads = backward(&loss).unwrap();
            let g = [&w1, &w2, &x]
                .iter()
                .map(|v| {
                    grads
                        .get(v.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect();
            (loss.to_scalar().unwrap(), g)
        };
        let (plain_loss, plain) = run(false);
        let (loss, grads) = run(true);
        assert_eq!(loss.to_bits(), plain_loss.to_bits());
        for (a, b) in grads.iter().zip(&plain) {
            assert!(a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        // A constant input (frozen embeddings): the block's parameters still get
        // their gradients.
        let run_const = |ckpt: bool| -> Vec<f32> {
            let mut rng = Rng::seed_from_u64(9);
            let x = x.as_tensor().detach();
            let h = match ckpt {
                true => checkpoint(&x, Some(&mut rng), block(w1.clone())).unwrap(),
                false => block(w1.clone())(&x, Some(&mut rng)).unwrap(),
            };
            let grads = backward(&h.sqr().unwrap().mean_all().unwrap()).unwrap();
            grads
                .get(w1.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(run_const(true), run_const(false));
        // Evaluation: no generator, no checkpoint.
        let y = checkpoint(x.as_tensor(), None, block(w1.clone())).unwrap();
        assert_eq!(y.dims(), &[4, 8]);
        let mut rng = Rng::seed_from_u64(9);
        let y = checkpoint(x.as_tensor(), Some(&mut rng), block(w1.clone())).unwrap();
        let e = y.sum_all().unwrap().backward().unwrap_err().to_string();
        assert!(e.contains("recompute::backward"), "{e}");
    }
}

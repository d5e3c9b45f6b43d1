//! Data-parallel reduction: gradients averaged over ranks in buckets, rank 0's weights
//! broadcast, ZeRO-1's updated shards shared, values averaged over ranks.

use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use kiln_checkpoint::commit::Coordinator;
use kiln_optim::Grads;

use super::Trainer;
use crate::Result;
use crate::model::Model;
use crate::rng::Rng;

impl<M: Model> Trainer<M> {
    /// Who writes files: rank 0, or with `save_on_each_node` the first process of every
    /// node (`kiln_dist::EachNode`).
    pub(super) fn writer(&self) -> Arc<dyn Coordinator> {
        if self.args.save_on_each_node {
            Arc::new(kiln_dist::EachNode(self.dist.clone()))
        } else {
            self.dist.clone()
        }
    }

    /// Whether every rank keeps only its part of the optimizer state (ZeRO stage 1).
    pub(super) fn sharded_optimizer(&self) -> bool {
        self.args.zero_stage == 1 && self.dist.world_size() > 1
    }

    /// Waits for every rank (a reduction on the training stream; nothing to do alone).
    pub(super) fn sync(&self) -> Result<()> {
        if self.dist.world_size() > 1 {
            self.dist.all_reduce_f64(&mut [0.0])?;
        }
        Ok(())
    }

    /// Adds every rank's floating-point operations since the last call to
    /// `total_flos`, as transformers' `store_flos` does (at each save and at the end).
    pub(super) fn store_flos(&mut self) -> Result<()> {
        let mut v = [self.current_flos];
        if self.dist.world_size() > 1 {
            self.dist.all_reduce_f64(&mut v)?;
        }
        self.state.total_flos += v[0];
        self.current_flos = 0.0;
        Ok(())
    }

    /// Adds every rank's tokens of the optimizer step just taken to
    /// `num_input_tokens_seen` (one reduction per step, only when counting).
    pub(super) fn count_tokens_seen(&mut self) -> Result<()> {
        if self.args.include_num_input_tokens_seen == crate::args::TokensSeen::No {
            return Ok(());
        }
        let mut v = [self.tokens_pending as f64];
        if self.dist.world_size() > 1 {
            self.dist.all_reduce_f64(&mut v)?;
        }
        self.state.num_input_tokens_seen += v[0] as u64;
        self.tokens_pending = 0;
        Ok(())
    }

    /// The mean of `x` over ranks.
    pub(super) fn mean_over_ranks(&self, x: f64) -> Result<f64> {
        let world = self.dist.world_size();
        if world <= 1 {
            return Ok(x);
        }
        let mut v = [x];
        self.dist.all_reduce_f64(&mut v)?;
        Ok(v[0] / world as f64)
    }

    /// Elements of f32 per all-reduce bucket (`ddp_bucket_cap_mb`, default 25 MiB).
    fn bucket_elems(&self) -> usize {
        let mb = self.args.ddp_bucket_cap_mb.unwrap_or(25) as usize;
        (mb.saturating_mul(1 << 20) / 4).max(1)
    }

    /// Averages the accumulated gradients over ranks: flattened into f32 buckets, one
    /// all-reduce per bucket. A parameter without a gradient on every rank keeps none.
    pub(super) fn reduce_gradients(&self, grads: &mut Grads, vars: &[Var]) -> Result<()> {
        let world = self.dist.world_size();
        if world <= 1 {
            return Ok(());
        }
        let mut present: Vec<f64> = grads
            .iter()
            .map(|g| if g.is_some() { 1.0 } else { 0.0 })
            .collect();
        self.dist.all_reduce_f64(&mut present)?;
        // Tests make one rank hang here (the others then wait in the gradient all-reduce).
        fail::fail_point!("kiln-train-before-all-reduce");
        let counts: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
        for range in kiln_dist::buckets(&counts, self.bucket_elems()) {
            let mut flat = Vec::with_capacity(range.len());
            for i in range.clone() {
                let g = match &grads[i] {
                    Some(g) => g.flatten_all()?.to_dtype(DType::F32)?,
                    None => Tensor::zeros(counts[i], DType::F32, vars[i].device())?,
                };
                flat.push(g);
            }
            let summed = self
                .dist
                .all_reduce_sum(&Tensor::cat(&flat, 0)?)?
                .affine(1.0 / world as f64, 0.0)?;
            let mut offset = 0;
            for i in range {
                let dtype = grads[i].as_ref().map_or(vars[i].dtype(), |g| g.dtype());
                grads[i] = if present[i] > 0.0 {
                    Some(
                        summed
                            .narrow(0, offset, counts[i])?
                            .reshape(vars[i].dims())?
                            .to_dtype(dtype)?,
                    )
                } else {
                    None
                };
                offset += counts[i];
            }
        }
        Ok(())
    }

    /// Overwrites every parameter with rank `root`'s values, in buckets.
    fn broadcast_from(&self, vars: &[&Var], root: usize) -> Result<()> {
        let counts: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
        for range in kiln_dist::buckets(&counts, self.bucket_elems()) {
            let flat = vars[range.clone()]
                .iter()
                .map(|v| Ok(v.as_tensor().flatten_all()?.to_dtype(DType::F32)?))
                .collect::<Result<Vec<_>>>()?;
            let got = self.dist.broadcast(&Tensor::cat(&flat, 0)?, root)?;
            let mut offset = 0;
            for i in range {
                let v = vars[i];
                let t = got
                    .narrow(0, offset, counts[i])?
                    .reshape(v.dims())?
                    .to_dtype(v.dtype())?;
                v.set(&t)?;
                offset += counts[i];
            }
        }
        Ok(())
    }

    /// Rank 0's weights on every rank (before training, as DDP's construction does).
    pub(super) fn broadcast_parameters(&self, vars: &[Var]) -> Result<()> {
        if self.dist.world_size() <= 1 {
            return Ok(());
        }
        self.broadcast_from(&vars.iter().collect::<Vec<_>>(), 0)?;
        self.refresh_working_copies()
    }

    /// Mixed precision: the model's 16-bit copy from the (just overwritten) masters.
    pub(super) fn refresh_working_copies(&self) -> Result<()> {
        match &self.precision {
            Some(p) => p.refresh(&self.model),
            None => Ok(()),
        }
    }

    /// ZeRO-1, after each rank stepped its own parameters: every owner's new values
    /// to every rank.
    pub(super) fn share_updated_parameters(&self, vars: &[Var], owners: &[usize]) -> Result<()> {
        for root in 0..self.dist.world_size() {
            let mine: Vec<&Var> = vars
                .iter()
                .zip(owners)
                .filter(|(_, o)| **o == root)
                .map(|(v, _)| v)
                .collect();
            if !mine.is_empty() {
                self.broadcast_from(&mine, root)?;
            }
        }
        self.refresh_working_copies()
    }
}

/// Concatenates tensors along the first dimension, padding later dimensions with -100
/// where they differ (as transformers pads predictions of different lengths).
/// The generator of `rank`: rank 0 draws what a single process draws; others draw
/// from their own stream of the same seed (far from the epochs' shuffle streams).
pub(super) fn rank_rng(seed: u64, rank: usize) -> Rng {
    if rank == 0 {
        Rng::seed_from_u64(seed)
    } else {
        Rng::with_stream(seed, (1 << 63) | rank as u64)
    }
}

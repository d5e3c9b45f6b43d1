//! Evaluation and prediction: the loss and logits of every example (gathered back
//! into the data's order across processes), metrics, and the best-model bookkeeping.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::Trainer;
use super::logging::{py, round_to};
use crate::data::BatchSource;
use crate::model::Model;
use crate::{Error, Result};

/// Predictions and labels of an evaluation, for [`Trainer::with_compute_metrics`].
#[derive(Debug, Clone)]
pub struct EvalPrediction {
    /// Logits of every example, `[n, ...]`.
    pub logits: Tensor,
    /// Labels of every example, if the data has them.
    pub labels: Option<Tensor>,
}

/// Metrics computed from an [`EvalPrediction`] (`{"accuracy": 0.9}`; the trainer adds
/// the `eval_` prefix).
pub type ComputeMetrics = Box<dyn Fn(&EvalPrediction) -> Result<BTreeMap<String, f64>> + Send>;

/// The argmax accuracy of classification logits against i64 labels.
pub fn accuracy(p: &EvalPrediction) -> Result<BTreeMap<String, f64>> {
    let Some(labels) = &p.labels else {
        return Ok(BTreeMap::new());
    };
    let pred = p
        .logits
        .argmax(candle_core::D::Minus1)?
        .to_dtype(candle_core::DType::I64)?;
    let labels = labels.to_dtype(candle_core::DType::I64)?;
    let n = labels.dims().iter().product::<usize>().max(1);
    let correct = pred
        .eq(&labels)?
        .to_dtype(candle_core::DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(BTreeMap::from([(
        "accuracy".to_string(),
        correct / n as f64,
    )]))
}

impl<M: Model> Trainer<M> {
    pub(super) fn update_best(&mut self, metrics: &BTreeMap<String, f64>) -> Result<bool> {
        let Some(name) = self.args.best_metric_name() else {
            return Ok(false);
        };
        let key = if name.starts_with("eval_") {
            name
        } else {
            format!("eval_{name}")
        };
        let value = *metrics.get(&key).ok_or_else(|| {
            Error::Config(format!(
                "metric_for_best_model {key:?} is not among the evaluation metrics: {}",
                metrics.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let better = match self.state.best_metric {
            None => true,
            Some(best) if self.args.is_greater_better() => value > best,
            Some(best) => value < best,
        };
        if better {
            self.state.best_metric = Some(value);
            self.state.best_global_step = Some(self.state.global_step);
        }
        Ok(better)
    }

    /// Evaluates on the evaluation data; metrics are prefixed `eval_` and logged (the
    /// memory metrics of `skip_memory_metrics = false` are returned, not logged, as
    /// transformers does).
    pub fn evaluate(&mut self) -> Result<BTreeMap<String, f64>> {
        self.memory.start("eval");
        match self.evaluate_inner(None) {
            Ok(mut metrics) => {
                self.memory.stop("eval", &mut metrics);
                Ok(metrics)
            }
            Err(e) => {
                self.memory.cancel();
                Err(e)
            }
        }
    }

    pub(super) fn evaluate_inner(
        &mut self,
        bar: Option<&indicatif::ProgressBar>,
    ) -> Result<BTreeMap<String, f64>> {
        self.prepare_precision()?;
        let data = self
            .eval_data
            .clone()
            .ok_or_else(|| Error::Config("no evaluation data".into()))?;
        let start = Instant::now();
        let (loss, logits, labels, batches) = self.run_prediction(data.as_ref())?;
        let runtime = start.elapsed().as_secs_f64();
        let mut metrics = BTreeMap::new();
        if let Some(l) = loss {
            metrics.insert("eval_loss".to_string(), l);
        }
        if let Some(f) = self
            .compute_metrics
            .as_ref()
            .filter(|_| !self.args.prediction_loss_only)
        {
            for (k, v) in f(&EvalPrediction { logits, labels })? {
                let key = if k.starts_with("eval_") {
                    k
                } else {
                    format!("eval_{k}")
                };
                metrics.insert(key, v);
            }
        }
        metrics.insert("eval_runtime".into(), round_to(runtime, 4));
        metrics.insert(
            "eval_samples_per_second".into(),
            round_to(data.len() as f64 / runtime.max(1e-9), 3),
        );
        metrics.insert(
            "eval_steps_per_second".into(),
            round_to(batches as f64 / runtime.max(1e-9), 3),
        );
        self.log(
            metrics.iter().map(|(k, v)| (k.clone(), py(*v))).collect(),
            bar,
        );
        let mut control = self.control;
        for cb in &mut self.callbacks {
            cb.on_evaluate(&self.args, &self.state, &mut control, &metrics);
        }
        self.control = control;
        Ok(metrics)
    }

    /// Logits (and labels, and the mean loss when labels are present) for every example
    /// of `data`, in order, with dropout off.
    pub fn predict(&mut self, data: &dyn BatchSource) -> Result<EvalPrediction> {
        self.prepare_precision()?;
        let (_, logits, labels, _) = self.run_prediction(data)?;
        Ok(EvalPrediction { logits, labels })
    }

    fn run_prediction(
        &self,
        data: &dyn BatchSource,
    ) -> Result<(Option<f64>, Tensor, Option<Tensor>, usize)> {
        let device = self.device();
        let bs = self.args.per_device_eval_batch_size;
        let world = self.dist.world_size();
        // Several processes: each predicts a disjoint part, gathered back in order below.
        let idx = kiln_dist::eval_indices(data.len(), self.dist.rank(), world);
        let mut loss_sum = 0.0;
        let mut loss_n = 0usize;
        let mut all_logits = Vec::new();
        let mut all_labels = Vec::new();
        let mut batches = 0;
        let labelled = self.args.evaluation_has_labels();
        // eval_accumulation_steps: what was predicted goes to host memory every N
        // batches (on the CPU it is there already).
        let offload_every = self
            .args
            .eval_accumulation_steps
            .filter(|_| !device.is_cpu());
        let mut offloaded = false;
        for chunk in idx.chunks(bs) {
            let mut batch = data.batch(chunk, &device)?;
            if !labelled {
                batch.labels = None;
            }
            let eps = self.args.label_smoothing_factor;
            let (loss, logits) = Self::loss_of(&self.model, eps, &batch, None)?;
            if let Some(l) = &loss {
                loss_sum +=
                    l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * chunk.len() as f64;
                loss_n += chunk.len();
            }
            // f32 logits from a bf16/fp16 model, as transformers hands them to metrics.
            all_logits.push(crate::precision::upcast(&logits)?);
            if let Some(l) = batch.labels {
                all_labels.push(l);
            }
            batches += 1;
            if offload_every.is_some_and(|n| batches % n == 0) {
                to_host(&mut all_logits)?;
                to_host(&mut all_labels)?;
                offloaded = true;
            }
        }
        if offloaded {
            to_host(&mut all_logits)?;
            to_host(&mut all_labels)?;
        }
        let logits = concat_padded(&all_logits)?;
        let labels = if all_labels.len() == all_logits.len() && !all_labels.is_empty() {
            Some(concat_padded(&all_labels)?)
        } else {
            None
        };
        if world > 1 {
            let mut sums = [loss_sum, loss_n as f64];
            self.dist.all_reduce_f64(&mut sums)?;
            let loss = (sums[1] > 0.0).then(|| sums[0] / sums[1]);
            let (logits, labels) = self.gather_predictions(data.len(), &logits, labels.as_ref())?;
            return Ok((loss, logits, labels, batches));
        }
        let loss = (loss_n > 0).then(|| loss_sum / loss_n as f64);
        Ok((loss, logits, labels, batches))
    }

    /// Every rank's predictions (rank `r` predicted examples `r, r + world, …`) put
    /// back into the order of the data, on every rank.
    fn gather_predictions(
        &self,
        n: usize,
        logits: &Tensor,
        labels: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let world = self.dist.world_size();
        let has_rows = |t: &Tensor| t.rank() > 0 && t.dims()[0] > 0;
        let mine = encode_tensors(&[Some(logits).filter(|t| has_rows(t)), labels])?;
        let parts = self.dist.all_gather_bytes(&mine)?;
        let mut logit_rows: Vec<Option<Tensor>> = vec![None; n];
        let mut label_rows: Vec<Option<Tensor>> = vec![None; n];
        let mut all_labels = true;
        for (r, bytes) in parts.iter().enumerate() {
            let mut ts = decode_tensors(bytes, &self.device())?.into_iter();
            let (lg, lb) = (ts.next().flatten(), ts.next().flatten());
            let expected = kiln_dist::eval_indices(n, r, world).len();
            all_labels &= lb.is_some() || expected == 0;
            for (k, index) in kiln_dist::eval_indices(n, r, world).into_iter().enumerate() {
                if let Some(t) = &lg {
                    logit_rows[index] = Some(t.narrow(0, k, 1)?);
                }
                if let Some(t) = &lb {
                    label_rows[index] = Some(t.narrow(0, k, 1)?);
                }
            }
        }
        let logits: Vec<Tensor> = logit_rows.into_iter().flatten().collect();
        if logits.len() != n {
            return Err(Error::Dist(kiln_dist::Error::Rendezvous(format!(
                "gathered {} predictions of {n} examples from {world} processes",
                logits.len()
            ))));
        }
        let labels: Vec<Tensor> = label_rows.into_iter().flatten().collect();
        let labels = if all_labels && labels.len() == n {
            Some(concat_padded(&labels)?)
        } else {
            None
        };
        Ok((concat_padded(&logits)?, labels))
    }
}

/// Moves the tensors to host memory.
fn to_host(ts: &mut [Tensor]) -> Result<()> {
    for t in ts.iter_mut().filter(|t| !t.device().is_cpu()) {
        *t = t.to_device(&Device::Cpu)?;
    }
    Ok(())
}

/// Tensors (or their absence) as bytes for a gather: per tensor a presence byte, the
/// dtype's name, the dims, and the values as little-endian f64 (exact for f32, bf16,
/// f16 and the integer labels kiln uses).
fn encode_tensors(ts: &[Option<&Tensor>]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for t in ts {
        let Some(t) = t else {
            out.push(0);
            continue;
        };
        out.push(1);
        let name = t.dtype().as_str().as_bytes();
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&(t.rank() as u32).to_le_bytes());
        for &d in t.dims() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        for x in t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()? {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    Ok(out)
}

/// The inverse of [`encode_tensors`].
fn decode_tensors(mut bytes: &[u8], device: &Device) -> Result<Vec<Option<Tensor>>> {
    let bad = || {
        Error::Dist(kiln_dist::Error::Rendezvous(
            "a gathered prediction is malformed".into(),
        ))
    };
    let mut take = |n: usize| -> Result<&[u8]> {
        if bytes.len() < n {
            return Err(bad());
        }
        let (head, rest) = bytes.split_at(n);
        bytes = rest;
        Ok(head)
    };
    let mut out = Vec::new();
    loop {
        let Ok(flag) = take(1) else { break };
        if flag[0] == 0 {
            out.push(None);
            continue;
        }
        let len = take(1)?[0] as usize;
        let name = std::str::from_utf8(take(len)?)
            .map_err(|_| bad())?
            .to_string();
        let dtype: DType = name.parse().map_err(|_| bad())?;
        let rank = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad())?) as usize;
        let mut dims = Vec::with_capacity(rank);
        for _ in 0..rank {
            dims.push(u64::from_le_bytes(take(8)?.try_into().map_err(|_| bad())?) as usize);
        }
        let count: usize = dims.iter().product();
        let raw = take(count.checked_mul(8).ok_or_else(bad)?)?;
        let values: Vec<f64> = raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        out.push(Some(
            Tensor::from_vec(values, dims, device)?.to_dtype(dtype)?,
        ));
    }
    Ok(out)
}

/// Concatenates tensors along the first dimension, padding later dimensions with -100
/// where they differ (as transformers pads predictions of different lengths).
fn concat_padded(ts: &[Tensor]) -> Result<Tensor> {
    if ts.is_empty() {
        return Ok(Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu)?);
    }
    let rank = ts[0].rank();
    if ts.iter().all(|t| t.dims()[1..] == ts[0].dims()[1..]) || rank < 2 {
        return Ok(Tensor::cat(ts, 0)?);
    }
    let max: Vec<usize> = (1..rank)
        .map(|d| ts.iter().map(|t| t.dims()[d]).max().unwrap_or(0))
        .collect();
    let mut padded = Vec::with_capacity(ts.len());
    for t in ts {
        let mut t = t.clone();
        for (k, &m) in max.iter().enumerate() {
            let d = k + 1;
            let have = t.dims()[d];
            if have < m {
                let mut shape = t.dims().to_vec();
                shape[d] = m - have;
                let pad = Tensor::full(-100f32, shape, t.device())?.to_dtype(t.dtype())?;
                t = Tensor::cat(&[&t, &pad], d)?;
            }
        }
        padded.push(t);
    }
    Ok(Tensor::cat(&padded, 0)?)
}

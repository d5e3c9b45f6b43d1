//! `label_smoothing_factor`: the loss of transformers' `LabelSmoother`, computed by the
//! trainer from the model's logits (the model's own loss is not asked for), in training
//! and in evaluation as transformers' `compute_loss` does in both.
//!
//! With ε the factor, over the positions whose label is not -100:
//! `(1 - ε) · mean(-log p[label]) + ε · mean(-Σ log p) / classes`. A causal LM's labels
//! are shifted as its own loss shifts them (logits of position t against label t + 1).
//! The mean is over this micro-batch; with gradient accumulation the trainer weighs it
//! as it weighs the model's own loss (a causal LM's by its label tokens, so the
//! denominator is the accumulated batch's, as transformers' `num_items_in_batch`).

use candle_core::{D, DType, Tensor};

use crate::{Error, Result};

/// The smoothed loss of `logits` (`[batch, classes]`, or `[batch, seq, vocab]` for a
/// causal LM) against i64 `labels` (`[batch]`, or `[batch, seq]` with -100 ignored).
pub fn smoothed_loss(logits: &Tensor, labels: &Tensor, epsilon: f64) -> Result<Tensor> {
    if !matches!(labels.dtype(), DType::I64 | DType::U32) {
        return Err(Error::Config(
            "label_smoothing_factor needs class labels; a regression target has none".into(),
        ));
    }
    let (logits, labels) = match (logits.rank(), labels.rank()) {
        (2, 1) => (logits.clone(), labels.clone()),
        (3, 2) => {
            let seq = logits.dim(1)?;
            if seq < 2 {
                return Ok(logits.sum_all()?.affine(0.0, 0.0)?);
            }
            (logits.narrow(1, 0, seq - 1)?, labels.narrow(1, 1, seq - 1)?)
        }
        (l, t) => {
            return Err(Error::Config(format!(
                "label_smoothing_factor: logits of rank {l} and labels of rank {t} are neither a classifier's nor a causal LM's"
            )));
        }
    };
    let classes = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), classes))?.to_dtype(DType::F32)?;
    let labels = labels.flatten_all()?.to_dtype(DType::I64)?;
    // log-softmax; the row maximum only steadies the exponentials (no gradient).
    let shifted = logits.broadcast_sub(&logits.max_keepdim(1)?.detach())?;
    let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(1)?.log()?)?;
    let active = labels.ne(-100i64)?.to_dtype(DType::F32)?;
    let index = labels
        .clamp(0i64, classes as i64 - 1)?
        .to_dtype(DType::U32)?;
    let picked = log_probs.gather(&index.unsqueeze(1)?, 1)?.squeeze(1)?;
    let nll = (picked * &active)?.sum_all()?.neg()?;
    let smooth = (log_probs.sum(1)? * &active)?.sum_all()?.neg()?;
    let n = active.sum_all()?.to_scalar::<f32>()? as f64;
    if n == 0.0 {
        return Ok(nll.affine(0.0, 0.0)?);
    }
    let loss = (nll.affine((1.0 - epsilon) / n, 0.0)?
        + smooth.affine(epsilon / (n * classes as f64), 0.0)?)?;
    Ok(loss)
}

/// The label tokens a causal LM's loss averages over: positions 1.. of `labels`
/// `[batch, seq]` that are not -100 (transformers' `num_items_in_batch` count).
pub fn label_tokens(labels: &Tensor) -> Result<f64> {
    let seq = labels.dim(1)?;
    if seq < 2 {
        return Ok(0.0);
    }
    let shifted = labels.narrow(1, 1, seq - 1)?.to_dtype(DType::I64)?;
    Ok(shifted
        .ne(-100i64)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_the_formula_and_ignores_minus_100() {
        let d = Device::Cpu;
        let logits = Tensor::new(&[[2.0f32, 0.0, -1.0], [0.5, 0.5, 3.0]], &d).unwrap();
        let labels = Tensor::new(&[0i64, 2], &d).unwrap();
        let got = smoothed_loss(&logits, &labels, 0.1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let lp = |row: &[f64]| -> Vec<f64> {
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let z = row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
            row.iter().map(|x| x - z).collect()
        };
        let (a, b) = (lp(&[2.0, 0.0, -1.0]), lp(&[0.5, 0.5, 3.0]));
        let nll = -(a[0] + b[2]) / 2.0;
        let smooth = -(a.iter().sum::<f64>() + b.iter().sum::<f64>()) / (2.0 * 3.0);
        assert!((got - (0.9 * nll + 0.1 * smooth)).abs() < 1e-6, "{got}");
        // ε = 0 is the plain cross-entropy; a causal LM's -100 positions count for nothing.
        let seq = Tensor::new(&[[[1.0f32, 2.0], [0.0, 1.0], [3.0, 0.0]]], &d).unwrap();
        let lab = Tensor::new(&[[-100i64, 1, -100]], &d).unwrap();
        let ce = smoothed_loss(&seq, &lab, 0.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let want = -lp(&[1.0, 2.0])[1];
        assert!((ce - want).abs() < 1e-6, "{ce} vs {want}");
        let reg = Tensor::new(&[0.5f32, 1.0], &d).unwrap();
        assert!(smoothed_loss(&logits, &reg, 0.1).is_err());
    }
}

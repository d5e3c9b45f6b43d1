//! Losses as torch computes them for transformers' heads (mean reductions).

use candle_core::{DType, Result, Tensor};

use crate::layers::{log_softmax_last, upcast};

/// torch's `ignore_index` default, which transformers uses for padding labels.
pub(crate) const IGNORE_INDEX: i64 = -100;

/// `CrossEntropyLoss()`: `logits [n, classes]`, integer `labels [n]`; labels equal to
/// -100 are ignored and the mean is over the others (NaN when all are ignored, as in
/// torch). Any other label outside `0..classes` is an error.
pub(crate) fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (n, classes) = logits.dims2()?;
    let labels = int_labels(labels)?;
    if labels.len() != n {
        candle_core::bail!("{} labels for {n} rows of logits", labels.len())
    }
    let mut index = Vec::with_capacity(n);
    let mut weight = Vec::with_capacity(n);
    let mut count = 0usize;
    for &l in &labels {
        if l == IGNORE_INDEX {
            index.push(0u32);
            weight.push(0f32);
        } else if (0..classes as i64).contains(&l) {
            index.push(l as u32);
            weight.push(1f32);
            count += 1;
        } else {
            candle_core::bail!(
                "label {l} is out of range for {classes} classes (use -100 to ignore a position)"
            )
        }
    }
    let device = logits.device();
    let index = Tensor::from_vec(index, (n, 1), device)?;
    let weight = Tensor::from_vec(weight, n, device)?;
    let picked = log_softmax_last(&logits.to_dtype(DType::F32)?)?
        .gather(&index, 1)?
        .squeeze(1)?;
    let total = (picked * weight)?.sum_all()?;
    if count == 0 {
        return total * f64::NAN;
    }
    total * (-1.0 / count as f64)
}

/// transformers' `ForCausalLMLoss`: position i of `logits` `[b, t, vocab]` predicts label
/// i + 1 of `labels` `[b, t]`, -100 ignored, the mean over the rest.
pub(crate) fn causal_lm(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, vocab) = logits.dims3()?;
    let n = t.saturating_sub(1);
    let shifted = logits.narrow(1, 0, n)?.reshape((b * n, vocab))?;
    let targets = labels.narrow(1, 1, n)?.flatten_all()?;
    cross_entropy(&shifted, &targets)
}

/// `MSELoss()`: mean of squared differences (`labels` converted to the logits' dtype;
/// 16-bit predictions are taken in f32, as autocast computes losses).
pub(crate) fn mse(predictions: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let predictions = &upcast(predictions)?;
    let labels = labels.to_dtype(predictions.dtype())?;
    if predictions.dims() != labels.dims() {
        candle_core::bail!(
            "regression labels of shape {:?} for predictions of shape {:?}",
            labels.dims(),
            predictions.dims()
        )
    }
    (predictions - labels)?.sqr()?.mean_all()
}

/// `BCEWithLogitsLoss()`: mean of `max(x, 0) - x·y + log(1 + e^-|x|)` (in f32 for
/// 16-bit logits).
pub(crate) fn bce_with_logits(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logits = &upcast(logits)?;
    let labels = labels.to_dtype(logits.dtype())?;
    if logits.dims() != labels.dims() {
        candle_core::bail!(
            "multi-label labels of shape {:?} for logits of shape {:?}",
            labels.dims(),
            logits.dims()
        )
    }
    let softplus = logits.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    ((logits.relu()? - (logits * labels)?)? + softplus)?.mean_all()
}

/// Integer labels on the host.
fn int_labels(labels: &Tensor) -> Result<Vec<i64>> {
    match labels.dtype() {
        DType::U8 | DType::U32 | DType::I16 | DType::I32 | DType::I64 => {
            labels.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()
        }
        other => candle_core::bail!("class labels must be integers, got {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_ignores_minus_100_and_matches_the_formula() {
        let d = Device::Cpu;
        let logits = Tensor::new(&[[1f32, 2., 3.], [0.5, -1., 2.], [0., 0., 0.]], &d).unwrap();
        let labels = Tensor::new(&[2i64, -100, 0], &d).unwrap();
        let loss = cross_entropy(&logits, &labels)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let lse1 = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        let want = ((lse1 - 3.0) + 3f32.ln()) / 2.0;
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
        let bad = Tensor::new(&[3i64, 0, 0], &d).unwrap();
        assert!(cross_entropy(&logits, &bad).is_err());
        let none = Tensor::new(&[-100i64, -100, -100], &d).unwrap();
        assert!(
            cross_entropy(&logits, &none)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .is_nan()
        );
    }

    #[test]
    fn bce_and_mse() {
        let d = Device::Cpu;
        let x = Tensor::new(&[[2f32, -1.], [0., 3.]], &d).unwrap();
        let y = Tensor::new(&[[1f32, 0.], [1., 0.]], &d).unwrap();
        let got = bce_with_logits(&x, &y).unwrap().to_scalar::<f32>().unwrap();
        let bce = |x: f32, y: f32| {
            -(y * (1.0 / (1.0 + (-x).exp())).ln()
                + (1.0 - y) * (1.0 - 1.0 / (1.0 + (-x).exp())).ln())
        };
        let want = (bce(2., 1.) + bce(-1., 0.) + bce(0., 1.) + bce(3., 0.)) / 4.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let m = mse(&x, &y).unwrap().to_scalar::<f32>().unwrap();
        assert!((m - (1.0 + 1.0 + 1.0 + 9.0) / 4.0).abs() < 1e-6);
    }
}

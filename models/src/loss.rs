//! Losses as torch computes them for transformers' heads (mean reductions).

use candle_core::{DType, Result, Tensor};

use crate::fused;
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
    let targets = labels
        .iter()
        .map(|&l| class(l, classes))
        .collect::<Result<Vec<_>>>()?;
    let logits32 = upcast(logits)?;
    if fused::cross_entropy_fits(&logits32) {
        return fused::cross_entropy(&logits32, targets);
    }
    written_cross_entropy(&logits32, &targets)
}

/// [`cross_entropy`] in candle's ops (log-softmax, gather, weights, sum), for the
/// devices and dtypes the fused op does not take, and as its reference in tests.
fn written_cross_entropy(logits: &Tensor, targets: &[Option<u32>]) -> Result<Tensor> {
    let n = targets.len();
    let index: Vec<u32> = targets.iter().map(|t| t.unwrap_or(0)).collect();
    let weight: Vec<f32> = targets
        .iter()
        .map(|t| f32::from(u8::from(t.is_some())))
        .collect();
    let count = targets.iter().flatten().count();
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
    let logits32 = upcast(logits)?;
    if fused::cross_entropy_fits(&logits32) && labels.dims() == [b, t] {
        // Row (i, j) of the logits predicts label (i, j + 1); a sequence's last row
        // predicts nothing. The logits are read in place, not shifted into a copy.
        let labels = int_labels(labels)?;
        let mut targets = Vec::with_capacity(b * t);
        for row in labels.chunks_exact(t.max(1)) {
            for &l in row.iter().skip(1) {
                targets.push(class(l, vocab)?);
            }
            targets.push(None);
        }
        return fused::cross_entropy(&logits32, targets);
    }
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

/// A label's class: None for -100 (ignored); an error outside `0..classes`.
fn class(label: i64, classes: usize) -> Result<Option<u32>> {
    match label {
        IGNORE_INDEX => Ok(None),
        l if (0..classes as i64).contains(&l) => Ok(Some(l as u32)),
        l => candle_core::bail!(
            "label {l} is out of range for {classes} classes (use -100 to ignore a position)"
        ),
    }
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

    /// Varied logits, deterministic.
    fn logits(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.618).sin() * 4.0 + (i % 5) as f32 * 0.3)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The loss and the logits' gradient of `f`.
    fn loss_and_grad(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> (f32, Vec<f32>) {
        let var = candle_core::Var::from_tensor(x).unwrap();
        let loss = f(var.as_tensor()).unwrap();
        let grads = (&loss * 1.7).unwrap().backward().unwrap();
        let g = grads.get(var.as_tensor()).unwrap();
        let g = g.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        (
            loss.to_dtype(DType::F32).unwrap().to_scalar().unwrap(),
            g.to_vec1().unwrap(),
        )
    }

    fn assert_close(a: (f32, Vec<f32>), b: (f32, Vec<f32>), tol: f32) {
        assert!(
            (a.0 - b.0).abs() <= tol * b.0.abs().max(1.0),
            "{} vs {}",
            a.0,
            b.0
        );
        let scale = b.1.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let d =
            a.1.iter()
                .zip(&b.1)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(d <= tol * scale, "gradients differ by {d} (scale {scale})");
    }

    /// The fused loss against its written-out form (the causal LM's shift as a narrowed
    /// copy): small and large (rows over threads), -100s, bf16 logits.
    #[test]
    fn fused_cross_entropy_matches_the_written_out_form() {
        for (b, t, vocab) in [(2, 5, 7), (4, 64, 600)] {
            let x = logits(&[b, t, vocab]);
            let labels: Vec<i64> = (0..b * t)
                .map(|i| {
                    if i % 4 == 3 {
                        -100
                    } else {
                        (i * 7 % vocab) as i64
                    }
                })
                .collect();
            let labels = Tensor::from_vec(labels, (b, t), &Device::Cpu).unwrap();
            let written = |x: &Tensor| {
                let shifted = x.narrow(1, 0, t - 1)?.reshape((b * (t - 1), vocab))?;
                let l = int_labels(&labels.narrow(1, 1, t - 1)?)?;
                let targets: Vec<Option<u32>> =
                    l.iter().map(|&l| class(l, vocab)).collect::<Result<_>>()?;
                written_cross_entropy(&shifted, &targets)
            };
            let fused = loss_and_grad(&x, |x| causal_lm(x, &labels));
            assert_close(fused, loss_and_grad(&x, written), 1e-6);
            // Rows of a classifier's logits, no shift.
            let x2 = x.reshape((b * t, vocab)).unwrap();
            let flat = labels.flatten_all().unwrap();
            let fused = loss_and_grad(&x2, |x| cross_entropy(x, &flat));
            let targets: Vec<Option<u32>> = int_labels(&flat)
                .unwrap()
                .iter()
                .map(|&l| class(l, vocab).unwrap())
                .collect();
            let reference = loss_and_grad(&x2, |x| written_cross_entropy(x, &targets));
            assert_close(fused, reference, 1e-6);
        }
        // bf16 logits are taken in f32 (as autocast); their gradient comes back in bf16.
        let x = logits(&[2, 6, 9]);
        let labels = Tensor::new(
            &[[1i64, 2, 3, 4, 5, 6], [8, 7, 6, -100, 4, 3]],
            &Device::Cpu,
        )
        .unwrap();
        let f32_run = loss_and_grad(&x, |x| causal_lm(x, &labels));
        let xb = x.to_dtype(DType::BF16).unwrap();
        let bf16_run = loss_and_grad(&xb, |x| causal_lm(x, &labels));
        assert_close(bf16_run, f32_run, 2e-2);
        // A label out of range is an error; all ignored is NaN.
        let bad = Tensor::new(&[[1i64, 9, 0, 0, 0, 0], [0; 6]], &Device::Cpu).unwrap();
        assert!(causal_lm(&x, &bad).is_err());
        let none = Tensor::new(&[[-100i64; 6], [-100; 6]], &Device::Cpu).unwrap();
        let loss = causal_lm(&x, &none).unwrap().to_scalar::<f32>().unwrap();
        assert!(loss.is_nan());
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

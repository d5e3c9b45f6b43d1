//! The fused ops against their written-out forms: values and gradients.

use super::gelu::fast_tanh;
use super::*;
use candle_core::Var;

/// Deterministic, varied values (no RNG needed).
fn values(shape: &[usize], seed: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f32 * 0.7311 + seed).sin() * 2.5) + (i % 7) as f32 * 0.1)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Values and the gradients of every input under a weighted sum (so that each output
/// element gets a different upstream gradient), for `f` applied to `inputs`.
fn value_and_grads(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let weights = values(y.dims(), 3.0);
    let grads = (&y * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = ts.iter().map(|t| grads.get(t).unwrap().clone()).collect();
    (y, g)
}

fn assert_same(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    tol: f32,
) {
    let (y1, g1) = value_and_grads(inputs, fused);
    let (y2, g2) = value_and_grads(inputs, reference);
    let d = max_diff(&y1, &y2);
    assert!(d <= tol, "values differ by {d}");
    for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
        let d = max_diff(a, b);
        assert!(d <= tol, "gradients of input {i} differ by {d}");
    }
}

#[test]
fn layer_norm_matches_the_written_out_form() {
    let x = values(&[3, 5, 16], 0.0);
    let w = (values(&[16], 1.0) * 0.5).unwrap();
    let b = values(&[16], 2.0);
    assert_same(
        &[x, w, b],
        |t| layer_norm(&t[0], &t[1], &t[2], 1e-12),
        |t| written_out::layer_norm(&t[0], &t[1], &t[2], 1e-12),
        2e-5,
    );
}

#[test]
fn scaled_biased_softmax_matches_the_written_out_form() {
    let x = (values(&[2, 3, 5, 8], 0.5) * 4.0).unwrap();
    let min = f32::MIN;
    // A padding mask [b, 1, 1, t] (BERT) and a causal one [1, 1, t, t] (GPT-2).
    let pad: Vec<f32> = (0..16).map(|i| if i % 8 > 5 { min } else { 0.0 }).collect();
    let pad = Tensor::from_vec(pad, (2, 1, 1, 8), &Device::Cpu).unwrap();
    let causal: Vec<f32> = (0..40)
        .map(|i| if i % 8 > i / 8 + 3 { min } else { 0.0 })
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, 5, 8), &Device::Cpu).unwrap();
    for bias in [pad, causal] {
        assert_same(
            std::slice::from_ref(&x),
            |t| softmax_scaled_biased(&t[0], 0.125, &bias),
            |t| written_out::softmax_last(&(&t[0] * 0.125)?.broadcast_add(&bias)?),
            1e-6,
        );
    }
}

#[test]
fn linear_matches_matmul_plus_bias_in_both_layouts() {
    let x = values(&[3, 4, 5], 0.0);
    let w = (values(&[6, 5], 1.0) * 0.3).unwrap(); // nn.Linear(5, 6): [out, in]
    let b = values(&[6], 2.0);
    let wt = w.t().unwrap().contiguous().unwrap(); // Conv1D(6, 5): [in, out]
    let reference = |t: &[Tensor], transposed: bool| {
        let w = if transposed { t[1].clone() } else { t[1].t()? };
        super::written_out::matmul_last(&t[0], &w)?.broadcast_add(&t[2])
    };
    assert_same(
        &[x.clone(), w, b.clone()],
        |t| linear(&t[0], &t[1], Some(&t[2]), false),
        |t| reference(t, false),
        1e-5,
    );
    assert_same(
        &[x.clone(), wt, b],
        |t| linear(&t[0], &t[1], Some(&t[2]), true),
        |t| reference(t, true),
        1e-5,
    );
    // Without a bias.
    let w = values(&[2, 5], 4.0);
    assert_same(
        &[x, w],
        |t| linear(&t[0], &t[1], None, false),
        |t| super::written_out::matmul_last(&t[0], &t[1].t()?),
        1e-5,
    );
}

/// A dense layer with its GELU in one op is the layer then the GELU, bit for bit
/// (the same kernels), values and gradients: both GELUs, both layouts, with and
/// without a bias, rows across the parallel threshold.
#[test]
fn linear_gelu_is_the_layer_then_the_gelu() {
    for rows in [4, 700] {
        let x = values(&[1, rows, 200], 0.0);
        let w = (values(&[300, 200], 1.0) * 0.05).unwrap();
        let b = values(&[300], 2.0);
        let wt = w.t().unwrap().contiguous().unwrap();
        for (tanh, transposed) in [(false, false), (true, true)] {
            let w = if transposed { &wt } else { &w };
            for bias in [true, false] {
                let inputs = match bias {
                    true => vec![x.clone(), w.clone(), b.clone()],
                    false => vec![x.clone(), w.clone()],
                };
                let one = |t: &[Tensor]| linear_gelu(&t[0], &t[1], t.get(2), transposed, tanh);
                let two = |t: &[Tensor]| gelu(&linear(&t[0], &t[1], t.get(2), transposed)?, tanh);
                let (y1, g1) = value_and_grads(&inputs, one);
                let (y2, g2) = value_and_grads(&inputs, two);
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(
                    flat(&y1),
                    flat(&y2),
                    "rows {rows}, tanh {tanh}, bias {bias}"
                );
                for (a, c) in g1.iter().zip(&g2) {
                    assert_eq!(flat(a), flat(c), "rows {rows}, tanh {tanh}, bias {bias}");
                }
            }
        }
    }
}

/// A dense layer with its dropout in one op is the layer then the mask, bit for bit,
/// values and gradients, in both layouts, with and without a bias.
#[test]
fn linear_dropout_is_the_layer_then_the_mask() {
    let x = values(&[2, 300, 64], 0.0);
    let w = (values(&[48, 64], 1.0) * 0.1).unwrap();
    let wt = w.t().unwrap().contiguous().unwrap();
    let b = values(&[48], 2.0);
    let mask: Vec<f32> = (0..2 * 300 * 48)
        .map(|i| if i % 5 == 2 { 0.0 } else { 1.0 / 0.8 })
        .collect();
    for transposed in [false, true] {
        let w = if transposed { &wt } else { &w };
        for inputs in [
            vec![x.clone(), w.clone(), b.clone()],
            vec![x.clone(), w.clone()],
        ] {
            let one =
                |t: &[Tensor]| linear_dropout(&t[0], &t[1], t.get(2), transposed, mask.clone());
            let two =
                |t: &[Tensor]| mul_mask(&linear(&t[0], &t[1], t.get(2), transposed)?, mask.clone());
            let (y1, g1) = value_and_grads(&inputs, one);
            let (y2, g2) = value_and_grads(&inputs, two);
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(&y1), flat(&y2));
            for (a, c) in g1.iter().zip(&g2) {
                assert_eq!(flat(a), flat(c));
            }
        }
    }
    // A mask of another size is an error.
    assert!(linear_dropout(&x, &w, Some(&b), false, vec![1.0; 7]).is_err());
}

/// LayerNorm of a residual sum in one op is the sum then the norm, bit for bit, values
/// and gradients of all four inputs, rows across the parallel threshold.
#[test]
fn layer_norm_of_a_residual_sum_is_the_sum_then_the_norm() {
    for rows in [3, 1500] {
        let inputs = [
            values(&[1, rows, 96], 0.0),
            values(&[1, rows, 96], 1.0),
            (values(&[96], 2.0) * 0.5).unwrap(),
            values(&[96], 3.0),
        ];
        let one = |t: &[Tensor]| layer_norm_residual(&t[0], &t[1], &t[2], &t[3], 1e-12);
        let two = |t: &[Tensor]| layer_norm(&(&t[0] + &t[1])?, &t[2], &t[3], 1e-12);
        let (y1, g1) = value_and_grads(&inputs, one);
        let (y2, g2) = value_and_grads(&inputs, two);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&y1), flat(&y2), "rows {rows}");
        for (a, c) in g1.iter().zip(&g2) {
            assert_eq!(flat(a), flat(c), "rows {rows}");
        }
    }
    // A residual of another shape takes the sum's path, which refuses it.
    let (y, r) = (values(&[2, 96], 0.0), values(&[3, 96], 1.0));
    let (w, b) = (values(&[96], 2.0), values(&[96], 3.0));
    assert!(layer_norm_residual(&y, &r, &w, &b, 1e-5).is_err());
}

#[test]
fn gelu_matches_candles_both_forms() {
    let x = (values(&[5, 7], 0.0) * 1.6).unwrap();
    assert_same(
        std::slice::from_ref(&x),
        |t| gelu(&t[0], false),
        |t| t[0].gelu_erf(),
        2e-6,
    );
    assert_same(
        std::slice::from_ref(&x),
        |t| gelu(&t[0], true),
        |t| t[0].gelu(),
        2e-6,
    );
    for i in -20_000..=20_000 {
        let u = i as f32 * 1e-3;
        let d = (f64::from(fast_tanh(u)) - f64::from(u).tanh()).abs();
        assert!(d < 2e-7, "tanh({u}) off by {d}");
    }
    assert_eq!(fast_tanh(100.0), 1.0);
    assert_eq!(fast_tanh(-100.0), -1.0);
    assert_eq!(fast_tanh(0.0), 0.0);
}

#[test]
fn attention_matmuls_match_split_heads_and_matmul() {
    let heads = 3;
    // GPT-2's case: q, k, v are slices of one fused projection (strided views).
    let qkv = values(&[2, 5, 3 * 12], 0.0);
    let (q, k, v) = (
        qkv.narrow(2, 0, 12).unwrap(),
        qkv.narrow(2, 12, 12).unwrap(),
        qkv.narrow(2, 24, 12).unwrap(),
    );
    let reference = |t: &[Tensor]| {
        let s = split_heads(&t[0], heads)?.matmul(&split_heads(&t[1], heads)?.t()?)?;
        let p = written_out::softmax_last(&s)?;
        merge_heads(&p.matmul(&split_heads(&t[2], heads)?)?)
    };
    let fused = |t: &[Tensor]| {
        let s = attention_scores(&t[0], &t[1], heads, heads)?;
        let p = written_out::softmax_last(&s)?;
        attention_context(&p, &t[2], heads, heads)
    };
    // As three inputs of their own (BERT's case) ...
    let inputs = [
        q.contiguous().unwrap(),
        k.contiguous().unwrap(),
        v.contiguous().unwrap(),
    ];
    assert_same(&inputs, fused, reference, 1e-5);
    // ... and as views of one tensor, whose gradient gathers all three.
    let (y1, g1) = value_and_grads(std::slice::from_ref(&qkv), |t| {
        let (q, k, v) = (
            t[0].narrow(2, 0, 12)?,
            t[0].narrow(2, 12, 12)?,
            t[0].narrow(2, 24, 12)?,
        );
        fused(&[q, k, v])
    });
    let (y2, g2) = value_and_grads(std::slice::from_ref(&qkv), |t| {
        let (q, k, v) = (
            t[0].narrow(2, 0, 12)?,
            t[0].narrow(2, 12, 12)?,
            t[0].narrow(2, 24, 12)?,
        );
        reference(&[q, k, v])
    });
    assert!(max_diff(&y1, &y2) <= 1e-5);
    assert!(max_diff(&g1[0], &g2[0]) <= 1e-5);
    // Heads that do not divide the width take candle's path and its error.
    assert!(attention_scores(&inputs[0], &inputs[1], 5, 5).is_err());
}

#[test]
fn large_tensors_split_over_threads_give_the_same_results() {
    // Over PARALLEL_ELEMENTS: the kernels run in blocks on rayon's threads.
    let (rows, h) = (1100, 1000);
    assert!(rows * h >= PARALLEL_ELEMENTS);
    let x = values(&[rows, h], 0.0);
    let w = values(&[h], 1.0);
    let b = values(&[h], 2.0);
    // dw and db are sums over 1100 rows (values in the thousands), added in another
    // order than candle's: compared relative to their size.
    let inputs = [x.clone(), w, b];
    let (y1, g1) = value_and_grads(&inputs, |t| layer_norm(&t[0], &t[1], &t[2], 1e-5));
    let (y2, g2) = value_and_grads(&inputs, |t| {
        written_out::layer_norm(&t[0], &t[1], &t[2], 1e-5)
    });
    assert!(max_diff(&y1, &y2) <= 1e-5);
    for (a, b) in g1.iter().zip(&g2) {
        let scale = 1.0 + host(b).unwrap().iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            max_diff(a, b) <= 1e-5 * scale,
            "{} at scale {scale}",
            max_diff(a, b)
        );
    }
    let zero = Tensor::zeros(h, DType::F32, &Device::Cpu).unwrap();
    assert_same(
        std::slice::from_ref(&x),
        |t| softmax_scaled_biased(&t[0], 0.5, &zero),
        |t| written_out::softmax_last(&(&t[0] * 0.5)?),
        1e-6,
    );
    assert_same(
        std::slice::from_ref(&x),
        |t| gelu(&t[0], true),
        |t| t[0].gelu(),
        2e-6,
    );
    let mask = values(&[rows, h], 5.0)
        .ge(0.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let m = host(&mask).unwrap();
    assert_same(
        std::slice::from_ref(&x),
        |t| mul_mask(&t[0], m.clone()),
        |t| &t[0] * &mask,
        0.0,
    );
}

#[test]
fn add_trailing_matches_broadcast_add() {
    let x = values(&[4, 3, 6], 0.0);
    for b in [values(&[6], 1.0), values(&[3, 6], 2.0)] {
        assert_same(
            &[x.clone(), b],
            |t| add_trailing(&t[0], &t[1]),
            |t| t[0].broadcast_add(&t[1]),
            1e-5,
        );
    }
    // Not a trailing shape: plain broadcasting, as before.
    let col = values(&[4, 3, 1], 3.0);
    let y = add_trailing(&x, &col).unwrap();
    assert_eq!(max_diff(&y, &x.broadcast_add(&col).unwrap()), 0.0);
}

#[test]
fn mul_mask_matches_mul() {
    let x = values(&[4, 6], 0.0);
    let mask = values(&[4, 6], 5.0)
        .ge(0.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let m = host(&mask).unwrap();
    assert_same(
        std::slice::from_ref(&x),
        |t| mul_mask(&t[0], m.clone()),
        |t| &t[0] * &mask,
        0.0,
    );
    // Other dtypes multiply with candle's op.
    let x64 = x.to_dtype(DType::F64).unwrap();
    let y = mul_mask(&x64, m.clone())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(max_diff(&y, &(&x * &mask).unwrap()), 0.0);
    assert!(mul_mask(&x, vec![1.0; 3]).is_err());
}

#[test]
fn non_contiguous_inputs_and_other_dtypes_take_the_right_path() {
    // A transposed input is made contiguous first.
    let x = values(&[6, 4], 0.0).t().unwrap();
    let zero = Tensor::zeros(6, DType::F32, &Device::Cpu).unwrap();
    let y = softmax_scaled_biased(&x, 0.5, &zero).unwrap();
    let expected = written_out::softmax_last(&(&x * 0.5).unwrap()).unwrap();
    assert!(max_diff(&y, &expected) <= 1e-6);
    // f64 is not fused; it computes through the written-out form.
    let (x64, zero64) = (
        x.to_dtype(DType::F64).unwrap(),
        zero.to_dtype(DType::F64).unwrap(),
    );
    let y64 = softmax_scaled_biased(&x64, 0.5, &zero64).unwrap();
    assert!(max_diff(&y, &y64.to_dtype(DType::F32).unwrap()) <= 1e-6);
}

#[test]
fn results_are_deterministic() {
    let x = values(&[8, 32], 0.0);
    let w = values(&[32], 1.0);
    let b = values(&[32], 2.0);
    let run = || {
        value_and_grads(&[x.clone(), w.clone(), b.clone()], |t| {
            let zero = Tensor::zeros(32, DType::F32, &Device::Cpu)?;
            softmax_scaled_biased(&layer_norm(&t[0], &t[1], &t[2], 1e-5)?, 0.3, &zero)
        })
    };
    let (y1, g1) = run();
    let (y2, g2) = run();
    assert_eq!(max_diff(&y1, &y2), 0.0);
    for (a, b) in g1.iter().zip(&g2) {
        assert_eq!(max_diff(a, b), 0.0);
    }
}

#[test]
fn lora_linear_matches_the_layer_plus_its_low_rank_update() {
    let x = values(&[2, 3, 5], 0.0);
    let w = (values(&[6, 5], 1.0) * 0.3).unwrap(); // [out, in]
    let b = values(&[6], 2.0);
    let a = (values(&[2, 5], 3.0) * 0.2).unwrap(); // [r, in]
    let bm = (values(&[6, 2], 4.0) * 0.1).unwrap(); // [out, r]
    let mask: Vec<f32> = (0..30)
        .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
        .collect();
    let mask_t = Tensor::from_vec(mask.clone(), (2, 3, 5), &Device::Cpu).unwrap();
    for (transposed, masked) in [(false, false), (true, false), (false, true), (true, true)] {
        let w = if transposed {
            w.t().unwrap().contiguous().unwrap()
        } else {
            w.clone()
        };
        let mask = masked.then(|| mask.clone());
        let mask_t = mask_t.clone();
        assert_same(
            &[x.clone(), w, b.clone(), a.clone(), bm.clone()],
            |t| {
                let lr = LowRankInput {
                    a: &t[3],
                    b: &t[4],
                    scaling: 1.75,
                    mask: mask.clone(),
                };
                lora_linear(&t[0], &t[1], Some(&t[2]), transposed, lr)
            },
            |t| {
                let base = linear(&t[0], &t[1], Some(&t[2]), transposed)?;
                let xd = if masked {
                    (&t[0] * &mask_t)?
                } else {
                    t[0].clone()
                };
                let h = super::written_out::matmul_last(&xd, &t[3].t()?)?;
                let up = super::written_out::matmul_last(&h, &t[4].t()?)?;
                base + (up * 1.75)?
            },
            1e-5,
        );
    }
    // A frozen (untracked) weight gets no gradient; the adapter's still match.
    let (wv, av) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&a).unwrap());
    let lr = LowRankInput {
        a: av.as_tensor(),
        b: &bm,
        scaling: 1.0,
        mask: None,
    };
    let y = lora_linear(&x, &wv.as_tensor().detach(), None, false, lr).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(wv.as_tensor()).is_none());
    assert!(grads.get(av.as_tensor()).is_some());
}

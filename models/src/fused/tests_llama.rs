//! The Llama family's fused ops (RMSNorm, rotary embeddings, SwiGLU's gate,
//! grouped-query attention) against their written-out forms: values and gradients.

use super::attention::{written_context, written_scores};
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

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a − b| over max(1, max |b|).
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (f32s(a), f32s(b));
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    let d = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    d / scale
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
    let weights = values(y.dims(), 3.0).to_dtype(y.dtype()).unwrap();
    let grads = (&y * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = ts.iter().map(|t| grads.get(t).unwrap().clone()).collect();
    (y, g)
}

/// `fused` and `reference` agree within `tol` (relative), values and every gradient.
fn assert_close(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    tol: f32,
) {
    let (y1, g1) = value_and_grads(inputs, fused);
    let (y2, g2) = value_and_grads(inputs, reference);
    let d = rel_diff(&y1, &y2);
    assert!(d <= tol, "values differ by {d}");
    for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
        let d = rel_diff(a, b);
        assert!(d <= tol, "gradients of input {i} differ by {d}");
    }
}

fn bf16(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16).unwrap()
}

#[test]
fn rms_norm_matches_the_written_out_form() {
    for (shape, eps) in [
        (&[3, 5, 17][..], 1e-6),
        (&[7, 1][..], 1e-5),
        (&[4, 33][..], 1e-6),
    ] {
        let h = shape[shape.len() - 1];
        let x = values(shape, 0.0);
        let w = (values(&[h], 1.0) * 0.5).unwrap();
        assert_close(
            &[x, w],
            |t| rms_norm(&t[0], &t[1], eps),
            |t| written_out::rms_norm(&t[0], &t[1], eps),
            1e-5,
        );
    }
    // A transposed input is made contiguous first.
    let x = values(&[9, 6], 2.0);
    let w = values(&[9], 1.0);
    assert_close(
        &[x, w],
        |t| rms_norm(&t[0].t()?, &t[1], 1e-6),
        |t| written_out::rms_norm(&t[0].t()?, &t[1], 1e-6),
        1e-5,
    );
}

#[test]
fn rms_norm_in_bf16_casts_before_the_weight() {
    let x = values(&[3, 5, 17], 0.0);
    let w = (values(&[17], 1.0) * 0.5).unwrap();
    let (xb, wb) = (bf16(&x), bf16(&w));
    let y = rms_norm(&xb, &wb, 1e-6).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    // transformers: normalised in f32, cast to bf16, times the bf16 weight in bf16.
    let ones = Tensor::ones(17, DType::F32, &Device::Cpu).unwrap();
    let normed = rms_norm(&xb.to_dtype(DType::F32).unwrap(), &ones, 1e-6).unwrap();
    let expected = bf16(&normed).broadcast_mul(&wb).unwrap();
    assert!(rel_diff(&y, &expected) <= 1e-2);
    // Gradients flow in bf16, close to f32's.
    let (yb, gb) = value_and_grads(&[xb.clone(), wb.clone()], |t| rms_norm(&t[0], &t[1], 1e-6));
    let (y32, g32) = value_and_grads(
        &[
            xb.to_dtype(DType::F32).unwrap(),
            wb.to_dtype(DType::F32).unwrap(),
        ],
        |t| rms_norm(&t[0], &t[1], 1e-6),
    );
    assert!(rel_diff(&yb, &y32) <= 1e-2);
    for (a, b) in gb.iter().zip(&g32) {
        assert_eq!(a.dtype(), DType::BF16);
        assert!(rel_diff(a, b) <= 3e-2, "{}", rel_diff(a, b));
    }
}

/// inv_freq of Llama's default rope: 1/θ^(2i/d), in f32.
fn inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// transformers' `q·cos + rotate_half(q)·sin` with `[t, d]` tables `cat(freqs, freqs)`,
/// on heads split out `[b, heads, t, d]`, in x's dtype.
fn rotate_half_reference(x: &Tensor, cos: &Tensor, sin: &Tensor, d: usize) -> Result<Tensor> {
    let heads = x.dim(2)? / d;
    let q = split_heads(x, heads)?;
    let full = |c: &Tensor| Tensor::cat(&[c, c], 1)?.to_dtype(x.dtype())?.unsqueeze(0);
    let (cos, sin) = (full(cos)?.unsqueeze(0)?, full(sin)?.unsqueeze(0)?);
    let (q1, q2) = (q.narrow(3, 0, d / 2)?, q.narrow(3, d / 2, d / 2)?);
    let rotated = Tensor::cat(&[&q2.neg()?, &q1], 3)?;
    let out = (q.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
    merge_heads(&out)?.contiguous()
}

#[test]
fn rope_tables_are_positions_times_inv_freq() {
    let inv = inv_freq(6, 10000.0);
    let (cos, sin) = rope_tables(&inv, 0..9, 1.0, &Device::Cpu).unwrap();
    assert_eq!(cos.dims(), [9, 3]);
    let (c, s) = (f32s(&cos), f32s(&sin));
    for p in 0..9 {
        for (j, f) in inv.iter().enumerate() {
            let angle = f64::from(f * p as f32);
            assert!((f64::from(c[p * 3 + j]) - angle.cos()).abs() < 1e-7);
            assert!((f64::from(s[p * 3 + j]) - angle.sin()).abs() < 1e-7);
        }
    }
    // A cache's later positions are the same rows; the scaling multiplies them.
    let (cos4, sin4) = rope_tables(&inv, 4..9, 0.5, &Device::Cpu).unwrap();
    let half = |t: &Tensor| (t.narrow(0, 4, 5).unwrap() * 0.5).unwrap();
    assert_eq!(rel_diff(&cos4, &half(&cos)), 0.0);
    assert_eq!(rel_diff(&sin4, &half(&sin)), 0.0);
}

#[test]
fn rope_matches_rotate_half_and_the_written_out_form() {
    let (b, t, heads, d) = (2, 5, 3, 6);
    let (cos, sin) = rope_tables(&inv_freq(d, 10000.0), 3..3 + t, 1.0, &Device::Cpu).unwrap();
    let x = values(&[b, t, heads * d], 0.0);
    // The same multiplies and adds as transformers' formula: the same bits.
    let y = rope(&x, &cos, &sin, d).unwrap();
    let expected = rotate_half_reference(&x, &cos, &sin, d).unwrap();
    assert_eq!(rel_diff(&y, &expected), 0.0);
    assert_close(
        std::slice::from_ref(&x),
        |t| rope(&t[0], &cos, &sin, d),
        |t| written_out::rope(&t[0], &cos, &sin, d),
        1e-6,
    );
    // A slice of a fused projection (strided rows), and its gradient through the view.
    let qkv = values(&[b, t, 3 * heads * d], 1.0);
    let e = heads * d;
    let view = qkv.narrow(2, e, e).unwrap();
    assert!(!view.is_contiguous());
    let y = rope(&view, &cos, &sin, d).unwrap();
    assert!(y.is_contiguous());
    assert_eq!(
        rel_diff(&y, &rotate_half_reference(&view, &cos, &sin, d).unwrap()),
        0.0
    );
    assert_close(
        std::slice::from_ref(&qkv),
        |t| rope(&t[0].narrow(2, e, e)?, &cos, &sin, d),
        |t| written_out::rope(&t[0].narrow(2, e, e)?, &cos, &sin, d),
        1e-6,
    );
    // The tables get no gradient.
    let cv = Var::from_tensor(&cos).unwrap();
    let grads = rope(&x, cv.as_tensor(), &sin, d)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(cv.as_tensor()).is_none());
    // Shapes that do not fit are errors.
    assert!(rope(&x, &cos, &sin, 5).is_err());
    assert!(rope(&x, &cos.narrow(0, 0, 4).unwrap(), &sin, d).is_err());
}

#[test]
fn rope_in_bf16_computes_in_bf16() {
    let (b, t, heads, d) = (2, 7, 2, 10);
    let (cos, sin) = rope_tables(&inv_freq(d, 500000.0), 0..t, 1.0, &Device::Cpu).unwrap();
    let x = bf16(&values(&[b, t, heads * d], 0.5));
    let y = rope(&x, &cos, &sin, d).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    // transformers' formula in bf16 with the tables cast to bf16: the same bits.
    let expected = rotate_half_reference(&x, &cos, &sin, d).unwrap();
    assert_eq!(rel_diff(&y, &expected), 0.0);
    let x32 = x.to_dtype(DType::F32).unwrap();
    let (y32, g32) = value_and_grads(std::slice::from_ref(&x32), |t| rope(&t[0], &cos, &sin, d));
    let (yb, gb) = value_and_grads(std::slice::from_ref(&x), |t| rope(&t[0], &cos, &sin, d));
    assert!(rel_diff(&yb, &y32) <= 1e-2);
    assert_eq!(gb[0].dtype(), DType::BF16);
    assert!(rel_diff(&gb[0], &g32[0]) <= 1e-2);
}

#[test]
fn silu_mul_matches_the_written_out_form() {
    let gate = (values(&[3, 7, 11], 0.0) * 3.0).unwrap();
    let up = values(&[3, 7, 11], 1.0);
    assert_close(
        &[gate, up],
        |t| silu_mul(&t[0], &t[1]),
        |t| written_out::silu_mul(&t[0], &t[1]),
        1e-5,
    );
    // Saturated gates, both ends.
    let extremes = [-100.0f32, -30.0, -5.0, 0.0, 1e-3, 5.0, 30.0, 100.0];
    let gate = Tensor::new(&extremes[..], &Device::Cpu).unwrap();
    let up = values(&[8], 2.0);
    assert_close(
        &[gate, up],
        |t| silu_mul(&t[0], &t[1]),
        |t| written_out::silu_mul(&t[0], &t[1]),
        1e-5,
    );
    // Other dtypes take the written-out form; shapes that differ are errors.
    let (g, u) = (values(&[4, 5], 0.0), values(&[4, 5], 1.0));
    let y64 = silu_mul(
        &g.to_dtype(DType::F64).unwrap(),
        &u.to_dtype(DType::F64).unwrap(),
    );
    let y = silu_mul(&g, &u).unwrap();
    assert!(rel_diff(&y, &y64.unwrap()) <= 1e-6);
    assert!(silu_mul(&g, &values(&[5, 4], 1.0)).is_err());
}

#[test]
fn swiglu_mlp_matches_its_three_ops() {
    // Rows across the parallel threshold, so both the one-block and the split paths run.
    for rows in [5, 300] {
        let x = values(&[1, rows, 16], 0.0);
        let (wg, wu) = (values(&[24, 16], 1.0), values(&[24, 16], 2.0));
        let three = |t: &[Tensor]| {
            let gate = linear(&t[0], &t[1], None, false)?;
            let up = linear(&t[0], &t[2], None, false)?;
            silu_mul(&gate, &up)
        };
        let (y1, g1) = value_and_grads(&[x.clone(), wg.clone(), wu.clone()], |t| {
            swiglu_mlp(&t[0], &t[1], &t[2])
        });
        let (y2, g2) = value_and_grads(&[x.clone(), wg.clone(), wu.clone()], three);
        // The forward pass is the same products and gate: the same bits.
        assert_eq!(f32s(&y1), f32s(&y2));
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            let d = rel_diff(a, b);
            assert!(d <= 1e-5, "gradients of input {i} differ by {d}");
        }
    }
    // Frozen weights (a LoRA base) get no gradient; x still does.
    let x = Var::from_tensor(&values(&[2, 3, 16], 0.0)).unwrap();
    let (wg, wu) = (values(&[24, 16], 1.0), values(&[24, 16], 2.0));
    let y = swiglu_mlp(x.as_tensor(), &wg, &wu).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(grads.get(&wg).is_none() && grads.get(&wu).is_none());
    // Other dtypes take the three ops; weights that do not fit are errors.
    let y64 = swiglu_mlp(
        &x.as_tensor().to_dtype(DType::F64).unwrap(),
        &wg.to_dtype(DType::F64).unwrap(),
        &wu.to_dtype(DType::F64).unwrap(),
    )
    .unwrap();
    assert!(rel_diff(&y64, &y) <= 1e-6);
    assert!(swiglu_mlp(x.as_tensor(), &values(&[24, 15], 1.0), &wu).is_err());
    assert!(swiglu_mlp(x.as_tensor(), &wg, &values(&[23, 16], 1.0)).is_err());
}

#[test]
fn linear_onto_a_residual_matches_the_sum() {
    for rows in [5, 3000] {
        let inputs = [
            values(&[1, rows, 24], 0.0),
            values(&[16, 24], 1.0),
            values(&[1, rows, 16], 2.0),
        ];
        let (y1, g1) = value_and_grads(&inputs, |t| linear_residual(&t[0], &t[1], &t[2]));
        let (y2, g2) = value_and_grads(&inputs, |t| &t[2] + linear(&t[0], &t[1], None, false)?);
        // The same bits forward (a layer with an adapter takes the two ops).
        assert_eq!(f32s(&y1), f32s(&y2));
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            assert_eq!(f32s(a), f32s(b), "gradient of input {i}");
        }
    }
    // A residual of another shape is an error, as the sum would be.
    let (x, w) = (values(&[2, 3, 24], 0.0), values(&[16, 24], 1.0));
    assert!(linear_residual(&x, &w, &values(&[2, 3, 15], 0.0)).is_err());
}

/// `[b, kv, t, d]` → `[b, kv·group, t, d]`, each head repeated `group` times in place
/// (transformers' `repeat_kv`).
fn repeat_kv(x: &Tensor, group: usize) -> Result<Tensor> {
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kv, group, t, d))?
        .reshape((b, kv * group, t, d))
}

/// Attention `softmax(q kᵀ · scale + bias) v` in three forms: the fused ops, their
/// written-out GQA forms, and the explicit repeat-kv reference.
fn gqa(form: usize, t: &[Tensor], heads: usize, kv: usize, bias: &Tensor) -> Result<Tensor> {
    let scale = 0.37;
    match form {
        0 => {
            let s = attention_scores(&t[0], &t[1], heads, kv)?;
            attention_context(&softmax_scaled_biased(&s, scale, bias)?, &t[2], heads, kv)
        }
        1 => {
            let s = written_scores(&t[0], &t[1], heads, kv)?;
            written_context(&softmax_scaled_biased(&s, scale, bias)?, &t[2], heads, kv)
        }
        _ => {
            let q = split_heads(&t[0], heads)?;
            let k = repeat_kv(&split_heads(&t[1], kv)?, heads / kv)?;
            let v = repeat_kv(&split_heads(&t[2], kv)?, heads / kv)?;
            let s = q.matmul(&k.t()?)?;
            let p = written_out::softmax_last(&(s * scale)?.broadcast_add(bias)?)?;
            merge_heads(&p.matmul(&v)?)
        }
    }
}

#[test]
fn grouped_query_attention_matches_repeat_kv() {
    let (b, heads, d) = (2, 4, 5);
    for kv in [4, 2, 1] {
        // Self-attention with a causal mask, and a query block against a longer cache.
        for (tq, tk) in [(7, 7), (3, 8)] {
            let bias: Vec<f32> = (0..tq * tk)
                .map(|i| {
                    if i % tk > i / tk + tk - tq {
                        f32::MIN
                    } else {
                        0.0
                    }
                })
                .collect();
            let bias = &Tensor::from_vec(bias, (1, 1, tq, tk), &Device::Cpu).unwrap();
            let inputs = [
                values(&[b, tq, heads * d], 0.0),
                values(&[b, tk, kv * d], 1.0),
                values(&[b, tk, kv * d], 2.0),
            ];
            let run = |form| move |t: &[Tensor]| gqa(form, t, heads, kv, bias);
            assert_close(&inputs, run(0), run(2), 1e-5);
            assert_close(&inputs, run(1), run(2), 1e-5);
            let s = attention_scores(&inputs[0], &inputs[1], heads, kv).unwrap();
            let k = repeat_kv(&split_heads(&inputs[1], kv).unwrap(), heads / kv).unwrap();
            let reference = split_heads(&inputs[0], heads)
                .unwrap()
                .matmul(&k.t().unwrap())
                .unwrap();
            assert_eq!(s.dims(), [b, heads, tq, tk]);
            assert!(rel_diff(&s, &reference) <= 1e-6);
        }
    }
}

/// The one-op attention gives the bits of its four ops (five with the rotation),
/// values and gradients: GQA and multi-head, a causal bias per batch entry or shared,
/// dropout or none, rotary tables or none, and views of a fused projection (GPT-2's
/// `c_attn`).
#[test]
fn sdpa_is_its_four_ops_bit_for_bit() {
    let (b, heads, d, t) = (2, 4, 6, 7);
    let (cos, sin) = rope_tables(&inv_freq(d, 10000.0), 0..t, 1.0, &Device::Cpu).unwrap();
    for kv in [4, 2] {
        for per_entry in [false, true] {
            // Causal; with a bias per entry, entry 1's first key is padding too.
            let bias: Vec<f32> = (0..b * t * t)
                .map(|i| {
                    let (entry, query, key) = (i / (t * t), (i / t) % t, i % t);
                    let padding = per_entry && entry == 1 && key == 0 && query > 0;
                    if key > query || padding {
                        f32::MIN
                    } else {
                        0.0
                    }
                })
                .collect();
            let bias = match per_entry {
                true => Tensor::from_vec(bias, (b, 1, t, t), &Device::Cpu).unwrap(),
                false => {
                    Tensor::from_vec(bias[..t * t].to_vec(), (1, 1, t, t), &Device::Cpu).unwrap()
                }
            };
            for (p, rotate) in [(0.0, false), (0.3, false), (0.0, true), (0.3, true)] {
                let n = b * heads * t * t;
                let mask: Option<Vec<f32>> = (p > 0.0).then(|| {
                    (0..n)
                        .map(|i| if i % 3 == 1 { 0.0 } else { 1.0 / 0.7 })
                        .collect()
                });
                let rotary = rotate.then_some(Rotary {
                    cos: &cos,
                    sin: &sin,
                    head_dim: d,
                });
                let bias = &bias;
                let one = |x: &[Tensor]| {
                    let qkv = (&x[0], &x[1], &x[2]);
                    sdpa(qkv, (heads, kv), bias, 0.37, mask.clone(), rotary)
                };
                let five = |x: &[Tensor]| {
                    let (q, k) = match rotate {
                        true => (rope(&x[0], &cos, &sin, d)?, rope(&x[1], &cos, &sin, d)?),
                        false => (x[0].clone(), x[1].clone()),
                    };
                    let s = attention_scores(&q, &k, heads, kv)?;
                    let mut probs = softmax_scaled_biased(&s, 0.37, bias)?;
                    if let Some(m) = &mask {
                        probs = mul_mask(&probs, m.clone())?;
                    }
                    attention_context(&probs, &x[2], heads, kv)
                };
                let inputs = [
                    values(&[b, t, heads * d], 0.0),
                    values(&[b, t, kv * d], 1.0),
                    values(&[b, t, kv * d], 2.0),
                ];
                let [q, k, v] = &inputs;
                assert!(sdpa_fits(q, k, v, (heads, kv), bias, rotary));
                let (y1, g1) = value_and_grads(&inputs, one);
                let (y2, g2) = value_and_grads(&inputs, five);
                let case = format!("kv {kv}, p {p}, rotary {rotate}");
                assert_eq!(f32s(&y1), f32s(&y2), "{case}");
                for (a, c) in g1.iter().zip(&g2) {
                    assert_eq!(f32s(a), f32s(c), "{case}");
                }
            }
        }
    }
    // Views of one [b, t, 3e] projection are taken as they are.
    let qkv = values(&[b, t, 3 * heads * d], 0.0);
    let e = heads * d;
    let zero = Tensor::zeros((1, 1, t, t), DType::F32, &Device::Cpu).unwrap();
    let split = |x: &Tensor| -> Result<[Tensor; 3]> {
        Ok([
            x.narrow(2, 0, e)?,
            x.narrow(2, e, e)?,
            x.narrow(2, 2 * e, e)?,
        ])
    };
    let (y1, g1) = value_and_grads(std::slice::from_ref(&qkv), |x| {
        let [q, k, v] = split(&x[0])?;
        sdpa((&q, &k, &v), (heads, heads), &zero, 0.37, None, None)
    });
    let (y2, g2) = value_and_grads(std::slice::from_ref(&qkv), |x| {
        gqa(0, &split(&x[0])?, heads, heads, &zero)
    });
    assert_eq!(f32s(&y1), f32s(&y2));
    assert_eq!(f32s(&g1[0]), f32s(&g2[0]));
    // The packed op over the whole projection gives the views' bits: multi-head, and
    // grouped with rotary tables and dropout.
    let kv = 2;
    let rotary = Rotary {
        cos: &cos,
        sin: &sin,
        head_dim: d,
    };
    let mask: Vec<f32> = (0..b * heads * t * t)
        .map(|i| if i % 4 == 0 { 0.0 } else { 1.25 })
        .collect();
    for (widths, rotary, mask) in [
        ((e, e, e), None, None),
        ((e, kv * d, kv * d), Some(rotary), Some(mask)),
    ] {
        let hk = (heads, widths.1 / d);
        let qkv = values(&[b, t, widths.0 + widths.1 + widths.2], 0.5);
        assert!(sdpa_packed_fits(&qkv, widths, hk, &zero, rotary));
        let (y1, g1) = value_and_grads(std::slice::from_ref(&qkv), |x| {
            sdpa_packed(&x[0], widths, hk, &zero, 0.37, mask.clone(), rotary)
        });
        let (y2, g2) = value_and_grads(std::slice::from_ref(&qkv), |x| {
            let (eq, ek, ev) = widths;
            let q = x[0].narrow(2, 0, eq)?;
            let (k, v) = (x[0].narrow(2, eq, ek)?, x[0].narrow(2, eq + ek, ev)?);
            sdpa((&q, &k, &v), hk, &zero, 0.37, mask.clone(), rotary)
        });
        assert_eq!(f32s(&y1), f32s(&y2));
        assert_eq!(f32s(&g1[0]), f32s(&g2[0]));
    }
    let qkv = values(&[b, t, 3 * e], 0.5);
    assert!(!sdpa_packed_fits(
        &qkv,
        (e, e, e + 1),
        (heads, heads),
        &zero,
        None
    ));
    assert!(sdpa_packed(&qkv, (e, e, e - 1), (heads, heads), &zero, 1.0, None, None).is_err());
    // What does not fit is refused by sdpa_fits (and by sdpa, in one line).
    let (q, k) = (values(&[b, t, e], 0.0), values(&[b, t, e], 1.0));
    let short_v = values(&[b, t - 1, e], 2.0);
    assert!(!sdpa_fits(&q, &k, &short_v, (heads, heads), &zero, None));
    assert!(!sdpa_fits(&q, &k, &k, (heads, 3), &zero, None));
    let wrong_bias = Tensor::zeros((1, 1, t, t + 1), DType::F32, &Device::Cpu).unwrap();
    assert!(!sdpa_fits(&q, &k, &k, (heads, heads), &wrong_bias, None));
    let odd = Rotary {
        cos: &cos,
        sin: &sin,
        head_dim: 5,
    };
    assert!(!sdpa_fits(&q, &k, &k, (heads, heads), &zero, Some(odd)));
    let ok = (&q, &k, &k);
    assert!(sdpa((&q, &k, &short_v), (heads, heads), &zero, 1.0, None, None).is_err());
    assert!(sdpa(ok, (heads, heads), &zero, 1.0, Some(vec![1.0; 3]), None).is_err());
}

#[test]
fn grouped_query_attention_reads_views_of_a_fused_projection() {
    let (b, t, heads, kv, d) = (2, 6, 4, 2, 3);
    let (eq, ekv) = (heads * d, kv * d);
    let qkv = values(&[b, t, eq + 2 * ekv], 0.0);
    let zero = Tensor::zeros((1, 1, t, t), DType::F32, &Device::Cpu).unwrap();
    let split = |x: &Tensor| -> Result<[Tensor; 3]> {
        Ok([
            x.narrow(2, 0, eq)?,
            x.narrow(2, eq, ekv)?,
            x.narrow(2, eq + ekv, ekv)?,
        ])
    };
    let (split, zero) = (&split, &zero);
    let run = |form| move |t: &[Tensor]| gqa(form, &split(&t[0])?, heads, kv, zero);
    assert_close(std::slice::from_ref(&qkv), run(0), run(2), 1e-5);
    assert_close(std::slice::from_ref(&qkv), run(1), run(2), 1e-5);
    // The crate's attention takes the key/value heads through, and f64 (written out)
    // gives the same values.
    let [q, k, v] = split(&qkv).unwrap();
    let y = crate::layers::attention(&q, &k, &v, heads, kv, zero, 0.37, 0.0, None).unwrap();
    assert!(rel_diff(&y, &gqa(2, &[q, k, v], heads, kv, zero).unwrap()) <= 1e-6);
    let f64s = split(&qkv.to_dtype(DType::F64).unwrap()).unwrap();
    let y64 = gqa(0, &f64s, heads, kv, &zero.to_dtype(DType::F64).unwrap()).unwrap();
    assert_eq!(y64.dtype(), DType::F64);
    assert!(rel_diff(&y, &y64) <= 1e-6);
}

#[test]
fn grouped_query_attention_needs_whole_groups() {
    let q = values(&[1, 3, 12], 0.0);
    let kv = values(&[1, 3, 6], 1.0);
    let probs = values(&[1, 4, 3, 3], 2.0);
    for heads_kv in [(4, 3), (4, 0), (0, 2)] {
        let (h, g) = heads_kv;
        assert!(attention_scores(&q, &kv, h, g).is_err());
        assert!(attention_context(&probs, &kv, h, g).is_err());
        assert!(written_scores(&q, &kv, h, g).is_err());
        assert!(written_context(&probs, &kv, h, g).is_err());
    }
    // Key/value widths that do not match the groups take the written-out path's error.
    assert!(attention_scores(&q, &values(&[1, 3, 5], 1.0), 4, 2).is_err());
    assert!(attention_context(&probs, &values(&[1, 3, 5], 1.0), 4, 2).is_err());
}

#[test]
fn large_tensors_split_over_threads_give_the_same_results() {
    // Over PARALLEL_ELEMENTS: the kernels run in blocks on rayon's threads.
    let (rows, h) = (1100, 1000);
    assert!(rows * h >= PARALLEL_ELEMENTS);
    let x = values(&[rows, h], 0.0);
    let w = values(&[h], 1.0);
    assert_close(
        &[x.clone(), w],
        |t| rms_norm(&t[0], &t[1], 1e-6),
        |t| written_out::rms_norm(&t[0], &t[1], 1e-6),
        1e-5,
    );
    let up = values(&[rows, h], 2.0);
    assert_close(
        &[x, up],
        |t| silu_mul(&t[0], &t[1]),
        |t| written_out::silu_mul(&t[0], &t[1]),
        1e-5,
    );
    let (b, t, d) = (2, 512, 64);
    let x = values(&[b, t, 16 * d], 3.0);
    assert!(x.elem_count() >= PARALLEL_ELEMENTS);
    let (cos, sin) = rope_tables(&inv_freq(d, 10000.0), 0..t, 1.0, &Device::Cpu).unwrap();
    assert_close(
        std::slice::from_ref(&x),
        |t| rope(&t[0], &cos, &sin, d),
        |t| written_out::rope(&t[0], &cos, &sin, d),
        1e-6,
    );
}

#[test]
fn results_are_deterministic() {
    let (b, t, heads, kv, d) = (2, 5, 4, 1, 3);
    let inputs = [
        values(&[b, t, heads * d], 0.0),
        values(&[b, t, kv * d], 1.0),
        values(&[b, t, kv * d], 2.0),
        values(&[heads * d], 3.0),
    ];
    let zero = Tensor::zeros((1, 1, t, t), DType::F32, &Device::Cpu).unwrap();
    let (cos, sin) = rope_tables(&inv_freq(d + 1, 10000.0), 0..t, 1.0, &Device::Cpu).unwrap();
    let run = || {
        value_and_grads(&inputs, |x| {
            let q = rms_norm(&x[0], &x[3], 1e-6)?;
            let y = gqa(0, &[q, x[1].clone(), x[2].clone()], heads, kv, &zero)?;
            let y = rope(&y.narrow(2, 0, 2 * (d + 1))?, &cos, &sin, d + 1)?;
            silu_mul(&y, &y.sin()?)
        })
    };
    let (y1, g1) = run();
    let (y2, g2) = run();
    assert_eq!(rel_diff(&y1, &y2), 0.0);
    for (a, b) in g1.iter().zip(&g2) {
        assert_eq!(rel_diff(a, b), 0.0);
    }
}

/// Forward and backward, milliseconds a run (best of `n` after a warm-up).
fn time_ms(inputs: &[Tensor], n: usize, f: impl Fn(&[Tensor]) -> Result<Tensor>) -> f64 {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let mut best = f64::INFINITY;
    for _ in 0..n + 1 {
        let start = std::time::Instant::now();
        let grads = f(&ts).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&ts[0]).is_some());
        best = best.min(start.elapsed().as_secs_f64() * 1e3);
    }
    best
}

/// At a small Llama's sizes (b 8, t 128, hidden 256, 4 heads, 2 key/value heads,
/// intermediate 688). Run with `--ignored --nocapture`, optimised.
#[test]
#[ignore]
fn timing_fused_vs_written_out() {
    let (b, t, hidden, heads, kv, inter) = (8, 128, 256, 4, 2, 688);
    let d = hidden / heads;
    let x = values(&[b, t, hidden], 0.0);
    let w = values(&[hidden], 1.0);
    let report = |name: &str, fused: f64, written: f64| {
        println!("{name:>10}: fused {fused:7.2} ms, written out {written:7.2} ms");
    };
    let inputs = [x.clone(), w];
    report(
        "rms_norm",
        time_ms(&inputs, 10, |t| rms_norm(&t[0], &t[1], 1e-6)),
        time_ms(&inputs, 10, |t| written_out::rms_norm(&t[0], &t[1], 1e-6)),
    );
    let (cos, sin) = rope_tables(&inv_freq(d, 10000.0), 0..t, 1.0, &Device::Cpu).unwrap();
    let qkv = values(&[b, t, hidden + 2 * kv * d], 1.0);
    let q = [qkv];
    report(
        "rope (q)",
        time_ms(&q, 10, |t| rope(&t[0].narrow(2, 0, hidden)?, &cos, &sin, d)),
        time_ms(&q, 10, |t| {
            written_out::rope(&t[0].narrow(2, 0, hidden)?, &cos, &sin, d)
        }),
    );
    let mlp = [values(&[b, t, inter], 2.0), values(&[b, t, inter], 3.0)];
    report(
        "silu_mul",
        time_ms(&mlp, 10, |t| silu_mul(&t[0], &t[1])),
        time_ms(&mlp, 10, |t| written_out::silu_mul(&t[0], &t[1])),
    );
    let causal: Vec<f32> = (0..t * t)
        .map(|i| if i % t > i / t { f32::MIN } else { 0.0 })
        .collect();
    let bias = Tensor::from_vec(causal, (1, 1, t, t), &Device::Cpu).unwrap();
    let qkv = [
        values(&[b, t, hidden], 4.0),
        values(&[b, t, kv * d], 5.0),
        values(&[b, t, kv * d], 6.0),
    ];
    report(
        "attention",
        time_ms(&qkv, 10, |x| gqa(0, x, heads, kv, &bias)),
        time_ms(&qkv, 10, |x| gqa(1, x, heads, kv, &bias)),
    );
    report(
        "repeat_kv",
        time_ms(&qkv, 10, |x| gqa(0, x, heads, kv, &bias)),
        time_ms(&qkv, 10, |x| gqa(2, x, heads, kv, &bias)),
    );
}

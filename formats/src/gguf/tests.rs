use super::*;
use crate::TensorCollection;

fn specs() -> (Vec<(String, Value)>, Vec<TensorSpec>) {
    let kv = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        ("llama.block_count".to_string(), Value::U32(2)),
        ("llama.rope.freq_base".to_string(), Value::F32(10000.0)),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::strings(["a", "b", "ü"]),
        ),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            Value::Bool(true),
        ),
        (
            "nested".to_string(),
            Value::Array(
                ValueType::Array,
                vec![Value::Array(ValueType::I32, vec![Value::I32(-1)])],
            ),
        ),
    ];
    let t = vec![
        TensorSpec {
            name: "w".into(),
            shape: vec![2, 32],
            ty: GgmlType::Q8_0,
        },
        TensorSpec {
            name: "n".into(),
            shape: vec![3],
            ty: GgmlType::F32,
        },
        TensorSpec {
            name: "h".into(),
            shape: vec![2, 2],
            ty: GgmlType::F16,
        },
        TensorSpec {
            name: "b".into(),
            shape: vec![5],
            ty: GgmlType::BF16,
        },
    ];
    (kv, t)
}

fn values(i: usize) -> Vec<f32> {
    let n = [64, 3, 4, 5][i];
    (0..n)
        .map(|j| (j as f32 - 7.5) * 0.37 * (i as f32 + 1.0))
        .collect()
}

fn write_sample(path: &std::path::Path) -> u64 {
    let (kv, t) = specs();
    write(path, &kv, &t, |i, buf| {
        let x = values(i);
        match t[i].ty {
            GgmlType::Q8_0 => quant::encode_q8_0(&x, buf)?,
            GgmlType::F32 => quant::encode_f32(&x, buf),
            GgmlType::F16 => quant::encode_f16(&x, buf),
            _ => quant::encode_bf16(&x, buf),
        }
        Ok(())
    })
    .unwrap()
}

#[test]
fn round_trips_metadata_and_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let size = write_sample(&path);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
    assert_eq!(
        crate::detect::detect(&path).unwrap(),
        crate::detect::Kind::Gguf
    );
    let f = GgufFile::open(&path).unwrap();
    let (kv, _) = specs();
    assert_eq!(f.kv(), kv.as_slice());
    assert_eq!(f.version(), 3);
    assert_eq!(f.data_start() % 32, 0);
    for t in f.gguf_tensors() {
        assert_eq!(t.offset % 32, 0, "{}", t.name);
    }
    assert_eq!(f.format_name(), "gguf");
    // Q8_0 reads dequantized: within half a step, plus the f16 rounding of the scale
    // (127 · 2^-11 of a step).
    let w = f.tensor("w").unwrap();
    assert_eq!(
        (w.dtype(), w.shape()),
        (crate::DType::F32, &[2usize, 32][..])
    );
    let got: Vec<f32> = w
        .data()
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    for (block, want) in got.chunks(32).zip(values(0).chunks(32)) {
        let d = want.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        for (g, x) in block.iter().zip(want) {
            assert!((g - x).abs() <= d * 0.57, "{g} vs {x}");
        }
    }
    let n = f.tensor("n").unwrap();
    let n: Vec<f32> = n
        .data()
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(n, values(1));
    assert_eq!(f.tensor("h").unwrap().dtype(), crate::DType::F16);
    assert_eq!(f.raw("b").unwrap().len(), 10);
    f.verify().unwrap();
    // Through the format-independent door too.
    let c = crate::open(&path).unwrap();
    assert_eq!(c.tensors().len(), 4);
}

#[test]
fn q8_0_matches_the_reference_rounding() {
    // Halves round away from zero; an all-zero block has scale 0.
    let mut x = vec![0f32; 32];
    x[0] = 127.0;
    x[1] = 0.5;
    x[2] = -0.5;
    x[3] = -127.0;
    let mut out = Vec::new();
    quant::encode_q8_0(&x, &mut out).unwrap();
    assert_eq!(half::f16::from_le_bytes([out[0], out[1]]).to_f32(), 1.0);
    assert_eq!(&out[2..6], &[127u8, 1, (-1i8) as u8, (-127i8) as u8]);
    let mut z = Vec::new();
    quant::encode_q8_0(&[0.0; 32], &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    assert!(quant::encode_q8_0(&[0.0; 31], &mut z).is_err());
}

/// Corrupts the sample file at `at` with `bytes` and says what opening it gives.
fn corrupt(at: usize, bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_sample(&path);
    let mut data = std::fs::read(&path).unwrap();
    data[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(&path, &data).unwrap();
    match GgufFile::open(&path) {
        Ok(_) => "opened".into(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn refuses_hostile_headers() {
    // Version, then the counts: absurd counts are refused before any allocation.
    assert!(corrupt(4, &1u32.to_le_bytes()).contains("version 1"));
    assert!(corrupt(4, &3u32.to_be_bytes()).contains("big-endian"));
    assert!(corrupt(8, &u64::MAX.to_le_bytes()).contains("tensor count"));
    assert!(corrupt(16, &(1u64 << 40).to_le_bytes()).contains("metadata count"));
    // The first key's length.
    assert!(corrupt(24, &u64::MAX.to_le_bytes()).contains("key length"));
    // The first value's type (after the 20-byte key "general.architecture").
    assert!(corrupt(24 + 8 + 20, &99u32.to_le_bytes()).contains("unknown value type"));
    // A truncated file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_sample(&path);
    let data = std::fs::read(&path).unwrap();
    std::fs::write(&path, &data[..data.len() - 40]).unwrap();
    let e = GgufFile::open(&path).unwrap_err().to_string();
    assert!(e.contains("past the end"), "{e}");
    std::fs::write(&path, b"GGUF").unwrap();
    assert!(
        GgufFile::open(&path)
            .unwrap_err()
            .to_string()
            .contains("truncated")
    );
}

#[test]
fn refuses_bad_tensor_descriptions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_sample(&path);
    let data = std::fs::read(&path).unwrap();
    // The first tensor's description starts at its name "w": length 1, then 'w'.
    let at = data
        .windows(9)
        .position(|w| w == [1, 0, 0, 0, 0, 0, 0, 0, b'w'])
        .unwrap();
    let patch = |off: usize, b: &[u8]| {
        let mut d = data.clone();
        d[at + off..at + off + b.len()].copy_from_slice(b);
        std::fs::write(&path, &d).unwrap();
        GgufFile::open(&path).map(|_| ()).unwrap_err().to_string()
    };
    // n_dims = 9.
    assert!(patch(9, &9u32.to_le_bytes()).contains("dimensions"));
    // ne[0] = 31: not whole Q8_0 blocks.
    assert!(patch(13, &31u64.to_le_bytes()).contains("whole blocks"));
    // type 99.
    assert!(patch(29, &99u32.to_le_bytes()).contains("unknown GGML type"));
    // offset 3: misaligned; offset 32: overlaps the next tensor.
    assert!(patch(33, &3u64.to_le_bytes()).contains("alignment"));
    assert!(patch(33, &96u64.to_le_bytes()).contains("overlap"));
}

#[test]
fn writer_refuses_what_readers_would() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    let t = |name: &str, shape: Vec<usize>, ty| TensorSpec {
        name: name.into(),
        shape,
        ty,
    };
    let e = write(
        &path,
        &[],
        &[t("a", vec![2, 31], GgmlType::Q8_0)],
        |_, _| Ok(()),
    )
    .unwrap_err();
    assert!(e.to_string().contains("whole blocks"), "{e}");
    let twice = [
        t("a", vec![1], GgmlType::F32),
        t("a", vec![1], GgmlType::F32),
    ];
    let e = write(&path, &[], &twice, |_, _| Ok(())).unwrap_err();
    assert!(e.to_string().contains("repeated"), "{e}");
    let mixed = Value::Array(ValueType::U32, vec![Value::U32(1), Value::I32(2)]);
    let e = write(&path, &[("k".into(), mixed)], &[], |_, _| Ok(())).unwrap_err();
    assert!(e.to_string().contains("array of u32"), "{e}");
    let e = write(&path, &[], &[t("a", vec![2], GgmlType::F32)], |_, buf| {
        buf.push(0);
        Ok(())
    })
    .unwrap_err();
    assert!(e.to_string().contains("needs 8 bytes"), "{e}");
    assert!(!path.exists(), "a failed write leaves nothing");
}

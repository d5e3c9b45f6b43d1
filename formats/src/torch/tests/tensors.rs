//! Tensor layouts in files: strided views, shared storages, 0-d and empty tensors,
//! nested trees, and the flat view.

use crate::torch::pickle::{StorageRef, TensorRef, Value};
use crate::torch::{StorageMap, TorchFile, save, save_value};
use crate::{DType, TensorCollection};

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn view(key: &str, nbytes: u64, offset: u64, shape: &[usize], stride: &[usize]) -> Value {
    Value::Tensor(Box::new(TensorRef {
        storage: StorageRef {
            key: key.into(),
            dtype: Some(DType::F32),
            nbytes,
            location: "cpu".into(),
        },
        dtype: DType::F32,
        offset,
        shape: shape.to_vec(),
        stride: stride.to_vec(),
        requires_grad: false,
    }))
}

fn s(x: &str) -> Value {
    Value::String(x.into())
}

#[test]
fn strided_shared_scalar_and_empty_views() {
    let dir = tempfile::tempdir().unwrap();
    let base: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let mut storages = StorageMap::new();
    storages.insert("s", f32s(&base));
    storages.insert("t", f32s(&[7.0, 8.0]));
    let tree = Value::OrderedDict(vec![
        (s("w"), view("s", 48, 0, &[3, 4], &[4, 1])),
        (s("wt"), view("s", 48, 0, &[4, 3], &[1, 4])),
        (s("row1"), view("s", 48, 4, &[4], &[1])),
        (s("col2"), view("s", 48, 2, &[3], &[4])),
        (s("scalar"), view("s", 48, 11, &[], &[])),
        (s("empty"), view("s", 48, 0, &[0, 4], &[4, 1])),
        (s("other"), view("t", 8, 0, &[2], &[1])),
    ]);
    let path = dir.path().join("views.bin");
    save_value(&path, &tree, &storages).unwrap();

    let f = TorchFile::open(&path).unwrap();
    f.verify().unwrap();
    let names: Vec<_> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        ["w", "wt", "row1", "col2", "scalar", "empty", "other"]
    );
    // Storages are renumbered in order of first appearance and shared.
    let records: Vec<_> = f.entry_names().collect();
    assert_eq!(
        records,
        [
            "archive/data.pkl",
            "archive/byteorder",
            "archive/data/0",
            "archive/data/1",
            "archive/version"
        ]
    );
    for n in ["w", "wt", "row1", "col2", "scalar", "empty"] {
        assert_eq!(f.tensor_ref(n).unwrap().storage.key, "0", "{n}");
    }
    assert_eq!(f.tensor_ref("other").unwrap().storage.key, "1");

    let w = f.tensor("w").unwrap();
    assert!(w.is_borrowed());
    assert_eq!(w.data(), f32s(&base).as_slice());
    let wt = f.tensor("wt").unwrap();
    assert!(!wt.is_borrowed());
    assert_eq!(wt.shape(), &[4, 3]);
    let expected: Vec<f32> = (0..4)
        .flat_map(|c| (0..3).map(move |r| (r * 4 + c) as f32))
        .collect();
    assert_eq!(wt.data(), f32s(&expected).as_slice());
    assert_eq!(
        f.tensor("row1").unwrap().data(),
        f32s(&[4., 5., 6., 7.]).as_slice()
    );
    assert_eq!(
        f.tensor("col2").unwrap().data(),
        f32s(&[2., 6., 10.]).as_slice()
    );
    let scalar = f.tensor("scalar").unwrap();
    assert_eq!(scalar.shape(), &[] as &[usize]);
    assert_eq!(scalar.data(), f32s(&[11.0]).as_slice());
    let empty = f.tensor("empty").unwrap();
    assert_eq!(empty.shape(), &[0, 4]);
    assert!(empty.data().is_empty());

    // Re-writing the file keeps the sharing; `save` gives one storage per tensor.
    let again = dir.path().join("again.bin");
    f.save_state_dict(&again).unwrap();
    let g = TorchFile::open(&again).unwrap();
    assert_eq!(g.entry_names().count(), 5);
    assert_eq!(g.tensor_ref("wt").unwrap().stride, vec![1, 4]);
    let flat = dir.path().join("flat.bin");
    save(&flat, &f).unwrap();
    let h = TorchFile::open(&flat).unwrap();
    assert_eq!(h.entry_names().count(), 3 + 7);
    for info in f.tensors() {
        assert_eq!(
            h.tensor(&info.name).unwrap(),
            f.tensor(&info.name).unwrap(),
            "{}",
            info.name
        );
        assert!(h.tensor_ref(&info.name).unwrap().is_contiguous());
    }
}

#[test]
fn refuses_views_outside_their_storage() {
    let dir = tempfile::tempdir().unwrap();
    let mut storages = StorageMap::new();
    storages.insert("s", f32s(&[0.0; 4]));
    for bad in [
        view("s", 16, 1, &[4], &[1]),
        view("s", 16, 0, &[2, 2], &[3, 1]),
        view("s", 16, 4, &[], &[]),
    ] {
        let e = save_value(dir.path().join("x.bin"), &bad, &storages).unwrap_err();
        assert!(e.to_string().contains("reaches byte"), "{e}");
    }
    // A declared storage size that disagrees with the bytes given.
    let e = save_value(
        dir.path().join("x.bin"),
        &view("s", 32, 0, &[8], &[1]),
        &storages,
    )
    .unwrap_err();
    assert!(e.to_string().contains("should hold 32 bytes"), "{e}");
    // One storage seen as two dtypes cannot be loaded by torch.
    let mut other = view("s", 16, 0, &[4], &[1]);
    if let Value::Tensor(t) = &mut other {
        t.dtype = DType::I32;
    }
    let tree = Value::List(vec![view("s", 16, 0, &[4], &[1]), other]);
    let e = save_value(dir.path().join("x.bin"), &tree, &storages).unwrap_err();
    assert!(e.to_string().contains("different dtypes"), "{e}");
}

#[test]
fn optimizer_like_tree() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = StorageMap::new();
    let mut state = Vec::new();
    for p in 0..2i64 {
        let step = st.insert_tensor(
            format!("step{p}"),
            crate::TensorView::new(DType::F32, vec![], f32s(&[3.0])).unwrap(),
        );
        let avg = st.insert_tensor(
            format!("avg{p}"),
            crate::TensorView::new(DType::F32, vec![2], f32s(&[p as f32, 1.0])).unwrap(),
        );
        state.push((
            Value::Int(p),
            Value::Dict(vec![(s("step"), step), (s("exp_avg"), avg)]),
        ));
    }
    let group = Value::Dict(vec![
        (s("lr"), Value::Float(0.001)),
        (
            s("betas"),
            Value::Tuple(vec![Value::Float(0.9), Value::Float(0.999)]),
        ),
        (s("amsgrad"), Value::Bool(false)),
        (s("foreach"), Value::None),
        (s("params"), Value::List(vec![Value::Int(0), Value::Int(1)])),
    ]);
    let tree = Value::Dict(vec![
        (s("state"), Value::Dict(state)),
        (s("param_groups"), Value::List(vec![group.clone()])),
    ]);
    let path = dir.path().join("optimizer.pt");
    save_value(&path, &tree, &st).unwrap();
    let f = TorchFile::open(&path).unwrap();
    f.verify().unwrap();
    let names: Vec<_> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "state.0.step",
            "state.0.exp_avg",
            "state.1.step",
            "state.1.exp_avg"
        ]
    );
    assert_eq!(
        f.root().get("param_groups"),
        Some(&Value::List(vec![group]))
    );
    assert_eq!(
        f.tensor("state.1.exp_avg").unwrap().data(),
        f32s(&[1.0, 1.0]).as_slice()
    );
    // Keys in the tree are the file's record keys now.
    let state = f.root().get("state").unwrap().as_dict().unwrap();
    assert_eq!(state[0].0, Value::Int(0));
    let step = state[0].1.get("step").unwrap().as_tensor().unwrap();
    assert_eq!(step.storage.key, "0");
    assert_eq!(f.read_tensor(step).unwrap().data(), f32s(&[3.0]).as_slice());
}

#[test]
fn flat_view_prefers_state_dict_entries() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = StorageMap::new();
    let t = st.insert_tensor(
        "a",
        crate::TensorView::new(DType::U8, vec![1], vec![5u8]).unwrap(),
    );
    for key in ["state_dict", "model"] {
        let tree = Value::Dict(vec![
            (s("epoch"), Value::Int(3)),
            (s(key), Value::Dict(vec![(s("layer.weight"), t.clone())])),
        ]);
        let path = dir.path().join("ckpt.pt");
        save_value(&path, &tree, &st).unwrap();
        let f = TorchFile::open(&path).unwrap();
        let names: Vec<_> = f.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["layer.weight"], "{key}");
    }
}

#[test]
fn dimensions_and_strides_past_2_pow_31() {
    // A stride-0 broadcast of one byte to 1 x 2^33, with a stride of 2^34 on the
    // size-1 dimension: written with LONG1, read back exactly, never expanded.
    let dir = tempfile::tempdir().unwrap();
    let mut st = StorageMap::new();
    st.insert("b", vec![7u8]);
    let t = TensorRef {
        storage: StorageRef {
            key: "b".into(),
            dtype: Some(DType::U8),
            nbytes: 1,
            location: "cpu".into(),
        },
        dtype: DType::U8,
        offset: 0,
        shape: vec![1, 1 << 33],
        stride: vec![1 << 34, 0],
        requires_grad: false,
    };
    let path = dir.path().join("long.bin");
    let tree = Value::Dict(vec![(s("b"), Value::Tensor(Box::new(t.clone())))]);
    save_value(&path, &tree, &st).unwrap();
    let f = TorchFile::open(&path).unwrap();
    assert_eq!(f.tensors()[0].shape, vec![1, 1 << 33]);
    let got = f.tensor_ref("b").unwrap();
    assert_eq!((got.shape.clone(), got.stride.clone()), (t.shape, t.stride));
    let e = f.tensor("b").unwrap_err();
    assert!(e.to_string().contains("not expanded"), "{e}");
}

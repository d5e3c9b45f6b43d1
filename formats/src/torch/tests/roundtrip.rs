//! Property tests: whatever kiln writes, kiln reads back identically.

use proptest::prelude::*;

use crate::torch::{TorchFile, save};
use crate::{DType, TensorCollection, TensorMap, TensorView};

fn dtype() -> impl Strategy<Value = DType> {
    proptest::sample::select(DType::ALL.to_vec())
}

/// A tensor of any dtype with a random shape of rank 0 to 4 (dimensions 0 to 5).
fn tensor() -> impl Strategy<Value = (DType, Vec<usize>, Vec<u8>)> {
    (dtype(), proptest::collection::vec(0usize..6, 0..5)).prop_flat_map(|(d, shape)| {
        let n = shape.iter().product::<usize>() * d.size();
        proptest::collection::vec(any::<u8>(), n).prop_map(move |bytes| (d, shape.clone(), bytes))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn write_then_read(tensors in proptest::collection::vec(tensor(), 0..6)) {
        let dir = tempfile::tempdir().unwrap();
        let mut map = TensorMap::new();
        for (i, (d, shape, bytes)) in tensors.iter().enumerate() {
            map.insert(format!("t{i}.{}", d.torch_name()), TensorView::new(*d, shape.clone(), bytes.clone()).unwrap()).unwrap();
        }
        let path = dir.path().join("pytorch_model.bin");
        save(&path, &map).unwrap();
        let f = TorchFile::open(&path).unwrap();
        f.verify().unwrap();
        prop_assert_eq!(f.tensors(), map.tensors());
        for info in map.tensors() {
            let got = f.tensor(&info.name).unwrap();
            prop_assert!(got.is_borrowed());
            prop_assert_eq!(got, map.tensor(&info.name).unwrap());
        }
    }
}

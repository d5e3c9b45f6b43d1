//! Tensor values as plain numbers, for comparing them in tests.

use candle_core::{Tensor, Var};

/// Every value of an f32 tensor, flattened.
pub fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Every value of an f32 variable (a model parameter), flattened.
pub fn f32_values(v: &Var) -> Vec<f32> {
    f32s(v.as_tensor())
}

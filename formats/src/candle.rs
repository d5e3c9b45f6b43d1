//! Conversions between [`TensorView`](crate::TensorView) and `candle_core::Tensor`.
//! PLACEHOLDER: being written.

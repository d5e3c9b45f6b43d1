//! The backend conformance suite on `cuda` (with the `cuda` feature). Where the driver
//! library is present but no GPU is, every test prints why and passes.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_backend_cuda as _;

kiln_backend_conformance::backend_conformance!(cuda_tests, "cuda");

//! The backend conformance suite on `metal` (macOS, with the `metal` feature).
#![cfg(all(target_os = "macos", feature = "metal"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_backend_metal as _;

kiln_backend_conformance::backend_conformance!(metal_tests, "metal");

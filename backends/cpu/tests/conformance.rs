//! The backend conformance suite on `cpu`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// Link the backend: an unreferenced crate is not linked and its registration vanishes.
use kiln_backend_cpu as _;

kiln_backend_conformance::backend_conformance!(cpu_tests, "cpu");

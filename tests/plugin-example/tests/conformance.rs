//! kiln's backend conformance suite on the plugin.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_plugin_example as _;

kiln_backend_conformance::backend_conformance!(null_tests, "null");

//! The registry finds a backend registered by a crate outside kiln, beside kiln's own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_backend_cpu as _;
use kiln_plugin_example as _;

#[test]
fn the_plugin_is_listed_after_cpu() {
    let names: Vec<_> = kiln_backend::backends().iter().map(|b| b.name()).collect();
    assert_eq!(names, ["cpu", "null"]);
}

#[test]
fn the_plugin_resolves_only_when_asked_for() {
    let s = kiln_backend::select("null").unwrap();
    assert_eq!((s.backend.name(), s.spec()), ("null", "null:0".to_string()));
    assert!(s.device.is_cpu());
    assert!(kiln_backend::resolve("null:0").unwrap().is_cpu());
    // priority -10: auto takes cpu
    assert_eq!(kiln_backend::select("auto").unwrap().backend.name(), "cpu");
    assert_eq!(
        kiln_backend::resolve("null:1").unwrap_err().to_string(),
        "null:1: only 1 device"
    );
}

#[test]
fn the_report_describes_the_plugin() {
    let report = kiln_backend::report();
    let null = report.iter().find(|r| r.name == "null").unwrap();
    assert!(null.available);
    assert_eq!(null.priority, -10);
    assert_eq!(null.capabilities.dtypes, ["f32", "f64"]);
    assert!(null.capabilities.deterministic);
}

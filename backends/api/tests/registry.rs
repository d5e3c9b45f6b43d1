//! The registry with fake backends registered in this test binary: order, device strings,
//! selection and every kind of failure message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device};
use kiln_backend::{Availability, Backend, Capabilities, DeviceInfo, Error, register_backend};

/// A configurable fake: `devices` CPU devices, or unavailable with a reason.
struct Fake {
    name: &'static str,
    priority: i32,
    unavailable: Option<&'static str>,
    devices: usize,
    panic_in_probe: bool,
    fail_device: bool,
}

const fn fake(name: &'static str, priority: i32, devices: usize) -> Fake {
    Fake {
        name,
        priority,
        unavailable: None,
        devices,
        panic_in_probe: false,
        fail_device: false,
    }
}

impl Backend for Fake {
    fn name(&self) -> &'static str {
        self.name
    }
    fn priority(&self) -> i32 {
        self.priority
    }
    fn probe(&self) -> Availability {
        if self.panic_in_probe {
            panic!("fake driver exploded\nsecond line");
        }
        match self.unavailable {
            Some(r) => Availability::Unavailable(r.into()),
            None => Availability::Available,
        }
    }
    fn devices(&self) -> Vec<DeviceInfo> {
        (0..self.devices)
            .map(|i| {
                DeviceInfo::new(i, format!("{} device {i}", self.name))
                    .with_memory(Some(1 << 30), None)
            })
            .collect()
    }
    fn device(&self, _ordinal: usize) -> candle_core::Result<Device> {
        if self.fail_device {
            Err(candle_core::Error::Msg(
                "out of fake memory\nat line two".into(),
            ))
        } else {
            Ok(Device::Cpu)
        }
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(&[DType::F32, DType::BF16]).with_threads(3)
    }
}

static FAKE_GPU: Fake = Fake {
    unavailable: Some("no fake driver found (libfake.so.1: cannot open shared object file)"),
    ..fake("fakegpu", 50, 0)
};
static ALPHA: Fake = fake("alpha", 10, 2);
static BETA: Fake = fake("beta", 10, 1);
static PANICKY: Fake = Fake {
    panic_in_probe: true,
    ..fake("panicky", 5, 1)
};
static BROKEN: Fake = Fake {
    fail_device: true,
    ..fake("broken", -5, 1)
};
static ZERO: Fake = fake("zero", -6, 0);

register_backend!(BETA);
register_backend!(ZERO);
register_backend!(FAKE_GPU);
register_backend!(ALPHA);
register_backend!(PANICKY);
register_backend!(BROKEN);

fn err(spec: &str) -> Error {
    kiln_backend::resolve(spec).unwrap_err()
}

#[test]
fn backends_are_ordered_by_priority_then_name() {
    let names: Vec<_> = kiln_backend::backends().iter().map(|b| b.name()).collect();
    assert_eq!(
        names,
        ["fakegpu", "alpha", "beta", "panicky", "broken", "zero"]
    );
    assert_eq!(kiln_backend::find("beta").unwrap().priority(), 10);
    assert!(kiln_backend::find("gamma").is_none());
}

#[test]
fn auto_takes_the_highest_priority_available_backend() {
    let s = kiln_backend::select("auto").unwrap();
    assert_eq!((s.backend.name(), s.ordinal), ("alpha", 0));
    assert_eq!(s.spec(), "alpha:0");
    assert_eq!(s.info.name, "alpha device 0");
    assert!(kiln_backend::resolve(" AUTO ").unwrap().is_cpu());
}

#[test]
fn names_and_ordinals_select_devices() {
    let s = kiln_backend::select("alpha:1").unwrap();
    assert_eq!((s.backend.name(), s.ordinal), ("alpha", 1));
    let s = kiln_backend::select("beta").unwrap();
    assert_eq!((s.backend.name(), s.ordinal), ("beta", 0));
    assert!(kiln_backend::resolve("beta:0").is_ok());
}

#[test]
fn errors_explain_in_one_line() {
    let cases = [
        ("alpha:2", "alpha:2: only 2 devices"),
        ("beta:3", "beta:3: only 1 device"),
        (
            "fakegpu",
            "fakegpu: compiled in, no fake driver found (libfake.so.1: cannot open shared object file)",
        ),
        (
            "fakegpu:1",
            "fakegpu: compiled in, no fake driver found (libfake.so.1: cannot open shared object file)",
        ),
        ("zero", "zero: compiled in, no device found"),
        ("broken", "broken: out of fake memory; at line two"),
        ("broken:0", "broken:0: out of fake memory; at line two"),
        (
            "gamma",
            "gamma: unknown backend (this build has: fakegpu, alpha, beta, panicky, broken, zero)",
        ),
    ];
    for (spec, want) in cases {
        let e = err(spec);
        assert_eq!(e.to_string(), want, "{spec}");
        assert!(!e.is_usage(), "{spec}");
    }
    let panicky = err("panicky").to_string();
    assert_eq!(
        panicky,
        "panicky: compiled in, the backend panicked: fake driver exploded; second line"
    );
}

#[test]
fn first_party_backends_that_are_not_linked_say_how_to_get_them() {
    assert_eq!(
        err("cuda").to_string(),
        "cuda: not compiled into this build; rebuild with --features cuda"
    );
    assert_eq!(
        err("cuda:1").to_string(),
        "cuda: not compiled into this build; rebuild with --features cuda"
    );
    let metal = err("metal").to_string();
    if cfg!(target_os = "macos") {
        assert_eq!(
            metal,
            "metal: not compiled into this build; rebuild with --features metal"
        );
    } else {
        assert_eq!(
            metal,
            "metal: not compiled into this build; it needs macOS: rebuild there with --features metal"
        );
    }
    assert!(
        err("cpu")
            .to_string()
            .starts_with("cpu: not compiled into this build; link kiln-backend-cpu")
    );
}

#[test]
fn malformed_device_strings_are_usage_errors() {
    for spec in [
        "", " ", "cuda:", "cuda:x", "cuda:-1", "cuda:+1", ":1", "auto:1", "cu da", "1cuda",
        "cuda:1:2",
    ] {
        let e = err(spec);
        assert!(e.is_usage(), "{spec:?}: {e}");
        assert_eq!(e.to_string().lines().count(), 1, "{spec:?}");
        assert!(e.to_string().contains("not a device string"), "{e}");
    }
}

#[test]
fn the_report_lists_every_backend_with_reasons_devices_and_capabilities() {
    let report = kiln_backend::report();
    let names: Vec<_> = report.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["fakegpu", "alpha", "beta", "panicky", "broken", "zero"]
    );
    let gpu = &report[0];
    assert!(!gpu.available && gpu.devices.is_empty());
    assert!(
        gpu.reason
            .as_deref()
            .unwrap()
            .starts_with("no fake driver found")
    );
    let alpha = &report[1];
    assert!(alpha.available && alpha.reason.is_none());
    assert_eq!(alpha.devices.len(), 2);
    assert_eq!(alpha.capabilities.dtypes, ["f32", "bf16"]);
    assert!(!report[3].available);

    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json[1]["name"], "alpha");
    assert_eq!(json[1]["available"], true);
    assert_eq!(json[1]["reason"], serde_json::Value::Null);
    assert_eq!(json[1]["devices"][1]["ordinal"], 1);
    assert_eq!(json[1]["devices"][1]["memory_total"], 1u64 << 30);
    assert_eq!(json[1]["capabilities"]["threads"], 3);
    assert_eq!(json[0]["available"], false);

    let text = kiln_backend::text(&report);
    assert!(text.contains("alpha (priority 10): available\n"), "{text}");
    assert!(
        text.contains("  alpha:1  alpha device 1, 1.0 GiB total\n"),
        "{text}"
    );
    assert!(
        text.contains("fakegpu (priority 50): unavailable: no fake driver found"),
        "{text}"
    );
    assert!(
        text.contains("cuda: not compiled into this build; rebuild with --features cuda\n"),
        "{text}"
    );
}

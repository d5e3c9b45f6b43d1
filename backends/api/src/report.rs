//! What `kiln backends` prints: every backend linked in, available or not and why.

use std::fmt;

use serde::Serialize;

use crate::backend::{Availability, DeviceInfo};
use crate::registry::{FIRST_PARTY, FirstParty, backends, devices, probe};

/// One backend as `kiln backends` describes it (serialised as one object of the `--json`
/// array).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendReport {
    /// Its name.
    pub name: String,
    /// Its priority.
    pub priority: i32,
    /// Whether it can be used here.
    pub available: bool,
    /// Why not, when it cannot.
    pub reason: Option<String>,
    /// Its devices.
    pub devices: Vec<DeviceInfo>,
    /// Its capabilities.
    pub capabilities: CapabilitiesReport,
}

/// [`Capabilities`](crate::Capabilities) with dtype names (`"bf16"`), for printing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CapabilitiesReport {
    /// Dtype names, as candle spells them.
    pub dtypes: Vec<&'static str>,
    /// Pinned host memory.
    pub pinned_host_memory: bool,
    /// Bit-identical repeated runs.
    pub deterministic: bool,
    /// CPU worker threads.
    pub threads: Option<usize>,
}

/// A report of every backend linked into the program, in [`backends`] order.
pub fn report() -> Vec<BackendReport> {
    backends()
        .into_iter()
        .map(|b| {
            let availability = probe(b);
            let (devices, availability) = match availability {
                Availability::Available => match devices(b) {
                    Ok(d) => (d, Availability::Available),
                    Err(e) => (Vec::new(), Availability::Unavailable(e)),
                },
                other => (Vec::new(), other),
            };
            let caps = b.capabilities();
            BackendReport {
                name: b.name().to_string(),
                priority: b.priority(),
                available: availability.is_available(),
                reason: availability.reason().map(str::to_string),
                devices,
                capabilities: CapabilitiesReport {
                    dtypes: caps.dtypes.iter().map(|d| d.as_str()).collect(),
                    pinned_host_memory: caps.pinned_host_memory,
                    deterministic: caps.deterministic,
                    threads: caps.threads,
                },
            }
        })
        .collect()
}

/// First-party backends this program does not contain.
pub fn missing_first_party() -> Vec<FirstParty> {
    let linked: Vec<_> = backends().iter().map(|b| b.name()).collect();
    FIRST_PARTY
        .iter()
        .filter(|f| !linked.contains(&f.name))
        .copied()
        .collect()
}

fn bytes(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    format!("{:.1} GiB", n as f64 / GIB)
}

/// A block of text: the name, status, capabilities and one line per device.
impl fmt::Display for BackendReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match &self.reason {
            None => "available".to_string(),
            Some(r) => format!("unavailable: {r}"),
        };
        writeln!(f, "{} (priority {}): {status}", self.name, self.priority)?;
        let c = &self.capabilities;
        let mut caps = format!("dtypes {}", c.dtypes.join(" "));
        if c.pinned_host_memory {
            caps += ", pinned host memory";
        }
        if c.deterministic {
            caps += ", deterministic";
        }
        if let Some(t) = c.threads {
            caps += &format!(", {t} threads");
        }
        writeln!(f, "  capabilities: {caps}")?;
        for d in &self.devices {
            let mem = match (d.memory_total, d.memory_free) {
                (Some(t), Some(fr)) => format!(", {} total, {} free", bytes(t), bytes(fr)),
                (Some(t), None) => format!(", {} total", bytes(t)),
                (None, Some(fr)) => format!(", {} free", bytes(fr)),
                (None, None) => String::new(),
            };
            writeln!(f, "  {}:{}  {}{mem}", self.name, d.ordinal, d.name)?;
        }
        Ok(())
    }
}

/// `kiln backends`' text: every report, then the first-party backends not compiled in.
pub fn text(reports: &[BackendReport]) -> String {
    let mut s = String::new();
    for r in reports {
        s += &r.to_string();
    }
    if reports.is_empty() {
        s += "no backends are linked into this program\n";
    }
    for m in missing_first_party() {
        s += &format!("{}: not compiled into this build; {}\n", m.name, m.hint());
    }
    s
}

//! Memory metrics (`skip_memory_metrics = false`), as transformers'
//! `TrainerMemoryTracker` reports them: for each stage (`init`, `train`, `eval`), the
//! change of the process's resident memory from the stage's start to its end
//! (`<stage>_mem_cpu_alloc_delta`) and how far above that end it peaked
//! (`<stage>_mem_cpu_peaked_delta`), in bytes; the first report also carries
//! `before_init_mem_cpu`, the resident memory when the trainer was made.
//!
//! transformers samples the resident size in a busy thread; kiln reads the kernel's
//! own high-water mark (`VmHWM` in `/proc/self/status`, reset at a stage's start
//! through `/proc/self/clear_refs`), which misses no peak and costs nothing while
//! the stage runs. `init` is the time from [`Trainer::new`](crate::Trainer::new) to
//! the first stage. An evaluation inside training is part of `train`, as in
//! transformers. Only Linux has these files: elsewhere the metrics are left out, with
//! one line saying so. Device memory (transformers' `_mem_gpu_` metrics) is not
//! reported.

use std::collections::BTreeMap;

/// The stages' memory, tracked across a trainer's life.
#[derive(Debug)]
pub(crate) struct MemoryTracker {
    enabled: bool,
    /// The resident size when the trainer was made.
    before_init: u64,
    /// `init`'s (begin, end, peak), once a stage has started.
    init: Option<(u64, u64, u64)>,
    init_reported: bool,
    /// The stage running and the resident size at its start.
    current: Option<(&'static str, u64)>,
}

/// The resident set size and its high-water mark, in bytes.
fn read_status() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Starts a new high-water mark at the current resident size.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

impl MemoryTracker {
    /// A tracker that measures when `enabled` and the system lets it; the second value
    /// is the line to print when it cannot.
    pub(crate) fn new(enabled: bool) -> (Self, Option<String>) {
        let status = enabled.then(read_status).flatten();
        let works = status.is_some() && reset_peak();
        let note = (enabled && !works).then(|| {
            "skip_memory_metrics false: this system has no /proc/self/status and \
             /proc/self/clear_refs to read memory from; no memory metrics are logged"
                .to_string()
        });
        let tracker = MemoryTracker {
            enabled: works,
            before_init: status.map(|s| s.0).unwrap_or(0),
            init: None,
            init_reported: false,
            current: None,
        };
        (tracker, note)
    }

    /// Starts `stage`, unless another one is running (an evaluation inside training).
    pub(crate) fn start(&mut self, stage: &'static str) {
        if !self.enabled || self.current.is_some() {
            return;
        }
        let Some((rss, peak)) = read_status() else {
            return;
        };
        if self.init.is_none() {
            self.init = Some((self.before_init, rss, peak));
        }
        reset_peak();
        self.current = Some((stage, rss));
    }

    /// Forgets the stage running (it failed), so that the next one is measured.
    pub(crate) fn cancel(&mut self) {
        self.current = None;
    }

    /// Ends `stage` (if it is the one running) and adds its metrics to `metrics` — and
    /// `init`'s, the first time.
    pub(crate) fn stop(&mut self, stage: &'static str, metrics: &mut BTreeMap<String, f64>) {
        let Some((running, begin)) = self.current else {
            return;
        };
        if running != stage {
            return;
        }
        self.current = None;
        let Some((end, peak)) = read_status() else {
            return;
        };
        if !self.init_reported
            && let Some((init_begin, init_end, init_peak)) = self.init
        {
            self.init_reported = true;
            add(metrics, "init", init_begin, init_end, init_peak);
            metrics.insert("before_init_mem_cpu".into(), init_begin as f64);
        }
        add(metrics, stage, begin, end, peak);
    }
}

/// `<stage>_mem_cpu_alloc_delta` and `<stage>_mem_cpu_peaked_delta`.
fn add(metrics: &mut BTreeMap<String, f64>, stage: &str, begin: u64, end: u64, peak: u64) {
    metrics.insert(
        format!("{stage}_mem_cpu_alloc_delta"),
        end as f64 - begin as f64,
    );
    metrics.insert(
        format!("{stage}_mem_cpu_peaked_delta"),
        peak.saturating_sub(end) as f64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stage that allocates and frees 64 MiB peaks at least that much above its end;
    /// init is reported once; a nested stage is ignored.
    #[test]
    fn a_stage_reports_its_peak_and_change() {
        let (mut t, note) = MemoryTracker::new(true);
        if note.is_some() {
            eprintln!("skipped: {note:?}");
            return;
        }
        t.start("train");
        t.start("eval");
        let mut big = vec![1u8; 64 << 20];
        big[12345] = 2;
        assert_eq!(std::hint::black_box(&big)[12345], 2);
        drop(big);
        let mut m = BTreeMap::new();
        t.stop("eval", &mut m);
        assert!(m.is_empty());
        t.stop("train", &mut m);
        assert!(
            m["train_mem_cpu_peaked_delta"] >= (60 << 20) as f64,
            "{m:?}"
        );
        assert!(m.contains_key("init_mem_cpu_alloc_delta"));
        assert!(m["before_init_mem_cpu"] > 0.0);
        let mut again = BTreeMap::new();
        t.start("eval");
        t.stop("eval", &mut again);
        assert!(again.contains_key("eval_mem_cpu_alloc_delta"));
        assert!(!again.contains_key("before_init_mem_cpu"));
        let (off, note) = MemoryTracker::new(false);
        assert!(note.is_none() && !off.enabled);
    }
}

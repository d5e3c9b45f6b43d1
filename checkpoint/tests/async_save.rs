//! Background saves: errors surface, backpressure, drop waits, reports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{Sizes, assert_content, save};
use kiln_checkpoint::Error;
use kiln_checkpoint::async_save::{AsyncSaver, SaveJob};
use kiln_checkpoint::scan::list_checkpoints;

/// A gate that jobs wait on until the test opens it.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    fn wait(&self) {
        let (m, c) = &*self.0;
        let mut open = m.lock().unwrap();
        while !*open {
            open = c.wait(open).unwrap();
        }
    }
    fn open(&self) {
        let (m, c) = &*self.0;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        c.notify_all();
    }

    /// Opens the gate when dropped, so that a failing assertion cannot leave the
    /// saver's `Drop` waiting forever on a gated job.
    fn guard(&self) -> impl Drop {
        struct G(Gate);
        impl Drop for G {
            fn drop(&mut self) {
                self.0.open();
            }
        }
        G(self.clone())
    }
}

fn gated(gate: &Gate, name: &str) -> SaveJob {
    let gate = gate.clone();
    let path = PathBuf::from(name);
    SaveJob::new(name, move || {
        gate.wait();
        Ok(path)
    })
}

fn failing(name: &str, msg: &'static str) -> SaveJob {
    SaveJob::new(name, move || Err(Error::Invalid(msg.into())))
}

#[test]
fn an_error_surfaces_at_the_next_submit_and_that_job_does_not_start() {
    let mut saver = AsyncSaver::new(1);
    saver
        .submit(failing("out/checkpoint-1", "disk on fire"))
        .unwrap();
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    // With one slot, this submit waits for the failing save, then reports it.
    let err = saver
        .submit(SaveJob::new("out/checkpoint-2", move || {
            flag.store(true, Ordering::SeqCst);
            Ok(PathBuf::from("out/checkpoint-2"))
        }))
        .unwrap_err();
    assert!(matches!(&err, Error::Background { path, .. } if path.ends_with("checkpoint-1")));
    assert_eq!(
        err.to_string(),
        "background save of out/checkpoint-1 failed: disk on fire"
    );
    assert!(!ran.load(Ordering::SeqCst));
    // Reported once, not again.
    assert!(saver.finish().unwrap().is_empty());
}

#[test]
fn an_error_surfaces_at_wait_and_at_finish() {
    let mut saver = AsyncSaver::new(2);
    saver.submit(failing("a", "first")).unwrap();
    let err = saver.wait().unwrap_err().to_string();
    assert_eq!(err, "background save of a failed: first");
    assert!(saver.wait().unwrap().is_empty());

    let mut saver = AsyncSaver::new(2);
    saver.submit(failing("b", "second")).unwrap();
    assert!(saver.finish().unwrap_err().to_string().contains("second"));
}

#[test]
fn several_errors_are_all_reported_and_panics_are_errors() {
    let gate = Gate::default();
    let mut saver = AsyncSaver::new(3);
    let _open = gate.guard(); // declared after the saver: dropped before it
    let g = gate.clone();
    saver
        .submit(SaveJob::new("x", move || {
            g.wait();
            Err(Error::Invalid("x broke".into()))
        }))
        .unwrap();
    let g = gate.clone();
    saver
        .submit(SaveJob::new("y", move || {
            g.wait();
            panic!("y panicked")
        }))
        .unwrap();
    saver.submit(gated(&gate, "z")).unwrap();
    gate.open();
    let err = saver.finish().unwrap_err().to_string();
    assert!(!err.contains('\n'), "{err}");
    assert!(
        err.contains("x broke") || err.contains("y panicked"),
        "{err}"
    );
    assert!(err.contains("1 more background saves failed"), "{err}");
    assert!(
        err.contains("x broke") && err.contains("y panicked"),
        "{err}"
    );
}

#[test]
fn backpressure_with_one_in_flight() {
    let gate = Gate::default();
    let mut saver = AsyncSaver::new(1);
    let _open = gate.guard(); // declared after the saver: dropped before it
    assert_eq!(saver.submit(gated(&gate, "1")).unwrap(), Duration::ZERO);
    assert_eq!(saver.in_flight(), 1);
    let opener = {
        let gate = gate.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            gate.open();
        })
    };
    // Blocks until the first save is done (the gate opens after 150 ms).
    let waited = saver.submit(gated(&gate, "2")).unwrap();
    assert!(waited >= Duration::from_millis(150), "{waited:?}");
    opener.join().unwrap();
    let reports = saver.finish().unwrap();
    assert_eq!(reports.len(), 2);
    let second = reports.iter().find(|r| r.path == Path::new("2")).unwrap();
    assert_eq!(second.wait, waited);
    assert!(second.stall() >= waited);
}

#[test]
fn backpressure_with_two_in_flight() {
    let gate = Gate::default();
    let mut saver = AsyncSaver::new(2);
    let _open = gate.guard(); // declared after the saver: dropped before it
    saver.submit(gated(&gate, "1")).unwrap();
    saver.submit(gated(&gate, "2")).unwrap();
    // Both are blocked on the gate, yet the second submit returned: two run at once.
    assert_eq!(saver.in_flight(), 2);
    let opener = {
        let gate = gate.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            gate.open();
        })
    };
    let waited = saver.submit(gated(&gate, "3")).unwrap();
    assert!(waited >= Duration::from_millis(150), "{waited:?}");
    assert!(saver.in_flight() <= 2);
    opener.join().unwrap();
    assert_eq!(saver.wait().unwrap().len(), 3);
    assert_eq!(saver.in_flight(), 0);
}

#[test]
fn drop_waits_for_the_save_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().to_path_buf();
    let sizes = Sizes {
        model: 1000,
        extra: 1000,
    };
    {
        let mut saver = AsyncSaver::new(1);
        let o = out.clone();
        saver
            .submit(SaveJob::new(out.join("checkpoint-3"), move || {
                std::thread::sleep(Duration::from_millis(100));
                save(&o, 3, 0, sizes)
            }))
            .unwrap();
    } // dropped here, without finish
    let list = list_checkpoints(&out).unwrap();
    assert_eq!(list.len(), 1);
    assert_content(&list[0].path, 3, 0, sizes);
}

#[test]
fn reports_have_plausible_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().to_path_buf();
    let sizes = Sizes {
        model: 1 << 20,
        extra: 1 << 19,
    };
    let mut saver = AsyncSaver::default();
    let submitted = Instant::now();
    for step in 1..=2u64 {
        let o = out.clone();
        let job = SaveJob::snapshot(
            out.join(format!("checkpoint-{step}")),
            || {
                // The host copy: the stall.
                std::thread::sleep(Duration::from_millis(20));
                Ok(step)
            },
            move |step| save(&o, step, 0, sizes),
        )
        .unwrap();
        saver.submit(job).unwrap();
    }
    // Drained as they complete.
    while saver.in_flight() > 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let reports = saver.reports();
    let elapsed = submitted.elapsed();
    assert_eq!(reports.len(), 2);
    assert!(saver.finish().unwrap().is_empty());
    let listed = list_checkpoints(&out).unwrap();
    for (r, e) in reports.iter().zip(&listed) {
        assert_eq!(r.path, e.path);
        assert_eq!(r.bytes, e.bytes);
        assert!(r.bytes > (sizes.model + sizes.extra) as u64);
        assert!(r.snapshot >= Duration::from_millis(20), "{r:?}");
        assert!(r.write > Duration::ZERO && r.write < elapsed, "{r:?}");
        assert_eq!(r.stall(), r.snapshot + r.wait);
        assert!(r.write_bytes_per_sec() > 0.0);
    }
    // The second submit waited for the first save (one slot): its wait is at most the
    // first one's write time.
    assert!(reports[1].wait <= reports[0].write + Duration::from_millis(50));
}

//! The commit protocol: success paths, multi-rank staging, injected faults at every
//! file-system operation, and a real file system that fills up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::{Arc, Barrier};

use common::{SMALL, Sizes, assert_content, copy_dir, names, save, save_with};
use kiln_checkpoint::commit::{
    Coordinator, Fault, FaultyFs, MANIFEST_NAME, Manifest, Op, SingleProcess, Staging,
};
use kiln_checkpoint::scan::{clean_leftovers, list_checkpoints, verify_checkpoint};

#[test]
fn commit_writes_manifest_last_and_renames() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out"); // created by begin
    let fs = Arc::new(FaultyFs::new());
    let path = save_with(&out, 7, 0, SMALL, fs.clone()).unwrap();
    assert_eq!(path, out.join("checkpoint-7"));
    assert_eq!(names(&out), vec!["checkpoint-7"]);
    assert_content(&path, 7, 0, SMALL);

    let m = Manifest::read(&path).unwrap();
    assert_eq!(m.step, 7);
    assert_eq!(m.kiln_version, env!("CARGO_PKG_VERSION"));
    let listed: Vec<&str> = m.files.keys().map(String::as_str).collect();
    assert_eq!(
        listed,
        ["extra_state.dat", "model.safetensors", "trainer_state.json"]
    );
    assert_eq!(m.files["extra_state.dat"], SMALL.extra as u64);

    // Order of the protocol: the manifest is the last file written, the folder is synced
    // before the rename, the parent after it.
    let log = fs.log();
    let pos = |pred: &dyn Fn(&(Op, std::path::PathBuf)) -> bool| log.iter().position(pred).unwrap();
    let last_write = log.iter().rposition(|(op, _)| *op == Op::Write).unwrap();
    assert!(log[last_write].1.ends_with(MANIFEST_NAME));
    let rename = pos(&|(op, _)| *op == Op::Rename);
    assert!(log[rename].1.ends_with(".checkpoint-7.tmp-kiln"));
    assert!(
        log[..rename]
            .iter()
            .any(|(op, p)| *op == Op::SyncDir && p.ends_with(".checkpoint-7.tmp-kiln"))
    );
    assert!(
        log[..rename]
            .iter()
            .any(|(op, p)| *op == Op::SyncFile && p.ends_with("model.safetensors"))
    );
    assert!(
        log[rename..]
            .iter()
            .any(|(op, p)| *op == Op::SyncDir && p == &out)
    );
}

#[test]
fn resave_same_step_replaces_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    save(out, 5, 0, SMALL).unwrap();
    save(out, 5, 1, SMALL).unwrap();
    assert_eq!(names(out), vec!["checkpoint-5"]);
    assert_content(&out.join("checkpoint-5"), 5, 1, SMALL);
}

#[test]
fn stale_staging_of_the_same_step_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    let stale = out.join(".checkpoint-3.tmp-kiln");
    std::fs::create_dir_all(stale.join("sub")).unwrap();
    std::fs::write(stale.join("sub/junk"), b"junk").unwrap();
    save(out, 3, 0, SMALL).unwrap();
    let m = Manifest::read(&out.join("checkpoint-3")).unwrap();
    assert!(!m.files.contains_key("sub/junk"));
    assert_eq!(names(out), vec!["checkpoint-3"]);
}

#[test]
fn interrupted_resave_is_recovered_by_the_next_commit() {
    // State after a crash between "move old aside" and "rename new in".
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    save(out, 4, 0, SMALL).unwrap();
    std::fs::rename(out.join("checkpoint-4"), out.join(".checkpoint-4.old-kiln")).unwrap();
    // A failing save of the same step must not lose the old copy.
    let fs = Arc::new(FaultyFs::new().with_fault(Fault::on(Op::Rename).path_contains("tmp-kiln")));
    assert!(save_with(out, 4, 1, SMALL, fs).is_err());
    assert_eq!(names(out), vec!["checkpoint-4"]);
    assert_content(&out.join("checkpoint-4"), 4, 0, SMALL);
    // And a successful one replaces it.
    std::fs::rename(out.join("checkpoint-4"), out.join(".checkpoint-4.old-kiln")).unwrap();
    save(out, 4, 2, SMALL).unwrap();
    assert_eq!(names(out), vec!["checkpoint-4"]);
    assert_content(&out.join("checkpoint-4"), 4, 2, SMALL);
}

#[test]
fn a_plain_file_under_the_final_name_is_not_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    std::fs::write(out.join("checkpoint-9"), b"someone's file").unwrap();
    let err = save(out, 9, 0, SMALL).unwrap_err().to_string();
    assert!(
        err.contains("checkpoint-9") && err.contains("not a folder"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(out.join("checkpoint-9")).unwrap(),
        b"someone's file"
    );
    assert_eq!(names(out), vec!["checkpoint-9"]);
}

#[test]
fn abort_removes_staging() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Staging::begin(tmp.path(), 1, &SingleProcess).unwrap();
    s.write("a.json", b"{}").unwrap();
    s.abort().unwrap();
    assert!(names(tmp.path()).is_empty());
}

/// Ranks as threads meeting at a std barrier.
struct Threads {
    rank: usize,
    world: usize,
    barrier: Arc<Barrier>,
}

impl Coordinator for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn barrier(&self) -> kiln_checkpoint::Result<()> {
        self.barrier.wait();
        Ok(())
    }
}

fn run_ranks(
    out: &Path,
    world: usize,
    main_fs: Arc<FaultyFs>,
) -> Vec<kiln_checkpoint::Result<std::path::PathBuf>> {
    let barrier = Arc::new(Barrier::new(world));
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let coord = Threads {
                    rank,
                    world,
                    barrier: barrier.clone(),
                };
                let fs = main_fs.clone();
                scope.spawn(move || {
                    let s = Staging::begin_with(out, 12, &coord, fs)?;
                    s.write(
                        format!("rng_state_{rank}.json"),
                        format!("{{\"rank\": {rank}}}").as_bytes(),
                    )?;
                    if coord.is_main() {
                        s.write("trainer_state.json", b"{\"global_step\": 12}")?;
                    }
                    s.commit(&coord)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn every_rank_writes_into_one_staging_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let results = run_ranks(tmp.path(), 4, Arc::new(FaultyFs::new()));
    let final_dir = tmp.path().join("checkpoint-12");
    for r in results {
        assert_eq!(r.unwrap(), final_dir);
    }
    let m = Manifest::read(&final_dir).unwrap();
    for rank in 0..4 {
        assert!(m.files.contains_key(&format!("rng_state_{rank}.json")));
    }
    verify_checkpoint(&final_dir).unwrap();
}

#[test]
fn other_ranks_learn_that_the_main_process_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let fs =
        Arc::new(FaultyFs::new().with_fault(Fault::on(Op::Write).path_contains(MANIFEST_NAME)));
    let results = run_ranks(tmp.path(), 3, fs);
    let errors: Vec<String> = results
        .into_iter()
        .map(|r| r.unwrap_err().to_string())
        .collect();
    assert!(errors[0].contains(MANIFEST_NAME), "{}", errors[0]);
    for e in &errors[1..] {
        assert!(
            e.contains("did not commit") && e.contains("checkpoint-12"),
            "{e}"
        );
    }
    assert!(names(tmp.path()).is_empty());
}

/// After a failed save of step 2 (generation 0 of step 1 exists): a one-line error
/// naming a path, nothing under a final name but checkpoint-1, which verifies, and no
/// staging folder.
fn assert_clean_failure(out: &Path, err: &kiln_checkpoint::Error, what: &str) {
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{what}: multi-line error: {msg}");
    assert!(
        msg.contains(&*out.to_string_lossy()),
        "{what}: no path in: {msg}"
    );
    assert_eq!(names(out), vec!["checkpoint-1"], "{what}: {msg}");
    assert_content(&out.join("checkpoint-1"), 1, 0, SMALL);
}

fn failing_save(fault: Fault, what: &str, expect_in_msg: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    save(out, 1, 0, SMALL).unwrap();
    let fs = Arc::new(FaultyFs::new().with_fault(fault));
    let err = save_with(out, 2, 0, SMALL, fs.clone()).unwrap_err();
    assert_eq!(fs.injected().len(), 1, "{what}: the fault did not fire");
    assert_clean_failure(out, &err, what);
    let msg = err.to_string();
    assert!(msg.contains("injected fault"), "{what}: {msg}");
    assert!(msg.contains(expect_in_msg), "{what}: {msg}");
}

#[test]
fn failing_write_fails_the_save() {
    // The third 64 KiB chunk of extra_state.dat.
    failing_save(
        Fault::on(Op::Write).path_contains("extra_state").nth(3),
        "write",
        "extra_state.dat",
    );
}

#[test]
fn failing_fsync_fails_the_save() {
    failing_save(
        Fault::on(Op::SyncFile).path_contains("model.safetensors"),
        "fsync",
        "model.safetensors",
    );
    failing_save(
        Fault::on(Op::SyncDir).path_contains("tmp-kiln"),
        "folder fsync",
        ".checkpoint-2.tmp-kiln",
    );
}

#[test]
fn failing_manifest_write_fails_the_save() {
    failing_save(
        Fault::on(Op::Write).path_contains(MANIFEST_NAME),
        "manifest write",
        MANIFEST_NAME,
    );
    failing_save(
        Fault::on(Op::CreateFile).path_contains(MANIFEST_NAME),
        "manifest create",
        MANIFEST_NAME,
    );
}

#[test]
fn failing_rename_fails_the_save() {
    failing_save(Fault::on(Op::Rename), "rename", "checkpoint-2");
}

#[test]
fn failing_parent_fsync_after_rename_undoes_the_rename() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("outdir");
    save(&out, 1, 0, SMALL).unwrap();
    // For a new step, the output folder is synced once: right after the rename.
    let fs = Arc::new(FaultyFs::new().with_fault(Fault::on(Op::SyncDir).path_ends_with("outdir")));
    let err = save_with(&out, 2, 0, SMALL, fs.clone()).unwrap_err();
    assert_eq!(fs.injected(), vec![(Op::SyncDir, out.clone())]);
    assert_clean_failure(&out, &err, "parent fsync");
}

/// Fails each file-system operation of a save in turn, for a new step and for a
/// re-save of an existing step, and checks the invariants after each.
#[test]
fn every_single_fault_leaves_a_consistent_folder() {
    for resave in [false, true] {
        let step = if resave { 1 } else { 2 };
        // Count the operations of a successful save.
        let tmp = tempfile::tempdir().unwrap();
        save(tmp.path(), 1, 0, SMALL).unwrap();
        let probe = Arc::new(FaultyFs::new());
        save_with(tmp.path(), step, 1, SMALL, probe.clone()).unwrap();
        let ops = probe.log().len() as u64;
        assert!(ops > 10, "{ops}");

        let template = tempfile::tempdir().unwrap();
        save(template.path(), 1, 0, SMALL).unwrap();
        for n in 1..=ops {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path();
            copy_dir(template.path(), out);
            let fs = Arc::new(FaultyFs::new().with_fault(Fault::any().nth(n)));
            let result = save_with(out, step, 1, SMALL, fs.clone());
            let (op, path) = fs.injected()[0].clone();
            let what = format!("resave={resave} op #{n} {op:?} {}", path.display());
            match result {
                Ok(p) => {
                    // Only the best-effort removal of the replaced copy may fail
                    // without failing the save.
                    assert!(resave && op == Op::Remove, "{what}: save succeeded");
                    assert_content(&p, step, 1, SMALL);
                    assert_eq!(names(out), vec![".checkpoint-1.old-kiln", "checkpoint-1"]);
                    clean_leftovers(out).unwrap();
                    assert_eq!(names(out), vec!["checkpoint-1"]);
                }
                Err(e) => {
                    let msg = e.to_string();
                    assert!(!msg.contains('\n'), "{what}: {msg}");
                    assert!(msg.contains("injected fault"), "{what}: {msg}");
                    assert_eq!(names(out), vec!["checkpoint-1"], "{what}: {msg}");
                    assert_content(&out.join("checkpoint-1"), 1, 0, SMALL);
                }
            }
            assert!(clean_leftovers(out).unwrap().is_empty(), "{what}");
            assert!(
                list_checkpoints(out)
                    .unwrap()
                    .iter()
                    .all(|e| e.is_complete())
            );
        }
    }
}

/// Mounts a 512 KiB tmpfs for the test's lifetime; unmounted on drop, even on panic.
struct Tmpfs {
    dir: std::path::PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path) -> Result<Tmpfs, String> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"size=512k".as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        use std::os::unix::ffi::OsStrExt;
        let target = std::ffi::CString::new(self.dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        if rc != 0 {
            eprintln!(
                "umount {}: {}",
                self.dir.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

#[test]
fn a_full_disk_fails_the_save_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = match Tmpfs::mount(&mnt) {
        Ok(g) => g,
        Err(e) => {
            println!(
                "skipping: cannot mount a tmpfs at {} ({e}); needs root",
                mnt.display()
            );
            return;
        }
    };
    let out = mnt.join("out");
    // ~100 KiB per checkpoint into 512 KiB.
    let sizes = Sizes {
        model: 40_000,
        extra: 60_000,
    };
    let mut saved = Vec::new();
    let err = loop {
        let step = saved.len() as u64 + 1;
        match save(&out, step, 0, sizes) {
            Ok(p) => saved.push(p),
            Err(e) => break e,
        }
        assert!(step < 20, "the disk never filled up");
    };
    let msg = err.to_string();
    println!("disk full after {} checkpoints: {msg}", saved.len());
    assert!(saved.len() >= 2, "{msg}");
    assert!(msg.contains("No space left on device"), "{msg}");
    assert!(msg.contains(&*out.to_string_lossy()), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
    let failed = saved.len() as u64 + 1;
    let expected: Vec<String> = (1..failed).map(|s| format!("checkpoint-{s}")).collect();
    assert_eq!(names(&out), expected, "no partial folder, no staging left");
    for (i, p) in saved.iter().enumerate() {
        assert_content(p, i as u64 + 1, 0, sizes);
    }
    // Rotation frees room and the next save succeeds.
    kiln_checkpoint::rotate::rotate(&out, 1, None).unwrap();
    let p = save(&out, failed, 0, sizes).unwrap();
    assert_content(&p, failed, 0, sizes);
}

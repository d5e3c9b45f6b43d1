//! Data-parallel training under `mpirun` (OpenMPI), against the same run in one process.
//!
//! These tests need OpenMPI (`mpirun`, and its headers and libclang to build kiln with
//! `--features mpi`). They build that `kiln` once, into `target/mpi` (apart from the
//! workspace's own `target/<profile>/kiln`, which has no MPI), with the `failpoints`
//! feature so that a rank can be made to crash or hang in the middle of a save. Without
//! `mpirun` they skip with the reason — except under `KILN_REQUIRE_MPI=1` (CI), where
//! that is a failure. `KILN_MPI_BIN` names an already built binary instead, and
//! `KILN_MPI_TARGET` another target folder for that build (CI caches it).
//!
//! Tolerance: 2 ranks × batch b against 1 rank × batch 2b differ only in the order of
//! float additions (the per-rank means are summed and halved instead of one mean over
//! 2b examples; the bucketed all-reduce adds in its own order). Over these 8 AdamW steps
//! that stays below 1e-7 absolute on every weight (7.2e-8 measured with `kiln diff`);
//! 1e-5 leaves room for other BLAS thread counts without hiding a real error, which moves
//! weights by the learning rate (1e-3) or more.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{Run, kiln, repo};
use kiln::checkpoint::lock::LOCK_NAME;
use kiln::formats::TensorCollection;
use kiln_test_support::fs::names;
use kiln_test_support::max_abs_diff;
use serde_json::Value;

const TOL: f32 = 1e-5;

/// The MPI-enabled `kiln`, or why there is none.
fn mpi_kiln() -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("KILN_MPI_BIN") {
            return Ok(PathBuf::from(bin));
        }
        match Command::new("mpirun").arg("--version").output() {
            Ok(o) if o.status.success() => {}
            _ => return Err("mpirun is not installed (Debian: openmpi-bin libopenmpi-dev)".into()),
        }
        // CI keeps this build in its cache (KILN_MPI_TARGET); locally it sits in target/.
        let target = std::env::var_os("KILN_MPI_TARGET")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("target/mpi"));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        eprintln!(
            "building kiln with --features mpi,failpoints into {}",
            target.display()
        );
        let out = Command::new(cargo)
            .current_dir(repo())
            .args([
                "build",
                "-p",
                "kiln-cli",
                "--features",
                "mpi,failpoints",
                "--target-dir",
            ])
            .arg(&target)
            .output()
            .map_err(|e| format!("cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cargo build -p kiln-cli --features mpi,failpoints failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(target.join("debug/kiln"))
    })
    .clone()
}

macro_rules! mpi_or_skip {
    () => {
        match mpi_kiln() {
            Ok(bin) => bin,
            Err(why) if std::env::var_os("KILN_REQUIRE_MPI").is_some_and(|v| v == "1") => {
                panic!("KILN_REQUIRE_MPI=1 but {why}")
            }
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        }
    };
}

/// One multi-process run at a time: they share 2 cores.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The small, dropout-free BERT run every test trains (8 steps, saves at 4 and 8).
fn base_args(out: &Path, batch: usize) -> Vec<String> {
    let mut a: Vec<String> = vec!["train".into(), "cli/bundled/bert-sentiment.toml".into()];
    for (k, v) in [
        ("output_dir", out.to_str().unwrap().to_string()),
        ("per_device_train_batch_size", batch.to_string()),
        ("max_steps", "8".into()),
        ("warmup_steps", "2".into()),
        ("save_strategy", "steps".into()),
        ("save_steps", "4".into()),
        ("eval_strategy", "steps".into()),
        ("eval_steps", "4".into()),
        ("logging_steps", "1".into()),
        ("load_best_model_at_end", "false".into()),
        ("disable_tqdm", "true".into()),
        ("hidden_dropout_prob", "0".into()),
        ("attention_probs_dropout_prob", "0".into()),
        ("ddp_timeout", "60".into()),
    ] {
        a.push(format!("--{k}"));
        a.push(v);
    }
    a
}

fn with(mut args: Vec<String>, extra: &[(&str, &str)]) -> Vec<String> {
    for (k, v) in extra {
        args.push(format!("--{k}"));
        args.push(v.to_string());
    }
    args
}

/// `mpirun -np <np> <bin> <args>` from the repository root; `env_rank1` is set for rank 1
/// only (MPMD syntax), e.g. a fail point.
fn mpirun(bin: &Path, np: usize, args: &[String], env_rank1: Option<&str>) -> Run {
    let mut cmd = Command::new("mpirun");
    cmd.current_dir(repo())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RUST_BACKTRACE", "0")
        .args(["--oversubscribe", "--bind-to", "none"]);
    match env_rank1 {
        None => {
            cmd.args(["-np", &np.to_string()]).arg(bin).args(args);
        }
        Some(var) => {
            assert_eq!(np, 2);
            cmd.args(["-np", "1"]).arg(bin).args(args);
            cmd.args([":", "-np", "1", "env", var]).arg(bin).args(args);
        }
    }
    let out = cmd.output().expect("mpirun");
    Run::from_output(args.to_vec(), out)
}

/// One process, without mpirun (the same binary: no launcher variables, one rank).
fn single(bin: &Path, args: &[String]) -> Run {
    let out = Command::new(bin)
        .current_dir(repo())
        .args(args)
        .output()
        .expect("kiln");
    Run::from_output(args.to_vec(), out)
}

fn weights(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let file = kiln::formats::safetensors::SafetensorsFile::open(path).unwrap();
    file.tensors()
        .iter()
        .map(|info| {
            let t = file.tensor(&info.name).unwrap();
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (info.name.clone(), v)
        })
        .collect()
}

/// The largest absolute difference between two weight files (same names, same sizes).
fn max_diff(a: &Path, b: &Path) -> f32 {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "different tensors"
    );
    let mut max = 0f32;
    for (name, x) in &a {
        let y = &b[name];
        assert_eq!(x.len(), y.len(), "{name}");
        max = max.max(max_abs_diff(x, y));
    }
    max
}

/// Panics unless `rel` (a weights file) under `a` and `b` agrees within [`TOL`].
fn assert_same_weights(a: &Path, b: &Path, rel: &str, what: &str) {
    let d = max_diff(&a.join(rel), &b.join(rel));
    assert!(d < TOL, "{what}: {rel} differs by {d}");
}

fn state(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap()).unwrap()
}

/// (step, loss) of every training log entry.
fn losses(dir: &Path) -> Vec<(u64, f64)> {
    state(dir)["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["step"].as_u64()?, e.get("loss")?.as_f64()?)))
        .collect()
}

fn eval_losses(dir: &Path) -> Vec<f64> {
    state(dir)["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.get("eval_loss")?.as_f64())
        .collect()
}

#[test]
fn two_ranks_of_b_train_as_one_rank_of_2b_and_save_once() {
    let bin = mpi_or_skip!();
    let _one_at_a_time = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    single(&bin, &base_args(&one, 16)).expect_success();
    let run = mpirun(&bin, 2, &base_args(&two, 8), None);
    run.expect_success();
    // One report, rank 0's.
    assert_eq!(
        run.stdout
            .matches("trained BertForSequenceClassification")
            .count(),
        1
    );

    assert_same_weights(
        &one,
        &two,
        "model.safetensors",
        "2 ranks x 8 vs 1 rank x 16, final",
    );
    assert_same_weights(
        &one,
        &two,
        "checkpoint-4/model.safetensors",
        "2 ranks x 8 vs 1 rank x 16, checkpoint-4",
    );
    // The same loss curve (logged rounded to 4 places, as transformers does) and the
    // same evaluation over the whole validation set (gathered from both ranks).
    let (l1, l2) = (losses(&one), losses(&two));
    assert_eq!(l1.len(), 8);
    for ((s1, a), (s2, b)) in l1.iter().zip(&l2) {
        assert_eq!(s1, s2);
        assert!((a - b).abs() <= 1e-4, "step {s1}: loss {a} vs {b}");
    }
    for (a, b) in eval_losses(&one).iter().zip(eval_losses(&two)) {
        assert!((a - b).abs() < 1e-5, "eval_loss {a} vs {b}");
    }
    assert_eq!(state(&two)["train_batch_size"], 16);

    // Exactly one copy of everything: rank 0's model files, each rank's RNG state, and
    // nothing left half-written.
    let ckpt = names(&two.join("checkpoint-8"));
    for f in [
        "rng_state_0.json",
        "rng_state_1.json",
        "model.safetensors",
        "optimizer.pt",
    ] {
        assert!(ckpt.contains(&f.to_string()), "{f} missing from {ckpt:?}");
    }
    assert!(!ckpt.contains(&"rng_state.json".to_string()));
    let top = names(&two);
    assert!(
        top.iter().all(|n| !n.starts_with('.') || n == LOCK_NAME),
        "leftovers in the output folder: {top:?}"
    );
    assert_eq!(
        top.iter().filter(|n| n.starts_with("checkpoint-")).count(),
        2,
        "{top:?}"
    );
    kiln(["verify", two.join("checkpoint-8").to_str().unwrap()]).expect_success();
}

#[test]
fn zero1_shards_resume_across_world_sizes_and_consolidate() {
    let bin = mpi_or_skip!();
    let _one_at_a_time = serial();
    let tmp = tempfile::tempdir().unwrap();
    let t = |n: &str| tmp.path().join(n);

    // 2 ranks with sharded optimizer state, uninterrupted.
    let two = t("two");
    mpirun(
        &bin,
        2,
        &with(base_args(&two, 8), &[("zero_stage", "1")]),
        None,
    )
    .expect_success();
    let c4 = two.join("checkpoint-4");
    let files = names(&c4);
    assert!(
        files.contains(&"optimizer.rank0-of-2.safetensors".to_string()),
        "{files:?}"
    );
    assert!(
        files.contains(&"optimizer.rank1-of-2.safetensors".to_string()),
        "{files:?}"
    );
    assert!(
        !files.contains(&"optimizer.safetensors".to_string())
            && !files.contains(&"optimizer.pt".to_string()),
        "{files:?}"
    );

    // 2 -> 1: one process resumes the sharded checkpoint and ends where 2 ranks ended.
    let resumed1 = t("resumed1");
    single(
        &bin,
        &with(
            base_args(&resumed1, 16),
            &[("resume_from_checkpoint", c4.to_str().unwrap())],
        ),
    )
    .expect_success();
    assert_same_weights(&two, &resumed1, "model.safetensors", "2 -> 1 resume");
    assert_eq!(losses(&resumed1).last(), losses(&two).last());

    // 1 -> 2: 2 ranks (sharded) resume a one-process checkpoint.
    let one = t("one");
    single(&bin, &base_args(&one, 16)).expect_success();
    let resumed2 = t("resumed2");
    mpirun(
        &bin,
        2,
        &with(
            base_args(&resumed2, 8),
            &[
                ("zero_stage", "1"),
                (
                    "resume_from_checkpoint",
                    one.join("checkpoint-4").to_str().unwrap(),
                ),
            ],
        ),
        None,
    )
    .expect_success();
    assert_same_weights(&one, &resumed2, "model.safetensors", "1 -> 2 resume");
    // Sharding the optimizer changes where state lives, not the arithmetic.
    assert_same_weights(
        &one,
        &two,
        "model.safetensors",
        "zero_stage 1 vs one process",
    );

    // kiln convert consolidates the shards into one optimizer.pt (torch's, numbered as
    // transformers numbers the parameters) holding every parameter's state, in a
    // checkpoint that verifies and resumes.
    let consolidated = t("consolidated");
    let run = kiln([
        "convert",
        "--consolidate",
        c4.to_str().unwrap(),
        consolidated.to_str().unwrap(),
    ]);
    run.expect_success();
    let c = consolidated.join("checkpoint-4");
    let files = names(&c);
    assert!(files.contains(&"optimizer.pt".to_string()), "{files:?}");
    assert!(
        !files.iter().any(|f| f.starts_with("optimizer.rank")),
        "{files:?}"
    );
    let opt = kiln::checkpoint::torch_state::TorchOptimizer::load(&c.join("optimizer.pt")).unwrap();
    let shard_tensors: usize = (0..2)
        .map(|r| {
            kiln::formats::safetensors::SafetensorsFile::open(
                c4.join(format!("optimizer.rank{r}-of-2.safetensors")),
            )
            .unwrap()
            .tensors()
            .len()
        })
        .sum();
    assert_eq!(2 * opt.state.len(), shard_tensors);
    // every parameter (41 in this BERT) has exp_avg and exp_avg_sq
    let params = weights(&c.join("model.safetensors")).len();
    assert_eq!(opt.state.len(), params);
    assert_eq!(
        opt.groups.iter().map(|g| g.params.len()).sum::<usize>(),
        params
    );
    kiln(["verify", c.to_str().unwrap()]).expect_success();
    // Consolidating a checkpoint that is not sharded is refused with a reason.
    kiln([
        "convert",
        "--consolidate",
        c.to_str().unwrap(),
        t("again").to_str().unwrap(),
    ])
    .expect_error(&["not sharded"]);
}

#[test]
fn a_rank_dying_mid_save_commits_nothing_and_stops_the_run() {
    let bin = mpi_or_skip!();
    let _one_at_a_time = serial();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let start = Instant::now();
    // Rank 1 panics after writing its files, before the commit barrier.
    let run = mpirun(
        &bin,
        2,
        &base_args(&out, 8),
        Some("FAILPOINTS=kiln-save-before-commit=panic"),
    );
    assert_ne!(run.code, Some(0), "the run must fail:\n{}", run.stderr);
    assert!(
        start.elapsed() < Duration::from_secs(50),
        "the other rank did not stop promptly ({:?})",
        start.elapsed()
    );
    // kiln's own notice (OpenMPI's MPI_ABORT banner is not always printed whole).
    assert!(
        run.stderr
            .contains("rank 1 of 2 panicked; ending every rank (MPI_Abort"),
        "{}",
        run.stderr
    );
    // No committed checkpoint: at most the hidden staging folder of step 4.
    let listed = names(&out);
    assert!(
        !listed.iter().any(|n| n.starts_with("checkpoint-")),
        "a checkpoint was committed: {listed:?}"
    );
    assert!(listed.iter().all(|n| n.starts_with('.')), "{listed:?}");
    let cps = kiln(["checkpoints", out.to_str().unwrap(), "--json"]);
    cps.expect_success();
    assert!(!cps.stdout.contains("checkpoint-4\""), "{}", cps.stdout);
    // A new run in the same folder cleans the leftover and commits normally.
    mpirun(&bin, 2, &base_args(&out, 8), None).expect_success();
    let listed = names(&out);
    // Only the run's lock file stays hidden there (it is never deleted).
    assert!(
        listed.iter().all(|n| !n.starts_with('.') || n == LOCK_NAME),
        "{listed:?}"
    );
    assert!(listed.contains(&"checkpoint-8".to_string()));
}

/// Runs 2 ranks with `ddp_timeout` 10 s, rank 1 with the fail point `failpoint`, and
/// checks that the run fails well before rank 1's 120 s sleep ends, with `message` on
/// stderr, and committed no checkpoint. Returns the output folder's names.
///
/// 10 s: every collective has this limit, so it must exceed how far apart the two ranks
/// can reach the first broadcast on a busy 2-core machine.
fn expect_timeout(bin: &Path, failpoint: &str, message: &str) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let start = Instant::now();
    let run = mpirun(
        bin,
        2,
        &with(base_args(&out, 8), &[("ddp_timeout", "10")]),
        Some(&format!("FAILPOINTS={failpoint}")),
    );
    let took = start.elapsed();
    assert_ne!(run.code, Some(0), "{}", run.stderr);
    assert!(
        took < Duration::from_secs(60),
        "took {took:?}: nothing timed out"
    );
    assert!(
        run.stderr.contains(message),
        "no clear timeout error ({message:?}):\n{}",
        run.stderr
    );
    let listed = names(&out);
    assert!(
        !listed.iter().any(|n| n.starts_with("checkpoint-")),
        "{listed:?}"
    );
    listed
}

#[test]
fn a_hanging_rank_makes_the_others_fail_at_the_barrier_timeout() {
    let bin = mpi_or_skip!();
    let _one_at_a_time = serial();
    // Rank 1 sleeps in its checkpoint writer before the commit barrier.
    expect_timeout(
        &bin,
        "kiln-save-before-commit=sleep(120000)",
        "rank 0 of 2: no answer from every rank at a checkpoint barrier within 10 s \
         (ddp_timeout)",
    );
}

#[test]
fn a_rank_hanging_in_training_ends_the_run_at_the_timeout() {
    let bin = mpi_or_skip!();
    let _one_at_a_time = serial();
    // Rank 1 stops answering before the gradient all-reduce of its third step; rank 0
    // waits in that all-reduce, a blocking MPI call, until the watchdog ends the run.
    let listed = expect_timeout(
        &bin,
        "kiln-train-before-all-reduce=2*off->sleep(120000)",
        "rank 0 of 2: no answer from every rank in a gradient all-reduce within 10 s \
         (ddp_timeout",
    );
    // Nothing was due to be saved yet (save_steps 4): not even a staging folder.
    assert!(
        !listed.iter().any(|n| n.contains("checkpoint-")),
        "{listed:?}"
    );
}

#[test]
fn an_mpi_launch_without_mpi_support_is_one_clear_error() {
    // The workspace's kiln has no MPI; the launcher's variable alone tells it apart.
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(common::kiln_bin())
        .current_dir(repo())
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .args(base_args(&tmp.path().join("out"), 8))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("built without MPI") && stderr.contains("--features mpi"),
        "{stderr}"
    );
    assert!(!tmp.path().join("out").exists());
}

/// SIGTERM reaching one rank stops both at the same step with one checkpoint holding
/// both ranks' state; resuming under mpirun ends with the weights of the uninterrupted
/// run, bit for bit.
#[test]
fn sigterm_to_one_rank_stops_every_rank_at_the_same_step() {
    let bin = mpi_or_skip!();
    let _one_at_a_time = serial();
    let tmp = tempfile::tempdir().unwrap();
    let args = |out: &Path| {
        with(
            base_args(out, 8),
            &[
                ("max_steps", "120"),
                ("save_steps", "40"),
                ("eval_strategy", "no"),
                ("metric_for_best_model", "none"),
                ("logging_steps", "10"),
            ],
        )
    };
    let (straight, stopped) = (tmp.path().join("straight"), tmp.path().join("stopped"));
    mpirun(&bin, 2, &args(&straight), None).expect_success();

    let child = Command::new("mpirun")
        .current_dir(repo())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["--oversubscribe", "--bind-to", "none", "-np", "2"])
        .arg(&bin)
        .args(args(&stopped))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Training is under way once the first checkpoint (step 40 of 120) is there; rank 0
    // holds the lock.
    let start = Instant::now();
    let saved = || {
        std::fs::read_dir(&stopped).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        })
    };
    while !saved() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    let lock = std::fs::read_to_string(stopped.join(".kiln-run.lock")).unwrap();
    let holder: Value = serde_json::from_str(&lock).unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &holder["pid"].to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let steps: Vec<u64> = err
        .lines()
        .filter_map(|l| l.split("stopped by SIGTERM after step ").nth(1))
        .map(|r| r.split(':').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(steps.len(), 2, "both ranks stopped: {err}");
    assert_eq!(steps[0], steps[1], "at the same step: {err}");
    let ckpt = stopped.join(format!("checkpoint-{}", steps[0]));
    kiln::checkpoint::scan::verify_checkpoint(&ckpt).unwrap();
    let files = names(&ckpt);
    assert!(
        files.contains(&"rng_state_0.json".to_string())
            && files.contains(&"rng_state_1.json".to_string()),
        "{files:?}"
    );

    mpirun(
        &bin,
        2,
        &with(args(&stopped), &[("resume_from_checkpoint", "last")]),
        None,
    )
    .expect_success();
    let d = max_diff(
        &straight.join("model.safetensors"),
        &stopped.join("model.safetensors"),
    );
    assert_eq!(d, 0.0, "stopped at step {} and resumed", steps[0]);
}

#[test]
fn lora_over_two_ranks_trains_as_one_rank_and_saves_one_adapter() {
    let bin = mpi_or_skip!();
    let _one_at_a_time = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (one, two, zero) = (
        tmp.path().join("one"),
        tmp.path().join("two"),
        tmp.path().join("zero"),
    );
    let lora = [
        ("use_peft", "true"),
        ("lora_target_modules", "all-linear"),
        ("learning_rate", "0.01"),
    ];
    single(&bin, &with(base_args(&one, 16), &lora)).expect_success();
    mpirun(&bin, 2, &with(base_args(&two, 8), &lora), None).expect_success();
    let zero1 = with(base_args(&zero, 8), &[("zero_stage", "1")]);
    mpirun(&bin, 2, &with(zero1, &lora), None).expect_success();
    for dir in [&two, &zero] {
        for rel in [
            "adapter_model.safetensors",
            "checkpoint-4/adapter_model.safetensors",
        ] {
            assert_same_weights(&one, dir, rel, "LoRA, 2 ranks x 8 vs 1 rank x 16");
        }
        let top = names(dir);
        assert!(!top.iter().any(|n| n == "model.safetensors"), "{top:?}");
    }
    kiln(["verify", two.join("checkpoint-8").to_str().unwrap()]).expect_success();
}

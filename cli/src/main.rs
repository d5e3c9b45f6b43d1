//! The `kiln` command: a thin composition of kiln's crates.
//!
//! Errors are one line on stderr (`kiln: <file>: <problem>`), exit status 1 for a
//! runtime failure and 2 for a usage error; output goes to stdout.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kiln_formats::compare::{Tolerance, compare};
use kiln_formats::convert::{Target, convert};
use kiln_formats::{DType, Format, TensorCollection};
use serde_json::json;

// Link every backend this build has: rustc does not link a crate nothing references, and
// the backend's registration would vanish with it.
use kiln_backend_cpu as _;
#[cfg(feature = "cuda")]
use kiln_backend_cuda as _;
#[cfg(feature = "metal")]
use kiln_backend_metal as _;

/// candle allocates a fresh buffer for every tensor of every step; glibc's malloc hands
/// the large ones back to the kernel on free (mmap / trim), and mimalloc by default
/// after 10 ms (purge), so every step paid page faults, and the kernel's zeroing of
/// those pages, for all its activations again. kiln uses mimalloc and keeps freed
/// memory for reuse ([`keep_freed_memory`]), as torch's caching allocator does: the
/// process stays at its peak size (`benches/README.md`, "Training speed").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns mimalloc's purging off (`mi_option_purge_delay` = -1) unless the user set
/// `MIMALLOC_PURGE_DELAY` (which mimalloc reads itself).
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // mimalloc's option enum (v2 and v3 alike: 15) has purge_delay right before
        // use_numa_nodes; libmimalloc-sys names only the latter.
        let purge_delay = libmimalloc_sys::mi_option_use_numa_nodes - 1;
        // SAFETY: mi_option_set stores one option value (atomically); it may be called at
        // any time from any thread, and purge_delay is a valid option of this mimalloc.
        unsafe { libmimalloc_sys::mi_option_set(purge_delay, -1) }
    }
}

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Train and checkpoint models outside Python"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a tensor file, shard index or model folder.
    Inspect {
        /// safetensors or PyTorch file, shard index, or model folder.
        path: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Convert between safetensors and PyTorch .bin, file to file or folder to folder;
    /// or, with --consolidate, a checkpoint's sharded optimizer state into one file.
    Convert {
        /// Input file, shard index or model folder (with --consolidate: a checkpoint
        /// folder whose optimizer state is sharded, optimizer.rank<r>-of-<w>.*).
        input: PathBuf,
        /// Output file (format from its extension), or folder (Hugging Face names);
        /// with --consolidate, the output_dir that receives checkpoint-<step>.
        output: PathBuf,
        /// Consolidate the per-rank optimizer shards of a ZeRO-1 checkpoint into one
        /// optimizer.safetensors, writing OUTPUT/checkpoint-<step> (resumable by any
        /// number of processes).
        #[arg(long, conflicts_with_all = ["to", "max_shard_size"])]
        consolidate: bool,
        /// Output format (default: OUTPUT's extension; safetensors for a folder).
        #[arg(long, value_enum)]
        to: Option<ToFormat>,
        /// Shard a folder output at this size ("5GB" = 5e9 bytes, "500MB", "1GiB").
        #[arg(long, value_parser = parse_size)]
        max_shard_size: Option<u64>,
    },
    /// Read every byte and check structure, CRCs and shard consistency.
    Verify {
        /// File, shard index, model folder or checkpoint folder.
        path: PathBuf,
    },
    /// Train a model: `kiln train [CONFIG.toml] [--FIELD VALUE ...]`; without a config, the
    /// bundled default (a small BERT sentiment classifier).
    Train {
        /// CONFIG.toml, then `--field value` pairs in transformers' spelling
        /// (`--save_steps 10`, `--train_file x.jsonl`, `--resume_from_checkpoint last`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CONFIG] [--FIELD VALUE"
        )]
        args: Vec<String>,
    },
    /// Evaluate a saved model: `kiln eval [CONFIG] --model DIR --validation_file F`;
    /// prints the metrics as JSON.
    Eval {
        /// CONFIG.toml and/or `--field value` pairs (`--model DIR` = `--init_from DIR`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CONFIG] [--FIELD VALUE"
        )]
        args: Vec<String>,
    },
    /// Run a saved model on texts.
    Predict {
        /// The saved model folder.
        #[arg(long)]
        model: PathBuf,
        /// A text (repeat for several).
        #[arg(long = "text", required = true)]
        texts: Vec<String>,
        /// GPT-2: generate this many tokens greedily.
        #[arg(long)]
        max_new_tokens: Option<usize>,
        /// Device (auto, cpu, cuda, cuda:N, metal).
        #[arg(long, default_value = "auto")]
        device: String,
        /// Print JSON (the default output is JSON too, indented).
        #[arg(long)]
        json: bool,
    },
    /// List the checkpoints of a training output folder.
    Checkpoints {
        /// The training run's output_dir.
        output_dir: PathBuf,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Compare the tensors of two files or folders of any formats.
    Diff {
        /// First collection.
        a: PathBuf,
        /// Second collection.
        b: PathBuf,
        /// Absolute tolerance; 0 with --rtol 0 (the default) means bit-identical.
        #[arg(long, default_value_t = 0.0, value_parser = parse_tolerance)]
        atol: f64,
        /// Relative tolerance (relative to B's values).
        #[arg(long, default_value_t = 0.0, value_parser = parse_tolerance)]
        rtol: f64,
    },
    /// List the device backends of this build: available or not and why, their devices
    /// and capabilities.
    Backends {
        /// Print a JSON array (or, with --device, one object) instead of text.
        #[arg(long)]
        json: bool,
        /// Select this device as training would (auto, cpu, cuda, cuda:1, metal) and print
        /// it; exit 1 with the reason when it cannot be had.
        #[arg(long, value_parser = parse_device)]
        device: Option<kiln_backend::DeviceSpec>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ToFormat {
    Safetensors,
    Bin,
}

fn parse_size(s: &str) -> Result<u64, String> {
    kiln_formats::shard::parse_size(s).map_err(|e| e.to_string())
}

fn parse_device(s: &str) -> Result<kiln_backend::DeviceSpec, String> {
    s.parse().map_err(|e: kiln_backend::Error| e.to_string())
}

fn parse_tolerance(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x >= 0.0 && x.is_finite() => Ok(x),
        _ => Err(format!("{s:?} is not a finite number >= 0")),
    }
}

/// A command's result: text for stdout and the exit status.
struct Outcome {
    stdout: String,
    code: u8,
}

/// Fixes the compute threads for the whole run in `RAYON_NUM_THREADS` and
/// `CANDLE_NUM_THREADS` unless the user set either:
///
/// - candle reads its thread count on every matrix product, and without these
///   variables that means counting the physical cores in `/proc/cpuinfo` each time
///   (about 950 file opens per step of the bundled run); kiln counts once, as candle
///   would;
/// - several processes of a data-parallel run on one node would each start one thread
///   per core and overload the node; as torchrun sets `OMP_NUM_THREADS=1`, each gets
///   `cores / processes on this node` (at least one), the process count coming from the
///   launcher (OpenMPI, MPICH, torchrun).
fn fix_compute_threads() {
    let var = |k: &str| std::env::var(k).ok();
    let set = |k: &str| var(k).is_some_and(|v| !v.is_empty());
    if set("RAYON_NUM_THREADS") || set("CANDLE_NUM_THREADS") {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = threads_per_local_process(var, cores)
        .unwrap_or_else(candle_core::utils::get_num_threads)
        .to_string();
    // SAFETY: this runs first in `main`, before kiln or any library it uses has started
    // a thread, so no other thread can read the environment concurrently.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", &threads);
        std::env::set_var("CANDLE_NUM_THREADS", &threads);
    }
}

/// The compute threads for each process when the launcher says this node runs several
/// (`var` reads the environment); `None` for a single process.
fn threads_per_local_process(var: impl Fn(&str) -> Option<String>, cores: usize) -> Option<usize> {
    let local = [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "LOCAL_WORLD_SIZE",
    ]
    .iter()
    .find_map(|k| var(k)?.trim().parse::<usize>().ok())
    .filter(|&n| n > 1)?;
    Some((cores / local).max(1))
}

fn main() -> ExitCode {
    keep_freed_memory();
    fix_compute_threads();
    // Fault tests (feature `failpoints`): FAILPOINTS=kiln-save-before-commit=panic, …
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Inspect { path, json } => inspect(&path, json),
        Command::Convert {
            input,
            output,
            consolidate: true,
            ..
        } => consolidate_cmd(&input, &output),
        Command::Convert {
            input,
            output,
            to,
            max_shard_size,
            consolidate: false,
        } => convert_cmd(&input, &output, to, max_shard_size),
        Command::Verify { path } => verify(&path),
        Command::Checkpoints { output_dir, json } => checkpoints(&output_dir, json),
        Command::Train { args } => train(&args),
        Command::Eval { args } => eval(&args),
        Command::Predict {
            model,
            texts,
            max_new_tokens,
            device,
            json,
        } => predict(&model, &texts, max_new_tokens, &device, json),
        Command::Diff { a, b, atol, rtol } => diff(&a, &b, Tolerance { atol, rtol }),
        Command::Backends { json, device } => backends(json, device.as_ref()),
    };
    match result {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (`kiln inspect x | head`) is not an error worth a message.
            let _ = stdout
                .write_all(out.stdout.as_bytes())
                .and_then(|()| stdout.flush());
            ExitCode::from(out.code)
        }
        Err(e) => {
            eprintln!("kiln: {e}");
            // A bad combination of arguments that only the command itself can see
            // (`convert a out.xyz` without --to) is a usage error, like clap's.
            let usage = matches!(
                e,
                CliError::Formats(kiln_formats::Error::Argument(_)) | CliError::Usage(_)
            ) || matches!(&e, CliError::Backend(b) if b.is_usage());
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

/// Any error a command can meet; printed as one line.
#[derive(Debug)]
enum CliError {
    Formats(kiln_formats::Error),
    Checkpoint(kiln_checkpoint::Error),
    Trainer(kiln_trainer::Error),
    Usage(String),
    Backend(kiln_backend::Error),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Formats(e) => e.fmt(f),
            CliError::Checkpoint(e) => e.fmt(f),
            CliError::Trainer(e) => e.fmt(f),
            CliError::Usage(m) => f.write_str(m),
            CliError::Backend(e) => e.fmt(f),
        }
    }
}

impl From<kiln_formats::Error> for CliError {
    fn from(e: kiln_formats::Error) -> Self {
        CliError::Formats(e)
    }
}

impl From<kiln_trainer::Error> for CliError {
    fn from(e: kiln_trainer::Error) -> Self {
        CliError::Trainer(e)
    }
}

impl From<kiln_checkpoint::Error> for CliError {
    fn from(e: kiln_checkpoint::Error) -> Self {
        CliError::Checkpoint(e)
    }
}

impl From<kiln_backend::Error> for CliError {
    fn from(e: kiln_backend::Error) -> Self {
        CliError::Backend(e)
    }
}

type CmdResult = Result<Outcome, CliError>;

fn ok(stdout: String) -> CmdResult {
    Ok(Outcome { stdout, code: 0 })
}

fn format_name(c: &dyn TensorCollection) -> &'static str {
    c.format().map(Format::name).unwrap_or("memory")
}

fn inspect(path: &std::path::Path, as_json: bool) -> CmdResult {
    let c = kiln_formats::open(path)?;
    if as_json {
        let tensors: Vec<_> = c
            .tensors()
            .iter()
            .map(|t| {
                json!({"name": t.name, "dtype": t.dtype.safetensors_name(), "shape": t.shape, "bytes": t.nbytes()})
            })
            .collect();
        let v = json!({"format": format_name(c.as_ref()), "metadata": c.metadata(), "tensors": tensors});
        return ok(format!("{v}\n"));
    }
    let mut s = String::new();
    let infos = c.tensors();
    s += &format!("path:       {}\n", path.display());
    s += &format!("format:     {}\n", format_name(c.as_ref()));
    s += &format!("tensors:    {}\n", infos.len());
    s += &format!("parameters: {}\n", c.parameter_count());
    s += &format!("bytes:      {}\n", c.total_bytes());
    let mut hist: std::collections::BTreeMap<DType, (usize, u64)> = Default::default();
    for t in infos {
        let e = hist.entry(t.dtype).or_default();
        e.0 += 1;
        e.1 += t.numel() as u64;
    }
    s += "dtypes:\n";
    for (d, (n, params)) in hist {
        s += &format!(
            "  {:<12} {n} tensors, {params} parameters\n",
            d.safetensors_name()
        );
    }
    if !c.metadata().is_empty() {
        s += "metadata:\n";
        for (k, v) in c.metadata() {
            s += &format!("  {k} = {v}\n");
        }
    }
    let width = infos.iter().map(|t| t.name.len()).max().unwrap_or(0);
    s += "\n";
    for t in infos {
        s += &format!(
            "{:<width$}  {:<11} {:?}\n",
            t.name,
            t.dtype.safetensors_name(),
            t.shape
        );
    }
    ok(s)
}

fn consolidate_cmd(input: &std::path::Path, output: &std::path::Path) -> CmdResult {
    let dir = kiln_checkpoint::training::consolidate_checkpoint(input, output)?;
    ok(format!(
        "consolidated the optimizer shards of {} into {}\n",
        input.display(),
        dir.display()
    ))
}

fn convert_cmd(
    input: &std::path::Path,
    output: &std::path::Path,
    to: Option<ToFormat>,
    max_shard_size: Option<u64>,
) -> CmdResult {
    let format = to.map(|t| match t {
        ToFormat::Safetensors => Format::Safetensors,
        ToFormat::Bin => Format::PyTorch,
    });
    let done = convert(input, &Target::from_path(output), format, max_shard_size)?;
    let mut s = format!("converted {} tensors to {}\n", done.tensors, done.format);
    for p in &done.written {
        s += &format!("  wrote   {}\n", p.display());
    }
    for p in &done.copied {
        s += &format!("  copied  {}\n", p.display());
    }
    for p in &done.removed {
        s += &format!("  removed {} (stale)\n", p.display());
    }
    for (p, why) in &done.skipped {
        s += &format!("  skipped {} ({why})\n", p.display());
    }
    ok(s)
}

fn verify(path: &std::path::Path) -> CmdResult {
    use kiln_checkpoint::commit::MANIFEST_NAME;
    use kiln_checkpoint::state::TRAINER_STATE_NAME;
    if path.is_dir()
        && (path.join(MANIFEST_NAME).exists() || path.join(TRAINER_STATE_NAME).exists())
    {
        let v = kiln_checkpoint::scan::verify_checkpoint(path)?;
        return ok(format!(
            "{}: ok (checkpoint, {:?}, {} tensor files, {} tensors, {} JSON files, {} bytes)\n",
            path.display(),
            v.completeness,
            v.tensor_files.len(),
            v.tensors,
            v.json_files,
            v.bytes
        ));
    }
    let c = kiln_formats::open(path)?;
    c.verify()?;
    // A model folder's config must parse too (a folder of bare weights has none).
    if path.is_dir() && path.join(kiln_checkpoint::model::CONFIG_NAME).exists() {
        kiln_checkpoint::model::read_config(path)?;
    }
    ok(format!(
        "{}: ok ({}, {} tensors, {} bytes)\n",
        path.display(),
        format_name(c.as_ref()),
        c.tensors().len(),
        c.total_bytes()
    ))
}

fn diff(a: &std::path::Path, b: &std::path::Path, tol: Tolerance) -> CmdResult {
    let (ca, cb) = (kiln_formats::open(a)?, kiln_formats::open(b)?);
    let diffs = compare(ca.as_ref(), cb.as_ref(), tol)?;
    let mut s = String::new();
    for d in &diffs {
        s += &format!("{d}\n");
    }
    let what = if tol.is_exact() {
        "bit-identical"
    } else {
        "equal within tolerance"
    };
    if diffs.is_empty() {
        s += &format!("{} tensors {what}\n", ca.tensors().len());
        ok(s)
    } else {
        s += &format!(
            "{} of {} tensors differ\n",
            diffs.len(),
            ca.tensors().len().max(cb.tensors().len())
        );
        Ok(Outcome { stdout: s, code: 1 })
    }
}

fn checkpoints(output_dir: &std::path::Path, as_json: bool) -> CmdResult {
    use kiln_checkpoint::scan::{Completeness, last_checkpoint, list_checkpoints};
    if !output_dir.is_dir() {
        return Err(kiln_checkpoint::Error::Invalid(format!(
            "{}: not a folder",
            output_dir.display()
        ))
        .into());
    }
    let list = list_checkpoints(output_dir)?;
    let last = last_checkpoint(output_dir)?;
    // The best checkpoint, as the newest complete checkpoint's trainer state records it.
    let best = list
        .iter()
        .rev()
        .filter(|c| c.is_complete())
        .find_map(|c| {
            kiln_checkpoint::state::TrainerState::load(
                &c.path.join(kiln_checkpoint::state::TRAINER_STATE_NAME),
            )
            .ok()
        })
        .and_then(|s| s.best_model_checkpoint)
        .and_then(|b| std::fs::canonicalize(b).ok());
    let is_best = |p: &std::path::Path| best.is_some() && std::fs::canonicalize(p).ok() == best;
    let is_last = |p: &std::path::Path| last.as_deref() == Some(p);
    let status = |c: &Completeness| match c {
        Completeness::Complete => "complete".to_string(),
        Completeness::Foreign => "complete (transformers)".to_string(),
        Completeness::Incomplete(why) => format!("incomplete: {why}"),
    };
    if as_json {
        let items: Vec<_> = list
            .iter()
            .map(|c| {
                json!({
                    "step": c.step,
                    "path": c.path.display().to_string(),
                    "bytes": c.bytes,
                    "complete": c.is_complete(),
                    "reason": match &c.completeness { Completeness::Incomplete(r) => Some(r.clone()), _ => None },
                    "best": is_best(&c.path),
                    "last": is_last(&c.path),
                })
            })
            .collect();
        return ok(format!("{}\n", serde_json::Value::Array(items)));
    }
    if list.is_empty() {
        return ok(format!("{}: no checkpoints\n", output_dir.display()));
    }
    let mut s = format!("{:>10}  {:>14}  {:<6} status\n", "step", "bytes", "marks");
    for c in &list {
        let marks = format!(
            "{}{}",
            if is_best(&c.path) { "B" } else { "" },
            if is_last(&c.path) { "L" } else { "" }
        );
        s += &format!(
            "{:>10}  {:>14}  {:<6} {}\n",
            c.step,
            c.bytes,
            marks,
            status(&c.completeness)
        );
    }
    s += "marks: B = best (best_model_checkpoint), L = last complete (what --resume_from_checkpoint last resumes)\n";
    ok(s)
}

/// A config path (optional, first) and `--field value` / `--field=value` pairs.
/// A config path and the flags after it.
type ConfigAndFlags = (Option<PathBuf>, Vec<(String, String)>);

fn config_and_flags(args: &[String]) -> Result<ConfigAndFlags, CliError> {
    let mut it = args.iter().peekable();
    let config = match it.peek() {
        Some(a) if !a.starts_with("--") => it.next().map(PathBuf::from),
        _ => None,
    };
    let mut flags = Vec::new();
    while let Some(a) = it.next() {
        let Some(name) = a.strip_prefix("--") else {
            return Err(CliError::Usage(format!(
                "unexpected argument {a:?}: flags are --field value"
            )));
        };
        let (name, value) = match name.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => {
                let v = it
                    .next()
                    .ok_or_else(|| CliError::Usage(format!("--{name} needs a value")))?;
                (name.to_string(), v.clone())
            }
        };
        flags.push((name.replace('-', "_"), value));
    }
    Ok((config, flags))
}

fn run_config(args: &[String], default: bool) -> Result<kiln_trainer::run::RunConfig, CliError> {
    use kiln_trainer::run::RunConfig;
    let (config, flags) = config_and_flags(args)?;
    let mut cfg = match config {
        Some(path) => RunConfig::from_file(&path)?,
        None if default => RunConfig::bundled_default()?,
        None => RunConfig::default(),
    };
    for (name, value) in flags {
        let name = if name == "model" {
            "init_from".to_string()
        } else {
            name
        };
        cfg.set(&name, &value)
            .map_err(|e| CliError::Usage(e.to_string()))?;
    }
    Ok(cfg)
}

fn train(args: &[String]) -> CmdResult {
    let cfg = run_config(args, true)?;
    let summary = kiln_trainer::run::train(&cfg, false)?;
    if summary.rank != 0 {
        // One report for a multi-process run: rank 0's.
        return ok(String::new());
    }
    let dir = summary.output_dir.display().to_string();
    let mut s = format!(
        "trained {} for {} steps (training loss {:.4})\n",
        summary.architecture, summary.train.global_step, summary.train.training_loss
    );
    if let Some(eval) = &summary.eval {
        s += &format!(
            "eval: {}\n",
            serde_json::to_string(eval).unwrap_or_default()
        );
    }
    let auto = if summary.architecture.ends_with("LMHeadModel") {
        "AutoModelForCausalLM"
    } else {
        "AutoModelForSequenceClassification"
    };
    s += &format!("model saved to {dir} (checkpoints: kiln checkpoints {dir})\n");
    s += "load it in Python:\n";
    s += &format!("  from transformers import {auto}, AutoTokenizer\n");
    s += &format!(
        "  model = {auto}.from_pretrained({dir:?}); tokenizer = AutoTokenizer.from_pretrained({dir:?})\n"
    );
    ok(s)
}

fn eval(args: &[String]) -> CmdResult {
    let cfg = run_config(args, false)?;
    let metrics = kiln_trainer::run::evaluate(&cfg)?;
    ok(format!(
        "{}\n",
        serde_json::to_string(&metrics).unwrap_or_default()
    ))
}

fn predict(
    model: &std::path::Path,
    texts: &[String],
    max_new_tokens: Option<usize>,
    device: &str,
    as_json: bool,
) -> CmdResult {
    let v = kiln_trainer::run::predict(model, texts, max_new_tokens, device)?;
    let text = if as_json {
        v.to_string()
    } else {
        serde_json::to_string_pretty(&v).unwrap_or_default()
    };
    ok(format!("{text}\n"))
}

fn backends(as_json: bool, device: Option<&kiln_backend::DeviceSpec>) -> CmdResult {
    if let Some(spec) = device {
        let s = kiln_backend::select(&spec.to_string())?;
        if as_json {
            let v = json!({"device": s.spec(), "backend": s.backend.name(), "info": s.info});
            return ok(format!("{v}\n"));
        }
        return ok(format!("{}: {}\n", s.spec(), s.info.name));
    }
    let report = kiln_backend::report();
    if as_json {
        return ok(format!("{}\n", json!(report)));
    }
    ok(kiln_backend::text(&report))
}

#[cfg(test)]
mod tests {
    use super::threads_per_local_process;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn local_processes_share_the_cores() {
        assert_eq!(threads_per_local_process(env(&[]), 16), None);
        let mpi = [("OMPI_COMM_WORLD_LOCAL_SIZE", "4")];
        assert_eq!(threads_per_local_process(env(&mpi), 16), Some(4));
        assert_eq!(threads_per_local_process(env(&mpi), 2), Some(1));
        let torchrun = [("LOCAL_WORLD_SIZE", "2")];
        assert_eq!(threads_per_local_process(env(&torchrun), 2), Some(1));
        // One process on the node: candle's default.
        assert_eq!(
            threads_per_local_process(env(&[("LOCAL_WORLD_SIZE", "1")]), 8),
            None
        );
        assert_eq!(
            threads_per_local_process(env(&[("MPI_LOCALNRANKS", "x")]), 8),
            None
        );
    }
}

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
    /// Convert between safetensors and PyTorch .bin, file to file or folder to folder.
    Convert {
        /// Input file, shard index or model folder.
        input: PathBuf,
        /// Output file (format from its extension), or folder (Hugging Face names).
        output: PathBuf,
        /// Output format (default: OUTPUT's extension; safetensors for a folder).
        #[arg(long, value_enum)]
        to: Option<ToFormat>,
        /// Shard a folder output at this size ("5GB" = 5e9 bytes, "500MB", "1GiB").
        #[arg(long, value_parser = parse_size)]
        max_shard_size: Option<u64>,
    },
    /// Read every byte and check structure, CRCs and shard consistency.
    Verify {
        /// File, shard index or model folder.
        path: PathBuf,
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
}

#[derive(Clone, Copy, ValueEnum)]
enum ToFormat {
    Safetensors,
    Bin,
}

fn parse_size(s: &str) -> Result<u64, String> {
    kiln_formats::shard::parse_size(s).map_err(|e| e.to_string())
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

fn main() -> ExitCode {
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
            to,
            max_shard_size,
        } => convert_cmd(&input, &output, to, max_shard_size),
        Command::Verify { path } => verify(&path),
        Command::Diff { a, b, atol, rtol } => diff(&a, &b, Tolerance { atol, rtol }),
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
            ExitCode::from(1)
        }
    }
}

type CmdResult = Result<Outcome, kiln_formats::Error>;

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
    let c = kiln_formats::open(path)?;
    c.verify()?;
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

//! The `kiln` command as a library: [`main`] parses the command line, runs the command
//! and turns its outcome into an exit status, so a plugin's whole binary is
//!
//! ```no_run
//! // use my_plugin as _;   // links the plugin's backend or architecture registrations
//! fn main() -> std::process::ExitCode {
//!     kiln_cli::main()
//! }
//! ```
//!
//! Backends (kiln-backend) and architectures ([`kiln_models::registry`]) are found in
//! what the binary links; `tests/plugin-example` adds one of each.
//!
//! - [`config`]: the TOML run config (`[model]`, `[data]`, `[training]`) and the bundled
//!   default run;
//! - [`run`]: whole runs ([`run::train`], [`run::evaluate`], [`run::predict`]) with the
//!   architecture resolved through the registry;
//! - [`gguf`]: model folders to GGUF, and GGUF files described;
//! - [`plot`]: a run's curves drawn from its `trainer_state.json`;
//! - [`Error`]: every error a command meets, and the exit status it maps to.
//!
//! Errors are one line on stderr (`kiln: <file>: <problem>`); output goes to stdout.
#![deny(missing_docs)]

mod args;
mod commands;
pub mod config;
mod error;
mod files;
pub mod gguf;
pub mod plot;
mod results;
pub mod run;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use kiln_formats::compare::Tolerance;

use crate::args::{Cli, Command};
pub use crate::error::Error;

// Link every backend and architecture this build has: rustc does not link a crate
// nothing references, and its registrations would vanish with it.
use kiln_backend_cpu as _;
#[cfg(feature = "cuda")]
use kiln_backend_cuda as _;
#[cfg(feature = "metal")]
use kiln_backend_metal as _;
use kiln_models as _;

/// Turns mimalloc's purging off (`mi_option_purge_delay` = -1) unless the user set
/// `MIMALLOC_PURGE_DELAY` (which mimalloc reads itself). It matters where mimalloc is
/// the global allocator, as the `kiln` binary makes it (its `main.rs` says why); in
/// another binary it sets an option nothing reads.
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

/// candle's element-wise pool spins 25 000 pauses (about a millisecond) after every
/// operation before it sleeps, on cores the matrix products need; kiln's steps run many
/// short operations between products, and a shorter spin is measurably faster
/// (BERT h256 benchmark, 2 threads: 2.59 → 2.72 steps/s). The user's
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` wins.
fn calm_idle_workers() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: as in `fix_compute_threads`, no other thread exists yet.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200") };
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

/// Runs the `kiln` command on this process's arguments: 0 on success, 2 for a usage
/// error, otherwise the code of the error's cause ([`Error::exit_code`]).
pub fn main() -> ExitCode {
    keep_freed_memory();
    calm_idle_workers();
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
    let result = in_compute_pool(move || run_command(cli.command));
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
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs `f` on a thread of the compute pool (rayon's, of `RAYON_NUM_THREADS` threads):
/// the thread that drives training is then one of the threads that compute, so `n`
/// threads share `n` cores, instead of a main thread competing with `n` workers that
/// spin between parallel products. The pool's threads get the main thread's 8 MiB
/// stack (candle walks graphs recursively). If no pool can be started, `f` runs here.
fn in_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let built = rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .build_global();
    match built {
        // `scope` from outside the pool runs its body on one of the pool's threads, the
        // calling thread asleep until it returns.
        Ok(()) => rayon::scope(|_| f()),
        Err(_) => f(),
    }
}

fn run_command(command: Command) -> CmdResult {
    match command {
        Command::Inspect { path, json } => files::inspect(&path, json),
        Command::Convert {
            input,
            output,
            consolidate: true,
            ..
        } => files::consolidate_cmd(&input, &output),
        Command::Convert {
            input,
            output,
            to,
            outtype,
            max_shard_size,
            consolidate: false,
        } => files::convert_cmd(&input, &output, to, outtype, max_shard_size),
        Command::Verify { path } => files::verify(&path),
        Command::Plot {
            runs,
            out,
            metrics,
            size,
        } => plot::plot_cmd(&runs, out.as_deref(), &metrics, size),
        Command::Checkpoints { output_dir, json } => files::checkpoints(&output_dir, json),
        Command::Train { args } => commands::train(&args),
        Command::Eval { args } => commands::eval(&args),
        Command::Predict {
            model,
            base,
            texts,
            max_new_tokens,
            device,
            json,
        } => commands::predict(
            &model,
            base.as_deref(),
            &texts,
            max_new_tokens,
            &device,
            json,
        ),
        Command::Merge {
            adapter,
            output,
            base,
        } => commands::merge(&adapter, &output, base.as_deref()),
        Command::Diff { a, b, atol, rtol } => files::diff(&a, &b, Tolerance { atol, rtol }),
        Command::Backends { json, device } => files::backends(json, device.as_ref()),
    }
}

/// A command's result.
type CmdResult = Result<Outcome, Error>;

fn ok(stdout: String) -> CmdResult {
    Ok(Outcome { stdout, code: 0 })
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

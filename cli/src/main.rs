//! The `kiln` binary: kiln's command ([`kiln_cli::main`]) with mimalloc as allocator.

use std::process::ExitCode;

/// candle allocates a fresh buffer for every tensor of every step; glibc's malloc hands
/// the large ones back to the kernel on free (mmap / trim), and mimalloc by default
/// after 10 ms (purge), so every step paid page faults, and the kernel's zeroing of
/// those pages, for all its activations again. kiln uses mimalloc and keeps freed
/// memory for reuse (`kiln_cli::main` turns purging off), as torch's caching allocator
/// does: the process stays at its peak size (`benches/README.md`, "Training speed").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    kiln_cli::main()
}

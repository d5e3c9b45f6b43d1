//! Criterion benches of the tensor file formats (see benches/README.md).
//!
//! `cargo bench --bench formats` writes `KILN_BENCH_BYTES` (default 1 GiB) of f32 in
//! 32 tensors under `target/bench-tmp` (or `KILN_BENCH_DIR`) and measures:
//! - `save/safetensors`, `save/bin`: writing them, as kiln saves: durably (temporary
//!   file, fsync, rename, fsync of the folder);
//! - `open_header/safetensors/<size>`: opening a safetensors file and reading its header,
//!   for the full size and for 64 MiB (the same 32 tensors, so the same header size);
//! - `read/bin`, `read/safetensors`: opening a file and reading every tensor, touching
//!   every byte (warm page cache: the file was just written).
//!
//! A format whose implementation is not there yet (an error on the first try) is
//! skipped with a line on stderr. Run by `cargo test --benches`, each bench runs once
//! on 1 MiB.

mod common;

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use kiln::formats::safetensors::{self, SafetensorsFile};
use kiln::formats::torch::{self, TorchFile};
use kiln::formats::{Result, TensorCollection};

/// The folder the benches write under: `KILN_BENCH_DIR`, else `target/bench-tmp` in the
/// repository (the same file system as the checkout). Created if missing.
fn bench_dir() -> std::io::Result<PathBuf> {
    let dir = match std::env::var_os("KILN_BENCH_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-tmp"),
    };
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

type SaveFn = fn(&Path, &dyn TensorCollection) -> Result<()>;

fn save_safetensors(path: &Path, tensors: &dyn TensorCollection) -> Result<()> {
    safetensors::save(path, tensors)
}

fn save_bin(path: &Path, tensors: &dyn TensorCollection) -> Result<()> {
    torch::save(path, tensors)
}

/// The value, or a panic naming what failed (only after a first try succeeded).
fn must<T>(r: Result<T>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

fn label(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => format!("{b}B"),
    }
}

fn formats(c: &mut Criterion) {
    // `cargo bench` passes --bench; `cargo test --benches` does not: a quick smoke run.
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let total = if bench_mode || std::env::var_os("KILN_BENCH_BYTES").is_some() {
        common::bench_bytes()
    } else {
        1 << 20
    };
    let small = if bench_mode { 64 << 20 } else { total / 4 };
    let dir = must(
        bench_dir()
            .and_then(|d| tempfile::Builder::new().prefix("formats-").tempdir_in(d))
            .map_err(|e| kiln::formats::Error::io("target/bench-tmp", e)),
        "scratch folder",
    );
    eprintln!(
        "formats: {} of f32 in {} tensors under {}",
        label(total),
        common::TENSORS,
        dir.path().display()
    );
    let tensors = must(common::model_like(total), "building tensors");

    let mut group = c.benchmark_group("save");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Bytes(total));
    let saves: [(&str, &str, SaveFn); 2] = [
        ("safetensors", "model.safetensors", save_safetensors),
        ("bin", "pytorch_model.bin", save_bin),
    ];
    for (name, file, save) in saves {
        let path = dir.path().join(file);
        if let Err(e) = save(&path, &tensors) {
            eprintln!("save/{name}: skipped: {e}");
            continue;
        }
        group.bench_function(name, |b| {
            b.iter_batched(
                // Deleting the previous file drops its dirty pages instead of writing
                // them back during the next save.
                || {
                    let _ = std::fs::remove_file(&path);
                },
                |()| must(save(&path, &tensors), name),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();

    let mut group = c.benchmark_group("open_header");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let big = dir.path().join("model.safetensors");
    let small_path = dir.path().join("small.safetensors");
    let files = match common::model_like(small)
        .and_then(|t| safetensors::save(&small_path, &t))
        .and_then(|()| safetensors::save(&big, &tensors))
    {
        Ok(()) if small == total => vec![(total, &big)],
        Ok(()) => vec![(total, &big), (small, &small_path)],
        Err(e) => {
            eprintln!("open_header/safetensors: skipped: {e}");
            vec![]
        }
    };
    for (size, path) in files {
        group.bench_function(format!("safetensors/{}", label(size)), |b| {
            b.iter(|| {
                let f = must(SafetensorsFile::open(path), "open");
                black_box(f.tensors().len())
            })
        });
    }
    let _ = std::fs::remove_file(&small_path);
    group.finish();

    let mut group = c.benchmark_group("read");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(total));
    let expected = must(common::read_all(&tensors), "checksum");
    let bin = dir.path().join("pytorch_model.bin");
    // The files of the save bench, rewritten (the save bench may have been skipped).
    let reads = [
        ("bin", &bin, torch::save(&bin, &tensors)),
        ("safetensors", &big, safetensors::save(&big, &tensors)),
    ];
    for (name, path, written) in reads {
        let read = |p: &Path| -> Result<u64> {
            if name == "bin" {
                common::read_all(&TorchFile::open(p)?)
            } else {
                common::read_all(&SafetensorsFile::open(p)?)
            }
        };
        match written.and_then(|()| read(path)) {
            Ok(sum) if sum == expected => {}
            Ok(sum) => panic!("read/{name}: checksum {sum}, wrote {expected}"),
            Err(e) => {
                eprintln!("read/{name}: skipped: {e}");
                continue;
            }
        }
        group.bench_function(name, |b| b.iter(|| must(read(path), name)));
    }
    group.finish();
}

criterion_group!(benches, formats);
criterion_main!(benches);

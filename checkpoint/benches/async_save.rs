//! What a checkpoint save costs the training loop: a synchronous save (snapshot, write,
//! fsync, commit) against the stall of an asynchronous one (snapshot + `submit`, the
//! write running in the background).
//!
//! A third function writes the same bytes raw (one file, fsynced, folder fsynced): the
//! floor a save is compared with.
//!
//! The snapshot copies into host buffers that are reused once their write finished, as
//! the Trainer's does (`HostWeights`, two buffers: one being written, one free): a fresh
//! allocation per save would measure the kernel zeroing new pages, not the copy.
//!
//! `KILN_BENCH_BYTES=1073741824 cargo bench -p kiln-checkpoint --bench async_save`
//! (default 16 MiB).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_checkpoint::async_save::{AsyncSaver, SaveJob};
use kiln_checkpoint::commit::{SingleProcess, Staging};
use kiln_checkpoint::rotate::rotate;
use kiln_formats::{DType, TensorMap, TensorView};

const MIB: usize = 1 << 20;

/// The "device" tensors: what a snapshot copies.
fn weights(bytes: usize) -> Vec<Vec<u8>> {
    (0..4).map(|i| vec![i as u8; bytes / 4]).collect()
}

/// Host buffers for snapshots, reused after their write.
type Pool = Arc<Mutex<Vec<Vec<Vec<u8>>>>>;

/// Copies `device` into a free buffer of `pool` (allocating one when none is free).
fn take_snapshot(device: &[Vec<u8>], pool: &Pool) -> Vec<Vec<u8>> {
    let free = pool.lock().unwrap().pop();
    match free {
        Some(mut buf) => {
            for (dst, src) in buf.iter_mut().zip(device) {
                dst.copy_from_slice(src);
            }
            buf
        }
        None => device.to_vec(),
    }
}

fn write_checkpoint(
    out: &std::path::Path,
    step: u64,
    snap: &[Vec<u8>],
) -> kiln_checkpoint::Result<std::path::PathBuf> {
    let s = Staging::begin(out, step, &SingleProcess)?;
    let mut map = TensorMap::new();
    for (i, t) in snap.iter().enumerate() {
        map.insert(
            format!("layer.{i}.weight"),
            TensorView::new(DType::U8, vec![t.len()], t.as_slice())?,
        )?;
    }
    kiln_formats::safetensors::save(s.dir().join("model.safetensors"), &map)?;
    s.write(
        "trainer_state.json",
        format!("{{\"global_step\": {step}}}\n").as_bytes(),
    )?;
    let path = s.commit(&SingleProcess)?;
    rotate(out, 2, None)?;
    Ok(path)
}

fn bench(c: &mut Criterion) {
    let size = std::env::var("KILN_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16 * MIB);
    let device = weights(size);
    // On the same file system as the repository (not a tmpfs /tmp).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-tmp");
    std::fs::create_dir_all(&root).unwrap();
    let tmp = tempfile::tempdir_in(&root).unwrap();
    let mut group = c.benchmark_group(format!("save_{}MiB", size / MIB));
    group
        .sample_size(10)
        .throughput(Throughput::Bytes(size as u64));

    let raw = tmp.path().join("raw.bin");
    group.bench_function("raw_write_fsync", |b| {
        b.iter(|| {
            use std::io::Write;
            let mut f = std::fs::File::create(&raw).unwrap();
            for t in &device {
                f.write_all(t).unwrap();
            }
            f.sync_all().unwrap();
            std::fs::File::open(tmp.path()).unwrap().sync_all().unwrap();
        })
    });

    let out = tmp.path().join("sync");
    let mut step = 0u64;
    let pool: Pool = Arc::default();
    group.bench_function("sync_save", |b| {
        b.iter(|| {
            step += 1;
            let snap = take_snapshot(&device, &pool);
            let path = write_checkpoint(&out, step, &snap).unwrap();
            pool.lock().unwrap().push(snap);
            path
        })
    });

    // The stall only: the background write of the previous save is waited for outside
    // the timed region (a training step would overlap it).
    let out = tmp.path().join("async");
    let mut saver = AsyncSaver::new(1);
    let mut step = 0u64;
    group.bench_function("async_stall", |b| {
        b.iter_custom(|iters| {
            let mut stall = Duration::ZERO;
            for _ in 0..iters {
                saver.wait().unwrap();
                step += 1;
                let (o, s, back) = (out.clone(), step, Arc::clone(&pool));
                let start = Instant::now();
                let job = SaveJob::snapshot(
                    out.join(format!("checkpoint-{s}")),
                    || Ok(take_snapshot(&device, &pool)),
                    move |snap| {
                        let path = write_checkpoint(&o, s, &snap);
                        back.lock().unwrap().push(snap);
                        path
                    },
                )
                .unwrap();
                saver.submit(job).unwrap();
                stall += start.elapsed();
            }
            stall
        })
    });
    group.finish();
    saver.finish().unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);

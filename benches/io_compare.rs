//! The kiln side of `benches/compare.sh`: one measurement per process, printed as one
//! JSON line on stdout. Not a criterion bench; the script builds it with
//! `cargo bench --bench io_compare --no-run` and runs the executable itself.
//!
//! ```text
//! io_compare layout                  names and shapes of the tensors (for py_io.py)
//! io_compare checksum                the checksum of the tensors, as the reads report it
//! io_compare save-st  PATH          build the tensors, then time safetensors::save
//! io_compare save-bin PATH          the same with torch::save (.bin)
//! io_compare open-st  PATH           time SafetensorsFile::open + the tensor list
//! io_compare read-st  PATH           time open + reading every byte of every tensor
//! io_compare read-bin PATH           the same for a PyTorch .bin
//! ```
//!
//! Sizes come from `KILN_BENCH_BYTES` (default 1 GiB). kiln's saves are durable: they
//! write a temporary file, fsync it, rename it and fsync the folder, so there is no
//! un-fsync'd variant here; compare.sh gets one by running this under `eatmydata`
//! (fsync made a no-op through LD_PRELOAD). Saves also report memory: the resident
//! set just before the save, and the high-water mark during it (reset just before the
//! save through `/proc/self/clear_refs`, so building the tensors does not count).
//! Run without a mode (as `cargo test --benches` does), it prints this usage and exits 0.

mod common;

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use kiln::formats::safetensors::{self, SafetensorsFile};
use kiln::formats::torch::{self, TorchFile};
use kiln::formats::{Error, Result, TensorCollection};

const USAGE: &str = "usage: io_compare layout | checksum | save-st PATH | save-bin PATH \
                     | open-st PATH | read-st PATH | read-bin PATH";

/// Header opens timed per process; the median is reported.
const OPENS: usize = 51;

fn main() -> ExitCode {
    // cargo appends --bench when it runs a bench target; it means nothing here.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = match args.as_slice() {
        [] => {
            eprintln!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        ["layout"] => Ok(layout_json()),
        ["checksum"] => common::model_like(common::bench_bytes())
            .and_then(|t| common::read_all(&t))
            .map(|sum| format!("{{\"mode\":\"checksum\",\"checksum\":{sum}}}")),
        [mode @ ("save-st" | "save-bin"), path] => save(mode, Path::new(path)),
        ["open-st", path] => open_header(Path::new(path)),
        [mode @ ("read-st" | "read-bin"), path] => read(mode, Path::new(path)),
        _ => usage(),
    };
    match out {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("io_compare: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> Result<String> {
    Err(Error::Argument(USAGE.into()))
}

fn layout_json() -> String {
    let total = common::bench_bytes();
    let tensors: Vec<String> = common::layout(total)
        .iter()
        .map(|(name, shape)| format!("{{\"name\":\"{name}\",\"shape\":{shape:?}}}"))
        .collect();
    format!(
        "{{\"bytes\":{total},\"dtype\":\"F32\",\"tensors\":[{}]}}",
        tensors.join(",")
    )
}

/// A field of /proc/self/status in KiB (`VmRSS`, `VmHWM`), 0 where unreadable.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn save(mode: &str, path: &Path) -> Result<String> {
    let total = common::bench_bytes();
    let tensors = common::model_like(total)?;
    let tensor_bytes = tensors.total_bytes();
    let rss_before = status_kib("VmRSS");
    // "5" resets the peak resident set to the current one (Linux >= 4.0).
    let hwm_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let start = Instant::now();
    if mode == "save-st" {
        safetensors::save(path, &tensors)?;
    } else {
        torch::save(path, &tensors)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let hwm = status_kib("VmHWM");
    let file_bytes = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    Ok(format!(
        "{{\"mode\":\"{mode}\",\"seconds\":{seconds:.6},\
         \"tensor_bytes\":{tensor_bytes},\"file_bytes\":{file_bytes},\
         \"rss_before_kib\":{rss_before},\"hwm_kib\":{hwm},\"hwm_reset\":{hwm_reset}}}"
    ))
}

fn open_header(path: &Path) -> Result<String> {
    let file_bytes = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let mut times = Vec::with_capacity(OPENS);
    let mut count = 0;
    for _ in 0..OPENS {
        let start = Instant::now();
        let f = SafetensorsFile::open(path)?;
        count = std::hint::black_box(f.tensors().len());
        times.push(start.elapsed().as_secs_f64());
    }
    let first = times[0];
    times.sort_by(f64::total_cmp);
    Ok(format!(
        "{{\"mode\":\"open-st\",\"seconds\":{:.9},\"first_seconds\":{first:.9},\
         \"opens\":{OPENS},\"tensors\":{count},\"file_bytes\":{file_bytes}}}",
        times[OPENS / 2]
    ))
}

fn read(mode: &str, path: &Path) -> Result<String> {
    let start = Instant::now();
    let (sum, bytes) = if mode == "read-st" {
        let f = SafetensorsFile::open(path)?;
        (common::read_all(&f)?, f.total_bytes())
    } else {
        let f = TorchFile::open(path)?;
        (common::read_all(&f)?, f.total_bytes())
    };
    let seconds = start.elapsed().as_secs_f64();
    Ok(format!(
        "{{\"mode\":\"{mode}\",\"seconds\":{seconds:.6},\"tensor_bytes\":{bytes},\
         \"checksum\":{sum}}}"
    ))
}

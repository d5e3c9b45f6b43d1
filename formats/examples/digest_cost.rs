//! What content hashes cost a checkpoint save: `safetensors::save` of N MiB of f32
//! (written, fsynced, renamed) with and without a digest recording over its folder,
//! alternating, median of 15 each.
//!
//! `cargo run --release -p kiln-formats --example digest_cost -- [MIB] [DIR]`
use std::time::Instant;

use kiln_formats::{DType, TensorMap, TensorView, digest, safetensors};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut argv = std::env::args().skip(1);
    let mib: usize = argv.next().map_or(Ok(256), |s| s.parse())?;
    let dir = argv.next().map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(dir)?;
    let mut map = TensorMap::new();
    // Eight tensors of varied content (not all-zero pages).
    let per = (mib << 20) / 8 / 4;
    for t in 0..8u32 {
        let bytes: Vec<u8> = (0..per as u32)
            .flat_map(|i| ((i.wrapping_mul(2_654_435_761) ^ t) as f32).to_le_bytes())
            .collect();
        map.insert(
            format!("w{t}"),
            TensorView::new(DType::F32, vec![per], bytes)?,
        )?;
    }
    let (mut plain, mut hashed) = (Vec::new(), Vec::new());
    for round in 0..15 {
        for with in [false, true] {
            let sub = dir.path().join(format!("r{round}-{with}"));
            std::fs::create_dir_all(&sub)?;
            let guard = with.then(|| digest::record(&sub));
            let path = sub.join("model.safetensors");
            let t = Instant::now();
            safetensors::save(&path, &map)?;
            let s = t.elapsed().as_secs_f64();
            if guard
                .as_ref()
                .is_some_and(|g| g.recording().get(&path).is_none())
            {
                return Err("no digest was recorded".into());
            }
            drop(guard);
            std::fs::remove_dir_all(&sub)?;
            if with { hashed.push(s) } else { plain.push(s) }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (p, h) = (median(&mut plain), median(&mut hashed));
    println!(
        "{mib} MiB: save {:.1} ms, with BLAKE3 {:.1} ms: {:+.1}%",
        p * 1e3,
        h * 1e3,
        (h / p - 1.0) * 100.0
    );
    Ok(())
}

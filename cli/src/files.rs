//! The commands on files: `inspect`, `convert`, `verify`, `diff`, `checkpoints`, and
//! `backends`, which describes the devices this build can use.

use kiln_formats::compare::{Tolerance, compare};
use kiln_formats::convert::{Target, convert};
use kiln_formats::{DType, Format, TensorCollection};
use serde_json::json;

use crate::args::ToFormat;
use crate::{CmdResult, Outcome, ok};

fn format_name(c: &dyn TensorCollection) -> &'static str {
    c.format_name()
}

pub(crate) fn inspect(path: &std::path::Path, as_json: bool) -> CmdResult {
    if !path.is_dir() && kiln_formats::detect::detect(path)? == kiln_formats::detect::Kind::Gguf {
        return ok(crate::gguf::inspect(path, as_json)?);
    }
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
    if path.is_dir() && kiln_checkpoint::model::is_adapter_folder(path) {
        s += &adapter_summary(path)?;
    }
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

/// The lines `kiln inspect` adds for a LoRA adapter folder: its options and base.
fn adapter_summary(dir: &std::path::Path) -> Result<String, crate::error::Error> {
    let c = kiln_checkpoint::model::read_adapter_config(dir)?;
    let text = |k: &str| match &c[k] {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    Ok(format!(
        "adapter:    {} {} r={} lora_alpha={} use_rslora={} target_modules={} modules_to_save={}\nbase:       {}\n",
        text("peft_type"),
        text("task_type"),
        text("r"),
        text("lora_alpha"),
        text("use_rslora"),
        text("target_modules"),
        text("modules_to_save"),
        text("base_model_name_or_path"),
    ))
}

pub(crate) fn consolidate_cmd(input: &std::path::Path, output: &std::path::Path) -> CmdResult {
    let dir = kiln_checkpoint::training::consolidate_checkpoint(input, output)?;
    ok(format!(
        "consolidated the optimizer shards of {} into {}\n",
        input.display(),
        dir.display()
    ))
}

pub(crate) fn convert_cmd(
    input: &std::path::Path,
    output: &std::path::Path,
    to: Option<ToFormat>,
    outtype: Option<kiln_formats::gguf::FileType>,
    max_shard_size: Option<u64>,
) -> CmdResult {
    let to_gguf = match to {
        Some(t) => matches!(t, ToFormat::Gguf),
        None => output
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf")),
    };
    if to_gguf {
        if max_shard_size.is_some() {
            return Err(crate::error::Error::Usage(
                "--max_shard_size: kiln writes a GGUF file whole (no split files)".into(),
            ));
        }
        let file_type = outtype.unwrap_or(kiln_formats::gguf::FileType::F16);
        let done = crate::gguf::export(input, output, file_type)?;
        let types: Vec<String> = done.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
        let mut s = format!(
            "converted {} to GGUF ({}, outtype {}): {} ({} bytes; tensors: {})\n",
            input.display(),
            done.arch,
            file_type.name(),
            done.path.display(),
            done.bytes,
            types.join(", ")
        );
        for n in &done.notes {
            s += &format!("  note: {n}\n");
        }
        return ok(s);
    }
    if outtype.is_some() {
        return Err(crate::error::Error::Usage(
            "--outtype is for GGUF output (OUTPUT.gguf or --to gguf)".into(),
        ));
    }
    let format = to.map(|t| match t {
        ToFormat::Safetensors | ToFormat::Gguf => Format::Safetensors,
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

pub(crate) fn verify(path: &std::path::Path) -> CmdResult {
    use kiln_checkpoint::commit::MANIFEST_NAME;
    use kiln_checkpoint::state::TRAINER_STATE_NAME;
    if path.is_dir()
        && (path.join(MANIFEST_NAME).exists() || path.join(TRAINER_STATE_NAME).exists())
    {
        let v = kiln_checkpoint::scan::verify_checkpoint(path)?;
        let kind = match v.completeness {
            kiln_checkpoint::scan::Completeness::Foreign => "transformers checkpoint",
            _ => "kiln checkpoint, every digest matches",
        };
        return ok(format!(
            "{}: ok ({kind}, {} tensor files, {} tensors, {} JSON files, {} bytes)\n",
            path.display(),
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

pub(crate) fn diff(a: &std::path::Path, b: &std::path::Path, tol: Tolerance) -> CmdResult {
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

pub(crate) fn checkpoints(output_dir: &std::path::Path, as_json: bool) -> CmdResult {
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

pub(crate) fn backends(as_json: bool, device: Option<&kiln_backend::DeviceSpec>) -> CmdResult {
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

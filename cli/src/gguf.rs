//! `kiln convert MODEL_DIR OUT.gguf [--outtype …]` and `kiln inspect FILE.gguf`: a
//! GPT-2 or Llama-family folder written as llama.cpp's convert_hf_to_gguf.py writes it
//! (the architecture's layout from kiln-models, the tokenizer's keys from kiln-data,
//! the file through kiln-formats), and a GGUF file's header described.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_formats::gguf::{self, FileType, GgmlType, GgufFile, TensorSpec, Value, quant};
use kiln_models::gguf::{Source, Transform};
use serde_json::json;

use crate::error::Error;

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct Exported {
    /// The file.
    pub path: PathBuf,
    /// `general.architecture`.
    pub arch: &'static str,
    /// Tensors written, by GGML type.
    pub types: BTreeMap<&'static str, usize>,
    /// The file's size.
    pub bytes: u64,
    /// What the file cannot say that the folder does.
    pub notes: Vec<String>,
}

/// Writes the model folder `dir` as the GGUF file `out`, its 2-D weights as `file_type`.
pub fn export(dir: &Path, out: &Path, file_type: FileType) -> Result<Exported, Error> {
    if kiln_peft::folder::is_adapter(dir) {
        return Err(Error::Usage(format!(
            "{} is a LoRA adapter: merge it into its base first (kiln merge {} MERGED), then convert MERGED",
            dir.display(),
            dir.display()
        )));
    }
    let config = kiln_checkpoint::model::read_config(dir)?;
    let name = config["architectures"][0].as_str().unwrap_or("");
    let arch = kiln_models::registry::find(name)?;
    let layout_fn = arch.gguf.ok_or_else(|| {
        Error::Config(format!(
            "{}: {name} has no GGUF form (kiln writes GPT-2, Llama, Mistral, Qwen2 and Qwen3, the architectures llama.cpp runs)",
            dir.display()
        ))
    })?;
    let weights = kiln_formats::open(dir)?;
    let names: Vec<String> = weights.tensors().iter().map(|t| t.name.clone()).collect();
    let layout = layout_fn(&config, &names).map_err(|e| in_dir(dir, e.into()))?;
    let vocab_size = config["vocab_size"]
        .as_u64()
        .ok_or_else(|| Error::Config(format!("{}: config.json has no vocab_size", dir.display())))?
        as usize;
    let tokenizer = kiln_data::tokenize::Tokenizer::from_dir(dir)?;
    let empty = serde_json::Map::new();
    let tokenizer_md = tokenizer
        .gguf_metadata(vocab_size, config.as_object().unwrap_or(&empty))
        .map_err(|e| in_dir(dir, e.into()))?;

    let folder_name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String(layout.arch.into()),
        ),
        ("general.type".to_string(), Value::String("model".into())),
        ("general.name".to_string(), Value::String(folder_name)),
    ];
    metadata.extend(layout.metadata.iter().cloned());
    metadata.push(("general.file_type".into(), Value::U32(file_type.id())));
    metadata.push((
        "general.quantization_version".into(),
        Value::U32(gguf::QUANTIZATION_VERSION),
    ));
    metadata.extend(tokenizer_md);

    let mut specs = Vec::with_capacity(layout.tensors.len());
    for t in &layout.tensors {
        let shape = match &t.source {
            Source::Computed(v) => vec![v.len()],
            Source::Tensor { name, transform } => {
                let info = weights
                    .info(name)
                    .ok_or_else(|| kiln_formats::Error::NotFound(name.clone()))?;
                match (transform, info.shape.as_slice()) {
                    (Transform::Transpose, [r, c]) => vec![*c, *r],
                    _ => info.shape.clone(),
                }
            }
        };
        let ty = gguf::storage_type(&t.name, &shape, file_type);
        specs.push(TensorSpec {
            name: t.name.clone(),
            shape,
            ty,
        });
    }
    let bytes = gguf::write(out, &metadata, &specs, |i, buf| {
        let (mut x, shape) = match &layout.tensors[i].source {
            Source::Computed(v) => (v.clone(), vec![v.len()]),
            Source::Tensor { name, transform } => {
                let view = weights.tensor(name)?;
                let mut x = gguf::to_f32(&view)?;
                let shape = transform
                    .apply(&mut x, view.shape())
                    .map_err(|e| kiln_formats::Error::Tensor(format!("{name}: {e}")))?;
                (x, shape)
            }
        };
        debug_assert_eq!(shape, specs[i].shape);
        encode(&mut x, specs[i].ty, buf)
    })?;
    let mut types = BTreeMap::new();
    for s in &specs {
        *types.entry(s.ty.name()).or_insert(0) += 1;
    }
    Ok(Exported {
        path: out.to_path_buf(),
        arch: layout.arch,
        types,
        bytes,
        notes: layout.notes,
    })
}

fn in_dir(dir: &Path, e: Error) -> Error {
    Error::Config(format!("{}: {e}", dir.display()))
}

fn encode(x: &mut [f32], ty: GgmlType, buf: &mut Vec<u8>) -> kiln_formats::Result<()> {
    match ty {
        GgmlType::F32 => quant::encode_f32(x, buf),
        GgmlType::F16 => quant::encode_f16(x, buf),
        GgmlType::BF16 => quant::encode_bf16(x, buf),
        GgmlType::Q8_0 => quant::encode_q8_0(x, buf)?,
        other => {
            return Err(kiln_formats::Error::Unsupported(format!("writing {other}")));
        }
    }
    Ok(())
}

/// `kiln inspect` of a GGUF file: version, metadata (arrays summarised), tensors with
/// their GGML types. Shapes are row-major, as for the other formats kiln inspects (the
/// torch shape); gguf-dump prints the same dims reversed (GGML's `ne` order).
pub(crate) fn inspect(path: &Path, as_json: bool) -> Result<String, Error> {
    let f = GgufFile::open(path)?;
    if as_json {
        let md: serde_json::Map<String, serde_json::Value> = f
            .kv()
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect();
        let tensors: Vec<_> = f
            .gguf_tensors()
            .iter()
            .map(|t| json!({"name": t.name, "type": t.ty.name(), "shape": t.shape, "bytes": t.nbytes}))
            .collect();
        let v = json!({"format": "gguf", "version": f.version(), "alignment": f.alignment(),
            "metadata": md, "tensors": tensors});
        return Ok(format!("{v}\n"));
    }
    let mut s = String::new();
    s += &format!("path:       {}\n", path.display());
    s += &format!(
        "format:     gguf (version {}, alignment {})\n",
        f.version(),
        f.alignment()
    );
    s += &format!("tensors:    {}\n", f.gguf_tensors().len());
    let params: u64 = f
        .gguf_tensors()
        .iter()
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum();
    s += &format!("parameters: {params}\n");
    s += &format!(
        "bytes:      {}\n",
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    );
    let mut hist: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for t in f.gguf_tensors() {
        let e = hist.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.shape.iter().product::<usize>() as u64;
    }
    s += "types:\n";
    for (ty, (n, p)) in hist {
        s += &format!("  {ty:<12} {n} tensors, {p} parameters\n");
    }
    s += "metadata:\n";
    for (k, v) in f.kv() {
        s += &format!("  {k} = {}\n", v.summary());
    }
    let width = f
        .gguf_tensors()
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(0);
    s += "\n";
    for t in f.gguf_tensors() {
        s += &format!("{:<width$}  {:<6} {:?}\n", t.name, t.ty.name(), t.shape);
    }
    Ok(s)
}

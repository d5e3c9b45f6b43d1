//! The Llama family in GGUF, as convert_hf_to_gguf.py writes it: Llama and Mistral as
//! `llama` (q/k rows permuted to llama.cpp's interleaved rotation), Qwen2 as `qwen2` and
//! Qwen3 as `qwen3` (half-split rotation, copied as they are).

use kiln_formats::gguf::Value;
use serde_json::Value as Json;

use super::{LlamaConfig, LlamaVariant};
use crate::gguf::{GgufLayout, GgufTensor, Source, Transform, block, map_names, u32_of};
use crate::{Error, Result};

/// The layout of a Llama-family folder.
pub(crate) fn layout(config: &Json, tensors: &[String]) -> Result<GgufLayout> {
    let c = LlamaConfig::from_json(config)?;
    let arch = match c.variant {
        LlamaVariant::Llama | LlamaVariant::Mistral => "llama",
        LlamaVariant::Qwen2 => "qwen2",
        LlamaVariant::Qwen3 => "qwen3",
    };
    let key = |k: &str| format!("{arch}.{k}");
    let mut md = vec![
        (
            key("block_count"),
            u32_of("num_hidden_layers", c.num_hidden_layers)?,
        ),
        (
            key("context_length"),
            u32_of("max_position_embeddings", c.max_position_embeddings)?,
        ),
        (
            key("embedding_length"),
            u32_of("hidden_size", c.hidden_size)?,
        ),
        (
            key("feed_forward_length"),
            u32_of("intermediate_size", c.intermediate_size)?,
        ),
        (
            key("attention.head_count"),
            u32_of("num_attention_heads", c.num_attention_heads)?,
        ),
    ];
    md.push((
        key("attention.head_count_kv"),
        u32_of("num_key_value_heads", c.kv_heads())?,
    ));
    let rope = &c.rope_parameters;
    md.push((key("rope.freq_base"), Value::F32(rope.rope_theta as f32)));
    md.push((
        key("attention.layer_norm_rms_epsilon"),
        Value::F32(c.rms_norm_eps as f32),
    ));
    if let Some(head_dim) = c.head_dim {
        md.push((key("attention.key_length"), u32_of("head_dim", head_dim)?));
        md.push((key("attention.value_length"), u32_of("head_dim", head_dim)?));
    }
    let mut notes = Vec::new();
    match rope.rope_type.as_str() {
        "linear" => {
            md.push((key("rope.scaling.type"), Value::String("linear".into())));
            md.push((key("rope.scaling.factor"), Value::F32(rope.factor.unwrap_or(1.0) as f32)));
        }
        "dynamic" => notes.push(format!(
            "rope_type \"dynamic\": llama.cpp has no dynamic NTK scaling; past {} positions it rotates as rope_type \"default\"",
            c.max_position_embeddings
        )),
        _ => {}
    }
    if c.variant == LlamaVariant::Llama {
        md.push((key("vocab_size"), u32_of("vocab_size", c.vocab_size)?));
        md.push((
            key("rope.dimension_count"),
            u32_of("head_dim", c.head_size())?,
        ));
    }
    if let Some(w) = (0..c.num_hidden_layers).find_map(|l| c.window(l))
        && w < c.max_position_embeddings
    {
        notes.push(format!(
            "sliding_window {w}: llama.cpp's {arch} attends over the whole context, so past {w} tokens its outputs differ"
        ));
    }
    let (heads, kv) = (c.num_attention_heads, c.kv_heads());
    let permute = matches!(c.variant, LlamaVariant::Llama | LlamaVariant::Mistral);
    let mut out = map_names(tensors, |name| {
        let leaf = |n: &str| Some(Some((n.to_string(), Transform::Copy)));
        match name {
            "model.embed_tokens.weight" => return leaf("token_embd.weight"),
            "model.norm.weight" => return leaf("output_norm.weight"),
            "lm_head.weight" if c.tie_word_embeddings => return Some(None),
            "lm_head.weight" => return leaf("output.weight"),
            _ => {}
        }
        let (n, rest) = block(name, "model.layers")?;
        let (module, suffix) = rest.rsplit_once('.')?;
        if module == "self_attn.rotary_emb" {
            return Some(None);
        }
        let gguf = match module {
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" => "ffn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            _ => return None,
        };
        if !matches!(suffix, "weight" | "bias") {
            return None;
        }
        let transform = match module {
            "self_attn.q_proj" if permute => Transform::RopePermute { heads },
            "self_attn.k_proj" if permute => Transform::RopePermute { heads: kv },
            _ => Transform::Copy,
        };
        Some(Some((format!("blk.{n}.{gguf}.{suffix}"), transform)))
    })?;
    if rope.rope_type == "llama3" {
        out.push(GgufTensor {
            name: "rope_freqs.weight".into(),
            source: Source::Computed(llama3_factors(&c)?),
        });
    }
    Ok(GgufLayout {
        arch,
        metadata: md,
        tensors: out,
        notes,
    })
}

/// Llama 3's per-frequency divisors, which llama.cpp applies to the default
/// frequencies (convert_hf_to_gguf.py's `generate_extra_tensors`), in f32 as there.
fn llama3_factors(c: &LlamaConfig) -> Result<Vec<f32>> {
    let rope = &c.rope_parameters;
    let dim = c.head_size();
    let base = rope.rope_theta as f32;
    let factor = rope.factor.unwrap_or(8.0) as f32;
    let low = rope.low_freq_factor.unwrap_or(1.0) as f32;
    let high = rope.high_freq_factor.unwrap_or(4.0) as f32;
    if high == low {
        return Err(Error::Config(
            "llama3 rope: low_freq_factor equals high_freq_factor".into(),
        ));
    }
    // transformers 5 keeps it in rope_parameters; 4.x files at the top level.
    let old = rope
        .original_max_position_embeddings
        .or_else(|| {
            c.extra
                .get("original_max_position_embeddings")?
                .as_u64()
                .map(|v| v as usize)
        })
        .unwrap_or(8192) as f32;
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    Ok((0..dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0 / base.powf(i as f32 / dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect())
}

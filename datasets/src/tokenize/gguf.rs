//! A tokenizer as GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`), as
//! llama.cpp's convert_hf_to_gguf.py writes a byte-level BPE tokenizer (`gpt2` model):
//! the tokens by id up to the model's `vocab_size` (`[PAD<i>]` where none), their types,
//! the merges, the pre-tokenizer's llama.cpp name, and the special tokens and their
//! add-flags as gguf-py's `SpecialVocab` finds them.
//!
//! SentencePiece-style tokenizers (Llama 2, Mistral v0.1: `tokenizer.ggml.model`
//! `llama`, with scores) and WordPiece are refused in one line.

use std::collections::HashMap;

use kiln_formats::gguf::{Value, ValueType};
use serde_json::{Map, Value as Json};

use super::{Tokenizer, token_text};
use crate::{Error, Result};

/// GGUF's token types (llama.cpp's `llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The split patterns of the pre-tokenizers llama.cpp names, as tokenizer.json holds
/// them; GPT-2's is ByteLevel's own (`use_regex`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The special-token roles gguf-py looks for, in its order.
const ROLES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

fn refuse(msg: String) -> Error {
    Error::Tokenizer(msg)
}

impl Tokenizer {
    /// The tokenizer's GGUF metadata for a model of `vocab_size` tokens whose
    /// `config.json` is `model_config` (its `*_token_id`s fill in what the tokenizer's
    /// config does not name).
    pub fn gguf_metadata(
        &self,
        vocab_size: usize,
        model_config: &Map<String, Json>,
    ) -> Result<Vec<(String, Value)>> {
        let json: Json = serde_json::from_str(
            &self
                .inner
                .to_string(false)
                .map_err(super::tokenizer_error)?,
        )
        .map_err(|e| refuse(format!("tokenizer.json: {e}")))?;
        let model = &json["model"];
        let kind = model["type"].as_str().unwrap_or("?");
        if kind != "BPE" || model["byte_fallback"].as_bool() == Some(true) || !byte_level(&json) {
            return Err(refuse(format!(
                "a {kind} tokenizer{}: kiln writes GGUF for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen)",
                if model["byte_fallback"].as_bool() == Some(true) {
                    " with byte fallback (SentencePiece-style)"
                } else {
                    ""
                }
            )));
        }
        let pre = pre_tokenizer_name(&json["pre_tokenizer"])?;
        let vocab = self.inner.get_vocab(true);
        let by_id: HashMap<u32, &str> = vocab.iter().map(|(t, &i)| (i, t.as_str())).collect();
        let added = self.inner.get_added_tokens_decoder();
        let mut tokens = Vec::with_capacity(vocab_size);
        let mut types = Vec::with_capacity(vocab_size);
        for i in 0..vocab_size as u32 {
            let Some(&token) = by_id.get(&i) else {
                tokens.push(Value::String(format!("[PAD{i}]")));
                types.push(Value::I32(UNUSED));
                continue;
            };
            let ty = match added.get(&i) {
                Some(a) if a.special || looks_special(token) => CONTROL,
                Some(_) => USER_DEFINED,
                None => NORMAL,
            };
            let text = if ty == USER_DEFINED {
                token.replace('\u{2581}', " ")
            } else {
                token.to_string()
            };
            tokens.push(Value::String(text));
            types.push(Value::I32(ty));
        }
        let mut md = vec![
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("gpt2".into()),
            ),
            ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(ValueType::String, tokens),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array(ValueType::I32, types),
            ),
        ];
        let merges = merges(&model["merges"])?;
        if !merges.is_empty() {
            md.push(("tokenizer.ggml.merges".into(), Value::strings(merges)));
        }
        let (ids, adds) = special_tokens(&json, &self.config, model_config, vocab_size);
        for (role, id) in ids {
            let key = match role {
                "sep" => "seperator", // sic: llama.cpp's key
                "unk" => "unknown",
                "pad" => "padding",
                "cls" => continue, // gguf-py has no key for it
                r => r,
            };
            md.push((format!("tokenizer.ggml.{key}_token_id"), Value::U32(id)));
        }
        for (role, add) in adds {
            md.push((format!("tokenizer.ggml.add_{role}_token"), Value::Bool(add)));
        }
        match self.config.get("chat_template") {
            Some(Json::String(t)) => {
                md.push(("tokenizer.chat_template".into(), Value::String(t.clone())))
            }
            Some(Json::Array(named)) => {
                let default = named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str());
                if let Some(t) = default {
                    md.push(("tokenizer.chat_template".into(), Value::String(t.into())));
                }
            }
            _ => {}
        }
        Ok(md)
    }
}

/// Whether the pipeline is byte-level (a ByteLevel pre-tokenizer or decoder).
fn byte_level(json: &Json) -> bool {
    fn has(v: &Json) -> bool {
        v["type"] == "ByteLevel"
            || v["pretokenizers"]
                .as_array()
                .is_some_and(|a| a.iter().any(has))
            || v["decoders"].as_array().is_some_and(|a| a.iter().any(has))
    }
    has(&json["pre_tokenizer"]) || has(&json["decoder"])
}

/// llama.cpp's name for the pre-tokenizer (`tokenizer.ggml.pre`).
fn pre_tokenizer_name(pre: &Json) -> Result<&'static str> {
    if pre["type"] == "ByteLevel" && pre["use_regex"].as_bool() != Some(false) {
        return Ok("gpt-2");
    }
    let splits: Vec<&str> = pre["pretokenizers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"] == "Split")
        .filter_map(|p| p["pattern"]["Regex"].as_str())
        .collect();
    match splits.as_slice() {
        [p] if *p == LLAMA3_SPLIT => Ok("llama-bpe"),
        [p] if *p == QWEN2_SPLIT => Ok("qwen2"),
        _ => Err(refuse(format!(
            "tokenizer.json's pre-tokenizer ({}) is none llama.cpp knows by name here (GPT-2's, Llama 3's or Qwen2's)",
            serde_json::to_string(pre)
                .unwrap_or_default()
                .chars()
                .take(120)
                .collect::<String>()
        ))),
    }
}

/// llama.cpp's `<|…|>`-and-friends rule for added tokens not flagged special.
fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>") && token.len() >= 4)
}

/// The merges as `"a b"` strings; tokenizers' pair form has its spaces written as
/// U+0120 + 256, as gguf-py does.
fn merges(merges: &Json) -> Result<Vec<String>> {
    let Some(list) = merges.as_array() else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) if pair.len() == 2 => {
                let part = |p: &Json| -> String {
                    p.as_str()
                        .unwrap_or_default()
                        .chars()
                        .map(|c| {
                            if c == ' ' {
                                char::from_u32(0x20 + 256).unwrap_or(c)
                            } else {
                                c
                            }
                        })
                        .collect()
                };
                Ok(format!("{} {}", part(&pair[0]), part(&pair[1])))
            }
            _ => Err(refuse(
                "tokenizer.json: a merge is neither \"a b\" nor [a, b]".into(),
            )),
        })
        .collect()
}

/// Special-token ids by role (`bos`, `eos`, …) and `add_<role>_token` flags.
type Specials = (Vec<(&'static str, u32)>, Vec<(&'static str, bool)>);

/// The special-token ids and add-flags, by gguf-py's `SpecialVocab` rules: each role's
/// token from `tokenizer_config.json` (bos falls back to cls, eos to sep) looked up among
/// the added tokens, else `config.json`'s `<role>_token_id`; `add_bos`/`add_eos` from a
/// TemplateProcessing post-processor, overridden by `tokenizer_config.json`'s
/// `add_<role>_token`.
fn special_tokens(
    json: &Json,
    config: &Map<String, Json>,
    model_config: &Map<String, Json>,
    vocab_size: usize,
) -> Specials {
    let text = |role: &str| config.get(&format!("{role}_token")).and_then(token_text);
    let bos = text("bos").or(text("cls"));
    let eos = text("eos").or(text("sep"));
    let role_text = |role: &str| match role {
        "bos" => bos,
        "eos" => eos,
        r => text(r),
    };
    let added = json["added_tokens"].as_array().cloned().unwrap_or_default();
    let mut ids = Vec::new();
    for role in ROLES {
        let from_tokenizer = role_text(role).and_then(|t| {
            added
                .iter()
                .find(|a| a["content"] == t)
                .and_then(|a| a["id"].as_u64())
        });
        let id = from_tokenizer.or_else(|| model_config.get(&format!("{role}_token_id"))?.as_u64());
        if let Some(id) = id.filter(|&id| id < vocab_size as u64) {
            ids.push((role, id as u32));
        }
    }
    let mut adds: Vec<(&'static str, bool)> = Vec::new();
    let mut set = |role: &'static str, v: bool| match adds.iter_mut().find(|(r, _)| *r == role) {
        Some(e) => e.1 = v,
        None => adds.push((role, v)),
    };
    let post = &json["post_processor"];
    let processors: Vec<&Json> = match post["processors"].as_array() {
        Some(a) => a.iter().collect(),
        None => vec![post],
    };
    for p in processors {
        if p["type"] == "TemplateProcessing" {
            let single = p["single"].as_array().cloned().unwrap_or_default();
            let special = |v: &Json| v["SpecialToken"]["id"].as_str().map(str::to_string);
            if single.len() > 1 {
                if let Some(first) = single.first().and_then(special) {
                    set(
                        "bos",
                        Some(first.as_str()) == bos || Some(first.as_str()) == text("cls"),
                    );
                }
                if let Some(last) = single.last().and_then(special) {
                    set("eos", Some(last.as_str()) == eos);
                }
            }
        } else if p["type"] == "RobertaProcessing" {
            set("bos", true);
            set("eos", true);
            set("sep", true);
        }
    }
    for role in ["bos", "eos", "sep"] {
        if let Some(Json::Bool(v)) = config.get(&format!("add_{role}_token")) {
            set(role, *v);
        }
    }
    (ids, adds)
}

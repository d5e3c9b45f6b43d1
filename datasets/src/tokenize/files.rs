//! The tokenizer files of a model folder, as transformers writes them.

use serde_json::{Map, Value};

use super::{
    CHAT_TEMPLATE_FILE, SPECIAL_TOKEN_ROLES, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE, Tokenizer, token_text, tokenizer_error,
};
use crate::{Error, Result};

/// `value` with every object's keys sorted, as Python's `json.dumps(sort_keys=True)`.
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// JSON as transformers writes its config files: sorted keys, indent 2, UTF-8, newline.
fn python_json(value: Value) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(&sorted(value))
        .map_err(|e| Error::Tokenizer(format!("serializing JSON: {e}")))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// The files of `tokenizer`'s model folder.
pub(super) fn files(tokenizer: &Tokenizer) -> Result<Vec<(String, Vec<u8>)>> {
    let text = tokenizer.inner.to_string(true).map_err(tokenizer_error)?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Tokenizer(format!("re-reading {TOKENIZER_FILE}: {e}")))?;

    let mut config = tokenizer.config.clone();
    // transformers 5 writes a single template to its own file, not into the config.
    let template = match config.get("chat_template") {
        Some(Value::String(_)) => config.remove("chat_template"),
        _ => None,
    };
    let mut decoder: Vec<(u32, Value)> = tokenizer
        .inner
        .get_added_tokens_decoder()
        .into_iter()
        .map(|(id, t)| {
            let entry = serde_json::json!({
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            });
            (id, entry)
        })
        .collect();
    decoder.sort_by_key(|(id, _)| *id);
    config.insert(
        "added_tokens_decoder".into(),
        Value::Object(
            decoder
                .into_iter()
                .map(|(id, v)| (id.to_string(), v))
                .collect(),
        ),
    );

    let mut special = Map::new();
    for role in SPECIAL_TOKEN_ROLES {
        if let Some(text) = config.get(role).and_then(token_text) {
            special.insert(role.into(), Value::String(text.into()));
        }
    }

    let mut out = vec![
        (TOKENIZER_FILE.to_string(), text.into_bytes()),
        (
            TOKENIZER_CONFIG_FILE.to_string(),
            python_json(Value::Object(config))?,
        ),
        (
            SPECIAL_TOKENS_MAP_FILE.to_string(),
            python_json(Value::Object(special))?,
        ),
    ];
    if let Some(Value::String(template)) = template {
        out.push((CHAT_TEMPLATE_FILE.to_string(), template.into_bytes()));
    }
    out.extend(vocab_files(&json)?);
    Ok(out)
}

/// The vocabulary files of the model in `tokenizer.json`: `vocab.txt` (WordPiece) or
/// `vocab.json` + `merges.txt` (BPE), as `tokenizers`' `Model::save` writes them; none
/// for other models.
fn vocab_files(json: &Value) -> Result<Vec<(String, Vec<u8>)>> {
    let model = &json["model"];
    let bad = |what: &str| Error::Tokenizer(format!("{TOKENIZER_FILE}: model {what}"));
    let vocab_in_order = || -> Result<Vec<(&str, u64)>> {
        let vocab = model["vocab"]
            .as_object()
            .ok_or_else(|| bad("has no vocab"))?;
        let mut entries = vocab
            .iter()
            .map(|(token, id)| {
                id.as_u64()
                    .map(|id| (token.as_str(), id))
                    .ok_or_else(|| bad("id"))
            })
            .collect::<Result<Vec<_>>>()?;
        entries.sort_by_key(|(_, id)| *id);
        Ok(entries)
    };
    match model["type"].as_str() {
        Some("WordPiece") => {
            let mut text = String::new();
            for (token, _) in vocab_in_order()? {
                text.push_str(token);
                text.push('\n');
            }
            Ok(vec![("vocab.txt".into(), text.into_bytes())])
        }
        Some("BPE") => {
            let vocab: Map<String, Value> = vocab_in_order()?
                .into_iter()
                .map(|(token, id)| (token.to_string(), Value::from(id)))
                .collect();
            let vocab = serde_json::to_vec(&vocab)
                .map_err(|e| Error::Tokenizer(format!("serializing vocab.json: {e}")))?;
            let mut merges = String::from("#version: 0.2\n");
            for merge in model["merges"]
                .as_array()
                .ok_or_else(|| bad("has no merges"))?
            {
                match merge {
                    Value::String(pair) => merges.push_str(pair),
                    Value::Array(pair) => {
                        let parts: Vec<&str> = pair.iter().filter_map(Value::as_str).collect();
                        if parts.len() != 2 {
                            return Err(bad("merge is not a pair"));
                        }
                        merges.push_str(parts[0]);
                        merges.push(' ');
                        merges.push_str(parts[1]);
                    }
                    _ => return Err(bad("merge is not a pair")),
                }
                merges.push('\n');
            }
            Ok(vec![
                ("vocab.json".into(), vocab),
                ("merges.txt".into(), merges.into_bytes()),
            ])
        }
        _ => Ok(Vec::new()),
    }
}

//! Folders without `tokenizer.json` (saved by transformers' slow tokenizers, or by hand):
//! the pipeline transformers' `BertTokenizer` builds from `vocab.txt`, and the one
//! `GPT2Tokenizer` builds from `vocab.json` + `merges.txt`.

use std::path::Path;

use ahash::AHashMap;
use serde_json::{Map, Value};
use tokenizers::AddedToken;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;

use super::{Tokenizer, read_optional, token_text, tokenizer_error};
use crate::{Error, Result};

const BERT_DEFAULTS: [(&str, &str); 5] = [
    ("unk_token", "[UNK]"),
    ("sep_token", "[SEP]"),
    ("pad_token", "[PAD]"),
    ("cls_token", "[CLS]"),
    ("mask_token", "[MASK]"),
];
const GPT2_DEFAULTS: [(&str, &str); 3] = [
    ("unk_token", "<|endoftext|>"),
    ("bos_token", "<|endoftext|>"),
    ("eos_token", "<|endoftext|>"),
];

/// The tokenizer of `dir` built from its vocabulary files, if it has some.
pub(super) fn from_vocab_files(
    dir: &Path,
    config: Map<String, Value>,
) -> Result<Option<Tokenizer>> {
    if let Some(vocab) = read_optional(&dir.join("vocab.txt"))? {
        return bert(&dir.join("vocab.txt"), &vocab, config).map(Some);
    }
    let vocab = read_optional(&dir.join("vocab.json"))?;
    let merges = read_optional(&dir.join("merges.txt"))?;
    match (vocab, merges) {
        (Some(v), Some(m)) => gpt2(dir, &v, &m, config).map(Some),
        _ => Ok(None),
    }
}

fn bad(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{}: {message}", path.display()))
}

/// Fills the special tokens the config lacks with the family's defaults; returns them.
fn specials(config: &mut Map<String, Value>, defaults: &[(&str, &str)]) -> Vec<AddedToken> {
    let mut out: Vec<AddedToken> = Vec::new();
    for (role, default) in defaults {
        let text = match config.get(*role) {
            Some(Value::Null) => continue,
            Some(v) => token_text(v).unwrap_or(default).to_string(),
            None => {
                config.insert((*role).into(), Value::String((*default).into()));
                (*default).to_string()
            }
        };
        if !out.iter().any(|t| t.content == text) {
            out.push(AddedToken::from(text, true));
        }
    }
    out
}

fn bert(path: &Path, bytes: &[u8], mut config: Map<String, Value>) -> Result<Tokenizer> {
    let text = std::str::from_utf8(bytes).map_err(|_| bad(path, "not UTF-8"))?;
    // transformers' load_vocab: one token per line, id = line number, "\n" stripped.
    let mut vocab: AHashMap<String, u32> = AHashMap::new();
    for (id, line) in text.split_terminator('\n').enumerate() {
        let id = u32::try_from(id).map_err(|_| bad(path, "too many tokens"))?;
        vocab.insert(line.to_string(), id);
    }
    let lower = config
        .get("do_lower_case")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let chinese = config
        .get("tokenize_chinese_chars")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let strip_accents = config.get("strip_accents").and_then(Value::as_bool);
    let added = specials(&mut config, &BERT_DEFAULTS);
    let unk = config
        .get("unk_token")
        .and_then(token_text)
        .unwrap_or("[UNK]")
        .to_string();
    let model = WordPiece::builder()
        .vocab(vocab)
        .unk_token(unk)
        .build()
        .map_err(tokenizer_error)?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_normalizer(Some(BertNormalizer::new(
        true,
        chinese,
        strip_accents,
        lower,
    )))
    .map_err(tokenizer_error)?;
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_decoder(Some(WordPieceDecoder::default()));
    tok.add_special_tokens(added).map_err(tokenizer_error)?;
    let cls = config
        .get("cls_token")
        .and_then(token_text)
        .unwrap_or("[CLS]")
        .to_string();
    let sep = config
        .get("sep_token")
        .and_then(token_text)
        .unwrap_or("[SEP]")
        .to_string();
    let (cls_id, sep_id) = (
        tok.token_to_id(&cls).unwrap_or(2),
        tok.token_to_id(&sep).unwrap_or(3),
    );
    let template = TemplateProcessing::builder()
        .try_single(format!("{cls}:0 $A:0 {sep}:0"))
        .and_then(|b| b.try_pair(format!("{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1")))
        .map_err(tokenizer_error)?
        .special_tokens(vec![(cls, cls_id), (sep, sep_id)])
        .build()
        .map_err(tokenizer_error)?;
    tok.with_post_processor(Some(template));
    config.entry("do_lower_case").or_insert(Value::Bool(lower));
    config
        .entry("tokenizer_class")
        .or_insert(Value::String("BertTokenizerFast".into()));
    Ok(Tokenizer::from_parts(tok, config))
}

fn gpt2(
    dir: &Path,
    vocab: &[u8],
    merges: &[u8],
    mut config: Map<String, Value>,
) -> Result<Tokenizer> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let vocab: AHashMap<String, u32> =
        serde_json::from_slice(vocab).map_err(|e| bad(&vocab_path, e))?;
    let text = std::str::from_utf8(merges).map_err(|_| bad(&merges_path, "not UTF-8"))?;
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => pairs.push((a.to_string(), b.to_string())),
            _ => return Err(bad(&merges_path, format!("line {}: not a pair", i + 1))),
        }
    }
    let add_prefix_space = config
        .get("add_prefix_space")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let added = specials(&mut config, &GPT2_DEFAULTS);
    let model = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .build()
        .map_err(tokenizer_error)?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(ByteLevel::new(add_prefix_space, true, true)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    tok.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
    tok.add_special_tokens(added).map_err(tokenizer_error)?;
    config
        .entry("add_prefix_space")
        .or_insert(Value::Bool(add_prefix_space));
    config
        .entry("tokenizer_class")
        .or_insert(Value::String("GPT2TokenizerFast".into()));
    Ok(Tokenizer::from_parts(tok, config))
}

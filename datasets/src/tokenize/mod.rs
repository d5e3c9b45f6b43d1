//! Tokenizers that transformers loads and that load transformers' tokenizers.
//!
//! A [`Tokenizer`] is a `tokenizers` (the Rust library behind transformers' "fast"
//! tokenizers) pipeline plus the keys of `tokenizer_config.json`:
//!
//! - [`Tokenizer::from_dir`] reads a model folder as transformers' `save_pretrained`
//!   writes it: `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`;
//!   without `tokenizer.json`, BERT's `vocab.txt` or GPT-2's `vocab.json` + `merges.txt`.
//! - [`TokenizerTrainer`] trains a BERT WordPiece or a GPT-2 byte-level BPE tokenizer on
//!   the training texts, set up exactly as transformers' `BertTokenizer` /
//!   `GPT2Tokenizer` rebuild them, so `AutoTokenizer.from_pretrained` gives the same ids.
//! - [`Tokenizer::encode`] truncates to `max_length` counting the special tokens, as
//!   `tokenizer(text, truncation=True, max_length=n)` does.
//! - [`Tokenizer::files`] gives the files of a model folder (`tokenizer.json`,
//!   `tokenizer_config.json`, `special_tokens_map.json`, and `vocab.txt`, or
//!   `vocab.json` and `merges.txt`) as (name, bytes) for
//!   `kiln_checkpoint::model::ModelSave::tokenizer_files`; [`Tokenizer::save`] writes
//!   them into a folder.
//!
//! Decisions:
//! - Truncation and padding stored in a loaded `tokenizer.json` are dropped: kiln
//!   truncates per call ([`Tokenizer::encode`]) and pads per batch (the collator), as
//!   transformers' `tokenizer(...)` calls do.
//! - transformers 5 rebuilds BERT's normalizer and GPT-2's pre-tokenizer from
//!   `tokenizer_config.json` (`do_lower_case`, `strip_accents`, `tokenize_chinese_chars`,
//!   `add_prefix_space`) rather than taking them from `tokenizer.json`; kiln writes those
//!   keys from the pipeline it trained, so both readings agree.
//! - `tokenizer_class` is written as `BertTokenizerFast` / `GPT2TokenizerFast` (the
//!   tokenizer.json-backed classes; transformers 4 and 5 both load them, 5 as aliases of
//!   `BertTokenizer` / `GPT2Tokenizer`).

mod files;
mod gguf;
mod train;
mod vocab;

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokenizers::{PostProcessor, TruncationDirection};

use crate::{Error, Result};

pub use train::{TokenizerKind, TokenizerTrainer};

/// The file transformers' fast tokenizers are stored in.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The tokenizer's settings (class, special tokens, `model_max_length`, ...).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// The special tokens by role (`cls_token`, `pad_token`, ...).
pub const SPECIAL_TOKENS_MAP_FILE: &str = "special_tokens_map.json";
/// The chat template, as transformers 5 saves it (it overrides `chat_template` in
/// `tokenizer_config.json` when both are there, as transformers reads them).
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// The roles of special tokens in `tokenizer_config.json`, as transformers names them.
pub const SPECIAL_TOKEN_ROLES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A tokenizer: the `tokenizers` pipeline and transformers' `tokenizer_config.json`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `tokenizer_config.json`, with the special tokens of `special_tokens_map.json`
    /// merged in where the config lacked them.
    config: Map<String, Value>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("tokenizer_class", &self.tokenizer_class())
            .field("vocab_size", &self.vocab_size())
            .field("model_max_length", &self.model_max_length())
            .finish_non_exhaustive()
    }
}

/// Each token's byte range (start, end) in the encoded text.
pub type Offsets = Vec<(usize, usize)>;

/// One encoded text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids, special tokens included.
    pub input_ids: Vec<u32>,
    /// Segment ids (all 0 for a single text).
    pub token_type_ids: Vec<u32>,
}

pub(crate) fn tokenizer_error(e: impl fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn json_object(bytes: &[u8], what: &str) -> Result<Map<String, Value>> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::Tokenizer(format!("{what} is not a JSON object"))),
        Err(e) => Err(Error::Tokenizer(format!("{what}: {e}"))),
    }
}

/// The text of a special token as `tokenizer_config.json` holds it: a string, or an
/// AddedToken dict with `content`.
fn token_text(value: &Value) -> Option<&str> {
    match value {
        Value::String(s) => Some(s),
        Value::Object(m) => m.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// `tokenizer_config.json` with the special tokens of `special_tokens_map.json` that it
/// lacks.
fn merged_config(
    tokenizer_config: Option<&[u8]>,
    special_tokens_map: Option<&[u8]>,
) -> Result<Map<String, Value>> {
    let mut config = match tokenizer_config {
        Some(bytes) => json_object(bytes, TOKENIZER_CONFIG_FILE)?,
        None => Map::new(),
    };
    if let Some(bytes) = special_tokens_map {
        for (role, value) in json_object(bytes, SPECIAL_TOKENS_MAP_FILE)? {
            if SPECIAL_TOKEN_ROLES.contains(&role.as_str()) && !config.contains_key(&role) {
                config.insert(role, value);
            }
        }
    }
    Ok(config)
}

impl Tokenizer {
    /// Loads the tokenizer of a model folder: `tokenizer.json`, with
    /// `tokenizer_config.json` and `special_tokens_map.json` when present. A folder
    /// without `tokenizer.json` (transformers' slow tokenizers saved only their
    /// vocabulary) is built as transformers builds it: BERT from `vocab.txt`, GPT-2 from
    /// `vocab.json` and `merges.txt`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let in_dir = |e: Error| match e {
            Error::Tokenizer(m) => Error::Tokenizer(format!("{}: {m}", dir.display())),
            e => e,
        };
        let config = read_optional(&dir.join(TOKENIZER_CONFIG_FILE))?;
        let special = read_optional(&dir.join(SPECIAL_TOKENS_MAP_FILE))?;
        let mut config = merged_config(config.as_deref(), special.as_deref()).map_err(in_dir)?;
        if let Some(template) = read_optional(&dir.join(CHAT_TEMPLATE_FILE))? {
            let template = String::from_utf8(template).map_err(|_| {
                Error::Tokenizer(format!(
                    "{}: {CHAT_TEMPLATE_FILE} is not UTF-8",
                    dir.display()
                ))
            })?;
            config.insert("chat_template".into(), Value::String(template));
        }
        let json_path = dir.join(TOKENIZER_FILE);
        match read_optional(&json_path)? {
            Some(json) => Self::with_config(&json, config).map_err(in_dir),
            None => vocab::from_vocab_files(dir, config)?.ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: no tokenizer.json, vocab.txt, or vocab.json and merges.txt",
                    dir.display()
                ))
            }),
        }
    }

    /// A tokenizer from the bytes of `tokenizer.json`, `tokenizer_config.json` and
    /// `special_tokens_map.json`.
    pub fn from_bytes(
        tokenizer_json: &[u8],
        tokenizer_config: Option<&[u8]>,
        special_tokens_map: Option<&[u8]>,
    ) -> Result<Self> {
        Self::with_config(
            tokenizer_json,
            merged_config(tokenizer_config, special_tokens_map)?,
        )
    }

    fn with_config(tokenizer_json: &[u8], config: Map<String, Value>) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| Error::Tokenizer(format!("{TOKENIZER_FILE}: {e}")))?;
        inner.with_truncation(None).map_err(tokenizer_error)?;
        inner.with_padding(None);
        Ok(Tokenizer { inner, config })
    }

    pub(crate) fn from_parts(inner: tokenizers::Tokenizer, config: Map<String, Value>) -> Self {
        Tokenizer { inner, config }
    }

    /// The `tokenizers` pipeline (no truncation, no padding).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// `tokenizer_config.json` as it will be saved (less `added_tokens_decoder`, which is
    /// written from the pipeline).
    pub fn config(&self) -> &Map<String, Value> {
        &self.config
    }

    /// `tokenizer_class` of `tokenizer_config.json`, e.g. `BertTokenizerFast`.
    pub fn tokenizer_class(&self) -> Option<&str> {
        self.config.get("tokenizer_class").and_then(Value::as_str)
    }

    /// The longest input the model takes (`model_max_length`); `None` when the config
    /// does not say or says transformers' "very large" default.
    pub fn model_max_length(&self) -> Option<usize> {
        let value = self.config.get("model_max_length")?;
        if let Some(n) = value.as_u64() {
            return usize::try_from(n).ok().filter(|&n| n < 1 << 53);
        }
        value
            .as_f64()
            .filter(|f| (0.0..9.0e15).contains(f))
            .map(|f| f as usize)
    }

    /// Sets `model_max_length`.
    pub fn with_model_max_length(mut self, n: usize) -> Self {
        self.config
            .insert("model_max_length".into(), Value::from(n));
        self
    }

    /// The chat template: `chat_template` of the config (or `chat_template.jinja`), or
    /// the one named `default` where the config lists named templates.
    pub fn chat_template(&self) -> Option<&str> {
        match self.config.get("chat_template")? {
            Value::String(s) => Some(s),
            Value::Array(named) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str),
            _ => None,
        }
    }

    /// Sets the chat template (saved as `chat_template.jinja`).
    pub fn with_chat_template(mut self, template: impl Into<String>) -> Self {
        self.config
            .insert("chat_template".into(), Value::String(template.into()));
        self
    }

    /// The named special tokens that are set (`bos_token` → its text, ...): the
    /// variables a chat template sees, as transformers passes `special_tokens_map`.
    pub fn special_tokens_map(&self) -> Map<String, Value> {
        SPECIAL_TOKEN_ROLES
            .iter()
            .filter_map(|role| {
                self.special_token(role)
                    .map(|t| ((*role).to_string(), Value::String(t.to_string())))
            })
            .collect()
    }

    /// Encodes `text` as it is, without the special tokens the post-processor adds
    /// (`add_special_tokens=False`; special tokens written in the text are still
    /// recognised), with each token's byte range in `text`.
    pub fn encode_plain(&self, text: &str) -> Result<(Vec<u32>, Offsets)> {
        let encoding = self.inner.encode(text, false).map_err(tokenizer_error)?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// The text of the special token of `role` (`"pad_token"`, `"cls_token"`, ...).
    pub fn special_token(&self, role: &str) -> Option<&str> {
        self.config.get(role).and_then(token_text)
    }

    /// The id of the special token of `role`, if it is set and in the vocabulary.
    pub fn special_token_id(&self, role: &str) -> Option<u32> {
        self.special_token(role)
            .and_then(|t| self.inner.token_to_id(t))
    }

    /// The padding token's id.
    pub fn pad_id(&self) -> Option<u32> {
        self.special_token_id("pad_token")
    }

    /// The end-of-sequence token's id.
    pub fn eos_id(&self) -> Option<u32> {
        self.special_token_id("eos_token")
    }

    /// The id to pad batches with: the padding token, or (GPT-2 has none) the
    /// end-of-sequence token, as `tokenizer.pad_token = tokenizer.eos_token` does; the
    /// attention mask hides it either way.
    pub fn padding_id(&self) -> u32 {
        self.pad_id().or_else(|| self.eos_id()).unwrap_or(0)
    }

    /// Whether batches are padded on the left (`padding_side` = `"left"`).
    pub fn pads_left(&self) -> bool {
        self.config.get("padding_side").and_then(Value::as_str) == Some("left")
    }

    /// Whether the model takes `token_type_ids` from this tokenizer (BERT does, GPT-2
    /// does not): `model_input_names` when the config lists them, else the class.
    pub fn returns_token_type_ids(&self) -> bool {
        if let Some(Value::Array(names)) = self.config.get("model_input_names") {
            return names.iter().any(|n| n.as_str() == Some("token_type_ids"));
        }
        self.tokenizer_class()
            .is_some_and(|c| c.starts_with("Bert"))
    }

    /// The vocabulary size, added tokens included (the model's `vocab_size` must be at
    /// least this).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of `token`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The number of special tokens added around a single text (2 for BERT: `[CLS]`,
    /// `[SEP]`; 0 for GPT-2).
    pub fn num_special_tokens(&self) -> usize {
        self.inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false))
    }

    /// Encodes `text` with the special tokens, keeping at most `max_length` tokens
    /// (specials included; the text is cut on the right, as transformers'
    /// `truncation=True` does).
    pub fn encode(&self, text: &str, max_length: Option<usize>) -> Result<Encoded> {
        let encoding = self.inner.encode(text, false).map_err(tokenizer_error)?;
        self.finish(encoding, max_length)
    }

    /// [`Tokenizer::encode`] for many texts (in parallel where the machine allows).
    pub fn encode_batch(&self, texts: &[&str], max_length: Option<usize>) -> Result<Vec<Encoded>> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), false)
            .map_err(tokenizer_error)?;
        encodings
            .into_iter()
            .map(|e| self.finish(e, max_length))
            .collect()
    }

    fn finish(
        &self,
        mut encoding: tokenizers::Encoding,
        max_length: Option<usize>,
    ) -> Result<Encoded> {
        let processor = self.inner.get_post_processor();
        if let Some(max) = max_length {
            let added = processor.map_or(0, |p| p.added_tokens(false));
            if max <= added {
                return Err(Error::Config(format!(
                    "max_length {max} leaves no room for text besides the {added} special tokens"
                )));
            }
            encoding.truncate(max - added, 0, TruncationDirection::Right);
        }
        let encoding = match processor {
            Some(p) => p.process(encoding, None, true).map_err(tokenizer_error)?,
            None => encoding,
        };
        Ok(Encoded {
            input_ids: encoding.get_ids().to_vec(),
            token_type_ids: encoding.get_type_ids().to_vec(),
        })
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(tokenizer_error)
    }

    /// The files of a model folder, as (file name, bytes): `tokenizer.json`,
    /// `tokenizer_config.json`, `special_tokens_map.json`, `chat_template.jinja` when the
    /// template is a single one (transformers 5's layout), and the vocabulary in the
    /// files transformers' slow tokenizers read (`vocab.txt` for WordPiece, `vocab.json`
    /// and `merges.txt` for BPE).
    pub fn files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        files::files(self)
    }

    /// Writes [`Tokenizer::files`] into `dir` (created if needed) and returns their paths.
    /// Inside a checkpoint, pass the files to `ModelSave::tokenizer_files` instead: the
    /// checkpoint layer writes them crash-safely.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut paths = Vec::new();
        for (name, bytes) in self.files()? {
            let path = dir.join(name);
            std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
            paths.push(path);
        }
        Ok(paths)
    }
}

//! Training a tokenizer on the training texts.

use std::collections::BTreeMap;

use ahash::AHashMap;
use compact_str::CompactString;
use serde_json::{Map, Value, json};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString,
    PreTokenizer,
};

use super::{Tokenizer, tokenizer_error};
use crate::{Error, Result};

/// The tokenizer families kiln trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// BERT: lowercasing `BertNormalizer`, `BertPreTokenizer`, WordPiece (`##`
    /// continuations), `[CLS] $A [SEP]`; specials `[PAD] [UNK] [CLS] [SEP] [MASK]` are ids
    /// 0..=4.
    Bert,
    /// GPT-2: byte-level BPE (no unknown token, no prefix space), `<|endoftext|>` (id 0)
    /// as bos, eos and unk; no special tokens added around a text.
    Gpt2,
}

impl TokenizerKind {
    /// The family of a transformers architecture or `model_type` (`BertFor...`,
    /// `bert`, `GPT2LMHeadModel`, `gpt2`).
    pub fn for_architecture(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("bert") {
            Some(TokenizerKind::Bert)
        } else if lower.starts_with("gpt2") {
            Some(TokenizerKind::Gpt2)
        } else {
            None
        }
    }
}

const BERT_SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
const GPT2_EOS: &str = "<|endoftext|>";

/// Trains a [`Tokenizer`] on texts:
/// `TokenizerTrainer::new(TokenizerKind::Bert, 2000).with_model_max_length(128).train(texts)`.
#[derive(Clone, Debug)]
pub struct TokenizerTrainer {
    kind: TokenizerKind,
    vocab_size: usize,
    model_max_length: usize,
    min_frequency: u64,
    lowercase: bool,
}

impl TokenizerTrainer {
    /// A trainer for a `kind` tokenizer of at most `vocab_size` tokens (specials
    /// included); `model_max_length` 512 (BERT) or 1024 (GPT-2), `min_frequency` 2, and
    /// lowercasing for BERT.
    pub fn new(kind: TokenizerKind, vocab_size: usize) -> Self {
        let model_max_length = match kind {
            TokenizerKind::Bert => 512,
            TokenizerKind::Gpt2 => 1024,
        };
        TokenizerTrainer {
            kind,
            vocab_size,
            model_max_length,
            min_frequency: 2,
            lowercase: true,
        }
    }

    /// Sets `model_max_length` (the model's `max_position_embeddings` / `n_positions`).
    pub fn with_model_max_length(mut self, n: usize) -> Self {
        self.model_max_length = n;
        self
    }

    /// Sets how often a pair must occur to be merged.
    pub fn with_min_frequency(mut self, n: u64) -> Self {
        self.min_frequency = n;
        self
    }

    /// Whether a BERT tokenizer lowercases (and strips accents), `do_lower_case`.
    pub fn with_lowercase(mut self, lowercase: bool) -> Self {
        self.lowercase = lowercase;
        self
    }

    /// Trains on `texts`. The result does not depend on thread scheduling: the same
    /// texts give the same tokenizer.
    pub fn train<I, S>(&self, texts: I) -> Result<Tokenizer>
    where
        I: IntoIterator<Item = S>,
        I::IntoIter: Send,
        S: AsRef<str> + Send,
    {
        match self.kind {
            TokenizerKind::Bert => self.train_bert(texts.into_iter()),
            TokenizerKind::Gpt2 => self.train_gpt2(texts.into_iter()),
        }
    }

    fn train_bert<I, S>(&self, texts: I) -> Result<Tokenizer>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if self.vocab_size < BERT_SPECIALS.len() + 1 {
            return Err(Error::Config(format!(
                "vocab_size {} is too small for a WordPiece vocabulary",
                self.vocab_size
            )));
        }
        let mut tok = tokenizers::Tokenizer::new(WordPiece::default());
        tok.with_normalizer(Some(BertNormalizer::new(true, true, None, self.lowercase)))
            .map_err(tokenizer_error)?;
        tok.with_pre_tokenizer(Some(BertPreTokenizer));
        tok.with_decoder(Some(WordPieceDecoder::default()));
        let specials: Vec<AddedToken> = BERT_SPECIALS
            .iter()
            .map(|t| AddedToken::from(*t, true))
            .collect();
        let trainer = BpeTrainer::builder()
            .vocab_size(self.vocab_size)
            .min_frequency(self.min_frequency)
            .special_tokens(specials.clone())
            .continuing_subword_prefix("##".into())
            .show_progress(false)
            .build();
        let bpe = train_bpe(&tok, &trainer, texts)?;
        tok.with_model(WordPiece::from_bpe(&bpe));
        tok.add_special_tokens(specials).map_err(tokenizer_error)?;
        let id = |t: &str| {
            tok.token_to_id(t)
                .ok_or_else(|| Error::Tokenizer(format!("{t} missing after training")))
        };
        let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
        let template = TemplateProcessing::builder()
            .try_single("[CLS]:0 $A:0 [SEP]:0")
            .and_then(|b| b.try_pair("[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1"))
            .map_err(tokenizer_error)?
            .special_tokens(vec![("[CLS]", cls), ("[SEP]", sep)])
            .build()
            .map_err(tokenizer_error)?;
        tok.with_post_processor(Some(template));
        let config = json!({
            "clean_up_tokenization_spaces": true,
            "cls_token": "[CLS]",
            "do_basic_tokenize": true,
            "do_lower_case": self.lowercase,
            "mask_token": "[MASK]",
            "model_max_length": self.model_max_length,
            "never_split": null,
            "pad_token": "[PAD]",
            "padding_side": "right",
            "sep_token": "[SEP]",
            "strip_accents": null,
            "tokenize_chinese_chars": true,
            "tokenizer_class": "BertTokenizerFast",
            "unk_token": "[UNK]",
        });
        Ok(Tokenizer::from_parts(tok, as_map(config)))
    }

    fn train_gpt2<I, S>(&self, texts: I) -> Result<Tokenizer>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let alphabet = ByteLevel::alphabet();
        if self.vocab_size < alphabet.len() + 1 {
            return Err(Error::Config(format!(
                "vocab_size {} is too small for byte-level BPE: it needs the {} bytes and \
                 {GPT2_EOS}",
                self.vocab_size,
                alphabet.len()
            )));
        }
        let mut tok = tokenizers::Tokenizer::new(BPE::default());
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        let specials = vec![AddedToken::from(GPT2_EOS, true)];
        let trainer = BpeTrainer::builder()
            .vocab_size(self.vocab_size)
            .min_frequency(self.min_frequency)
            .initial_alphabet(alphabet.into_iter().collect())
            .special_tokens(specials.clone())
            .show_progress(false)
            .build();
        let bpe = train_bpe(&tok, &trainer, texts)?;
        tok.with_model(bpe);
        tok.add_special_tokens(specials).map_err(tokenizer_error)?;
        tok.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
        let config = json!({
            "add_bos_token": false,
            "add_prefix_space": false,
            "bos_token": GPT2_EOS,
            "clean_up_tokenization_spaces": false,
            "eos_token": GPT2_EOS,
            "errors": "replace",
            "model_max_length": self.model_max_length,
            "pad_token": null,
            "padding_side": "right",
            "tokenizer_class": "GPT2TokenizerFast",
            "unk_token": GPT2_EOS,
        });
        Ok(Tokenizer::from_parts(tok, as_map(config)))
    }
}

/// Trains `trainer` on the words of `texts` as `tok`'s normalizer and pre-tokenizer
/// split them.
///
/// `tokenizers`' own `Tokenizer::train` is not deterministic (huggingface/tokenizers#1794):
/// its trainer numbers the `##` continuation symbols in the iteration order of a hash map
/// with a random state, and those numbers break ties between equally frequent merges.
/// Here the words are counted in a `BTreeMap` and handed to the trainer in a map with
/// fixed hash seeds, filled in sorted order, so the same texts always give the same
/// vocabulary.
fn train_bpe<I, S>(tok: &tokenizers::Tokenizer, trainer: &BpeTrainer, texts: I) -> Result<BPE>
where
    I: Iterator<Item = S>,
    S: AsRef<str>,
{
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for text in texts {
        let mut normalized = NormalizedString::from(text.as_ref());
        if let Some(n) = tok.get_normalizer() {
            n.normalize(&mut normalized).map_err(tokenizer_error)?;
        }
        let mut pre = PreTokenizedString::from(normalized);
        if let Some(p) = tok.get_pre_tokenizer() {
            p.pre_tokenize(&mut pre).map_err(tokenizer_error)?;
        }
        for (word, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            *counts.entry(word.to_owned()).or_default() += 1;
        }
    }
    let mut words: AHashMap<CompactString, u64> = AHashMap::with_capacity_and_hasher(
        counts.len(),
        ahash::RandomState::with_seeds(0x6b69_6c6e, 1, 2, 3),
    );
    for (word, count) in counts {
        words.insert(CompactString::from(word), count);
    }
    let mut bpe = BPE::default();
    trainer
        .do_train(&words, &mut bpe)
        .map_err(tokenizer_error)?;
    Ok(bpe)
}

fn as_map(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

//! Supervised fine-tuning data for causal LMs, tokenized as TRL's `SFTTrainer` tokenizes
//! it (TRL 1.x, `trl/trainer/sft_trainer.py`).
//!
//! Three kinds of JSON Lines row, told from the file's first row:
//! - prompt/completion text (`{"prompt": "...", "completion": "..."}`): the EOS token is
//!   appended to the completion unless it ends with it; the ids are
//!   `tokenizer(prompt + completion)` (special tokens added, e.g. Llama's BOS), the
//!   prompt's those it shares with `tokenizer(prompt)`;
//! - conversational prompt/completion (both lists of `{role, content}` messages): the
//!   prompt is `apply_chat_template(prompt, add_generation_prompt=True)`, the ids
//!   `apply_chat_template(prompt + completion)`;
//! - conversations (`{"messages": [...]}`, or ShareGPT's `{"conversations": [{"from",
//!   "value"}]}`, renamed to `role`/`content` as TRL's `maybe_convert_to_chatml` does):
//!   `apply_chat_template(messages)`.
//!
//! A row's `tools` column (a list, or a JSON string of one) is passed to the template.
//! The prompt ends where the ids of the prompt alone and of the whole row first differ
//! (TRL's `common_prefix_length`: templates may render a lone prompt differently).
//!
//! Labels are the ids, with -100 where the loss is not taken: on the prompt
//! (`completion_only_loss`, TRL's default for prompt/completion rows) and outside the
//! template's `{% generation %}` blocks (`assistant_only_loss`). Without packing each row
//! is cut to `max_length` (its start kept, or its end with `keep_end`) and rows left
//! with no label are dropped, as
//! TRL drops them; batches are padded per batch on the right. With packing (TRL's
//! `wrapped` strategy) all rows are joined and cut into `max_length` blocks, the last one
//! kept short. The chat template is applied as transformers applies it ([`crate::chat`]).

use std::path::Path;

use serde_json::{Map, Value};

use crate::chat::ChatTemplate;
use crate::collate::IGNORE_INDEX;
use crate::dataset::{Dataset, Example};
use crate::labels::Label;
use crate::read::{at, json_rows};
use crate::tokenize::Tokenizer;
use crate::{Error, Result};

/// One supervised fine-tuning row.
#[derive(Clone, Debug, PartialEq)]
pub enum SftRow {
    /// A prompt and its completion, as text.
    PromptCompletion {
        /// The prompt.
        prompt: String,
        /// What the model learns to write after it.
        completion: String,
    },
    /// A prompt and its completion, as lists of messages.
    ChatPromptCompletion {
        /// The prompt's messages.
        prompt: Vec<Value>,
        /// The completion's messages.
        completion: Vec<Value>,
    },
    /// A conversation.
    Messages(Vec<Value>),
}

/// A row and the line of the file it is on.
#[derive(Clone, Debug, PartialEq)]
pub struct SftRecord {
    /// The 1-based line.
    pub line: usize,
    /// The row.
    pub row: SftRow,
    /// The row's `tools` (function schemas), for the template.
    pub tools: Option<Value>,
}

impl SftRow {
    /// Whether the row is made of messages (and needs a chat template).
    pub fn is_conversational(&self) -> bool {
        !matches!(self, SftRow::PromptCompletion { .. })
    }

    /// The texts in the row (to train a tokenizer on): the prompt and completion, or the
    /// messages' string contents.
    pub fn texts(&self) -> Vec<&str> {
        fn contents(m: &[Value]) -> Vec<&str> {
            m.iter()
                .filter_map(|m| m.get("content").and_then(Value::as_str))
                .collect()
        }
        match self {
            SftRow::PromptCompletion { prompt, completion } => vec![prompt, completion],
            SftRow::ChatPromptCompletion { prompt, completion } => {
                let mut t = contents(prompt);
                t.extend(contents(completion));
                t
            }
            SftRow::Messages(m) => contents(m),
        }
    }
}

/// The kind of rows a JSON Lines file holds, from its first row's columns: `messages`,
/// or `prompt` (with `completion`); `None` for other rows (plain text).
pub fn detect(first_row: &Map<String, Value>) -> Option<&'static str> {
    if first_row.contains_key("messages") {
        Some("messages")
    } else if first_row.contains_key("conversations") {
        Some("conversations")
    } else if first_row.contains_key("prompt") {
        Some("prompt")
    } else {
        None
    }
}

/// ShareGPT's `{"from", "value"}` messages as `{"role", "content"}` ones.
fn from_sharegpt(value: Option<&Value>) -> Option<Value> {
    let Some(Value::Array(items)) = value else {
        return value.cloned();
    };
    let renamed = items
        .iter()
        .map(|m| match m {
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| {
                        let k = match k.as_str() {
                            "from" => "role",
                            "value" => "content",
                            k => k,
                        };
                        (k.to_string(), v.clone())
                    })
                    .collect(),
            ),
            other => other.clone(),
        })
        .collect();
    Some(Value::Array(renamed))
}

/// A row's `tools`: a list of schemas, or a JSON string holding one (as TRL reads it).
fn tools(value: Option<&Value>, path: &Path, line: usize) -> Result<Option<Value>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Array(_)) => Ok(Some(v.clone())),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Array(_)) => Ok(Some(v)),
            Ok(Value::Null) => Ok(None),
            _ => Err(at(
                path,
                line,
                "column \"tools\" must be a list of tool schemas",
            )),
        },
        Some(_) => Err(at(
            path,
            line,
            "column \"tools\" must be a list of tool schemas",
        )),
    }
}

/// A list of messages, each an object with a string `role`.
fn messages(value: Option<&Value>, column: &str, path: &Path, line: usize) -> Result<Vec<Value>> {
    let Some(Value::Array(items)) = value else {
        return Err(at(
            path,
            line,
            match value {
                None => format!("missing column {column:?}"),
                Some(v) => format!("column {column:?} must be a list of messages, found {v}"),
            },
        ));
    };
    for (i, m) in items.iter().enumerate() {
        if !m.get("role").is_some_and(Value::is_string) {
            return Err(at(
                path,
                line,
                format!("{column}[{i}] is not a message with a string \"role\""),
            ));
        }
    }
    Ok(items.clone())
}

/// Reads the SFT rows of a JSON Lines file whose first row has `messages` or `prompt`
/// columns; `Ok(None)` for other files. Every row must have the first row's columns
/// (`prompt` needs `completion`), of the same kind (text or messages): else an
/// [`Error::Data`] with `file:line`.
pub fn read_sft(path: &Path, text: &str) -> Result<Option<Vec<SftRecord>>> {
    let mut kind: Option<&'static str> = None;
    let mut chat_prompt = false;
    let mut out = Vec::new();
    for row in json_rows(path, text) {
        let (line, row) = row?;
        let k = match kind {
            Some(k) => k,
            None => {
                let Some(k) = detect(&row) else {
                    return Ok(None);
                };
                chat_prompt = row.get("prompt").is_some_and(Value::is_array);
                kind = Some(k);
                k
            }
        };
        let tools = tools(row.get("tools"), path, line)?;
        let row = match k {
            "messages" => SftRow::Messages(messages(row.get("messages"), "messages", path, line)?),
            "conversations" => SftRow::Messages(messages(
                from_sharegpt(row.get("conversations")).as_ref(),
                "conversations",
                path,
                line,
            )?),
            _ if chat_prompt => SftRow::ChatPromptCompletion {
                prompt: messages(row.get("prompt"), "prompt", path, line)?,
                completion: messages(row.get("completion"), "completion", path, line)?,
            },
            _ => {
                let string = |column: &str| match row.get(column) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(other) => Err(at(
                        path,
                        line,
                        format!(
                            "column {column:?} must be a string like the first row's, found \
                             {other}"
                        ),
                    )),
                    None => Err(at(path, line, format!("missing column {column:?}"))),
                };
                SftRow::PromptCompletion {
                    prompt: string("prompt")?,
                    completion: string("completion")?,
                }
            }
        };
        out.push(SftRecord { line, row, tools });
    }
    Ok(kind.map(|_| out))
}

/// How SFT rows become examples (`[data]`'s names, TRL's `SFTConfig` names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftOptions {
    /// The longest example (or packed block), in tokens.
    pub max_length: usize,
    /// Cut longer rows (else a longer row is an error).
    pub truncation: bool,
    /// Which end of a longer row to keep: its start (TRL's `keep_start`, the default) or
    /// its end (`keep_end`).
    pub keep_end: bool,
    /// Labels -100 on the prompt of prompt/completion rows (TRL's default `None` = true).
    pub completion_only_loss: bool,
    /// Labels -100 outside the template's `{% generation %}` blocks.
    pub assistant_only_loss: bool,
    /// Join rows and cut them into `max_length` blocks (TRL's `wrapped` packing).
    pub packing: bool,
}

/// The ids of one row and which of them carry a label.
struct Tokenized {
    ids: Vec<u32>,
    keep: Vec<bool>,
}

/// A chat template with what it renders with: the tokenizer, and its named special
/// tokens (computed once for all rows).
struct Chat<'a> {
    template: &'a ChatTemplate,
    tokenizer: &'a Tokenizer,
    special: Map<String, Value>,
}

impl Chat<'_> {
    /// Ids of a rendered conversation, and (when `assistant`) which tokens overlap its
    /// `{% generation %}` blocks, as `return_assistant_tokens_mask` marks them.
    fn ids(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
        assistant: bool,
    ) -> Result<(Vec<u32>, Option<Vec<bool>>)> {
        if messages.is_empty() {
            return Err(Error::Template("the conversation has no messages".into()));
        }
        let rendered =
            self.template
                .render(messages, tools, add_generation_prompt, &self.special)?;
        let (ids, offsets) = self.tokenizer.encode_plain(&rendered.text)?;
        let mask = assistant.then(|| {
            offsets
                .iter()
                .map(|&(start, end)| {
                    rendered
                        .generation
                        .iter()
                        .any(|g| end > g.start && start < g.end)
                })
                .collect()
        });
        Ok((ids, mask))
    }
}

/// The number of leading ids `a` and `b` share.
fn common_prefix_length(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn tokenize_row(
    record: &SftRecord,
    tokenizer: &Tokenizer,
    chat: Option<&Chat<'_>>,
    options: &SftOptions,
) -> Result<Tokenized> {
    let prompt_mask = |prompt_len: usize, len: usize| -> Vec<bool> {
        (0..len)
            .map(|i| !options.completion_only_loss || i >= prompt_len)
            .collect()
    };
    let chat = || {
        chat.ok_or_else(|| {
            Error::Config(
                "conversational rows need a chat template: the tokenizer has none; set \
                 data.chat_template_path"
                    .into(),
            )
        })
    };
    let tools = record.tools.as_ref();
    match &record.row {
        SftRow::PromptCompletion { prompt, completion } => {
            let mut completion = completion.clone();
            if let Some(eos) = tokenizer.special_token("eos_token")
                && !completion.ends_with(eos)
            {
                completion.push_str(eos);
            }
            let prompt_ids = tokenizer.encode(prompt, None)?.input_ids;
            let ids = tokenizer
                .encode(&format!("{prompt}{completion}"), None)?
                .input_ids;
            let keep = prompt_mask(common_prefix_length(&prompt_ids, &ids), ids.len());
            Ok(Tokenized { ids, keep })
        }
        SftRow::ChatPromptCompletion { prompt, completion } => {
            let chat = chat()?;
            let (prompt_ids, _) = chat.ids(prompt, tools, true, false)?;
            let all: Vec<Value> = prompt.iter().chain(completion).cloned().collect();
            let (ids, assistant) = chat.ids(&all, tools, false, options.assistant_only_loss)?;
            let mut keep = prompt_mask(common_prefix_length(&prompt_ids, &ids), ids.len());
            if let Some(assistant) = assistant {
                check_assistant(&assistant)?;
                keep.iter_mut().zip(assistant).for_each(|(k, a)| *k &= a);
            }
            Ok(Tokenized { ids, keep })
        }
        SftRow::Messages(messages) => {
            let (ids, assistant) =
                chat()?.ids(messages, tools, false, options.assistant_only_loss)?;
            let keep = match assistant {
                Some(a) => {
                    check_assistant(&a)?;
                    a
                }
                None => vec![true; ids.len()],
            };
            Ok(Tokenized { ids, keep })
        }
    }
}

/// TRL's check: assistant-only loss with no assistant token means the template has no
/// `{% generation %}` block for what the assistant says.
fn check_assistant(mask: &[bool]) -> Result<()> {
    if mask.iter().any(|&a| a) {
        return Ok(());
    }
    Err(Error::Config(
        "assistant_only_loss is on but the chat template marks no assistant tokens: it needs \
         {% generation %} ... {% endgeneration %} around the assistant's messages"
            .into(),
    ))
}

fn labels(t: &Tokenized) -> Vec<i64> {
    t.ids
        .iter()
        .zip(&t.keep)
        .map(|(&id, &k)| if k { i64::from(id) } else { IGNORE_INDEX })
        .collect()
}

fn example(ids: Vec<u32>, labels: Vec<i64>) -> Example {
    Example {
        input_ids: ids,
        token_type_ids: None,
        label: Label::Tokens(labels),
    }
}

/// Tokenizes SFT rows of `path` into examples (see the module docs). `template` is the
/// tokenizer's chat template, needed by conversational rows. A template that fails to
/// render, or a row longer than `max_length` with truncation off, is an error naming the
/// row's line.
pub fn tokenize_sft(
    records: &[SftRecord],
    path: &Path,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    options: &SftOptions,
) -> Result<Dataset> {
    if options.max_length == 0 {
        return Err(Error::Config("data.max_length must be at least 1".into()));
    }
    if options.assistant_only_loss && template.is_some_and(|t| !t.has_generation()) {
        // No row can have assistant tokens: say so before tokenizing any.
        check_assistant(&[])?;
    }
    let chat = template.map(|template| Chat {
        template,
        tokenizer,
        special: tokenizer.special_tokens_map(),
    });
    let mut rows = Vec::with_capacity(records.len());
    for record in records {
        let in_row = |e: Error| match e {
            e @ (Error::Template(_) | Error::Tokenizer(_) | Error::Data(_)) => {
                at(path, record.line, e)
            }
            e => e,
        };
        let t = tokenize_row(record, tokenizer, chat.as_ref(), options).map_err(in_row)?;
        if !options.truncation && t.ids.len() > options.max_length {
            return Err(at(
                path,
                record.line,
                format!(
                    "{} tokens, longer than max_length {} (truncation is off: raise \
                     max_length up to the model's limit or shorten the row)",
                    t.ids.len(),
                    options.max_length
                ),
            ));
        }
        rows.push(t);
    }
    if options.packing {
        let ids: Vec<u32> = rows.iter().flat_map(|t| t.ids.iter().copied()).collect();
        let labels: Vec<i64> = rows.iter().flat_map(labels).collect();
        let examples = ids
            .chunks(options.max_length)
            .zip(labels.chunks(options.max_length))
            .map(|(i, l)| example(i.to_vec(), l.to_vec()))
            .collect();
        return Ok(Dataset::new(examples));
    }
    let examples = rows
        .into_iter()
        .filter_map(|mut t| {
            let cut = t.ids.len().saturating_sub(options.max_length);
            if options.keep_end {
                t.ids.drain(..cut);
                t.keep.drain(..cut);
            } else {
                t.ids.truncate(options.max_length);
                t.keep.truncate(options.max_length);
            }
            let labels = labels(&t);
            labels
                .iter()
                .any(|&l| l != IGNORE_INDEX)
                .then(|| example(t.ids, labels))
        })
        .collect();
    Ok(Dataset::new(examples))
}

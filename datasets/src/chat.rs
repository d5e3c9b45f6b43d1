//! Chat templates: a tokenizer's `chat_template` rendered as transformers'
//! `apply_chat_template` renders it, by a real Jinja engine (minijinja).
//!
//! The environment is set up as transformers sets up its sandboxed Jinja2 one:
//! `trim_blocks` and `lstrip_blocks`, loop controls (`break`, `continue`), Python string
//! and dict methods (`.strip()`, `.startswith()`, `.items()`, ...), a `tojson` that writes
//! what Python's `json.dumps` writes (no HTML escaping; `indent`, `separators`,
//! `sort_keys`, `ensure_ascii`), `raise_exception(msg)` and `strftime_now(fmt)`. The
//! variables are `messages`, `add_generation_prompt`, `tools` and `documents` (none), and
//! the tokenizer's named special tokens (`bos_token`, `eos_token`, ...).
//!
//! transformers' `{% generation %}...{% endgeneration %}` tag (which marks the text the
//! assistant wrote, for `return_assistant_tokens_mask`) is not Jinja: the source's
//! generation tags become a `{% filter %}` block that brackets its text with two
//! private-use characters, which are taken out of the rendered text again and kept as
//! byte ranges ([`Rendered::generation`]). A message holding one of them is refused.
//!
//! Decisions: templates get a fuel budget ([`FUEL`]), so a hostile or broken template
//! fails instead of running for ever; messages' keys whose value is `null` are dropped, as
//! transformers drops them.

use std::ops::Range;

use minijinja::value::{Kwargs, Serde, Value as JValue};
use minijinja::{AutoEscape, Environment, ErrorKind, syntax::SyntaxConfig};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// The instructions a template may run per rendering (minijinja's fuel); a long chat
/// takes well under a million.
pub const FUEL: u64 = 50_000_000;

/// Opens the text of a `{% generation %}` block in the raw rendering.
const GEN_START: char = '\u{E000}';
/// Closes it.
const GEN_END: char = '\u{E001}';
/// The filter a generation block becomes.
const GEN_FILTER: &str = "_kiln_generation";
const TEMPLATE: &str = "chat_template";

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    has_generation: bool,
}

/// A rendered conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// The text, to be tokenized without added special tokens.
    pub text: String,
    /// The byte ranges of `text` that `{% generation %}` blocks wrote (the assistant's
    /// turns, for assistant-only loss).
    pub generation: Vec<Range<usize>>,
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is an [`Error::Template`] naming its line.
    pub fn new(source: &str) -> Result<Self> {
        let (source, has_generation) = rewrite_generation_tags(source);
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(template_error)?,
        );
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_filter(GEN_FILTER, |text: String| {
            format!("{GEN_START}{text}{GEN_END}")
        });
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| {
            jiff::Zoned::now().strftime(&format).to_string()
        });
        env.add_template_owned(TEMPLATE, source)
            .map_err(template_error)?;
        Ok(ChatTemplate {
            env,
            has_generation,
        })
    }

    /// Whether the template marks the assistant's text with `{% generation %}`.
    pub fn has_generation(&self) -> bool {
        self.has_generation
    }

    /// Renders `messages` (JSON objects with `role` and `content`, and whatever else the
    /// template reads) and `tools` (function schemas, or none), with the tokenizer's
    /// `special_tokens` (role → text) as variables.
    pub fn render(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
        special_tokens: &Map<String, Value>,
    ) -> Result<Rendered> {
        let mut chat = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let Value::Object(m) = m else {
                return Err(Error::Template(format!(
                    "message {i} is not an object with role and content"
                )));
            };
            let kept: Map<String, Value> = m
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if holds_marks(&Value::Object(kept.clone())) {
                return Err(Error::Template(format!(
                    "message {i} holds U+E000 or U+E001, which kiln reserves for the template's \
                     generation marks"
                )));
            }
            chat.push(Value::Object(kept));
        }
        let mut context: Map<String, Value> = special_tokens.clone();
        context.insert("messages".into(), Value::Array(chat));
        context.insert("tools".into(), tools.cloned().unwrap_or(Value::Null));
        context.insert("documents".into(), Value::Null);
        context.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        let raw = self
            .env
            .get_template(TEMPLATE)
            .and_then(|t| t.render(JValue::from(Serde(&context))))
            .map_err(template_error)?;
        Ok(take_marks(&raw))
    }
}

/// A minijinja error as one line: what went wrong and where in the template.
fn template_error(e: minijinja::Error) -> Error {
    let mut message = match e.kind() {
        ErrorKind::InvalidOperation if e.detail().is_some() => {
            e.detail().unwrap_or_default().to_string()
        }
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        message = format!("{message} (template line {line})");
    }
    Error::Template(message.replace('\n', " "))
}

fn holds_marks(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains([GEN_START, GEN_END]),
        Value::Array(items) => items.iter().any(holds_marks),
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| k.contains([GEN_START, GEN_END]) || holds_marks(v)),
        _ => false,
    }
}

/// The rendering without its generation marks, and the byte ranges they enclosed.
fn take_marks(raw: &str) -> Rendered {
    let mut text = String::with_capacity(raw.len());
    let mut generation = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    for c in raw.chars() {
        match c {
            GEN_START => open.push(text.len()),
            GEN_END => {
                if let Some(start) = open.pop()
                    && open.is_empty()
                    && start < text.len()
                {
                    generation.push(start..text.len());
                }
            }
            c => text.push(c),
        }
    }
    Rendered { text, generation }
}

/// `source` with `{% generation %}` / `{% endgeneration %}` (any whitespace control)
/// turned into `{% filter _kiln_generation %}` / `{% endfilter %}`, and whether it had any.
fn rewrite_generation_tags(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            rest = "";
            break;
        };
        let inner = &tag[2..end];
        let (open_ctl, body) = split_control(inner, true);
        let (body, close_ctl) = split_control(body, false);
        let replacement = match body.trim() {
            "generation" => Some(format!("filter {GEN_FILTER}")),
            "endgeneration" => Some("endfilter".to_string()),
            _ => None,
        };
        match replacement {
            Some(word) => {
                found = true;
                out.push_str(&format!("{{%{open_ctl} {word} {close_ctl}%}}"));
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    (out, found)
}

/// Splits a whitespace-control sign (`-` or `+`) off the start (or end) of a tag's inside.
fn split_control(inner: &str, start: bool) -> (&str, &str) {
    if start {
        match inner.chars().next() {
            Some(c @ ('-' | '+')) => inner.split_at(c.len_utf8()),
            _ => ("", inner),
        }
    } else {
        match inner.chars().last() {
            Some(c @ ('-' | '+')) => inner.split_at(inner.len() - c.len_utf8()),
            _ => (inner, ""),
        }
    }
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, each settable as a keyword.
fn tojson(value: JValue, kwargs: Kwargs) -> std::result::Result<JValue, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<JValue> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_usize(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n)),
            (None, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        },
    };
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ));
        }
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let json: Value = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let style = PyJson {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(JValue::from(out))
}

/// How Python's `json.dumps` lays a value out.
struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    }

    fn write(&self, value: &Value, level: usize, out: &mut String) {
        match value {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => out.push_str(&py_number(n)),
            Value::String(s) => self.string(s, out),
            Value::Array(items) if items.is_empty() => out.push_str("[]"),
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push(']');
            }
            Value::Object(map) if map.is_empty() => out.push_str("{}"),
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.string(k, out);
                    out.push_str(&self.key_sep);
                    self.write(v, level + 1, out);
                }
                self.newline(level, out);
                out.push('}');
            }
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        kiln_formats::pyjson::write_json_string(out, s, self.ensure_ascii);
    }
}

/// A number as Python prints it: integers as they are, floats by `repr` (`1.0`, `1e-05`).
fn py_number(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(x) if !(n.is_i64() || n.is_u64()) => kiln_formats::pyjson::float_repr(x),
        _ => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, messages: Value, gen_prompt: bool) -> Rendered {
        let Value::Array(messages) = messages else {
            panic!("messages")
        };
        let special = json!({"bos_token": "<s>", "eos_token": "</s>"});
        let Value::Object(special) = special else {
            panic!()
        };
        ChatTemplate::new(source)
            .unwrap()
            .render(&messages, None, gen_prompt, &special)
            .unwrap()
    }

    #[test]
    fn generation_blocks_become_byte_ranges() {
        let t = "{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %}A: \
                 {%- generation %} {{ m.content }}{{ eos_token }}{% endgeneration -%}\n\
                 {% else %}U: {{ m.content }}\n{% endif %}{% endfor %}";
        let r = render(
            t,
            json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo é"}]),
            false,
        );
        assert_eq!(r.text, "<s>U: hi\nA: yo é</s>");
        assert_eq!(r.generation.len(), 1);
        assert_eq!(&r.text[r.generation[0].clone()], " yo é</s>");
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let r = render(
            "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2, sort_keys=true) }}",
            json!([{"role": "user", "content": "a<b> \"q\" é\n", "n": [1, 2.5, 1e-5, 3.0]}]),
            false,
        );
        assert_eq!(
            r.text,
            "{\"role\": \"user\", \"content\": \"a<b> \\\"q\\\" é\\n\", \"n\": [1, 2.5, 1e-05, 3.0]}|\
             {\n  \"content\": \"a<b> \\\"q\\\" é\\n\",\n  \"n\": [\n    1,\n    2.5,\n    1e-05,\n    3.0\n  ],\n  \"role\": \"user\"\n}"
        );
    }

    #[test]
    fn python_methods_loop_controls_and_errors() {
        let t = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}\
                 {{ m.content.strip().upper() }}{% endfor %}\
                 {% if add_generation_prompt %}>{% endif %}";
        let r = render(
            t,
            json!([{"role": "user", "content": "  x "}, {"role": "user", "content": "y"}]),
            true,
        );
        assert_eq!(r.text, "X>");
        let bad = ChatTemplate::new("{{ raise_exception('Conversation roles must alternate') }}")
            .unwrap()
            .render(&[], None, false, &Map::new())
            .unwrap_err()
            .to_string();
        assert!(bad.contains("Conversation roles must alternate"), "{bad}");
        let syntax = ChatTemplate::new("{% for m in messages %}")
            .unwrap_err()
            .to_string();
        assert!(syntax.contains("template line 1"), "{syntax}");
        assert!(!syntax.contains('\n'));
    }

    #[test]
    fn an_endless_template_runs_out_of_fuel() {
        let t = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let e = ChatTemplate::new(t)
            .unwrap()
            .render(&[], None, false, &Map::new())
            .unwrap_err();
        assert!(e.to_string().contains("fuel"), "{e}");
    }

    #[test]
    fn marks_in_messages_are_refused() {
        let e = ChatTemplate::new("{{ messages[0].content }}")
            .unwrap()
            .render(
                &[json!({"role": "user", "content": "\u{E000}"})],
                None,
                false,
                &Map::new(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("U+E000"));
    }
}

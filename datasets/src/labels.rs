//! The labels of a classification or regression dataset, and `id2label` / `label2id`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value, json};

use crate::read::{RawLabel, Record};
use crate::{Error, Result};

/// An example's target.
#[derive(Clone, Debug, PartialEq)]
pub enum Label {
    /// No label (prediction data).
    None,
    /// A class id (single-label classification).
    Class(i64),
    /// A regression target.
    Value(f32),
    /// Token targets of a language model, -100 where nothing is predicted.
    Tokens(Vec<i64>),
}

/// How a dataset's labels map to what the model predicts.
///
/// Decided from the **training** file, as `datasets` types a column:
/// - every label an integer → [`Labels::Ids`]: the integers are the class ids (as a
///   `ClassLabel` column's are), `num_labels` = largest + 1, negative ids are errors;
///   `id2label` is transformers' default `LABEL_<i>`;
/// - some label a float (and the rest integers) → [`Labels::Regression`];
/// - every label a string → [`Labels::Names`]: the distinct names **sorted** (by code
///   point, as Python's `sorted` and `ClassLabel`/`class_encode_column` order them), id =
///   position; `"negative" < "positive"` gives negative = 0.
///
/// Other files are mapped through the same scheme: a label the training file does not
/// have is an error (file and line), never a new class.
#[derive(Clone, Debug, PartialEq)]
pub enum Labels {
    /// Integer class ids `0..num_labels`.
    Ids {
        /// The number of classes.
        num_labels: usize,
    },
    /// Named classes; the id of a name is its position.
    Names(Vec<String>),
    /// One float target per example.
    Regression,
}

fn at(path: &Path, line: usize, message: impl std::fmt::Display) -> Error {
    Error::Data(format!("{}:{line}: {message}", path.display()))
}

impl Labels {
    /// The scheme of the training rows (read from `path`).
    pub fn infer(records: &[Record], path: &Path) -> Result<Labels> {
        let mut first: Option<(usize, &RawLabel)> = None;
        let mut names: Vec<&str> = Vec::new();
        let mut max_id: Option<i64> = None;
        let mut any_float = false;
        for r in records {
            let Some(label) = &r.label else {
                return Err(at(path, r.line, "no label"));
            };
            let (first_line, first_label) = *first.get_or_insert((r.line, label));
            let numeric = |l: &RawLabel| !matches!(l, RawLabel::Str(_));
            if numeric(first_label) != numeric(label) {
                return Err(at(
                    path,
                    r.line,
                    format!(
                        "wrong label type: {label} is {}, but line {first_line} has {} ({first_label})",
                        label.kind(),
                        first_label.kind()
                    ),
                ));
            }
            match label {
                RawLabel::Str(s) => names.push(s),
                RawLabel::Float(_) => any_float = true,
                RawLabel::Int(i) => {
                    if *i < 0 {
                        return Err(at(
                            path,
                            r.line,
                            format!("negative class id {i} (class ids start at 0)"),
                        ));
                    }
                    max_id = Some(max_id.map_or(*i, |m| m.max(*i)));
                }
            }
        }
        match first {
            None => Err(Error::Data(format!("{}: no rows", path.display()))),
            Some((_, RawLabel::Str(_))) => {
                names.sort_unstable();
                names.dedup();
                Ok(Labels::Names(names.into_iter().map(String::from).collect()))
            }
            Some(_) if any_float => Ok(Labels::Regression),
            Some(_) => {
                let max = max_id.unwrap_or(0);
                let num_labels = usize::try_from(max).ok().and_then(|m| m.checked_add(1));
                match num_labels {
                    Some(n) if n <= 1 << 24 => Ok(Labels::Ids { num_labels: n }),
                    _ => Err(Error::Data(format!(
                        "{}: class id {max} is too large for a classifier",
                        path.display()
                    ))),
                }
            }
        }
    }

    /// The scheme saved in a model's `config.json` (`problem_type`, `label2id`,
    /// `id2label`), to map new data the way the model was trained.
    pub fn from_config(config: &Value) -> Result<Labels> {
        if config.get("problem_type").and_then(Value::as_str) == Some("regression") {
            return Ok(Labels::Regression);
        }
        let bad = |m: &str| Error::Config(format!("config.json: {m}"));
        let mut by_id: BTreeMap<usize, String> = BTreeMap::new();
        if let Some(Value::Object(map)) = config.get("id2label") {
            for (id, name) in map {
                let id: usize = id
                    .parse()
                    .map_err(|_| bad("id2label has a non-integer id"))?;
                let name = name
                    .as_str()
                    .ok_or_else(|| bad("id2label has a non-string label"))?;
                by_id.insert(id, name.to_string());
            }
        } else if let Some(Value::Object(map)) = config.get("label2id") {
            for (name, id) in map {
                let id = id
                    .as_u64()
                    .ok_or_else(|| bad("label2id has a non-integer id"))?;
                let id = usize::try_from(id).map_err(|_| bad("label2id id out of range"))?;
                by_id.insert(id, name.clone());
            }
        } else if let Some(n) = config.get("num_labels").and_then(Value::as_u64) {
            let n = usize::try_from(n).map_err(|_| bad("num_labels out of range"))?;
            return Ok(Labels::Ids { num_labels: n });
        } else {
            return Err(bad("no id2label, label2id or num_labels"));
        }
        if by_id.keys().copied().ne(0..by_id.len()) {
            return Err(bad("label ids are not 0..num_labels"));
        }
        let names: Vec<String> = by_id.into_values().collect();
        if names
            .iter()
            .enumerate()
            .all(|(i, n)| *n == format!("LABEL_{i}"))
        {
            Ok(Labels::Ids {
                num_labels: names.len(),
            })
        } else {
            Ok(Labels::Names(names))
        }
    }

    /// The number of model outputs (`num_labels`; 1 for regression).
    pub fn num_labels(&self) -> usize {
        match self {
            Labels::Ids { num_labels } => *num_labels,
            Labels::Names(names) => names.len(),
            Labels::Regression => 1,
        }
    }

    /// The label of every id, in id order (`LABEL_<i>` where the data has no names).
    pub fn id2label(&self) -> Vec<String> {
        match self {
            Labels::Names(names) => names.clone(),
            _ => (0..self.num_labels())
                .map(|i| format!("LABEL_{i}"))
                .collect(),
        }
    }

    /// The id of every label.
    pub fn label2id(&self) -> BTreeMap<String, usize> {
        self.id2label()
            .into_iter()
            .enumerate()
            .map(|(i, n)| (n, i))
            .collect()
    }

    /// The keys of `config.json` that record this scheme: `id2label` (`{"0": "negative"}`),
    /// `label2id` (`{"negative": 0}`), and `problem_type` (`"regression"` or
    /// `"single_label_classification"`). `num_labels` follows from `id2label`, as in
    /// transformers.
    pub fn config_entries(&self) -> Map<String, Value> {
        let id2label: Map<String, Value> = self
            .id2label()
            .into_iter()
            .enumerate()
            .map(|(i, n)| (i.to_string(), Value::String(n)))
            .collect();
        let label2id: Map<String, Value> = self
            .label2id()
            .into_iter()
            .map(|(n, i)| (n, json!(i)))
            .collect();
        let problem_type = match self {
            Labels::Regression => "regression",
            _ => "single_label_classification",
        };
        let mut out = Map::new();
        out.insert("id2label".into(), Value::Object(id2label));
        out.insert("label2id".into(), Value::Object(label2id));
        out.insert("problem_type".into(), Value::String(problem_type.into()));
        out
    }

    /// The target of `label`, read at `path:line`.
    pub fn encode(&self, label: &RawLabel, path: &Path, line: usize) -> Result<Label> {
        let wrong = |expected: &str| {
            at(
                path,
                line,
                format!(
                    "wrong label type: {label} is {}, expected {expected}",
                    label.kind()
                ),
            )
        };
        match (self, label) {
            (Labels::Ids { num_labels }, RawLabel::Int(i)) => {
                if usize::try_from(*i).is_ok_and(|i| i < *num_labels) {
                    Ok(Label::Class(*i))
                } else {
                    Err(at(
                        path,
                        line,
                        format!(
                            "unknown label {i}: the training data has class ids 0..{num_labels}"
                        ),
                    ))
                }
            }
            (Labels::Ids { .. }, _) => Err(wrong("an integer class id")),
            (Labels::Names(names), RawLabel::Str(_) | RawLabel::Int(_)) => {
                let text = match label {
                    RawLabel::Str(s) => s.clone(),
                    other => other.to_string(),
                };
                match names.iter().position(|n| *n == text) {
                    Some(i) => Ok(Label::Class(i as i64)),
                    None => Err(at(
                        path,
                        line,
                        format!("unknown label {label} (labels: {})", names.join(", ")),
                    )),
                }
            }
            (Labels::Names(_), RawLabel::Float(_)) => Err(wrong("a label name")),
            (Labels::Regression, RawLabel::Int(i)) => Ok(Label::Value(*i as f32)),
            (Labels::Regression, RawLabel::Float(x)) => Ok(Label::Value(*x as f32)),
            (Labels::Regression, RawLabel::Str(_)) => Err(wrong("a number")),
        }
    }
}

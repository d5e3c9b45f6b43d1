//! Reading rows of text (and labels) from JSON Lines, CSV/TSV and plain-text files.

use std::fmt;
use std::path::Path;

use serde_json::{Map, Value};

use crate::{Error, Result};

/// A value of the label column, as the file holds it.
#[derive(Clone, Debug, PartialEq)]
pub enum RawLabel {
    /// An integer (`1`).
    Int(i64),
    /// A number with a fraction or exponent (`0.5`, `1.0`, `2e3`).
    Float(f64),
    /// A string (`"positive"`).
    Str(String),
}

impl RawLabel {
    /// What kind of value this is, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            RawLabel::Int(_) => "an integer",
            RawLabel::Float(_) => "a float",
            RawLabel::Str(_) => "a string",
        }
    }
}

impl fmt::Display for RawLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawLabel::Int(i) => write!(f, "{i}"),
            RawLabel::Float(x) => write!(f, "{x}"),
            RawLabel::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// One row of a data file.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// The 1-based line of the file the row starts on.
    pub line: usize,
    /// The text.
    pub text: String,
    /// The label, when a label column was asked for.
    pub label: Option<RawLabel>,
}

/// The kinds of data file, told by the file name's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    /// `.jsonl`, `.json`: one JSON object per line (`datasets`' "json" loader).
    JsonLines,
    /// `.csv`: a header row, then comma-separated rows (`datasets`' "csv" loader).
    Csv,
    /// `.tsv`: as CSV, tab-separated.
    Tsv,
    /// `.txt`: every line is a text (`datasets`' "text" loader).
    Text,
}

impl FileFormat {
    /// The format of `path`, from its extension.
    pub fn of(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("jsonl" | "json") => Ok(FileFormat::JsonLines),
            Some("csv") => Ok(FileFormat::Csv),
            Some("tsv") => Ok(FileFormat::Tsv),
            Some("txt" | "text") => Ok(FileFormat::Text),
            _ => Err(Error::Data(format!(
                "{}: unknown data file type (use .jsonl, .json, .csv, .tsv or .txt)",
                path.display()
            ))),
        }
    }
}

/// Which columns to read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Columns<'a> {
    /// The text column; `None` takes `text`, or else `sentence`.
    pub text: Option<&'a str>,
    /// The label column; `None` reads no labels.
    pub label: Option<&'a str>,
}

/// Options of [`read_records`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadOptions<'a> {
    /// The columns.
    pub columns: Columns<'a>,
    /// For plain-text files: keep each line's line break in its text (`run_clm`'s
    /// `keep_linebreaks`, default true).
    pub keep_linebreaks: bool,
}

impl Default for ReadOptions<'_> {
    fn default() -> Self {
        ReadOptions {
            columns: Columns::default(),
            keep_linebreaks: true,
        }
    }
}

/// The text columns tried, in order, when none is named.
pub const DEFAULT_TEXT_COLUMNS: [&str; 2] = ["text", "sentence"];

/// Reads the rows of `path` (format from the extension).
///
/// Every malformed row is an [`Error::Data`] naming the file and line: bad JSON, a
/// missing column, a text that is not a string, a label that is null, a boolean or a
/// nested value, a CSV row with the wrong number of fields. Blank lines of JSON Lines
/// files are skipped. CSV labels are typed per file as pandas infers a column: integers
/// if every value is one, else floats if every value is one, else strings.
pub fn read_records(path: &Path, options: &ReadOptions<'_>) -> Result<Vec<Record>> {
    records_from_text(path, &read_text(path)?, options)
}

/// The text of a data file: UTF-8 (an invalid byte is an error naming its line), a
/// leading byte-order mark dropped.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        Error::Data(format!("{}:{line}: not valid UTF-8", path.display()))
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// [`read_records`] of a file's text, already read.
pub(crate) fn records_from_text(
    path: &Path,
    text: &str,
    options: &ReadOptions<'_>,
) -> Result<Vec<Record>> {
    match FileFormat::of(path)? {
        FileFormat::JsonLines => read_json_lines(path, text, &options.columns),
        FileFormat::Csv => read_csv(path, text, b',', &options.columns),
        FileFormat::Tsv => read_csv(path, text, b'\t', &options.columns),
        FileFormat::Text => {
            if let Some(label) = options.columns.label {
                return Err(Error::Data(format!(
                    "{}: a plain-text file has no label column {label:?}; use JSON Lines or CSV",
                    path.display()
                )));
            }
            Ok(read_text_lines(text, options.keep_linebreaks))
        }
    }
}

pub(crate) fn at(path: &Path, line: usize, message: impl fmt::Display) -> Error {
    Error::Data(format!("{}:{line}: {message}", path.display()))
}

/// The text column of a file whose columns are `names`.
fn resolve_text_column<'a>(
    wanted: Option<&'a str>,
    names: &[&str],
    path: &Path,
    line: usize,
) -> Result<&'a str> {
    if let Some(column) = wanted {
        return Ok(column);
    }
    DEFAULT_TEXT_COLUMNS
        .into_iter()
        .find(|c| names.contains(c))
        .ok_or_else(|| {
            at(
                path,
                line,
                format!(
                    "no \"text\" or \"sentence\" column (columns: {}); set text_column",
                    names.join(", ")
                ),
            )
        })
}

fn json_label(value: Option<&Value>, column: &str, path: &Path, line: usize) -> Result<RawLabel> {
    match value {
        None => Err(at(path, line, format!("missing column {column:?}"))),
        Some(Value::String(s)) => Ok(RawLabel::Str(s.clone())),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(RawLabel::Int(i))
            } else if n.is_u64() {
                Err(at(path, line, format!("label {n} is out of range")))
            } else {
                n.as_f64()
                    .map(RawLabel::Float)
                    .ok_or_else(|| at(path, line, format!("label {n} is not a number")))
            }
        }
        Some(other) => Err(at(
            path,
            line,
            format!(
                "wrong label type in column {column:?}: {other} (use an integer, a float or a \
                 string)"
            ),
        )),
    }
}

/// The rows of a JSON Lines text with their 1-based lines, blank lines skipped; a line
/// that is not a JSON object is an error naming it.
pub(crate) fn json_rows<'t>(
    path: &'t Path,
    text: &'t str,
) -> impl Iterator<Item = Result<(usize, Map<String, Value>)>> + 't {
    text.lines()
        .enumerate()
        .filter(|(_, raw)| !raw.trim().is_empty())
        .map(move |(i, raw)| {
            let line = i + 1;
            match serde_json::from_str(raw) {
                Ok(Value::Object(row)) => Ok((line, row)),
                Ok(_) => Err(at(path, line, "a row must be a JSON object")),
                Err(e) => Err(at(path, line, format!("bad JSON: {e}"))),
            }
        })
}

fn read_json_lines(path: &Path, text: &str, columns: &Columns<'_>) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    let mut text_column: Option<&str> = None;
    for row in json_rows(path, text) {
        let (line, row) = row?;
        let column = match text_column {
            Some(c) => c,
            None => {
                let names: Vec<&str> = row.keys().map(String::as_str).collect();
                let c = resolve_text_column(columns.text, &names, path, line)?;
                text_column = Some(c);
                c
            }
        };
        let text = match row.get(column) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(at(
                    path,
                    line,
                    format!("column {column:?} must be a string, found {other}"),
                ));
            }
            None => return Err(at(path, line, format!("missing column {column:?}"))),
        };
        let label = match columns.label {
            Some(c) => Some(json_label(row.get(c), c, path, line)?),
            None => None,
        };
        out.push(Record { line, text, label });
    }
    Ok(out)
}

fn read_csv(path: &Path, text: &str, delimiter: u8, columns: &Columns<'_>) -> Result<Vec<Record>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .flexible(false)
        .from_reader(text.as_bytes());
    let csv_error = |e: csv::Error| {
        let line = e.position().map_or(1, |p| p.line() as usize);
        match e.kind() {
            csv::ErrorKind::UnequalLengths {
                expected_len, len, ..
            } => at(
                path,
                line,
                format!("the row has {len} fields, the header has {expected_len}"),
            ),
            _ => at(path, line, e),
        }
    };
    let header = reader.headers().map_err(csv_error)?.clone();
    let names: Vec<&str> = header.iter().collect();
    if names.is_empty() || (names.len() == 1 && names[0].is_empty()) {
        return Err(at(path, 1, "no header row"));
    }
    let find = |column: &str| {
        names.iter().position(|n| *n == column).ok_or_else(|| {
            at(
                path,
                1,
                format!("missing column {column:?} (columns: {})", names.join(", ")),
            )
        })
    };
    let text_index = find(resolve_text_column(columns.text, &names, path, 1)?)?;
    let label_index = columns.label.map(find).transpose()?;
    let mut rows: Vec<(usize, String, Option<String>)> = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_error)?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        let field = |i: usize| record.get(i).unwrap_or_default().to_string();
        rows.push((line, field(text_index), label_index.map(field)));
    }
    let Some(label_index) = label_index else {
        return Ok(rows
            .into_iter()
            .map(|(line, text, _)| Record {
                line,
                text,
                label: None,
            })
            .collect());
    };
    let column = names[label_index];
    for (line, _, label) in &rows {
        if label.as_deref().is_none_or(|l| l.trim().is_empty()) {
            return Err(at(path, *line, format!("empty label in column {column:?}")));
        }
    }
    let values = || {
        rows.iter()
            .filter_map(|(_, _, l)| l.as_deref())
            .map(str::trim)
    };
    let all_int = values().all(|v| v.parse::<i64>().is_ok());
    let all_float = all_int || values().all(|v| v.parse::<f64>().is_ok());
    Ok(rows
        .into_iter()
        .map(|(line, text, label)| {
            let label = label.unwrap_or_default();
            let value = label.trim();
            let label = if all_int {
                value
                    .parse()
                    .map(RawLabel::Int)
                    .unwrap_or(RawLabel::Str(label))
            } else if all_float {
                value
                    .parse()
                    .map(RawLabel::Float)
                    .unwrap_or(RawLabel::Str(label))
            } else {
                RawLabel::Str(label)
            };
            Record {
                line,
                text,
                label: Some(label),
            }
        })
        .collect())
}

fn read_text_lines(text: &str, keep_linebreaks: bool) -> Vec<Record> {
    let mut out = Vec::new();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let text = if keep_linebreaks {
            line.to_string()
        } else {
            line.strip_suffix('\n')
                .map_or(line, |l| l.strip_suffix('\r').unwrap_or(l))
                .to_string()
        };
        out.push(Record {
            line: i + 1,
            text,
            label: None,
        });
    }
    out
}

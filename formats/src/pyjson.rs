//! JSON text exactly as Python's `json.dumps(obj, indent=2, sort_keys=True)` writes it,
//! which is how transformers writes `config.json`, shard indexes and
//! `trainer_state.json`: keys sorted, two-space indent, `", "`-free item separators
//! at line ends, non-ASCII escaped as `\uXXXX` (`ensure_ascii`), floats in Python's
//! `repr` (`3.875e-05`, `0.001`, `1e+16`, `2.0`).
//!
//! Files written this way diff cleanly against the ones transformers writes.

use std::collections::BTreeMap;

use serde_json::Value;

/// A JSON value as Python's `json` module sees it: integers and floats stay distinct
/// (`2` vs `2.0`), and floats may be `NaN` or infinite (which `json.dumps` writes as the
/// bare tokens `NaN`, `Infinity`, `-Infinity`, and `serde_json` cannot represent).
#[derive(Clone, Debug, PartialEq)]
pub enum PyValue {
    /// `null` / `None`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// An integer above `i64::MAX` (Python's ints have no limit; a generator's u64
    /// state must survive a round trip).
    UInt(u64),
    /// A float, possibly non-finite.
    Float(f64),
    /// A string.
    Str(String),
    /// A list.
    List(Vec<PyValue>),
    /// An object; `json.dumps(sort_keys=True)` sorts the keys anyway.
    Dict(BTreeMap<String, PyValue>),
}

impl PyValue {
    /// The value as f64, for numbers.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            PyValue::Int(i) => Some(i as f64),
            PyValue::UInt(u) => Some(u as f64),
            PyValue::Float(f) => Some(f),
            _ => None,
        }
    }

    /// The value as i64, for integers.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            PyValue::Int(i) => Some(i),
            _ => None,
        }
    }

    /// The value as a string slice, for strings.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            PyValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

impl From<&Value> for PyValue {
    fn from(v: &Value) -> Self {
        match v {
            Value::Null => PyValue::Null,
            Value::Bool(b) => PyValue::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => PyValue::Int(i),
                (None, Some(f)) if n.is_f64() => PyValue::Float(f),
                (None, _) if n.is_u64() => n.as_u64().map_or(PyValue::Null, PyValue::UInt),
                (None, Some(f)) => PyValue::Float(f),
                (None, None) => PyValue::Null,
            },
            Value::String(s) => match s.strip_prefix(NONFINITE) {
                Some("NaN") => PyValue::Float(f64::NAN),
                Some("Infinity") => PyValue::Float(f64::INFINITY),
                Some("-Infinity") => PyValue::Float(f64::NEG_INFINITY),
                _ => PyValue::Str(s.clone()),
            },
            Value::Array(a) => PyValue::List(a.iter().map(PyValue::from).collect()),
            Value::Object(o) => PyValue::Dict(
                o.iter()
                    .map(|(k, v)| (k.clone(), PyValue::from(v)))
                    .collect(),
            ),
        }
    }
}

impl From<f64> for PyValue {
    fn from(x: f64) -> Self {
        PyValue::Float(x)
    }
}

impl From<i64> for PyValue {
    fn from(x: i64) -> Self {
        PyValue::Int(x)
    }
}

impl From<&str> for PyValue {
    fn from(x: &str) -> Self {
        PyValue::Str(x.to_string())
    }
}

/// Marks a non-finite float token while text goes through serde_json in [`loads`].
const NONFINITE: &str = "\u{0}kiln-nonfinite:";

/// Parses JSON as Python's `json.loads` does, accepting the `NaN`, `Infinity` and
/// `-Infinity` tokens that `json.dumps` writes.
pub fn loads(text: &str) -> Result<PyValue, serde_json::Error> {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else {
            let token = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|t| rest.starts_with(t));
            if let Some(t) = token {
                out.push('"');
                out.push_str(&NONFINITE.replace('\0', "\\u0000"));
                out.push_str(t);
                out.push('"');
                rest = &rest[t.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    let value: Value = serde_json::from_str(&out)?;
    Ok(PyValue::from(&value))
}

/// Renders `value` as `json.dumps(value, indent=2, sort_keys=True)` does (no trailing
/// newline; transformers adds one).
pub fn dumps(value: &Value) -> String {
    dumps_py(&PyValue::from(value))
}

/// Renders a [`PyValue`] as `json.dumps(value, indent=2, sort_keys=True)` does.
pub fn dumps_py(value: &PyValue) -> String {
    dumps_py_indent(value, 2)
}

/// Renders a [`PyValue`] as `json.dumps(value, indent=width, sort_keys=True)` does
/// (transformers' `save_metrics` writes `*_results.json` with `indent=4`).
pub fn dumps_py_indent(value: &PyValue, width: usize) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0, width);
    out
}

/// Python's `repr` of a float: the shortest text that reads back to the same value, in
/// positional notation when the decimal exponent is in [-4, 16), scientific otherwise;
/// `NaN`, `Infinity` and `-Infinity` as `json.dumps` spells them.
pub fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // `{:e}` gives the shortest round-trip digits: "-3.875e-5".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let text = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if (point as usize) >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{text}")
    } else {
        let mant = if digits.len() == 1 {
            digits
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mant}e{esign}{:02}", exp.abs())
    }
}

fn indent(out: &mut String, level: usize, width: usize) {
    out.push('\n');
    for _ in 0..level * width {
        out.push(' ');
    }
}

fn write_value(out: &mut String, value: &PyValue, level: usize, width: usize) {
    match value {
        PyValue::Null => out.push_str("null"),
        PyValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        PyValue::Int(i) => out.push_str(&i.to_string()),
        PyValue::UInt(u) => out.push_str(&u.to_string()),
        PyValue::Float(f) => out.push_str(&float_repr(*f)),
        PyValue::Str(s) => write_json_string(out, s, true),
        PyValue::List(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1, width);
                write_value(out, item, level + 1, width);
            }
            indent(out, level, width);
            out.push(']');
        }
        PyValue::Dict(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1, width);
                write_json_string(out, k, true);
                out.push_str(": ");
                write_value(out, v, level + 1, width);
            }
            indent(out, level, width);
            out.push('}');
        }
    }
}

/// Appends `s` as `json.dumps` writes a string: quotes, backslash escapes, control
/// characters as `\uXXXX`, and with `ensure_ascii` everything but printable ASCII
/// (DEL too) as `\uXXXX` UTF-16 units.
pub fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    #[test]
    fn integers_beyond_i64_stay_exact() {
        let v = serde_json::json!({"state": 9_223_372_036_854_775_813u64, "n": -3});
        let text = dumps(&v);
        assert!(text.contains("9223372036854775813"), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v);
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn floats_read_like_python_repr() {
        let cases = [
            (3.875e-05, "3.875e-05"),
            (0.0001, "0.0001"),
            (1e-5, "1e-05"),
            (2.0, "2.0"),
            (0.5, "0.5"),
            (123.25, "123.25"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (9999999999999998.0, "9999999999999998.0"),
            (-0.001, "-0.001"),
            (0.1 + 0.2, "0.30000000000000004"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
            (-0.0, "-0.0"),
            (5e-324, "5e-324"),
        ];
        for (x, want) in cases {
            assert_eq!(float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn layout_matches_json_dumps() {
        let v = json!({"weight_map": {"b": "x", "a": "y"}, "metadata": {"total_size": 8}, "l": [], "o": {}, "u": "é\"", "f": [1.0, 2]});
        let want = "{\n  \"f\": [\n    1.0,\n    2\n  ],\n  \"l\": [],\n  \"metadata\": {\n    \"total_size\": 8\n  },\n  \"o\": {},\n  \"u\": \"\\u00e9\\\"\",\n  \"weight_map\": {\n    \"a\": \"y\",\n    \"b\": \"x\"\n  }\n}";
        assert_eq!(dumps(&v), want);
    }

    #[test]
    fn loads_accepts_python_tokens_and_round_trips() {
        let text = "{\n  \"a\": NaN,\n  \"b\": [\n    Infinity,\n    -Infinity,\n    1.0,\n    2\n  ],\n  \"c\": \"NaN in a string\"\n}";
        let v = loads(text).unwrap();
        let PyValue::Dict(d) = &v else { panic!() };
        assert!(d["a"].as_f64().unwrap().is_nan());
        assert_eq!(d["c"], PyValue::Str("NaN in a string".into()));
        assert_eq!(dumps_py(&v), text);
        assert!(loads("{\"a\": Nan}").is_err());
    }

    /// Found by fuzzing (fuzz/artifacts-regressions/trainer_state): serde_json's default
    /// float parser can be one ULP off, so kiln read a different number than Python's
    /// `json.loads` and a loads/dumps round trip changed the value.
    #[test]
    fn floats_parse_correctly_rounded() {
        for text in [
            "5.2345678901234568e+51",
            "2.2250738585072011e-308",
            "0.30000000000000004",
        ] {
            let want: f64 = text.parse().unwrap();
            let got = loads(text).unwrap().as_f64().unwrap();
            assert_eq!(got.to_bits(), want.to_bits(), "{text}");
            let again = loads(&dumps_py(&PyValue::Float(got)))
                .unwrap()
                .as_f64()
                .unwrap();
            assert_eq!(again.to_bits(), want.to_bits(), "{text}");
        }
        assert_eq!(float_repr(5.234567890123457e+51), "5.234567890123457e+51");
    }
}

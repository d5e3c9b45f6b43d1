//! Arguments of the text opcodes of protocol 0 (`INT`, `LONG`, `STRING`, `UNICODE`,
//! `GET`, `PUT`).

use super::read::err;
use crate::Result;

pub(super) fn parse_int(s: &str) -> Result<i64> {
    s.trim()
        .parse()
        .map_err(|_| err(format!("bad or too large integer {s:?}")))
}

pub(super) fn parse_index(s: &str) -> Result<u64> {
    s.trim()
        .parse()
        .map_err(|_| err(format!("bad memo index {s:?}")))
}

/// Protocol 0 `STRING`: a Python `repr` of a string, quotes included.
pub(super) fn unquote_string(line: &[u8]) -> Result<String> {
    let inner = match line {
        [q @ (b'\'' | b'"'), inner @ .., last] if last == q => inner,
        _ => return Err(err("STRING argument is not quoted")),
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let c = inner[i];
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let e = *inner.get(i).ok_or_else(|| err("bad escape in STRING"))?;
        i += 1;
        match e {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match inner.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(u8::try_from(v).map_err(|_| err("bad octal escape in STRING"))?);
            }
            b'x' => {
                let h = inner
                    .get(i..i + 2)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| err("bad \\x escape in STRING"))?;
                out.push(h);
                i += 2;
            }
            b'\\' | b'\'' | b'"' => out.push(e),
            other => {
                out.push(b'\\');
                out.push(other);
            }
        }
    }
    String::from_utf8(out).map_err(|_| err("invalid UTF-8 in STRING"))
}

/// Protocol 0 `UNICODE`: latin-1 text with `\uXXXX` and `\UXXXXXXXX` escapes.
pub(super) fn raw_unicode_escape(line: &[u8]) -> Result<String> {
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        let c = line[i];
        if c == b'\\' && matches!(line.get(i + 1), Some(b'u' | b'U')) {
            let n = if line[i + 1] == b'u' { 4 } else { 8 };
            let code = line
                .get(i + 2..i + 2 + n)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .and_then(char::from_u32)
                .ok_or_else(|| err("bad \\u escape in UNICODE"))?;
            out.push(code);
            i += 2 + n;
        } else {
            out.push(char::from(c));
            i += 1;
        }
    }
    Ok(out)
}

//! Reading JSONL/CSV/TSV/text rows, every malformed-row error with file:line, and the
//! label schemes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use kiln_data::Error;
use kiln_data::{Columns, Label, Labels, RawLabel, ReadOptions, Record, read_records};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn labelled() -> ReadOptions<'static> {
    ReadOptions {
        columns: Columns {
            text: None,
            label: Some("label"),
        },
        keep_linebreaks: true,
    }
}

fn read(dir: &Path, name: &str, text: &str) -> Result<Vec<Record>, Error> {
    read_records(&write(dir, name, text), &labelled())
}

/// The message of a `Data` error, checked to start with `file:line: `.
fn data_error(result: Result<Vec<Record>, Error>, dir: &Path, name: &str, line: usize) -> String {
    match result {
        Err(Error::Data(m)) => {
            let prefix = format!("{}:{line}: ", dir.join(name).display());
            assert!(m.starts_with(&prefix), "{m:?} should start with {prefix:?}");
            m[prefix.len()..].to_string()
        }
        other => panic!("expected a data error, got {other:?}"),
    }
}

#[test]
fn jsonl_rows_labels_and_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let rows = read(
        dir.path(),
        "a.jsonl",
        "{\"text\": \"good\", \"label\": \"positive\", \"extra\": [1]}\n\n  \n\
         {\"label\": 1, \"text\": \"caf\\u00e9 \u{1F600}\"}\n{\"text\": \"x\", \"label\": 0.5}\n",
    )
    .unwrap();
    assert_eq!(
        rows,
        vec![
            Record {
                line: 1,
                text: "good".into(),
                label: Some(RawLabel::Str("positive".into()))
            },
            Record {
                line: 4,
                text: "café \u{1F600}".into(),
                label: Some(RawLabel::Int(1))
            },
            Record {
                line: 5,
                text: "x".into(),
                label: Some(RawLabel::Float(0.5))
            },
        ]
    );
    // `sentence` is the text column when there is no `text`; no label column asked.
    let path = write(
        dir.path(),
        "b.json",
        "{\"sentence\": \"s1\", \"idx\": 0}\r\n{\"sentence\": \"s2\"}",
    );
    let rows = read_records(&path, &ReadOptions::default()).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.text.as_str()).collect::<Vec<_>>(),
        ["s1", "s2"]
    );
    assert!(rows.iter().all(|r| r.label.is_none()));
    // A named column wins; a UTF-8 BOM is ignored.
    let path = write(
        dir.path(),
        "c.jsonl",
        "\u{feff}{\"review\": \"r\", \"text\": \"t\", \"y\": 2}\n",
    );
    let options = ReadOptions {
        columns: Columns {
            text: Some("review"),
            label: Some("y"),
        },
        keep_linebreaks: true,
    };
    let rows = read_records(&path, &options).unwrap();
    assert_eq!(rows[0].text, "r");
    assert_eq!(rows[0].label, Some(RawLabel::Int(2)));
}

#[test]
fn jsonl_malformed_rows_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ok = "{\"text\": \"fine\", \"label\": 1}\n";
    let cases: [(&str, String, usize, &str); 9] = [
        (
            "bad.jsonl",
            format!("{ok}{{\"text\": \"oops\", \"label\": 1\n"),
            2,
            "bad JSON",
        ),
        (
            "array.jsonl",
            format!("{ok}{ok}[1, 2]\n"),
            3,
            "must be a JSON object",
        ),
        (
            "nolabel.jsonl",
            format!("{ok}{{\"text\": \"t\"}}\n"),
            2,
            "missing column \"label\"",
        ),
        (
            "notext.jsonl",
            format!("{ok}{{\"txt\": \"t\", \"label\": 1}}\n"),
            2,
            "missing column \"text\"",
        ),
        (
            "nocol.jsonl",
            "{\"body\": \"t\", \"label\": 1}\n".into(),
            1,
            "no \"text\" or \"sentence\" column",
        ),
        (
            "numtext.jsonl",
            format!("{ok}{ok}{ok}{{\"text\": 5, \"label\": 1}}\n"),
            4,
            "must be a string",
        ),
        (
            "nulllabel.jsonl",
            format!("{ok}{{\"text\": \"t\", \"label\": null}}\n"),
            2,
            "wrong label type",
        ),
        (
            "boollabel.jsonl",
            "{\"text\": \"t\", \"label\": true}\n".to_string(),
            1,
            "wrong label type",
        ),
        (
            "biglabel.jsonl",
            format!("{ok}{{\"text\": \"t\", \"label\": 18446744073709551615}}\n"),
            2,
            "out of range",
        ),
    ];
    for (name, text, line, needle) in cases {
        let message = data_error(read(d, name, &text), d, name, line);
        assert!(
            message.contains(needle),
            "{name}: {message:?} lacks {needle:?}"
        );
    }
    // Invalid UTF-8 is reported at its line.
    let path = d.join("latin1.jsonl");
    std::fs::write(
        &path,
        b"{\"text\": \"a\", \"label\": 1}\n{\"text\": \"caf\xe9\", \"label\": 1}\n",
    )
    .unwrap();
    let message = data_error(read_records(&path, &labelled()), d, "latin1.jsonl", 2);
    assert!(message.contains("UTF-8"), "{message}");
    // A missing file is an I/O error naming it; an unknown extension is refused.
    let err = read_records(&d.join("absent.jsonl"), &labelled()).unwrap_err();
    assert!(
        matches!(err, Error::Io { .. }) && err.to_string().contains("absent.jsonl"),
        "{err}"
    );
    let err = read(d, "data.parquet", "x").unwrap_err().to_string();
    assert!(err.contains("unknown data file type"), "{err}");
}

#[test]
fn csv_and_tsv_rows_with_typed_labels() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Quoted fields with commas, quotes and a newline; the row's first line is reported.
    let rows = read(
        d,
        "a.csv",
        "idx,sentence,label\n0,\"hello, world\",1\n1,\"she said \"\"hi\"\"\nthen left\",0\n2,plain,1\n",
    )
    .unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].text, "hello, world");
    assert_eq!(rows[1].text, "she said \"hi\"\nthen left");
    assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 3, 5]);
    assert!(
        rows.iter()
            .all(|r| matches!(r.label, Some(RawLabel::Int(_))))
    );
    // A column of integers and floats is floats; anything else makes it strings.
    let rows = read(d, "f.csv", "text,label\na,1\nb,2.5\nc,-3e-1\n").unwrap();
    assert_eq!(rows[1].label, Some(RawLabel::Float(2.5)));
    assert_eq!(rows[0].label, Some(RawLabel::Float(1.0)));
    let rows = read(d, "s.csv", "text,label\na,1\nb,pos\n").unwrap();
    assert_eq!(rows[0].label, Some(RawLabel::Str("1".into())));
    let rows = read(d, "t.tsv", "label\ttext\npos\ta, b\n").unwrap();
    assert_eq!(
        (rows[0].text.as_str(), rows[0].label.clone()),
        ("a, b", Some(RawLabel::Str("pos".into())))
    );
}

#[test]
fn csv_malformed_rows_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: [(&str, &str, usize, &str); 5] = [
        (
            "fields.csv",
            "text,label\na,1\nb,1,extra\n",
            3,
            "the row has 3 fields, the header has 2",
        ),
        (
            "short.csv",
            "text,label\na,1\nb,0\nc\n",
            4,
            "the row has 1 fields, the header has 2",
        ),
        (
            "nolabel.csv",
            "text,target\na,1\n",
            1,
            "missing column \"label\"",
        ),
        (
            "notext.csv",
            "body,label\na,1\n",
            1,
            "no \"text\" or \"sentence\" column",
        ),
        ("empty.csv", "text,label\na,1\nb,\n", 3, "empty label"),
    ];
    for (name, text, line, needle) in cases {
        let message = data_error(read(d, name, text), d, name, line);
        assert!(
            message.contains(needle),
            "{name}: {message:?} lacks {needle:?}"
        );
    }
}

#[test]
fn plain_text_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "c.txt",
        "first line\n\nthird\r\nlast without newline",
    );
    let rows = read_records(&path, &ReadOptions::default()).unwrap();
    let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
    assert_eq!(
        texts,
        ["first line\n", "\n", "third\r\n", "last without newline"]
    );
    assert_eq!(rows[3].line, 4);
    let no_breaks = ReadOptions {
        keep_linebreaks: false,
        ..ReadOptions::default()
    };
    let rows = read_records(&path, &no_breaks).unwrap();
    let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
    assert_eq!(texts, ["first line", "", "third", "last without newline"]);
    let err = read_records(&path, &labelled()).unwrap_err().to_string();
    assert!(err.contains("no label column"), "{err}");
}

fn records(labels: &[RawLabel]) -> Vec<Record> {
    labels
        .iter()
        .enumerate()
        .map(|(i, l)| Record {
            line: i + 1,
            text: format!("t{i}"),
            label: Some(l.clone()),
        })
        .collect()
}

fn s(x: &str) -> RawLabel {
    RawLabel::Str(x.into())
}

#[test]
fn string_labels_map_through_sorted_names() {
    let p = Path::new("train.jsonl");
    let labels = Labels::infer(
        &records(&[s("positive"), s("negative"), s("neutral"), s("negative")]),
        p,
    )
    .unwrap();
    assert_eq!(
        labels,
        Labels::Names(vec!["negative".into(), "neutral".into(), "positive".into()])
    );
    assert_eq!(labels.num_labels(), 3);
    assert_eq!(
        labels.encode(&s("positive"), p, 1).unwrap(),
        Label::Class(2)
    );
    assert_eq!(labels.label2id()["neutral"], 1);
    let config = serde_json::Value::Object(labels.config_entries());
    assert_eq!(
        config,
        serde_json::json!({
            "id2label": {"0": "negative", "1": "neutral", "2": "positive"},
            "label2id": {"negative": 0, "neutral": 1, "positive": 2},
            "problem_type": "single_label_classification",
        })
    );
    assert_eq!(Labels::from_config(&config).unwrap(), labels);
    // Code-point order, as Python sorts: upper case before lower case, "B" before "a".
    let labels = Labels::infer(&records(&[s("a"), s("B"), s("é"), s("z")]), p).unwrap();
    assert_eq!(labels.id2label(), ["B", "a", "z", "é"]);

    let v = Path::new("validation.jsonl");
    let err = labels.encode(&s("c"), v, 7).unwrap_err().to_string();
    assert!(
        err.starts_with("validation.jsonl:7: unknown label \"c\""),
        "{err}"
    );
    let err = labels
        .encode(&RawLabel::Float(1.5), v, 8)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("validation.jsonl:8: wrong label type"),
        "{err}"
    );
    // Names that look like numbers match integers (CSV columns of "1", "2").
    let labels = Labels::infer(&records(&[s("1"), s("2"), s("x")]), p).unwrap();
    assert_eq!(
        labels.encode(&RawLabel::Int(2), v, 1).unwrap(),
        Label::Class(1)
    );
}

#[test]
fn integer_float_and_mixed_labels() {
    let p = Path::new("train.jsonl");
    let ids = Labels::infer(
        &records(&[RawLabel::Int(0), RawLabel::Int(3), RawLabel::Int(1)]),
        p,
    )
    .unwrap();
    assert_eq!(ids, Labels::Ids { num_labels: 4 });
    assert_eq!(ids.id2label(), ["LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3"]);
    assert_eq!(
        ids.encode(&RawLabel::Int(3), p, 1).unwrap(),
        Label::Class(3)
    );
    let err = ids.encode(&RawLabel::Int(4), p, 9).unwrap_err().to_string();
    assert!(err.contains(":9: unknown label 4"), "{err}");
    let err = ids.encode(&s("3"), p, 2).unwrap_err().to_string();
    assert!(err.contains(":2: wrong label type"), "{err}");
    assert_eq!(
        Labels::from_config(&serde_json::Value::Object(ids.config_entries())).unwrap(),
        ids
    );

    let reg = Labels::infer(
        &records(&[RawLabel::Int(1), RawLabel::Float(2.5), RawLabel::Int(0)]),
        p,
    )
    .unwrap();
    assert_eq!(reg, Labels::Regression);
    assert_eq!(reg.num_labels(), 1);
    assert_eq!(
        reg.encode(&RawLabel::Int(2), p, 1).unwrap(),
        Label::Value(2.0)
    );
    assert_eq!(reg.config_entries()["problem_type"], "regression");

    let err = Labels::infer(&records(&[s("pos"), s("neg"), RawLabel::Int(1)]), p)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(
            "train.jsonl:3: wrong label type: 1 is an integer, but line 1 has a string"
        ),
        "{err}"
    );
    let err = Labels::infer(&records(&[RawLabel::Int(0), RawLabel::Int(-1)]), p)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("train.jsonl:2: negative class id -1"),
        "{err}"
    );
    let unlabelled = vec![Record {
        line: 5,
        text: "t".into(),
        label: None,
    }];
    let err = Labels::infer(&unlabelled, p).unwrap_err().to_string();
    assert!(err.starts_with("train.jsonl:5: no label"), "{err}");
    assert!(Labels::infer(&[], p).is_err());
}

#[test]
fn labels_from_a_transformers_config() {
    let config =
        serde_json::json!({"id2label": {"1": "pos", "0": "neg"}, "label2id": {"neg": 0, "pos": 1}});
    assert_eq!(
        Labels::from_config(&config).unwrap(),
        Labels::Names(vec!["neg".into(), "pos".into()])
    );
    let config = serde_json::json!({"label2id": {"LABEL_0": 0, "LABEL_1": 1}});
    assert_eq!(
        Labels::from_config(&config).unwrap(),
        Labels::Ids { num_labels: 2 }
    );
    let config = serde_json::json!({"num_labels": 5});
    assert_eq!(
        Labels::from_config(&config).unwrap(),
        Labels::Ids { num_labels: 5 }
    );
    let config = serde_json::json!({"problem_type": "regression", "id2label": {"0": "LABEL_0"}});
    assert_eq!(Labels::from_config(&config).unwrap(), Labels::Regression);
    assert!(Labels::from_config(&serde_json::json!({"id2label": {"0": "a", "2": "b"}})).is_err());
    assert!(Labels::from_config(&serde_json::json!({})).is_err());
}

//! Every field of transformers' `TrainingArguments` (walked with
//! `dataclasses.fields` in the venv, tests/check_args.py) is a kiln field or an entry
//! of `kiln_trainer::parity` with transformers' default and type; kiln's own fields
//! keep transformers' defaults except where the table below says why not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use kiln::trainer::TrainingArguments;
use kiln::trainer::parity::{FIELDS, KILN_ONLY, Kind, implemented};
use kiln_test_support::run_checker;
use serde_json::Value;

/// kiln defaults that differ from transformers 5's, and why.
const DIFFERENT_DEFAULTS: &[(&str, &str)] = &[
    // transformers: None (required in practice); kiln: a folder name.
    (
        "output_dir",
        "kiln needs a folder; transformers' None means trainer_output too",
    ),
    // Both spellings run the same AdamW in kiln.
    (
        "optim",
        "adamw is adamw_torch_fused's kiln name; both are accepted",
    ),
    // transformers: None (then set from the log level); kiln: false.
    (
        "disable_tqdm",
        "transformers resolves None to false at the default log level",
    ),
    // transformers: "none" (a string); kiln: an empty list, which means the same.
    ("report_to", "an empty list is none"),
];

#[test]
fn every_transformers_field_is_implemented_or_in_the_table() {
    let work = tempfile::tempdir().unwrap();
    let script = common::repo().join("tests/check_args.py");
    let Some(results) = run_checker(&script, &[Value::Null], work.path()) else {
        return;
    };
    let fields = results[0]["fields"].as_array().unwrap();
    let kiln_defaults = serde_json::to_value(TrainingArguments::default()).unwrap();
    let implemented = implemented();
    let mut missing = Vec::new();
    let mut differ = Vec::new();
    for f in fields {
        let name = f["name"].as_str().unwrap();
        let default = &f["default"];
        let ty = f["type"].as_str().unwrap();
        if implemented.iter().any(|n| n == name) {
            let ours = &kiln_defaults[name];
            let same = match (ours.as_f64(), default.as_f64()) {
                (Some(a), Some(b)) => a == b,
                _ => ours == default,
            };
            // An empty table is transformers' None (no kwargs).
            let empty = default.is_null() && ours.as_object().is_some_and(|o| o.is_empty());
            let listed = DIFFERENT_DEFAULTS.iter().any(|(n, _)| *n == name);
            if !same && !empty && !listed {
                differ.push(format!("{name}: kiln {ours}, transformers {default}"));
            }
            if same && listed {
                differ.push(format!("{name}: listed as different but both are {ours}"));
            }
        } else if let Some(entry) = FIELDS.iter().find(|e| e.name == name) {
            let ours: Value = serde_json::from_str(entry.default).unwrap();
            let same = match (ours.as_f64(), default.as_f64()) {
                (Some(a), Some(b)) => a == b,
                _ => &ours == default,
            };
            assert!(
                same,
                "{name}: the table says default {ours}, transformers {default}"
            );
            let word = match entry.kind {
                Kind::Bool => "bool",
                Kind::Int => "int",
                Kind::Float => "float",
                Kind::Str => "str",
                Kind::List => "list",
                Kind::Dict => "dict",
            };
            // parallelism_config's annotation is accelerate's class: no builtin word.
            let plain = ["bool", "int", "float", "str", "list", "dict"]
                .iter()
                .any(|w| ty.contains(w));
            assert!(
                !plain || ty.contains(word),
                "{name}: the table says {word}, transformers {ty}"
            );
        } else {
            missing.push(name.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "neither kiln fields nor in kiln_trainer::parity: {missing:?}"
    );
    let theirs: Vec<&str> = fields.iter().map(|f| f["name"].as_str().unwrap()).collect();
    for name in &implemented {
        assert!(
            theirs.contains(&name.as_str()),
            "{name}: not a transformers field (add it to KILN_ONLY)"
        );
    }
    for k in KILN_ONLY {
        assert!(
            !theirs.contains(k),
            "{k} is a transformers 5 field: not kiln-only"
        );
    }
    println!(
        "transformers {}: {} fields, {} implemented, {} in the table",
        results[0]["version"],
        fields.len(),
        implemented.len(),
        FIELDS.len()
    );
}

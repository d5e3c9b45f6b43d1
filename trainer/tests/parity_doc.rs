//! `trainer/TRAINING_ARGUMENTS.md` is the table `kiln_trainer::parity::markdown`
//! writes (`KILN_BLESS=1` rewrites it), and the table and kiln's fields do not overlap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_trainer::TrainingArguments;
use kiln_trainer::parity::{FIELDS, KILN_ONLY, implemented, markdown};

#[test]
fn the_doc_is_the_table() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("TRAINING_ARGUMENTS.md");
    let want = markdown();
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "{} is stale: run KILN_BLESS=1 cargo test -p kiln-trainer --test parity_doc",
        path.display()
    );
}

#[test]
fn table_and_fields_do_not_overlap() {
    for f in FIELDS {
        assert!(
            !TrainingArguments::has_field(f.name),
            "{} is a kiln field too",
            f.name
        );
    }
    for k in KILN_ONLY {
        assert!(TrainingArguments::has_field(k), "{k} is not a kiln field");
    }
    let n = implemented().len();
    // transformers 5.25 has 114 fields.
    assert_eq!(
        n + FIELDS.len(),
        114,
        "{n} implemented + {} in the table",
        FIELDS.len()
    );
}

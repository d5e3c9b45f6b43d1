//! What transformers' example scripts write into `output_dir` besides the model:
//! `train_results.json` and `eval_results.json` (the stage's metrics, as `save_metrics`
//! writes them: `json.dump(indent=4, sort_keys=True)`), `all_results.json` (every
//! stage's metrics merged into what the file held), and `predict_results.txt` (one
//! predicted class per row of the test file, as `run_classification.py` writes it).

use std::collections::BTreeMap;
use std::path::Path;

use kiln_formats::pyjson::{PyValue, dumps_py_indent, loads};
use serde_json::Value;

use crate::error::{Error, Result};

/// A metric as transformers holds it: counts of samples and bytes are integers.
fn metric(key: &str, value: f64) -> PyValue {
    if key.ends_with("_samples") || key.contains("_mem_") {
        PyValue::Int(value as i64)
    } else {
        PyValue::Float(value)
    }
}

fn write(path: &Path, text: String) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// `save_metrics(split, metrics)`: `<split>_results.json`, and the metrics merged
/// into `all_results.json`.
pub(crate) fn save_metrics(dir: &Path, split: &str, metrics: &BTreeMap<String, f64>) -> Result<()> {
    let values: BTreeMap<String, PyValue> = metrics
        .iter()
        .map(|(k, v)| (k.clone(), metric(k, *v)))
        .collect();
    std::fs::create_dir_all(dir).map_err(|e| Error::Config(format!("{}: {e}", dir.display())))?;
    write(
        &dir.join(format!("{split}_results.json")),
        dumps_py_indent(&PyValue::Dict(values.clone()), 4),
    )?;
    let all_path = dir.join("all_results.json");
    let mut all = match std::fs::read_to_string(&all_path) {
        Ok(text) => match loads(&text) {
            Ok(PyValue::Dict(d)) => d,
            _ => {
                return Err(Error::Config(format!(
                    "{}: not a JSON object; remove it or choose another output_dir",
                    all_path.display()
                )));
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(Error::Config(format!("{}: {e}", all_path.display()))),
    };
    all.extend(values);
    write(&all_path, dumps_py_indent(&PyValue::Dict(all), 4))
}

/// How a classifier's logits become a prediction, from its `config.json`.
enum Head {
    /// One output: the value, `{:3.3f}`.
    Regression,
    /// The class of the largest logit, by name.
    SingleLabel(Vec<String>),
    /// Every class whose logit is above 0, as a Python list of names.
    MultiLabel(Vec<String>),
}

/// `predict_results.txt`: `index<TAB>prediction` per row of the logits `[n, labels]`,
/// after the header `index<TAB>prediction`.
pub(crate) fn save_predictions(dir: &Path, config: &Value, logits: &[Vec<f32>]) -> Result<()> {
    let names: Vec<String> = match config.get("id2label").and_then(Value::as_object) {
        Some(m) => {
            let mut pairs: Vec<(usize, String)> = m
                .iter()
                .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string())))
                .collect();
            pairs.sort();
            pairs.into_iter().map(|(_, n)| n).collect()
        }
        None => Vec::new(),
    };
    let width = logits.first().map_or(0, Vec::len);
    let names = if names.len() == width {
        names
    } else {
        (0..width).map(|i| i.to_string()).collect()
    };
    let head = match config.get("problem_type").and_then(Value::as_str) {
        Some("regression") => Head::Regression,
        Some("multi_label_classification") => Head::MultiLabel(names),
        _ if width == 1 => Head::Regression,
        _ => Head::SingleLabel(names),
    };
    let mut text = String::from("index\tprediction\n");
    for (i, row) in logits.iter().enumerate() {
        let item = match &head {
            Head::Regression => format!("{:3.3}", row.first().copied().unwrap_or(0.0)),
            Head::SingleLabel(names) => {
                let best = row
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
                    .map_or(0, |(j, _)| j);
                names[best].clone()
            }
            Head::MultiLabel(names) => {
                let chosen: Vec<String> = row
                    .iter()
                    .zip(names)
                    .filter(|(x, _)| **x > 0.0)
                    .map(|(_, n)| format!("'{n}'"))
                    .collect();
                format!("[{}]", chosen.join(", "))
            }
        };
        text += &format!("{i}\t{item}\n");
    }
    write(&dir.join("predict_results.txt"), text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metrics_files_are_written_and_merged_as_save_metrics_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        let m = BTreeMap::from([
            ("train_loss".to_string(), 0.5),
            ("train_samples".to_string(), 96.0),
        ]);
        save_metrics(dir.path(), "train", &m).unwrap();
        save_metrics(
            dir.path(),
            "eval",
            &BTreeMap::from([("eval_loss".to_string(), 0.25)]),
        )
        .unwrap();
        let train = std::fs::read_to_string(dir.path().join("train_results.json")).unwrap();
        assert_eq!(
            train,
            "{\n    \"train_loss\": 0.5,\n    \"train_samples\": 96\n}"
        );
        let all = std::fs::read_to_string(dir.path().join("all_results.json")).unwrap();
        assert!(all.contains("\"eval_loss\": 0.25,\n    \"train_loss\": 0.5"));
        std::fs::write(dir.path().join("all_results.json"), "[1]").unwrap();
        let e = save_metrics(dir.path(), "eval", &BTreeMap::new()).unwrap_err();
        assert!(e.to_string().contains("not a JSON object"), "{e}");
    }

    #[test]
    fn predictions_are_named_classes_values_or_lists() {
        let dir = tempfile::tempdir().unwrap();
        let config = json!({"id2label": {"0": "neg", "1": "pos"}});
        save_predictions(dir.path(), &config, &[vec![0.1, 0.9], vec![2.0, -1.0]]).unwrap();
        let text = std::fs::read_to_string(dir.path().join("predict_results.txt")).unwrap();
        assert_eq!(text, "index\tprediction\n0\tpos\n1\tneg\n");
        save_predictions(dir.path(), &json!({}), &[vec![1.23456]]).unwrap();
        let text = std::fs::read_to_string(dir.path().join("predict_results.txt")).unwrap();
        assert_eq!(text, "index\tprediction\n0\t1.235\n");
        let multi = json!({"problem_type": "multi_label_classification",
            "id2label": {"0": "a", "1": "b", "2": "c"}});
        save_predictions(dir.path(), &multi, &[vec![1.0, -1.0, 0.5]]).unwrap();
        let text = std::fs::read_to_string(dir.path().join("predict_results.txt")).unwrap();
        assert_eq!(text, "index\tprediction\n0\t['a', 'c']\n");
    }
}

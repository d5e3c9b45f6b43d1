//! `kiln train`, `kiln eval` and `kiln predict`: a config and flags in, the run's
//! report out.

use std::path::PathBuf;

use crate::config::RunConfig;
use crate::error::Error;
use crate::{CmdResult, ok};

/// A config path (optional, first) and the `--field value` / `--field=value` pairs
/// after it.
type ConfigAndFlags = (Option<PathBuf>, Vec<(String, String)>);

fn config_and_flags(args: &[String]) -> Result<ConfigAndFlags, Error> {
    let mut it = args.iter().peekable();
    let config = match it.peek() {
        Some(a) if !a.starts_with("--") => it.next().map(PathBuf::from),
        _ => None,
    };
    let mut flags = Vec::new();
    while let Some(a) = it.next() {
        let Some(name) = a.strip_prefix("--") else {
            return Err(Error::Usage(format!(
                "unexpected argument {a:?}: flags are --field value"
            )));
        };
        let (name, value) = match name.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => {
                let v = it
                    .next()
                    .ok_or_else(|| Error::Usage(format!("--{name} needs a value")))?;
                (name.to_string(), v.clone())
            }
        };
        flags.push((name.replace('-', "_"), value));
    }
    Ok((config, flags))
}

/// The run a command line describes: its config file with the flags over it; without a
/// file, the bundled default run (when `default`) — unless the flags name a model folder
/// to fine-tune, which the bundled sentiment run does not describe: then transformers'
/// defaults, as `run_clm.py --model_name_or_path DIR` starts from.
fn run_config(args: &[String], default: bool) -> Result<RunConfig, Error> {
    let (config, flags) = config_and_flags(args)?;
    let gives_model = flags
        .iter()
        .any(|(n, _)| matches!(n.as_str(), "model" | "init_from" | "model_name_or_path"));
    let mut cfg = match config {
        Some(path) => RunConfig::from_file(&path)?,
        None if default && !gives_model => RunConfig::bundled_default()?,
        None => RunConfig::default(),
    };
    for (name, value) in flags {
        let name = if name == "model" {
            "init_from".to_string()
        } else {
            name
        };
        cfg.set(&name, &value)
            .map_err(|e| Error::Usage(e.to_string()))?;
    }
    Ok(cfg)
}

pub(crate) fn train(args: &[String]) -> CmdResult {
    let cfg = run_config(args, true)?;
    let stop = match cfg.training.save_on_signal {
        true => Some(crate::run::install_stop_signals()?),
        false => None,
    };
    let summary = crate::run::train_until(&cfg, false, stop)?;
    if summary.rank != 0 {
        // One report for a multi-process run: rank 0's.
        return ok(String::new());
    }
    let dir = summary.output_dir.display().to_string();
    let mut s = String::new();
    if let Some(train) = &summary.train {
        s += &format!(
            "trained {} for {} steps (training loss {:.4})\n",
            summary.architecture, train.global_step, train.training_loss
        );
    }
    if let Some(eval) = &summary.eval {
        s += &format!(
            "eval: {}\n",
            serde_json::to_string(eval).unwrap_or_default()
        );
    }
    if summary.predicted {
        s += &format!("predictions written to {dir}/predict_results.txt\n");
    }
    if summary.train.is_none() {
        // do_train false: the model was not trained, so not saved either.
        return ok(s);
    }
    let causal = kiln_trainer::Task::for_architecture(&summary.architecture)
        == Some(kiln_trainer::Task::CausalLm);
    let auto = if causal {
        "AutoModelForCausalLM"
    } else {
        "AutoModelForSequenceClassification"
    };
    if kiln_peft::folder::is_adapter(&summary.output_dir) {
        let peft = format!("AutoPeft{}", auto.trim_start_matches("Auto"));
        s += &format!(
            "LoRA adapter saved to {dir} (checkpoints: kiln checkpoints {dir}; merged: kiln merge {dir} MERGED)\n"
        );
        s += "load it in Python:\n";
        s += &format!("  from peft import {peft}; from transformers import AutoTokenizer\n");
        s += &format!(
            "  model = {peft}.from_pretrained({dir:?}); tokenizer = AutoTokenizer.from_pretrained({dir:?})\n"
        );
        return ok(s);
    }
    s += &format!("model saved to {dir} (checkpoints: kiln checkpoints {dir})\n");
    s += "load it in Python:\n";
    s += &format!("  from transformers import {auto}, AutoTokenizer\n");
    s += &format!(
        "  model = {auto}.from_pretrained({dir:?}); tokenizer = AutoTokenizer.from_pretrained({dir:?})\n"
    );
    ok(s)
}

pub(crate) fn eval(args: &[String]) -> CmdResult {
    let cfg = run_config(args, false)?;
    let metrics = crate::run::evaluate(&cfg)?;
    ok(format!(
        "{}\n",
        serde_json::to_string(&metrics).unwrap_or_default()
    ))
}

pub(crate) fn predict(
    model: &std::path::Path,
    base: Option<&std::path::Path>,
    texts: &[String],
    max_new_tokens: Option<usize>,
    device: &str,
    as_json: bool,
) -> CmdResult {
    let v = crate::run::predict(model, base, texts, max_new_tokens, device)?;
    let text = if as_json {
        v.to_string()
    } else {
        serde_json::to_string_pretty(&v).unwrap_or_default()
    };
    ok(format!("{text}\n"))
}

pub(crate) fn merge(
    adapter: &std::path::Path,
    output: &std::path::Path,
    base: Option<&std::path::Path>,
) -> CmdResult {
    let out = crate::run::merge(adapter, output, base)?;
    ok(format!(
        "merged {} into its base model: {}\n",
        adapter.display(),
        out.display()
    ))
}

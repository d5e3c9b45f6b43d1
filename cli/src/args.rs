//! The command line: clap's definitions of `kiln`'s subcommands and their flags.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Train and checkpoint models outside Python"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Describe a tensor file, shard index or model folder.
    Inspect {
        /// safetensors or PyTorch file, shard index, or model folder.
        path: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Convert between safetensors and PyTorch .bin, file to file or folder to folder; a
    /// GPT-2 or Llama-family model folder to GGUF (OUTPUT.gguf, --outtype); or, with
    /// --consolidate, a checkpoint's sharded optimizer state into one file.
    Convert {
        /// Input file, shard index or model folder (with --consolidate: a checkpoint
        /// folder whose optimizer state is sharded, optimizer.rank<r>-of-<w>.*).
        input: PathBuf,
        /// Output file (format from its extension), or folder (Hugging Face names);
        /// with --consolidate, the output_dir that receives checkpoint-<step>.
        output: PathBuf,
        /// Consolidate the per-rank optimizer shards of a ZeRO-1 checkpoint into one
        /// optimizer.pt, writing OUTPUT/checkpoint-<step> (resumable by any number of
        /// processes, and by transformers' Trainer).
        #[arg(long, conflicts_with_all = ["to", "max_shard_size", "outtype"])]
        consolidate: bool,
        /// Output format (default: OUTPUT's extension; safetensors for a folder).
        #[arg(long, value_enum)]
        to: Option<ToFormat>,
        /// GGUF only: the type of the 2-D weights (f32, f16, bf16, q8_0; default f16, as
        /// convert_hf_to_gguf.py); 1-D tensors and norms stay f32.
        #[arg(long, value_parser = parse_outtype)]
        outtype: Option<kiln_formats::gguf::FileType>,
        /// Shard a folder output at this size ("5GB" = 5e9 bytes, "500MB", "1GiB").
        #[arg(long, value_parser = parse_size)]
        max_shard_size: Option<u64>,
    },
    /// Read every byte and check structure, CRCs and shard consistency.
    Verify {
        /// File, shard index, model folder or checkpoint folder.
        path: PathBuf,
    },
    /// Train a model: `kiln train [CONFIG.toml] [--FIELD VALUE ...]`; without a config, the
    /// bundled default (a small BERT sentiment classifier).
    Train {
        /// CONFIG.toml, then `--field value` pairs in transformers' spelling
        /// (`--save_steps 10`, `--train_file x.jsonl`, `--resume_from_checkpoint last`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CONFIG] [--FIELD VALUE"
        )]
        args: Vec<String>,
    },
    /// Evaluate a saved model: `kiln eval [CONFIG] --model DIR --validation_file F`;
    /// prints the metrics as JSON.
    Eval {
        /// CONFIG.toml and/or `--field value` pairs (`--model DIR` = `--init_from DIR`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CONFIG] [--FIELD VALUE"
        )]
        args: Vec<String>,
    },
    /// Run a saved model on texts.
    Predict {
        /// The saved model folder, or a LoRA adapter folder (kiln's or peft's).
        #[arg(long)]
        model: PathBuf,
        /// An adapter's base model folder (default: its base_model_name_or_path).
        #[arg(long)]
        base: Option<PathBuf>,
        /// A text (repeat for several).
        #[arg(long = "text", required = true)]
        texts: Vec<String>,
        /// GPT-2: generate this many tokens greedily.
        #[arg(long)]
        max_new_tokens: Option<usize>,
        /// Device (auto, cpu, cuda, cuda:N, metal).
        #[arg(long, default_value = "auto")]
        device: String,
        /// Print JSON (the default output is JSON too, indented).
        #[arg(long)]
        json: bool,
    },
    /// Merge a LoRA adapter into its base model (W + scaling·B·A, trained heads in
    /// place), as peft's merge_and_unload: a full model folder from_pretrained loads.
    Merge {
        /// The adapter folder (kiln's or peft's).
        adapter: PathBuf,
        /// The folder to write the merged model to.
        output: PathBuf,
        /// The base model folder (default: the adapter's base_model_name_or_path).
        #[arg(long)]
        base: Option<PathBuf>,
    },
    /// Draw a run's curves from its trainer_state.json (train loss, eval loss and metrics,
    /// learning rate), with its checkpoints and the best one marked; give several
    /// output folders to compare runs on one figure.
    Plot {
        /// Training output folders (or checkpoint folders, or trainer_state.json files).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// The image to write, .png or .svg (default: FIRST_RUN/training_curves.png).
        #[arg(long)]
        out: Option<PathBuf>,
        /// A log_history key to draw, one panel each (repeat: --metric loss --metric
        /// grad_norm; default: loss, eval_loss, the other eval_* metrics, learning_rate).
        #[arg(long = "metric")]
        metrics: Vec<String>,
        /// The figure's size in pixels, WIDTHxHEIGHT (default: 1000 wide, 280 high per
        /// panel).
        #[arg(long, value_parser = parse_image_size)]
        size: Option<(u32, u32)>,
    },
    /// List the checkpoints of a training output folder.
    Checkpoints {
        /// The training run's output_dir.
        output_dir: PathBuf,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Compare the tensors of two files or folders of any formats.
    Diff {
        /// First collection.
        a: PathBuf,
        /// Second collection.
        b: PathBuf,
        /// Absolute tolerance; 0 with --rtol 0 (the default) means bit-identical.
        #[arg(long, default_value_t = 0.0, value_parser = parse_tolerance)]
        atol: f64,
        /// Relative tolerance (relative to B's values).
        #[arg(long, default_value_t = 0.0, value_parser = parse_tolerance)]
        rtol: f64,
    },
    /// List the device backends of this build: available or not and why, their devices
    /// and capabilities.
    Backends {
        /// Print a JSON array (or, with --device, one object) instead of text.
        #[arg(long)]
        json: bool,
        /// Select this device as training would (auto, cpu, cuda, cuda:1, metal) and print
        /// it; exit 1 with the reason when it cannot be had.
        #[arg(long, value_parser = parse_device)]
        device: Option<kiln_backend::DeviceSpec>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ToFormat {
    Safetensors,
    Bin,
    Gguf,
}

fn parse_outtype(s: &str) -> Result<kiln_formats::gguf::FileType, String> {
    s.parse().map_err(|e: kiln_formats::Error| e.to_string())
}

fn parse_image_size(s: &str) -> Result<(u32, u32), String> {
    let parsed = s
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    parsed.ok_or_else(|| format!("{s:?} is not WIDTHxHEIGHT in pixels (e.g. 1200x900)"))
}

fn parse_size(s: &str) -> Result<u64, String> {
    kiln_formats::shard::parse_size(s).map_err(|e| e.to_string())
}

fn parse_device(s: &str) -> Result<kiln_backend::DeviceSpec, String> {
    s.parse().map_err(|e: kiln_backend::Error| e.to_string())
}

fn parse_tolerance(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x >= 0.0 && x.is_finite() => Ok(x),
        _ => Err(format!("{s:?} is not a finite number >= 0")),
    }
}

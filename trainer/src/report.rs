//! `report_to = "tensorboard"`: TensorBoard event files as transformers'
//! `TensorBoardCallback` writes them through torch's `SummaryWriter`.
//!
//! - The folder: `logging_dir`, else `TENSORBOARD_LOGGING_DIR`, else transformers'
//!   default `output_dir/runs/<Mon DD_HH-MM-SS>_<host>`; the file
//!   `events.out.tfevents.<unix time>.<host>.<pid>.0`, opened by the main process only.
//! - The records: tensorflow's `Event` protocol buffers (`brain.Event:2` first), each
//!   framed as TFRecord does (length, masked CRC-32C of the length, data, masked
//!   CRC-32C of the data) and flushed at each log, so a crashed run's curves survive.
//! - What is written: the training arguments as text (`args`) and the model's config
//!   (`model_config`) at the start; every numeric log value as a scalar at
//!   `global_step`, its key rewritten as transformers' `rewrite_logs` does
//!   (`eval_loss` → `eval/loss`, `loss` → `train/loss`).
//!
//! A resumed run writes a new file into its folder (as transformers does), which
//! TensorBoard reads together with the earlier ones.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_checkpoint::state::TrainerState;
use kiln_formats::pyjson::PyValue;
use prost::Message;

use crate::args::TrainingArguments;
use crate::callback::{TrainerCallback, TrainerControl};

/// tensorflow's `Event` (event.proto), the fields kiln writes.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

/// tensorflow's `Summary` (summary.proto).
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `Summary.Value`: a scalar (`simple_value`) or a tensor with plugin metadata.
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
    #[prost(message, optional, tag = "8")]
    tensor: Option<TensorProto>,
    #[prost(message, optional, tag = "9")]
    metadata: Option<SummaryMetadata>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    plugin_data: Option<PluginData>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PluginData {
    #[prost(string, tag = "1")]
    plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    content: Vec<u8>,
}

/// tensorflow's `TensorProto`, for a string tensor.
#[derive(Clone, PartialEq, prost::Message)]
struct TensorProto {
    /// `DT_STRING` = 7.
    #[prost(int32, tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    string_val: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    dim: Vec<Dim>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Dim {
    #[prost(int64, tag = "1")]
    size: i64,
}

/// TFRecord's masked CRC-32C.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// An open event file.
#[derive(Debug)]
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// transformers' default TensorBoard folder under `output_dir`:
/// `runs/<Mon DD_HH-MM-SS>_<host>` in local time.
pub fn default_logging_dir(output_dir: &Path) -> PathBuf {
    let stamp = jiff::Zoned::now().strftime("%b%d_%H-%M-%S").to_string();
    output_dir
        .join("runs")
        .join(format!("{stamp}_{}", kiln_checkpoint::lock::host_name()))
}

impl EventWriter {
    /// Creates `dir` and a new event file in it, with the file-version record.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let name = format!(
            "events.out.tfevents.{}.{}.{}.0",
            now() as u64,
            kiln_checkpoint::lock::host_name(),
            std::process::id()
        );
        let path = dir.join(name);
        let file = File::create(&path)?;
        let mut w = EventWriter { file, path };
        w.write(&Event {
            wall_time: now(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        w.flush()?;
        Ok(w)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &Event) -> std::io::Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc(&len).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.file.write_all(&record)
    }

    fn summary(&mut self, step: u64, value: SummaryValue) -> std::io::Result<()> {
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value: vec![value] }),
        })
    }

    /// A scalar, as `SummaryWriter.add_scalar(tag, value, step)`.
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: u64) -> std::io::Result<()> {
        self.summary(
            step,
            SummaryValue {
                tag: tag.into(),
                simple_value: Some(value as f32),
                ..Default::default()
            },
        )
    }

    /// A text, as `SummaryWriter.add_text(tag, text, step)` (tag `<tag>/text_summary`,
    /// the text plugin's string tensor).
    pub fn add_text(&mut self, tag: &str, text: &str, step: u64) -> std::io::Result<()> {
        self.summary(
            step,
            SummaryValue {
                tag: format!("{tag}/text_summary"),
                tensor: Some(TensorProto {
                    dtype: 7,
                    tensor_shape: Some(TensorShape {
                        dim: vec![Dim { size: 1 }],
                    }),
                    string_val: vec![text.as_bytes().to_vec()],
                }),
                metadata: Some(SummaryMetadata {
                    plugin_data: Some(PluginData {
                        plugin_name: "text".into(),
                        content: Vec::new(),
                    }),
                }),
                ..Default::default()
            },
        )
    }

    /// Makes what was written durable against a crash of the process.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// transformers' `rewrite_logs`: `eval_x` → `eval/x`, `test_x` → `test/x`, the rest
/// `train/x`.
pub fn tensorboard_tag(key: &str) -> String {
    if let Some(k) = key.strip_prefix("eval_") {
        format!("eval/{k}")
    } else if let Some(k) = key.strip_prefix("test_") {
        format!("test/{k}")
    } else {
        format!("train/{key}")
    }
}

/// transformers' `TensorBoardCallback` (see the module docs). The trainer adds it on the
/// main process when `report_to` names `tensorboard` (or `all`).
#[derive(Debug)]
pub struct TensorBoardCallback {
    dir: PathBuf,
    model_config: Option<String>,
    writer: Option<EventWriter>,
    /// The first error, reported once (a full disk must not stop training).
    failed: bool,
}

impl TensorBoardCallback {
    /// Writes into `dir`; `model_config` is the model's `config.json` text.
    pub fn new(dir: PathBuf, model_config: Option<String>) -> Self {
        TensorBoardCallback {
            dir,
            model_config,
            writer: None,
            failed: false,
        }
    }

    fn fail(&mut self, e: std::io::Error) {
        if !self.failed {
            eprintln!(
                "warning: TensorBoard logging to {} stopped: {e}",
                self.dir.display()
            );
        }
        self.failed = true;
        self.writer = None;
    }
}

impl TrainerCallback for TensorBoardCallback {
    fn name(&self) -> &str {
        "TensorBoardCallback"
    }

    fn on_train_begin(
        &mut self,
        args: &TrainingArguments,
        state: &TrainerState,
        _control: &mut TrainerControl,
    ) {
        let result = EventWriter::create(&self.dir).and_then(|mut w| {
            let args_json = serde_json::to_string_pretty(args).unwrap_or_default();
            w.add_text("args", &args_json, state.global_step)?;
            if let Some(c) = &self.model_config {
                w.add_text("model_config", c, state.global_step)?;
            }
            w.flush()?;
            Ok(w)
        });
        match result {
            Ok(w) => self.writer = Some(w),
            Err(e) => self.fail(e),
        }
    }

    fn on_log(
        &mut self,
        _args: &TrainingArguments,
        state: &TrainerState,
        _control: &mut TrainerControl,
        logs: &BTreeMap<String, PyValue>,
    ) {
        let Some(w) = &mut self.writer else { return };
        let step = state.global_step;
        let mut result = Ok(());
        for (k, v) in logs {
            let value = match v {
                PyValue::Float(f) => *f,
                PyValue::Int(i) => *i as f64,
                PyValue::UInt(u) => *u as f64,
                _ => continue,
            };
            result = result.and_then(|()| w.add_scalar(&tensorboard_tag(k), value, step));
        }
        if let Err(e) = result.and_then(|()| w.flush()) {
            self.fail(e);
        }
    }

    fn on_train_end(
        &mut self,
        _args: &TrainingArguments,
        _state: &TrainerState,
        _control: &mut TrainerControl,
    ) {
        // Kept open: an evaluation after training (kiln train's, a script's) logs too,
        // as transformers' callback reopens its writer for it.
        if let Some(w) = &mut self.writer
            && let Err(e) = w.flush()
        {
            self.fail(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_framed_as_tfrecord() {
        // The masked CRC of TFRecord's reference: crc32c("") = 0, masked 0xa282ead8.
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.add_scalar("train/loss", 0.5, 3).unwrap();
        w.flush().unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut at = 0;
        let mut events = Vec::new();
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(len_crc, masked_crc(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            events.push(Event::decode(data).unwrap());
            at += 16 + len;
        }
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let v = &events[1].summary.as_ref().unwrap().value[0];
        assert_eq!(
            (v.tag.as_str(), v.simple_value, events[1].step),
            ("train/loss", Some(0.5), 3)
        );
        assert_eq!(tensorboard_tag("eval_accuracy"), "eval/accuracy");
        assert_eq!(tensorboard_tag("learning_rate"), "train/learning_rate");
    }
}

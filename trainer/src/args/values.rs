//! The values some arguments take: when to log, evaluate and save, what a failed save
//! does, log levels, the sampling order, which tokens are counted.

use serde::{Deserialize, Serialize};

/// When to log, evaluate or save.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Never.
    No,
    /// Every N steps.
    Steps,
    /// At the end of every epoch.
    Epoch,
    /// After an evaluation that improved the best metric (saving only).
    Best,
}

impl Strategy {
    pub(super) fn name(self) -> &'static str {
        match self {
            Strategy::No => "no",
            Strategy::Steps => "steps",
            Strategy::Epoch => "epoch",
            Strategy::Best => "best",
        }
    }
}

/// What training does when a checkpoint save fails (disk full, a read-only folder, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveErrorPolicy {
    /// Stop training with the error (the default); `kiln train` then saves the model in
    /// memory to an emergency folder.
    Stop,
    /// Log the error (`save_error` in `log_history`) and go on training.
    Continue,
}

/// `log_level` / `log_level_replica`: transformers' names of Python's logging levels.
/// kiln's informational lines ("resuming from …", "loading best model from …") are
/// `info`, its warnings and notes about the arguments `warning`; the log entries
/// themselves are printed at every level, as transformers' progress callbacks print them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Everything.
    Debug,
    /// Informational lines and up.
    Info,
    /// Warnings and up.
    Warning,
    /// Errors only.
    Error,
    /// Errors only (kiln has no level above errors).
    Critical,
    /// Leave the level as it is: info on the main process (kiln's lines), warning on
    /// the others.
    Passive,
}

/// `train_sampling_strategy`: the order training examples are drawn in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplingStrategy {
    /// Shuffled each epoch.
    Random,
    /// In the data's order.
    Sequential,
    /// Shuffled, then grouped by length.
    GroupByLength,
    /// transformers' batch rebalancing (refused: not implemented).
    BatchRebalance,
}

/// `include_num_input_tokens_seen`: which training tokens are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokensSeen {
    /// None (the default).
    No,
    /// Every position of `input_ids`, padding included.
    All,
    /// The positions the attention mask keeps (all of them without a mask).
    NonPadding,
}

impl<'de> Deserialize<'de> for TokensSeen {
    /// `"no"`, `"all"`, `"non_padding"`, or a boolean (`true` = all), as transformers.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Flag(bool),
            Name(String),
        }
        match Given::deserialize(d)? {
            Given::Flag(true) => Ok(TokensSeen::All),
            Given::Flag(false) => Ok(TokensSeen::No),
            Given::Name(n) => match n.to_ascii_lowercase().as_str() {
                "no" | "false" => Ok(TokensSeen::No),
                "all" | "true" => Ok(TokensSeen::All),
                "non_padding" => Ok(TokensSeen::NonPadding),
                _ => Err(serde::de::Error::custom(format!(
                    "include_num_input_tokens_seen {n:?}: give all, non_padding or no (or true/false)"
                ))),
            },
        }
    }
}

//! transformers' `TrainingArguments` fields that are not fields of kiln's
//! [`TrainingArguments`](crate::TrainingArguments), each with what kiln does when a
//! run sets it, so that a user's existing command line runs unchanged wherever it
//! means something here and is refused in one line where it does not.
//!
//! Every entry carries transformers 5's default. Given that default (or `None`), a
//! field asks for nothing kiln lacks and is accepted silently. Given another value it
//! is either accepted with one printed line saying why it changes nothing here
//! ([`Disposition::NoEffect`]) or refused with one line saying what to do instead
//! ([`Disposition::Refused`]). `tests/args_parity.rs` walks transformers'
//! `dataclasses.fields(TrainingArguments)` and fails on a field that is in neither
//! kiln's arguments nor this table, or whose default here is not transformers'.
//! `TRAINING_ARGUMENTS.md` (written by [`markdown`]) lists them all.

use serde_json::Value;

/// What kiln does with a field set to something other than transformers' default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Accepted; the reason it changes nothing here is printed once.
    NoEffect(&'static str),
    /// Refused before any work, with what to do instead.
    Refused(&'static str),
}

/// The type transformers gives the field, which a value must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `true`/`false`.
    Bool,
    /// A whole number.
    Int,
    /// A number.
    Float,
    /// A string.
    Str,
    /// A list of strings, or one comma-separated string.
    List,
    /// A JSON object, or a string (a path, or JSON).
    Dict,
}

/// One field of transformers' `TrainingArguments` that kiln's arguments do not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// transformers' name.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// transformers 5's default as JSON (`null` for `None`).
    pub default: &'static str,
    /// What a value other than the default does.
    pub otherwise: Disposition,
}

const fn f(name: &'static str, kind: Kind, default: &'static str, otherwise: Disposition) -> Field {
    Field {
        name,
        kind,
        default,
        otherwise,
    }
}

use Disposition::{NoEffect, Refused};
use Kind::{Bool, Dict, Int, List, Str};

const LOADER: Disposition = NoEffect(
    "kiln builds batches in the training process, in a fixed order; there are no loader workers",
);
const HUB: Disposition =
    Refused("kiln does not push to the Hub; upload output_dir with `hf upload`");
const COMPILE: Disposition = Refused(
    "there is no torch graph to compile: kiln's models are compiled Rust with fused ops; drop it",
);
const TRACKIO: Disposition =
    NoEffect("trackio is not one of kiln's integrations (report_to takes tensorboard)");
const DDP: Disposition = NoEffect(
    "kiln's data parallelism all-reduces every trainable parameter's gradient in fixed buckets; torch DDP's graph options do not apply",
);

/// The fields, in transformers 5.25's order.
#[rustfmt::skip]
pub const FIELDS: &[Field] = &[
    f("optim_args", Str, "null", Refused("kiln's optimizers take adam_beta1, adam_beta2, adam_epsilon and weight_decay; give those")),
    f("optim_target_modules", List, "null", Refused("GaLore, APOLLO and the other optimizers that take target modules are not in kiln; use optim adamw or sgd")),
    f("bf16_full_eval", Bool, "false", Refused("not implemented in kiln yet: with bf16 the evaluation runs in bf16 already; drop it")),
    f("fp16_full_eval", Bool, "false", Refused("not implemented in kiln yet: with fp16 the evaluation runs in fp16 already; drop it")),
    f("tf32", Bool, "null", NoEffect("kiln never computes f32 products in TF32")),
    f("torch_compile", Bool, "false", COMPILE),
    f("torch_compile_backend", Str, "null", COMPILE),
    f("torch_compile_mode", Str, "null", COMPILE),
    f("use_liger_kernel", Bool, "false", Refused("Liger's kernels are Triton for torch; kiln fuses its own ops; drop it")),
    f("liger_kernel_config", Dict, "null", Refused("Liger's kernels are Triton for torch; kiln fuses its own ops; drop it")),
    f("use_cache", Bool, "false", NoEffect("kiln's models keep no key/value cache while training")),
    f("torch_empty_cache_steps", Int, "null", NoEffect("there is no torch caching allocator to empty")),
    f("auto_find_batch_size", Bool, "false", Refused("not implemented in kiln: give per_device_train_batch_size")),
    f("log_on_each_node", Bool, "true", NoEffect("only the main process of a kiln run prints log lines")),
    f("project", Str, "\"huggingface\"", TRACKIO),
    f("trackio_space_id", Str, "null", TRACKIO),
    f("trackio_bucket_id", Str, "null", TRACKIO),
    f("trackio_static_space_id", Str, "null", TRACKIO),
    f("eval_do_concat_batches", Bool, "true", Refused("kiln's compute_metrics always gets the evaluation batches concatenated; drop it")),
    f("eval_use_gather_object", Bool, "false", NoEffect("kiln gathers evaluation tensors, never Python objects")),
    f("include_for_metrics", List, "[]", Refused("kiln's EvalPrediction holds the logits and labels only; drop it")),
    f("batch_eval_metrics", Bool, "false", Refused("kiln's compute_metrics is called once on the whole evaluation set; drop it")),
    f("enable_jit_checkpoint", Bool, "false", NoEffect("kiln already saves a checkpoint on SIGTERM and SIGINT (save_on_signal, default true)")),
    f("push_to_hub", Bool, "false", HUB),
    f("hub_token", Str, "null", HUB),
    f("hub_private_repo", Bool, "null", HUB),
    f("hub_model_id", Str, "null", HUB),
    f("hub_strategy", Str, "\"every_save\"", HUB),
    f("hub_always_push", Bool, "false", HUB),
    f("hub_revision", Str, "null", HUB),
    f("full_determinism", Bool, "false", NoEffect("kiln is always deterministic: the same arguments and seed give the same bits")),
    f("accelerator_config", Dict, "null", Refused("kiln does not run through accelerate; drop it")),
    f("parallelism_config", Dict, "null", Refused("kiln is data-parallel over the processes of mpirun (zero_stage = 1 shards the optimizer); drop it")),
    f("dataloader_num_workers", Int, "0", LOADER),
    f("dataloader_pin_memory", Bool, "true", LOADER),
    f("dataloader_persistent_workers", Bool, "false", LOADER),
    f("dataloader_prefetch_factor", Int, "null", LOADER),
    f("dataloader_multiprocessing_context", Str, "null", LOADER),
    f("dataloader_in_order", Bool, "true", LOADER),
    f("remove_unused_columns", Bool, "true", Refused("kiln's batches hold only what its models take; drop it")),
    f("length_column_name", Str, "\"length\"", NoEffect("kiln's datasets keep no extra columns: group_by_length counts each example's input_ids, as transformers does without that column")),
    f("ddp_find_unused_parameters", Bool, "null", DDP),
    f("ddp_broadcast_buffers", Bool, "null", DDP),
    f("ddp_static_graph", Bool, "null", DDP),
    f("ddp_backend", Str, "null", NoEffect("kiln's collective follows the launch: MPI under mpirun, NCCL between CUDA devices")),
    f("fsdp", Str, "null", Refused("kiln shards only the optimizer state (zero_stage = 1); drop it")),
    f("fsdp_config", Dict, "null", Refused("kiln shards only the optimizer state (zero_stage = 1); drop it")),
    f("deepspeed", Dict, "null", Refused("kiln's ZeRO stage 1 is zero_stage = 1; DeepSpeed's stages 2 and 3 and offloading are not offered")),
    f("debug", Str, "\"\"", Refused("torch's underflow/overflow and TPU debugging aids are not in kiln; drop it")),
    f("local_rank", Int, "-1", NoEffect("kiln takes each process's rank from its launcher (mpirun)")),
];

/// The entry of `name`, if it is one of these fields.
pub fn field(name: &str) -> Option<&'static Field> {
    FIELDS.iter().find(|f| f.name == name)
}

/// What setting `field` to `value` (JSON, as a config table holds it) does: `Ok(None)`
/// for its default, `Ok(Some(line))` for a value that changes nothing here (the line
/// says why), `Err(line)` for a value of the wrong type or a refused one.
pub fn check(field: &Field, value: &Value) -> Result<Option<String>, String> {
    let shown = match value {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let fits = match (field.kind, value) {
        (_, Value::Null) => true,
        (Kind::Bool, v) => v.is_boolean(),
        (Kind::Int, v) => v.is_i64() || v.is_u64(),
        (Kind::Float, v) => v.is_number(),
        (Kind::Str, v) => v.is_string(),
        (Kind::List, v) => {
            v.is_string() || v.as_array().is_some_and(|a| a.iter().all(Value::is_string))
        }
        (Kind::Dict, v) => v.is_object() || v.is_string(),
    };
    if !fits {
        let want = match field.kind {
            Kind::Bool => "true or false",
            Kind::Int => "a whole number",
            Kind::Float => "a number",
            Kind::Str => "a string",
            Kind::List => "a list of names",
            Kind::Dict => "a JSON object or a path",
        };
        return Err(format!("{} must be {want}, got {shown}", field.name));
    }
    let default: Value = serde_json::from_str(field.default).unwrap_or(Value::Null);
    let same = |a: &Value, b: &Value| match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    };
    if value.is_null() || same(value, &default) || (value.as_str() == Some("") && default.is_null())
    {
        return Ok(None);
    }
    match field.otherwise {
        Disposition::NoEffect(why) => Ok(Some(format!(
            "{} {shown} changes nothing here: {why}",
            field.name
        ))),
        Disposition::Refused(why) => Err(format!("{} {shown}: {why}", field.name)),
    }
}

/// `text` (a command-line value) as the JSON value `field` takes.
pub fn parse(field: &Field, text: &str) -> Value {
    let t = text.trim();
    if t.eq_ignore_ascii_case("none") || t == "null" {
        return Value::Null;
    }
    match field.kind {
        Kind::Bool => match t.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Value::Bool(true),
            "false" | "0" | "no" => Value::Bool(false),
            _ => Value::String(t.to_string()),
        },
        Kind::Int | Kind::Float => serde_json::from_str::<serde_json::Number>(t)
            .map(Value::Number)
            .unwrap_or_else(|_| Value::String(t.to_string())),
        Kind::Dict => serde_json::from_str::<serde_json::Map<String, Value>>(t)
            .map(Value::Object)
            .unwrap_or_else(|_| Value::String(t.to_string())),
        Kind::Str | Kind::List => Value::String(t.to_string()),
    }
}

/// kiln's fields that transformers 5 does not have: kiln's own, and transformers 4's
/// names that kiln keeps reading.
pub const KILN_ONLY: &[&str] = &[
    "overwrite_output_dir",
    "warmup_ratio",
    "save_safetensors",
    "logging_dir",
    "group_by_length",
    "device",
    "async_save",
    "on_save_error",
    "save_on_signal",
    "zero_stage",
];

/// kiln's [`TrainingArguments`](crate::TrainingArguments) fields that transformers 5
/// has too, in kiln's order.
pub fn implemented() -> Vec<String> {
    match serde_json::to_value(crate::TrainingArguments::default()) {
        Ok(Value::Object(o)) => o
            .keys()
            .filter(|k| !KILN_ONLY.contains(&k.as_str()))
            .cloned()
            .collect(),
        _ => Vec::new(),
    }
}

/// The table of every transformers field, as `TRAINING_ARGUMENTS.md` holds it: the
/// [`implemented`] ones first, then [`FIELDS`].
pub fn markdown() -> String {
    let mut s = String::from(
        "# transformers' TrainingArguments in kiln\n\n\
         Generated from `kiln_trainer::parity` (`KILN_BLESS=1 cargo test -p kiln-trainer \
         --test parity_doc` rewrites it). Every field of transformers 5's \
         `TrainingArguments` is one of:\n\n\
         - **implemented** with transformers' semantics (a field of \
         `kiln_trainer::TrainingArguments`, also a `kiln train --FIELD` flag and a \
         `[training]` key);\n\
         - **no effect here**: accepted; a value other than transformers' default prints \
         one line saying why it changes nothing;\n\
         - **refused**: transformers' default is accepted, any other value is refused \
         before any work with the line shown.\n\n\
         kiln's own fields (`device`, `async_save`, `on_save_error`, `save_on_signal`, \
         `zero_stage`) and transformers 4's `overwrite_output_dir`, `warmup_ratio`, \
         `save_safetensors`, `logging_dir` and `group_by_length` are implemented too.\n\n\
         | field | in kiln | default | otherwise |\n|---|---|---|---|\n",
    );
    for name in implemented() {
        s += &format!("| `{name}` | implemented | | |\n");
    }
    for f in FIELDS {
        let (what, why) = match f.otherwise {
            Disposition::NoEffect(w) => ("no effect here", w),
            Disposition::Refused(w) => ("refused", w),
        };
        s += &format!("| `{}` | {what} | `{}` | {why} |\n", f.name, f.default);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_pass_silently_others_say_why() {
        let w = field("dataloader_num_workers").unwrap();
        assert_eq!(check(w, &json!(0)), Ok(None));
        let line = check(w, &json!(4)).unwrap().unwrap();
        assert!(
            line.starts_with("dataloader_num_workers 4 changes nothing here: "),
            "{line}"
        );
        let hub = field("push_to_hub").unwrap();
        assert_eq!(check(hub, &json!(false)), Ok(None));
        let e = check(hub, &json!(true)).unwrap_err();
        assert!(e.starts_with("push_to_hub true: kiln does not push"), "{e}");
        assert_eq!(
            check(field("hub_model_id").unwrap(), &Value::Null),
            Ok(None)
        );
        // Types as transformers has them.
        let e = check(w, &json!("four")).unwrap_err();
        assert_eq!(e, "dataloader_num_workers must be a whole number, got four");
        assert!(
            check(field("tf32").unwrap(), &json!(false))
                .unwrap()
                .is_some()
        );
        assert!(check(field("include_for_metrics").unwrap(), &json!(["a", 1])).is_err());
    }

    #[test]
    fn command_line_values_parse_as_the_field_takes_them() {
        let b = field("full_determinism").unwrap();
        assert_eq!(parse(b, "True"), json!(true));
        assert_eq!(parse(b, "none"), Value::Null);
        assert_eq!(
            parse(field("dataloader_prefetch_factor").unwrap(), "2"),
            json!(2)
        );
        assert_eq!(
            parse(field("deepspeed").unwrap(), "ds.json"),
            json!("ds.json")
        );
        assert_eq!(
            parse(field("fsdp_config").unwrap(), "{\"a\": 1}"),
            json!({"a": 1})
        );
        assert!(
            FIELDS
                .iter()
                .all(|f| serde_json::from_str::<Value>(f.default).is_ok())
        );
        let mut names: Vec<_> = FIELDS.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FIELDS.len());
    }
}

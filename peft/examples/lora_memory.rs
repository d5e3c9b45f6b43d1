//! What one training step of a Llama (hidden 256 × 4 layers, 8 × 128 tokens) holds: the
//! process's peak RSS after the forward and the backward pass, and the gradients left
//! in candle's store, for a full model or LoRA (r 16) on the layers named.
//!
//! `cargo run --release -p kiln-peft --example lora_memory -- [full|all-linear|q_proj]`
#![allow(clippy::unwrap_used, clippy::expect_used)]
use candle_core::{Device, Tensor};
use kiln_peft::{LoraConfig, PeftModel, Targets};
use kiln_trainer::model::{Batch, Model};
use kiln_trainer::rng::Rng;

fn hwm() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("VmHWM") || l.starts_with("VmRSS"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    let arg = std::env::args().nth(1).unwrap_or_default();
    let mut rng = Rng::seed_from_u64(1);
    let arch = kiln_models::registry::find("LlamaForCausalLM").unwrap();
    let config = serde_json::json!({"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 256});
    let base = (arch.build)(&config, &mut rng, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..8 * 128).map(|i| (i * 7 % 1000) as u32).collect();
    let ids = Tensor::from_vec(ids, (8, 128), &Device::Cpu).unwrap();
    let labels = ids.to_dtype(candle_core::DType::I64).unwrap();
    let batch = Batch {
        input_ids: ids,
        attention_mask: None,
        token_type_ids: None,
        labels: Some(labels),
    };
    let model: Box<dyn Model> = if arg == "full" {
        Box::new(base)
    } else {
        let t = if arg.is_empty() {
            "all-linear".to_string()
        } else {
            arg.clone()
        };
        let c = LoraConfig {
            r: 16,
            lora_alpha: 32.0,
            target_modules: Some(if t == "all-linear" {
                Targets::Pattern(t)
            } else {
                Targets::List(vec![t])
            }),
            ..Default::default()
        };
        Box::new(PeftModel::new(base, c, kiln_trainer::Task::CausalLm, None, &mut rng).unwrap())
    };
    println!("built: {}", hwm());
    for _ in 0..2 {
        let out = model.forward(&batch, Some(&mut rng)).unwrap();
        println!("forward: {}", hwm());
        let grads = out.loss.unwrap().backward().unwrap();
        let n = grads.get_ids().count();
        let bytes: usize = grads
            .get_ids()
            .filter_map(|id| grads.get_id(*id))
            .map(|t| t.elem_count() * 4)
            .sum();
        println!(
            "backward: {} grads, {:.1} MiB; {}",
            n,
            bytes as f64 / 1048576.0,
            hwm()
        );
    }
}

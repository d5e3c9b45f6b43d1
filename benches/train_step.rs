//! Criterion benches of one training step at the sizes `benches/speed_compare.sh` runs
//! whole (hidden 256 × 4 layers, sequence 128), through the crates' public APIs: the
//! forward pass with dropout, the backward pass, clipping and AdamW, for BERT (batch 16,
//! vocabulary 8000), GPT-2 and a Llama (batch 8, vocabulary 941, as the bundled corpus'
//! tokenizer gives), and the optimizer's parts alone. `benches/README.md` has results.
//!
//! It runs as the `kiln` binary does (kiln-cli's `main`): mimalloc as the allocator
//! (set `MIMALLOC_PURGE_DELAY=-1` to keep freed memory, as the binary does), candle's
//! element-wise pool spinning 200 pauses before it sleeps, and each step on one of
//! rayon's workers, so that the thread driving the step is one of the
//! threads computing. A program of its own that calls the crates from its main thread
//! with the system allocator measured 1.6× slower here (BERT 511 ms a step against
//! 320 ms): page faults of freed activations and a third thread beside two workers.
//!
//! `cargo bench --bench train_step` (set `RAYON_NUM_THREADS` to compare thread counts).
#![allow(clippy::expect_used)]

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use kiln::models::{
    BertConfig, BertForSequenceClassification, Gpt2Config, Gpt2LMHeadModel, LlamaConfig,
    LlamaForCausalLM, LlamaVariant,
};
use kiln::optim::{Hyper, OptimKind, Optimizer};
use kiln::trainer::rng::Rng;
use kiln::trainer::{Batch, Model};

const SEQ: usize = 128;

/// Random token ids `[batch, SEQ]` below `vocab`.
fn tokens(rng: &mut Rng, batch: usize, vocab: usize) -> Tensor {
    let ids: Vec<u32> = (0..batch * SEQ)
        .map(|_| rng.below(vocab as u64) as u32)
        .collect();
    Tensor::from_vec(ids, (batch, SEQ), &Device::Cpu).expect("token ids")
}

fn optimizer(model: &dyn Model) -> Optimizer {
    let hyper = Hyper {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let params = model
        .parameters()
        .into_iter()
        .map(|(name, var)| (name, var, true))
        .collect();
    Optimizer::new(OptimKind::AdamW, hyper, params)
}

/// One step on a rayon worker: forward with dropout, backward, clipping to norm 1,
/// AdamW.
fn step(model: &(dyn Model + Sync), batch: &Batch, opt: &mut Optimizer, rng: &mut Rng) {
    rayon::scope(|_| step_here(model, batch, opt, rng))
}

fn step_here(model: &dyn Model, batch: &Batch, opt: &mut Optimizer, rng: &mut Rng) {
    let out = model.forward(batch, Some(rng)).expect("forward");
    let loss = out.loss.expect("a loss");
    let mut grads = opt.grads_of(&loss).expect("backward");
    Optimizer::clip(&mut grads, 1.0).expect("clip");
    opt.step(&grads, 1e-4).expect("step");
}

fn bench_models(c: &mut Criterion) {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: no thread of this program reads the environment yet (candle's pools
        // start with the first tensor operation, below); the kiln binary sets the same.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200") };
    }
    let dev = Device::Cpu;
    let mut rng = Rng::seed_from_u64(0);
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);

    let bert_cfg = BertConfig {
        vocab_size: 8000,
        hidden_size: 256,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        intermediate_size: 1024,
        max_position_embeddings: 512,
        ..BertConfig::default()
    };
    let bert = BertForSequenceClassification::new(bert_cfg.with_num_labels(2), &mut rng, &dev)
        .expect("BERT");
    let labels: Vec<i64> = (0..16).map(|i| i % 2).collect();
    let batch = Batch {
        input_ids: tokens(&mut rng, 16, 8000),
        attention_mask: Some(Tensor::ones((16, SEQ), DType::U32, &dev).expect("mask")),
        token_type_ids: Some(Tensor::zeros((16, SEQ), DType::U32, &dev).expect("types")),
        labels: Some(Tensor::new(labels.as_slice(), &dev).expect("labels")),
    };
    let mut opt = optimizer(&bert);
    group.bench_function("bert_h256x4_b16", |b| {
        b.iter(|| step(&bert, &batch, &mut opt, &mut rng))
    });

    let gpt2_cfg = Gpt2Config {
        vocab_size: 941,
        n_embd: 256,
        n_layer: 4,
        n_head: 4,
        n_positions: 256,
        ..Gpt2Config::default()
    };
    let gpt2 = Gpt2LMHeadModel::new(gpt2_cfg, &mut rng, &dev).expect("GPT-2");
    let ids = tokens(&mut rng, 8, 941);
    let causal = |ids: &Tensor| Batch {
        input_ids: ids.clone(),
        attention_mask: None,
        token_type_ids: None,
        labels: Some(ids.to_dtype(DType::I64).expect("labels")),
    };
    let batch = causal(&ids);
    let mut opt = optimizer(&gpt2);
    group.bench_function("gpt2_h256x4_b8", |b| {
        b.iter(|| step(&gpt2, &batch, &mut opt, &mut rng))
    });

    let mut llama_cfg = LlamaConfig::default_for(LlamaVariant::Llama);
    llama_cfg.vocab_size = 941;
    llama_cfg.hidden_size = 256;
    llama_cfg.intermediate_size = 688;
    llama_cfg.num_hidden_layers = 4;
    llama_cfg.num_attention_heads = 4;
    llama_cfg.num_key_value_heads = Some(2);
    llama_cfg.max_position_embeddings = 256;
    let llama = LlamaForCausalLM::new(llama_cfg, &mut rng, &dev).expect("Llama");
    let mut opt = optimizer(&llama);
    group.bench_function("llama_h256x4_b8", |b| {
        b.iter(|| step(&llama, &batch, &mut opt, &mut rng))
    });
    group.finish();

    // The optimizer alone over BERT's parameters (3.3 M): the gradient norm and AdamW.
    let mut opt = optimizer(&bert);
    let grads: Vec<Option<Tensor>> = bert
        .parameters()
        .iter()
        .map(|(_, v)| Some(v.as_tensor().affine(1e-3, 0.0).expect("a gradient")))
        .collect();
    let mut group = c.benchmark_group("optimizer");
    group.sample_size(20);
    group.bench_function("grad_norm_bert_h256", |b| {
        b.iter(|| Optimizer::grad_norm(&grads).expect("norm"))
    });
    group.bench_function("adamw_bert_h256", |b| {
        b.iter(|| opt.step(&grads, 1e-4).expect("step"))
    });
    group.finish();
}

criterion_group!(benches, bench_models);
criterion_main!(benches);

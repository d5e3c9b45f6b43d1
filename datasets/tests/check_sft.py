"""TRL's and transformers' side of datasets/tests/sft_interop.rs: builds tokenizers with
chat templates (saved by transformers, for kiln to load), and for each job prepares the
data as TRL's SFTTrainer does and renders conversations with apply_chat_template.

Usage: python check_sft.py JOBS.json
JOBS.json: {"work": DIR, "tokenizers": [{"name", "template", "bos_post": bool,
            "eos": ..., "dir": optional existing folder (kiln's)}],
            "texts": [...training texts for the tokenizers...],
            "jobs": [{"tokenizer", "file", "sft": {SFTConfig keys}}],
            "renders": [{"tokenizer", "file"}]}
(passed as a one-element list, run_checker's jobs).
Prints one JSON line: {"results": [{"prepared": [[{"input_ids", "labels"}...]...],
"renders": [[{"text", "text_gen"}...]...], "dirs": {name: dir}}]} or {"skip": ...}.
"""
import json
import os
import sys

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]"]


def make_tokenizer(spec, texts, work):
    """A byte-level BPE trained on `texts`, with the template and specials of `spec`,
    saved by transformers' save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if spec["bos_post"]:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token=spec["eos"],
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "[INST]", "[/INST]"],
    )
    fast.chat_template = spec["template"]
    out = os.path.join(work, "tok-" + spec["name"])
    fast.save_pretrained(out)
    return out


def read_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prepare(tokenizer, rows, sft, work):
    """input_ids and labels of `rows` as SFTTrainer prepares them."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
        )
    )
    args = SFTConfig(
        output_dir=os.path.join(work, "trl-out"), report_to=[], bf16=False, use_cpu=True, **sft
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]


def render(tokenizer, rows):
    out = []
    for row in rows:
        messages = row.get("messages") or (row.get("prompt", []) + row.get("completion", []))
        tools = row.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        out.append(
            {
                "text": tokenizer.apply_chat_template(messages, tools=tools, tokenize=False),
                "text_gen": tokenizer.apply_chat_template(
                    messages, tools=tools, tokenize=False, add_generation_prompt=True
                ),
            }
        )
    return out


def main():
    spec = json.load(open(sys.argv[1]))[0]
    try:
        import transformers
        import trl  # noqa: F401
        from transformers import AutoTokenizer
    except ImportError as e:
        print(json.dumps({"skip": f"cannot import transformers/trl: {e}"}))
        return
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    work = spec["work"]
    dirs = {}
    for t in spec["tokenizers"]:
        dirs[t["name"]] = t.get("dir") or make_tokenizer(t, spec["texts"], work)
    prepared = []
    for job in spec["jobs"]:
        tokenizer = AutoTokenizer.from_pretrained(dirs[job["tokenizer"]])
        prepared.append(prepare(tokenizer, read_rows(job["file"]), job["sft"], work))
    renders = []
    for job in spec["renders"]:
        tokenizer = AutoTokenizer.from_pretrained(dirs[job["tokenizer"]])
        renders.append(render(tokenizer, read_rows(job["file"])))
    print(json.dumps({"results": [{"prepared": prepared, "renders": renders, "dirs": dirs}]}))


if __name__ == "__main__":
    main()

"""llama.cpp's and transformers' side of tests/cli_gguf.rs, for GGUF files kiln wrote.

For each job (a model folder and the GGUF kiln made of it): gguf-py's GGUFReader lists
the tensors; their names are the ones gguf-py's own TensorNameMap gives the folder's
tensors (what convert_hf_to_gguf.py maps them through); every tensor's bytes equal
gguf-py's quantize() of the folder's tensor, rearranged as convert_hf_to_gguf.py does
(GPT-2's Conv1D weights transposed, Llama's q/k permuted); the tokenizer keys are what
gguf-py's SpecialVocab and convert_hf_to_gguf.py's get_vocab_base rules find in the
folder; transformers loads the file (from_pretrained(dir, gguf_file=...)) and its
logits are compared with the folder's, and its tokenizer built from the file encodes as
the folder's. Jobs as a JSON list (argv[1]); one JSON line out."""

import json
import os
import sys

try:
    import numpy as np
    import torch
    import gguf
    import transformers
    from safetensors.torch import load_file
except ImportError as e:
    print(json.dumps({"skip": f"cannot import gguf/torch/transformers: {e}"}))
    sys.exit(0)

transformers.logging.set_verbosity_error()

ARCH = {"gpt2": gguf.MODEL_ARCH.GPT2, "llama": gguf.MODEL_ARCH.LLAMA,
        "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
         "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    vals = f.contents()
    return vals


def permute(w, n_head):
    # convert_hf_to_gguf.py's LlamaModel.permute.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_tensors(folder, arch, config, outtype):
    """{gguf name: expected stored numpy array}, as convert_hf_to_gguf.py would make it."""
    sd = load_file(os.path.join(folder, "model.safetensors"))
    n_blocks = config.get("num_hidden_layers", config.get("n_layer"))
    tmap = gguf.get_tensor_name_map(ARCH[arch], n_blocks)
    out = {}
    for name, t in sd.items():
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue
        if name == "lm_head.weight" and (arch == "gpt2" or config.get("tie_word_embeddings")):
            continue
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, f"gguf-py maps no name for {name}"
        x = t.to(torch.float32).numpy()
        if arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            x = x.T.copy()
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            x = permute(x, config["num_attention_heads"])
        if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            x = permute(x, config.get("num_key_value_heads") or config["num_attention_heads"])
        # convert_hf_to_gguf.py's type rule.
        qtype = TYPES[outtype]
        if x.ndim <= 1 or new.endswith("_norm.weight") or new == "position_embd.weight" or not new.endswith(".weight"):
            qtype = gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and x.shape[-1] % 32 != 0:
            qtype = gguf.GGMLQuantizationType.F16
        out[new] = (qtype, gguf.quants.quantize(x, qtype))
    return out


def vocab_expectations(folder, config):
    """get_vocab_base's tokens and types, and SpecialVocab's keys."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    vocab_size = config["vocab_size"]
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(5)
            continue
        t = reverse[i]
        if t in added:
            special = decoder[i].special or t in ("<pad>", "<mask>") or (t.startswith("<|") and t.endswith("|>"))
            types.append(3 if special else 4)
        else:
            types.append(1)
        tokens.append(t)
    sv = gguf.SpecialVocab(folder, load_merges=True)
    ids = {k: v for k, v in sv.special_token_ids.items() if k != "cls"}
    adds = {k: v for k, v in sv.add_special_token.items() if k in ("bos", "eos", "sep")}
    return tokens, types, list(sv.merges), ids, adds, sv.chat_template


KEY_OF = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
          "sep": "seperator_token_id", "pad": "padding_token_id", "mask": "mask_token_id"}


def check(job):
    folder, path, outtype = job["folder"], job["gguf"], job["outtype"]
    config = json.load(open(os.path.join(folder, "config.json")))
    reader = gguf.GGUFReader(path)
    arch = field(reader, "general.architecture")
    problems = []

    want = expected_tensors(folder, arch, config, outtype)
    got = {t.name: t for t in reader.tensors}
    extra = sorted(set(got) - set(want) - {"rope_freqs.weight"})
    missing = sorted(set(want) - set(got))
    if extra or missing:
        problems.append(f"tensor names: extra {extra}, missing {missing}")
    bytes_equal = 0
    for name, (qtype, data) in want.items():
        t = got.get(name)
        if t is None:
            continue
        if t.tensor_type != qtype:
            problems.append(f"{name}: {t.tensor_type.name}, convert_hf_to_gguf.py stores {qtype.name}")
            continue
        if np.asarray(t.data).tobytes() != np.ascontiguousarray(data).tobytes():
            problems.append(f"{name}: bytes differ from gguf-py's quantize")
        else:
            bytes_equal += 1

    tokens, types, merges, ids, adds, template = vocab_expectations(folder, config)
    if field(reader, "tokenizer.ggml.tokens") != tokens:
        problems.append("tokenizer.ggml.tokens differ from get_vocab_base's")
    if field(reader, "tokenizer.ggml.token_type") != types:
        problems.append("tokenizer.ggml.token_type differ from get_vocab_base's")
    if (field(reader, "tokenizer.ggml.merges") or []) != merges:
        problems.append("tokenizer.ggml.merges differ from SpecialVocab's")
    for role, tid in ids.items():
        if field(reader, f"tokenizer.ggml.{KEY_OF[role]}") != tid:
            problems.append(f"{role} id: file {field(reader, 'tokenizer.ggml.' + KEY_OF[role])}, SpecialVocab {tid}")
    written_ids = {k for k in reader.fields if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")}
    if written_ids != {f"tokenizer.ggml.{KEY_OF[r]}" for r in ids}:
        problems.append(f"special ids written {sorted(written_ids)}, SpecialVocab has {sorted(ids)}")
    for role, v in adds.items():
        if field(reader, f"tokenizer.ggml.add_{role}_token") != v:
            problems.append(f"add_{role}_token differs from SpecialVocab's {v}")
    if field(reader, "tokenizer.chat_template") != template:
        problems.append("tokenizer.chat_template differs from SpecialVocab's")
    if field(reader, "general.file_type") != {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[outtype]:
        problems.append("general.file_type")

    # transformers loads the file; logits against the folder's.
    ids_in = torch.tensor([job["ids"]])
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    with torch.no_grad():
        a = ref(ids_in).logits
        b = model(ids_in).logits
    diff = float((a - b).abs().max())
    scale = float(a.abs().max())
    tok_ref = transformers.AutoTokenizer.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    text = job["text"]
    same_encoding = tok(text)["input_ids"] == tok_ref(text)["input_ids"]
    return {"problems": problems, "bytes_equal": bytes_equal, "tensors": len(want),
            "logits_diff": diff, "logits_scale": scale, "same_encoding": same_encoding,
            "config_type": model.config.model_type,
            "keys": sorted(reader.fields)}


def main():
    jobs = json.load(open(sys.argv[1]))
    print(json.dumps({"results": [check(j) for j in jobs]}))


if __name__ == "__main__":
    main()

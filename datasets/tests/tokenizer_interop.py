"""Helper of tokenizer_interop.rs: transformers' side of the tokenizer round trips.

    python tokenizer_interop.py encode MAX_LENGTH DIR... < {"probe": [texts]}
        AutoTokenizer.from_pretrained(DIR) for each DIR; prints a JSON list of
        {"class", "ids", "truncated", "pad_token_id", ...} for the probe texts.
    python tokenizer_interop.py make MAX_LENGTH DIR:bert|gpt2:VOCAB_SIZE...
            < {"train": [texts], "probe": [texts]}
        trains each tokenizer with the `tokenizers` library on the training texts, wraps
        it in transformers' fast class, save_pretrained(DIR), then encodes as above.
"""

import json
import sys

import transformers


def encode(folder, max_length, texts):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    out = {
        "class": type(tok).__name__,
        "ids": [tok(t)["input_ids"] for t in texts],
        "truncated": [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts],
        "token_type_ids": [tok(t).get("token_type_ids") for t in texts],
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "model_max_length": tok.model_max_length,
        "vocab_size": len(tok),
        "decoded": [tok.decode(tok(t)["input_ids"], skip_special_tokens=True) for t in texts],
    }
    return out


def make(folder, kind, vocab_size, texts):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS]:0 $A:0 [SEP]:0",
            pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
        tok.decoder = decoders.WordPiece(prefix="##")
        wrapped = transformers.BertTokenizerFast(tokenizer_object=tok, model_max_length=64)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer)
        wrapped = transformers.GPT2TokenizerFast(
            tokenizer_object=tok,
            model_max_length=64,
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        )
    wrapped.save_pretrained(folder)


if __name__ == "__main__":
    inputs = json.load(sys.stdin)
    max_length = int(sys.argv[2])
    results = []
    for arg in sys.argv[3:]:
        if sys.argv[1] == "make":
            folder, kind, vocab_size = arg.rsplit(":", 2)
            make(folder, kind, int(vocab_size), inputs["train"])
        else:
            folder = arg
        results.append(encode(folder, max_length, inputs["probe"]))
    print(json.dumps(results))

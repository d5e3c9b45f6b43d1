"""transformers' side of tests/args_parity.rs: every field of TrainingArguments with
its type annotation and default (enums as their values), and what the dataclass
normalises a few values to. Jobs ignored; one JSON line out."""

import dataclasses
import enum
import json
import sys

try:
    import transformers
    from transformers import TrainingArguments
except ImportError as e:
    print(json.dumps({"skip": f"cannot import transformers: {e}"}))
    sys.exit(0)


def plain(v):
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, (str, int, float, bool, dict)) or v is None:
        return v
    return str(v)


def main():
    fields = []
    for f in dataclasses.fields(TrainingArguments):
        if f.default is not dataclasses.MISSING:
            d = f.default
        elif f.default_factory is not dataclasses.MISSING:
            d = f.default_factory()
        else:
            d = None
        fields.append({"name": f.name, "type": str(f.type), "default": plain(d)})
    print(json.dumps({"results": [{"version": transformers.__version__, "fields": fields}]}))


if __name__ == "__main__":
    main()

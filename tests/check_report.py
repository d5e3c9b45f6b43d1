"""tensorboard's side of tests/cli_report.rs: reads kiln's event files with
tensorboard's EventAccumulator, and counts a saved model's parameters as transformers'
floating_point_ops does. Jobs as a JSON list (argv[1]); one JSON line out."""

import json
import sys

try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import transformers
except ImportError as e:
    print(json.dumps({"skip": f"cannot import tensorboard/transformers: {e}"}))
    sys.exit(0)

transformers.logging.set_verbosity_error()


def events(job):
    acc = EventAccumulator(job["logdir"], size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]}
    texts = {t: acc.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in tags["tensors"]}
    return {"scalars": scalars, "texts": texts}


def flos_params(job):
    model = transformers.AutoModelForCausalLM.from_pretrained(job["model"])
    return {"params": model.num_parameters(exclude_embeddings=True)}


def main():
    jobs = json.load(open(sys.argv[1]))
    kinds = {"events": events, "flos_params": flos_params}
    print(json.dumps({"results": [kinds[j["kind"]](j) for j in jobs]}))


if __name__ == "__main__":
    main()

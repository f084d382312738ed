"""What a knowledge variant costs at training and inference time against its stock model, paired.

    python benchmarks/train_cost.py DeepFM_REKI [--dataset ml-100k] [--reps 5] [--config knowledge_dir=../knowledge]
    python benchmarks/train_cost.py DeepFM_REKI --only variant --reps 3   # one side per process (whole-process timers)

One process loads the data once per model, builds (or finds) the variant's knowledge store, then
alternates training epochs of the stock model and the variant (stock, variant, variant, stock, ...:
the order flips every rep, so a drift of the machine's speed falls on both), and times RecBole's
evaluation of both (the variant as trained, then prestored: HEIN run once over every id, as REKI
deploys it). It prints the per-rep ratios and their median and appends a JSON line with the code,
library versions, threads and device to ``benchmarks/results/train_cost/runs.jsonl``.
Not part of the test suite.
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from harness.cells import code_version, inference_ms, provenance  # noqa: E402
from harness.schema import stock_of  # noqa: E402


def setting(text):
    key, _, value = text.partition("=")
    import yaml

    return key, yaml.safe_load(value)


def trained_pair(model, dataset, config):
    """(name, trainer, train_data, eval_data) for the stock model and ``model``, knowledge built."""
    from recbole_llmk.quick_start import build_knowledge, create_model, prepare
    from recbole_llmk.utils import get_trainer

    sides = {}
    for name in (stock_of(model), model):
        cfg, _, train_data, valid_data, _ = prepare(name, dataset, config_dict=dict(config))
        store = build_knowledge(cfg, train_data)
        net = create_model(cfg, train_data)
        sides[name] = (get_trainer(cfg)(cfg, net), train_data, valid_data, cfg, store)
    return sides


def epoch_seconds(trainer, train_data, epoch):
    trainer.model.train()
    begin = time.perf_counter()
    trainer._train_epoch(train_data, epoch, show_progress=False)
    return time.perf_counter() - begin


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a knowledge variant, e.g. DeepFM_REKI")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--reps", type=int, default=5, help="training epochs of each model")
    parser.add_argument("--only", choices=("stock", "variant"), help="train one side only (for whole-process timers)")
    parser.add_argument("--config", action="append", default=[], type=setting, help="key=value (yaml value)")
    parser.add_argument("--results", default=os.path.join(HERE, "results", "train_cost"))
    args = parser.parse_args()
    stock = stock_of(args.model)
    if stock is None:
        raise SystemExit(f"{args.model} is no knowledge variant (e.g. DeepFM_REKI)")
    config = dict({"show_progress": False, "state": "WARNING"}, **dict(args.config))
    code = code_version()
    began = time.time()
    sides = trained_pair(args.model, args.dataset, config)
    order = [stock, args.model] if args.only is None else [stock if args.only == "stock" else args.model]
    seconds = {name: [] for name in order}
    for rep in range(args.reps):
        for name in (order if rep % 2 == 0 else order[::-1]):
            trainer, train_data = sides[name][:2]
            seconds[name].append(epoch_seconds(trainer, train_data, rep))
    row = {"model": args.model, "stock": stock, "dataset": args.dataset, "reps": args.reps, "only": args.only,
           "config": config, "train_epoch_seconds": seconds}
    if args.only is None:
        ratios = [v / s for s, v in zip(seconds[stock], seconds[args.model])]
        row["train_ratio_per_rep"] = ratios
        row["train_ratio_median"] = statistics.median(ratios)
        infer = {name: inference_ms(sides[name][0].model, sides[name][2]) for name in order}
        sides[args.model][0].model.prestore_knowledge(drop_adapter=True)
        infer[f"{args.model} prestored"] = inference_ms(sides[args.model][0].model, sides[args.model][2])
        row["infer_batch_ms"] = infer
        row["infer_ratio"] = {k: v / infer[stock] for k, v in infer.items() if k != stock}
    trainer, _, _, cfg, store = sides[args.model]
    row["provenance"] = dict(code, **provenance(cfg, store, time.time() - began))
    row["load_average_1min"] = os.getloadavg()[0]
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "runs.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")
    for name, values in seconds.items():
        print(f"{name}: train epoch s {' '.join(f'{v:.2f}' for v in values)} (median {statistics.median(values):.2f})")
    if args.only is None:
        print(f"train ratio {args.model}/{stock} per rep: {' '.join(f'{r:.3f}' for r in ratios)}; "
              f"median {row['train_ratio_median']:.3f}")
        print("inference ms/batch: " + ", ".join(f"{k} {v:.2f}" for k, v in infer.items())
              + "; ratios " + ", ".join(f"{k} {v:.3f}" for k, v in row["infer_ratio"].items()))
    print(f"threads {row['provenance']['threads']}, commit {code['commit'][:7]}"
          f"{' (code changed)' if code['code_changed'] else ''}, load {row['load_average_1min']:.1f}")


if __name__ == "__main__":
    main()

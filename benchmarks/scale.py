"""How the knowledge pipeline's offline phases grow with users: seconds and peak memory per phase.

    python benchmarks/scale.py [--users 10000,100000,1000000] [--phases seed_sampling,retrieval,...]
        [--timeout 1200] [--out benchmarks/results/scale]

Synthetic data (no LLM, no encoder: random behaviour vectors and random 384-d knowledge vectors),
the plugin's own code for each phase, each (phase, size) in a process of its own so its peak
memory is its own:
  seed_sampling   ReLand's adaptive seed sampling: a pool of 10 % of the users, 10 clusters (64-d)
  retrieval       ReLand's retrieval: every user's most similar seed (exact inner product, faiss)
  retrieval_ivf   the same through an inverted-file index (reland_retrieval: ivf, nprobe 32), with
                  its recall: the share of 10,000 sampled users given the seed exact search gives
  kmeans          REKI-C's user clusters (KMeansClusterer, REKI's cap of 100 users a cluster; 64-d)
  store_write     a store of one 384-d vector per user (KnowledgeStore.write)
  store_load      that store aligned to the users' ids (KnowledgeStore.aligned: the table a model reads)
  store_write_float16, store_load_float16   the same with the vectors kept as float16
                  (knowledge_vector_dtype: float16; the table a model reads is float32)
Encoding is not run: it is linear in texts (one forward pass each; MiniLM ~60 texts/s on one CPU
core) and belongs on a GPU or a batch job at scale. A phase that passes ``--timeout`` is recorded as
such, not extrapolated. Prints a table with the growth exponent between sizes (slope of
log seconds over log users) and writes it, with the code, library versions, threads and CPU, to
``--out``. Not part of the test suite.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

PHASES = ("seed_sampling", "retrieval", "retrieval_ivf", "kmeans", "store_write", "store_load", "store_write_float16",
          "store_load_float16")


class Users:
    """The minimum of a RecBole dataset that ``KnowledgeStore.aligned`` reads."""

    def __init__(self, n):
        self.field2token_id = {"user_id": {str(i): i + 1 for i in range(n)}}
        self.n = n

    def num(self, field):
        return self.n + 1


def phase(name, n, folder):
    """Run one phase on ``n`` synthetic users; -> (seconds of its work, resident MB before it, other
    figures): the data is made and the plugin's modules imported before the clock starts."""
    import numpy as np

    from recbole_llmk.knowledge.clustering import KMeansClusterer
    from recbole_llmk.knowledge.store import KnowledgeStore
    from recbole_llmk.techniques.reland import SeedSampler, nearest_seeds

    rng = np.random.default_rng(0)
    store, _, dtype = name.partition("_float")
    name, dtype = store, f"float{dtype}" if dtype else "float32"
    path = os.path.join(folder, f"store-{dtype}")
    if name in ("seed_sampling", "retrieval", "retrieval_ivf", "kmeans"):
        vectors = rng.standard_normal((n, 64), dtype=np.float32)
        counts = rng.integers(1, 300, n)
        seeds = vectors[rng.choice(n, max(1, n // 10), replace=False)]
    elif name == "store_write":
        knowledge = rng.standard_normal((n, 384), dtype=np.float32)
        texts = [f"user {i} likes things" for i in range(n)]
    elif not KnowledgeStore.exists(path):
        raise SystemExit("store_load needs store_write's store: run the phases in order")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    began = time.perf_counter()
    if name == "seed_sampling":
        SeedSampler(max(1, n // 10), n_clusters=10, seed=0).sample(vectors, counts)
    elif name == "retrieval":
        nearest_seeds(vectors, seeds)
    elif name == "retrieval_ivf":
        found, _ = nearest_seeds(vectors, seeds, "ivf", nprobe=32)
        seconds = time.perf_counter() - began
        sample = rng.choice(n, min(n, 10_000), replace=False)
        exact, _ = nearest_seeds(vectors[sample], seeds)
        return seconds, before, {"recall_at_1": float((found[sample] == exact).mean())}
    elif name == "kmeans":
        KMeansClusterer(max_cluster_size=100, seed=0).fit(vectors)
    elif name == "store_write":
        KnowledgeStore.write(path, {"technique": "scale", "vector_dtype": dtype},
                             {"user": ([str(i) for i in range(n)], knowledge, texts)})
    else:
        KnowledgeStore.open(path).aligned("user", Users(n), "user_id")
    return time.perf_counter() - began, before, {}


def run_one(name, n, folder, timeout):
    """``{seconds, peak_mb}`` of one phase in a fresh process, or ``{timed_out: True}``."""
    code = (f"import sys, json, resource; sys.path[:0] = [{HERE!r}, {ROOT!r}]; from scale import phase; "
            f"s, before, extra = phase({name!r}, {n}, {folder!r}); "
            "print(json.dumps({'seconds': s, 'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
            "'peak_mb_before': before, **extra}))")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "timeout_s": timeout}
    if done.returncode:
        return {"failed": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def exponents(rows, sizes):
    import math

    for r in rows:
        r.pop("exponent", None)
    for name in {r["phase"] for r in rows}:
        cells = {r["users"]: r for r in rows if r["phase"] == name and "seconds" in r}
        for small, big in zip(sizes, sizes[1:]):
            if small in cells and big in cells and cells[small]["seconds"] > 0:
                cells[big]["exponent"] = round(math.log(cells[big]["seconds"] / cells[small]["seconds"])
                                               / math.log(big / small), 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", default="10000,100000,1000000")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--timeout", type=int, default=1200, help="seconds a phase may take")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "scale"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.users.split(",")]
    phases = args.phases.split(",")
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
    sys.path.insert(0, HERE)
    from harness.cells import code_version

    path = os.path.join(args.out, "scale.json")
    code = code_version()
    ran = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as folder:
            for name in phases:
                row = dict(phase=name, users=n, **run_one(name, n, folder, args.timeout), commit=code["commit"],
                           code_changed=code["code_changed"], load_average_1min=os.getloadavg()[0])
                ran.append(row)
                print(json.dumps(row), flush=True)
    # rows of earlier runs for other phases or sizes stay (each row names its commit and load)
    old = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {"rows": []}
    earlier = [dict({"commit": old.get("commit"), "code_changed": old.get("code_changed"),
                     "load_average_1min": old.get("load_average_1min")}, **r) for r in old["rows"]]
    rows = [r for r in earlier if (r["phase"], r["users"]) not in {(x["phase"], x["users"]) for x in ran}] + ran
    rows.sort(key=lambda r: (r["users"], PHASES.index(r["phase"])))
    sizes = sorted({r["users"] for r in rows})
    exponents(rows, sizes)
    import faiss
    import numpy
    import torch

    from harness.cells import cpu_name

    report = {"rows": rows, "threads": int(os.environ.get("OMP_NUM_THREADS", "1")), "cpu": cpu_name(),
              "cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
              "versions": {"python": platform.python_version(), "numpy": numpy.__version__,
                           "faiss": faiss.__version__, "torch": torch.__version__},
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print("\n| phase | users | seconds | peak MB (before the phase) | growth exponent |\n|---|---|---|---|---|")
    for r in rows:
        seconds = f"{r['seconds']:.2f}" if "seconds" in r else ("> %d (stopped)" % r["timeout_s"] if r.get("timed_out")
                                                                 else f"failed: {r.get('failed')}")
        recall = f" (recall {r['recall_at_1']:.3f})" if "recall_at_1" in r else ""
        print(f"| {r['phase']}{recall} | {r['users']:,} | {seconds} | {r.get('peak_mb', float('nan')):.0f} "
              f"({r.get('peak_mb_before', float('nan')):.0f}) | "
              f"{r.get('exponent', '')} |")
    print(f"\ncommits {', '.join(sorted({r['commit'][:7] for r in rows}))}, threads {report['threads']}, {report['cpu']}, "
          f"{report['cores']} cores; load averages per row in {path}")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()

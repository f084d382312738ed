"""How many requests a second the ``openai`` backend sends, with one and with several sending
processes (``llm_processes``), against a server that costs almost nothing.

    python benchmarks/client_throughput.py [--n 3000] [--processes 1,2] [--reps 3] [--concurrency 16]
        [--out benchmarks/results/client_throughput]

The server (started here, in its own process) is a bare asyncio HTTP/1.1 responder that answers every
chat completion with one fixed short answer, so what is timed is the plugin's side: the openai SDK,
httpx, the answer cache (an fsync per answer) and the threads. Each repetition runs every
``--processes`` value in turn, each with a fresh answer cache and ``--n`` distinct prompts; the answer
gate keeps what it gets (``llm_on_bad_answer: keep``). Results (requests/s per case, the code, library
versions, CPU and load) are appended to ``<out>/runs.jsonl``. Not part of the test suite.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from harness.cells import code_version, cpu_name  # noqa: E402
from recbole_llmk.files import written_whole  # noqa: E402
from recbole_llmk.knowledge.generation import Request, make_backend  # noqa: E402

ANSWER = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "bench",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "Likes quiet dramas and old westerns."}}],
                     "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}}).encode()
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(ANSWER)) + ANSWER
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


async def serve_connection(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if length:
                await reader.readexactly(length)
            writer.write(RESPONSE if head.startswith(b"POST") else NOT_FOUND)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def run_server(port_queue):
    async def main():
        server = await asyncio.start_server(serve_connection, "127.0.0.1", 0, backlog=1024)
        port_queue.put(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def timed(base_url, n, processes, concurrency, tag):
    requests = [Request(f"user:{i}", f"[{tag}] Summarise the tastes of user {i}, who liked Title{i} Story.", "")
                for i in range(n)]
    config = {"llm_backend": "openai", "llm_model": "bench", "llm_base_url": base_url, "llm_concurrency": concurrency,
              "llm_processes": processes, "llm_on_bad_answer": "keep", "llm_max_tokens": 64, "llm_timeout": 60}
    with tempfile.TemporaryDirectory() as cache:
        backend = make_backend(config, cache)
        start = time.perf_counter()
        _, report = backend.generate(requests)
        seconds = time.perf_counter() - start
    if report.called != n or report.failed:
        raise SystemExit(f"{processes} processes: {report.summary()}")
    return {"processes": processes, "concurrency": concurrency, "n": n, "seconds": round(seconds, 3),
            "requests_per_s": round(n / seconds, 1)}


def provenance():
    import openai

    from recbole_llmk.knowledge.deadline import httpx  # httpx2 for openai 3, httpx before

    return {**code_version(), "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": f"{cpu_name()} ({os.cpu_count()} cores)",
            "python": platform.python_version(), "openai": openai.__version__, "httpx": f"{httpx.__name__} {httpx.__version__}",
            "load_average_1min_at_start": os.getloadavg()[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "client_throughput"))
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    server = context.Process(target=run_server, args=(ports,), daemon=True)
    server.start()
    base_url = f"http://127.0.0.1:{ports.get(timeout=30)}/v1"
    cases = []
    try:
        for rep in range(args.reps):
            for processes in (int(p) for p in args.processes.split(",")):
                case = dict(timed(base_url, args.n, processes, args.concurrency, f"{rep}-{processes}"), rep=rep)
                print(json.dumps(case), flush=True)
                cases.append(case)
    finally:
        server.terminate()
    record = {"cases": cases, "provenance": provenance(),
              "load_average_1min_at_end": os.getloadavg()[0]}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "runs.jsonl")
    old = open(path, encoding="utf-8").read() if os.path.isfile(path) else ""
    with written_whole(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(old + json.dumps(record) + "\n")
    by = {}
    for case in cases:
        by.setdefault(case["processes"], []).append(case["requests_per_s"])
    for processes, rates in by.items():
        print(f"{processes} sending process(es): {', '.join(map(str, rates))} requests/s "
              f"(median {sorted(rates)[len(rates) // 2]})")


if __name__ == "__main__":
    main()

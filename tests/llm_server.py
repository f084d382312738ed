"""A small OpenAI-compatible chat-completions server for tests (no real LLM, no network).

Why a real HTTP server rather than a mocked client: the generation backend's retry, timeout,
concurrency and crash-safety behaviour lives partly in the ``openai`` package and its HTTP
stack, so only a real socket exercises it honestly.

Answers are deterministic: ``ANSWER[<sha1(prompt)[:8]>]: <first 40 chars of prompt>``.

Fault injection (per test):
  * ``server.add_faults("429", "500", ...)``: applied, in order, to the next requests received.
  * ``server.fail_prompts_containing("POISON", "500")``: every request whose prompt contains the
    text gets that fault, forever (a prompt that never succeeds).
  * ``hang_after=K``: the first K requests are handled normally; every later one is held open
    without an answer until ``clear_hang()``/``stop()`` (it is then dropped, never answered), so a
    client can be killed while it waits.
Faults: ``"429"``, ``"500"`` (or any other status code as a string, e.g. ``"401"``, ``"400"``),
``"slow"`` (answers only after ``slow_seconds``, longer than the client's timeout), ``"drip"`` (headers at
once, then the answer one byte every ``drip_seconds``: no single read ever waits long), ``"malformed"``
(200 with a body that is not JSON), ``"empty"`` (200 with empty content), ``"no_choices"``, ``"refusal"`` (200 with :data:`REFUSAL`), ``"length"``
(the normal answer with ``finish_reason: length``).
A faulted request never counts as answered.

Server shapes (constructor options), to play what real servers do:
  * ``serial_seconds=S``: one request is worked on at a time, each for S seconds, and the work is
    done even when the client has given up (llama-cpp-python's server); ``worked`` counts it.
  * ``models=[...]``: GET /v1/models lists these ids (otherwise GET answers 501, as many do).
  * ``total_slots=N``: GET /props answers ``{"total_slots": N}`` (llama.cpp's own server).

Counters (thread-safe): ``received`` (all requests), ``answered`` (Counter prompt -> successful
answers), ``answered_total``, ``temperatures`` and ``paths`` (of every request received, in order),
``max_in_flight`` (the most requests open at once).

Use in-process as a context manager (``with LLMTestServer() as server: server.base_url``) or as a
separate process: ``python tests/llm_server.py --port-file F [--hang-after K]``.
"""

import argparse
import collections
import hashlib
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("slow", "drip", "malformed", "empty", "no_choices", "refusal", "length")
REFUSAL = "I'm sorry, but I can't help with that request."


def answer_for(prompt):
    """The deterministic answer the server gives for ``prompt`` (tests compare against it)."""
    return f"ANSWER[{hashlib.sha1(prompt.encode()).hexdigest()[:8]}]: {prompt[:40]}"


def completion_body(model, answer, prompt, number, finish_reason="stop"):
    return {
        "id": f"chatcmpl-test-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(answer.split()),
                  "total_tokens": len(prompt.split()) + len(answer.split())},
    }


def error_body(status, message):
    kinds = {401: "invalid_request_error", 429: "rate_limit_exceeded"}
    return {"error": {"message": message, "type": kinds.get(status, "server_error"), "code": str(status)}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a held (hung) request must never keep the test process alive
    block_on_close = False


class LLMTestServer:
    """The server plus its fault script and counters; see the module docstring."""

    def __init__(self, host="127.0.0.1", port=0, hang_after=None, slow_seconds=2.0, serial_seconds=None,
                 models=None, total_slots=None, drip_seconds=0.3):
        self.slow_seconds = slow_seconds
        self.drip_seconds = drip_seconds
        self.serial_seconds = serial_seconds
        self.models = models
        self.total_slots = total_slots
        self._work_lock = threading.Lock()
        self.worked = 0
        self._lock = threading.Condition()
        self._faults = collections.deque()
        self._prompt_faults = {}
        self._hang_after = hang_after
        self._release = threading.Event()
        self.received = 0
        self.temperatures = []
        self.paths = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.answered = collections.Counter()
        self.faults_applied = []
        self._httpd = _Server((host, port), self._handler_class())
        self._thread = None
        self._serving = False

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def port(self):
        return self._httpd.server_address[1]

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self):
        self._serving = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="llm-test-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self):
        self._serving = True
        self._httpd.serve_forever(poll_interval=0.05)

    def stop(self):
        self._release.set()
        if self._serving:  # shutdown() would block forever on a server that never ran
            self._httpd.shutdown()
            self._serving = False
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- test controls ---------------------------------------------------------------------
    def add_faults(self, *faults):
        with self._lock:
            self._faults.extend(str(f) for f in faults)

    def fail_prompts_containing(self, text, fault="500"):
        with self._lock:
            self._prompt_faults[text] = str(fault)

    def clear_faults(self):
        with self._lock:
            self._faults.clear()
            self._prompt_faults.clear()

    def set_hang_after(self, count):
        """Hang every request after the first ``count`` received (None: hang nothing)."""
        with self._lock:
            self._hang_after = count

    def clear_hang(self):
        """Serve new requests normally again; requests already held are dropped unanswered."""
        with self._lock:
            self._hang_after = None
        self._release.set()

    @property
    def answered_total(self):
        with self._lock:
            return sum(self.answered.values())

    def wait_for_answers(self, count, timeout=30.0):
        """Block until ``count`` requests were answered; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: sum(self.answered.values()) >= count, timeout)

    # --- request handling ------------------------------------------------------------------
    def _admit(self, prompt, body):
        """Count the request and decide its fate: None (answer), a fault name, or 'hang'."""
        with self._lock:
            self.received += 1
            self.temperatures.append(body.get("temperature"))
            number = self.received
            if self._hang_after is not None and number > self._hang_after:
                return number, "hang"
            for text, fault in self._prompt_faults.items():
                if text in prompt:
                    self.faults_applied.append(fault)
                    return number, fault
            if self._faults:
                fault = self._faults.popleft()
                self.faults_applied.append(fault)
                return number, fault
            return number, None

    def _record_answer(self, prompt):
        with self._lock:
            self.answered[prompt] += 1
            self._lock.notify_all()

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                path = self.path.rstrip("/")
                if path.endswith("/models") and server.models is not None:
                    return self._send_json(200, {"object": "list", "data": [
                        {"id": name, "object": "model", "owned_by": "test"} for name in server.models]})
                if path == "/props" and server.total_slots is not None:
                    return self._send_json(200, {"total_slots": server.total_slots})
                return self._send_json(501, error_body(501, f"no GET route {self.path}"))

            def do_POST(self):
                server.paths.append(self.path)
                if not self.path.split("?")[0].rstrip("/").endswith("/chat/completions"):
                    return self._send_json(404, error_body(404, f"no route {self.path}"))
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                    prompt = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    return self._send_json(400, error_body(400, f"bad request: {exc}"))
                number, fault = server._admit(prompt, body)
                if fault == "hang":
                    server._release.wait()
                    self.close_connection = True
                    return
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if server.serial_seconds:
                        with server._work_lock:  # one at a time; finished even if the client left
                            time.sleep(server.serial_seconds)
                            server.worked += 1
                    self._respond(body, prompt, number, fault)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _respond(self, body, prompt, number, fault):
                model = body.get("model", "test-model")
                answer = answer_for(prompt)
                if fault is None:
                    if self._send_json(200, completion_body(model, answer, prompt, number)):
                        server._record_answer(prompt)
                elif fault == "slow":
                    server._release.wait(server.slow_seconds)
                    self._send_json(200, completion_body(model, answer, prompt, number))
                elif fault == "drip":
                    self._drip(json.dumps(completion_body(model, answer, prompt, number)).encode())
                elif fault == "malformed":
                    self._send_raw(200, b'{"id": "chatcmpl-broken", "choices": [{"mess')
                elif fault == "refusal":
                    self._send_json(200, completion_body(model, REFUSAL, prompt, number))
                elif fault == "length":
                    if self._send_json(200, completion_body(model, answer, prompt, number, "length")):
                        server._record_answer(prompt)
                elif fault == "empty":
                    self._send_json(200, completion_body(model, "", prompt, number))
                elif fault == "no_choices":
                    self._send_json(200, dict(completion_body(model, answer, prompt, number), choices=[]))
                elif fault == "401":
                    # Echo the key like a careless proxy would: the client must never repeat it.
                    token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    self._send_json(401, error_body(401, f"Incorrect API key provided: {token}"))
                else:
                    status = int(fault)
                    self._send_json(status, error_body(status, f"injected fault {status}"))

            def _drip(self, data):
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    for byte in data:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        if server._release.wait(server.drip_seconds):
                            return
                except OSError:  # the client gave up
                    pass

            def _send_json(self, status, payload):
                return self._send_raw(status, json.dumps(payload).encode())

            def _send_raw(self, status, data):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    self.wfile.flush()
                    return True
                except OSError:  # the client gave up (timeout or killed): not an answer
                    return False

        return Handler


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", required=True, help="where to write the chosen port")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--hang-after", type=int, default=None)
    args = parser.parse_args(argv)
    server = LLMTestServer(port=args.port, hang_after=args.hang_after)
    # Write then rename so a reader never sees a half-written port number.
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(server.port))
    os.replace(args.port_file + ".tmp", args.port_file)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.stop).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    print(json.dumps({"received": server.received, "answered": server.answered_total}))


if __name__ == "__main__":
    main()

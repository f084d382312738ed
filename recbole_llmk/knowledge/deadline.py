"""A total deadline for one HTTP request, for the openai client.

Why: an HTTP client's timeout bounds each wait for data, not the whole answer. A server (or a
proxy in front of it) that sends one byte every two seconds never trips a 3-second read timeout,
so a request could run for minutes. The transport below also counts the time since the request
was sent while the body arrives, and raises the client's own read timeout once it is past, which
the openai SDK reports as ``APITimeoutError`` like any other timeout.
"""

import time

try:  # the openai SDK's HTTP library: httpx2 since openai 3, httpx before
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older openai
    import httpx


class _DeadlineStream(httpx.SyncByteStream):
    def __init__(self, stream, deadline, seconds):
        self._stream, self._deadline, self._seconds = stream, deadline, seconds

    def __iter__(self):
        for chunk in self._stream:
            if time.monotonic() > self._deadline:
                raise httpx.ReadTimeout(f"the answer took longer than {self._seconds:g} s in all")
            yield chunk

    def close(self):
        self._stream.close()


class DeadlineTransport(httpx.BaseTransport):
    """``inner`` (default: a plain HTTP transport) with every response due ``seconds`` after its request."""

    def __init__(self, seconds, inner=None, max_connections=100):
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._inner = inner or httpx.HTTPTransport(limits=limits)
        self._seconds = seconds

    def handle_request(self, request):
        deadline = time.monotonic() + self._seconds
        response = self._inner.handle_request(request)
        response.stream = _DeadlineStream(response.stream, deadline, self._seconds)
        return response

    def close(self):
        self._inner.close()


def http_client(seconds, max_connections):
    """An HTTP client for ``openai.OpenAI(http_client=...)`` whose requests end ``seconds`` after they start."""
    import openai

    return openai.DefaultHttpxClient(timeout=seconds, transport=DeadlineTransport(seconds, max_connections=max_connections))

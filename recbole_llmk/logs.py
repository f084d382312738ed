"""What the plugin's runs write to their logs: no secrets, no line per HTTP request.

A credential can sit in ``llm_base_url`` (``https://user:key@host/v1`` or ``...?api-key=...``):
RecBole logs the command line and the whole config, so the URL would be written to every log.
:func:`protect_logs` puts a filter on the log's handlers that writes such a URL as its public
part (scheme, host, port, path) and hides the API key's value wherever it appears; and it keeps
the HTTP libraries' per-request INFO lines (one per prompt: thousands per knowledge build) out.
"""

import logging
import os
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from recbole_llmk.defaults import setting

HTTP_LOGGERS = ("httpx", "httpx2", "httpcore")


def public_url(url):
    """``url`` without user:password or query (either may carry a credential)."""
    if not url:
        return "https://api.openai.com/v1 (the openai default)"
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def url_secrets(url):
    """{secret text: what to write instead} for the credentials an endpoint URL may carry."""
    secrets = {}
    if url and public_url(url) != str(url):
        parts = urlsplit(str(url))
        secrets[str(url)] = public_url(url)
        values = [value for _, value in parse_qsl(parts.query)]
        for part in (parts.password, parts.username, parts.query, *values):
            if part and len(part) >= 4:
                secrets[part] = "***"
    return secrets


def secrets_of(config):
    """{secret text: what to write instead} for a run's settings."""
    secrets = url_secrets(config["llm_base_url"])
    key = os.environ.get(setting(config, "llm_api_key_env"))
    if key and len(key) >= 4:
        secrets[key] = "***"
    return secrets


def redact(text, secrets):
    """``text`` with each secret replaced, longest first (a URL before its parts)."""
    for secret, replacement in sorted(secrets.items(), key=lambda item: -len(item[0])):
        text = text.replace(secret, replacement)
    return text


class RedactingFilter(logging.Filter):
    """Writes each record's message with its secrets replaced (:func:`redact`)."""

    def __init__(self, secrets):
        super().__init__("recbole_llmk.redact")
        self.secrets = secrets

    def filter(self, record):
        message = record.getMessage()
        redacted = redact(message, self.secrets)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def protect_logs(config):
    """Install the filter on the root logger's handlers (again for each run) and quiet HTTP INFO."""
    for name in HTTP_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    secrets = secrets_of(config)
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, RedactingFilter)]:
            handler.removeFilter(old)
        if secrets:
            handler.addFilter(RedactingFilter(secrets))

"""recbole-llmk: knowledge from large language models (REKI/KAR, ReLand, LEARN) for RecBole models.

    from recbole_llmk import run_recbole_llmk
    result = run_recbole_llmk("DIN_REKI", "ml-100k")      # RecBole's run_recbole, with knowledge

The names below load on first use (importing RecBole and torch takes seconds).
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("recbole-llmk")
except PackageNotFoundError:  # run from a checkout that was not installed
    __version__ = "0+unknown"

_PUBLIC = {
    "run_recbole_llmk": "recbole_llmk.quick_start",
    "prepare": "recbole_llmk.quick_start",
    "build_knowledge": "recbole_llmk.quick_start",
    "create_model": "recbole_llmk.quick_start",
    "get_model": "recbole_llmk.utils",
    "KnowledgeStore": "recbole_llmk.knowledge.store",
    "make_backend": "recbole_llmk.knowledge.generation",
    "Request": "recbole_llmk.knowledge.generation",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'recbole_llmk' has no attribute {name!r}")

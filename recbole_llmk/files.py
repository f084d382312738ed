"""Writing a file or folder so that no reader, and no rerun after a kill, ever sees half of it."""

import os
import shutil
from contextlib import contextmanager


@contextmanager
def written_whole(path, per_process=False):
    """Yield a temporary path beside ``path`` to write a file or a folder at; when the block ends
    without an error it takes ``path``'s place in one rename (a folder already there is removed
    first), so a kill mid-write leaves the previous version or none, never a torn one. Temporary
    names end in ``.partial``; ``per_process`` gives each process its own, for writers that run at
    once (each then swaps in a whole copy)."""
    path = os.fspath(path).rstrip("/")
    tmp = f"{path}.{os.getpid()}.partial" if per_process else f"{path}.partial"
    _remove(tmp)  # what a killed writer left
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if os.path.isdir(tmp) and os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)

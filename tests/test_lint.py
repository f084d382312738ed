"""The code passes the linter setup.cfg configures (pyflakes' checks through flake8), so CI runs it."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flake8_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "flake8", "recbole_llmk", "tests", "benchmarks", "run_recbole_llmk.py"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"flake8 (config: setup.cfg [flake8]):\n{done.stdout}{done.stderr}"

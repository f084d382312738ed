"""The benchmark runner's parts; ``benchmarks/run_suite.py`` is its command line.

schema (suite files, cells and their settings), staleness (is a finished cell still the run the
suite asks for; cells of other suites that stand for ours), cells (one cell run and its
provenance), statistics, plots and reports (the summary)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

"""Puts the repository root on sys.path, so a benchmark run as `python bench/X.py` finds the helpers it shares
with the tests (`tests.support`). Imported first, for that effect alone."""

import sys
from pathlib import Path

import _root  # noqa: F401  (the repository root on sys.path: tests.support)

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)

"""Benchmark: simplesmtp against the servers people would otherwise pick.

Run from the repository root: ``python -m bench`` (the full comparison,
a few minutes) or ``python -m bench --quick`` (simplesmtp only, a few
hundred messages, what CI runs).  See ``run.py`` for what is measured.
"""

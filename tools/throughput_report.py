#!/usr/bin/env python
"""Throughput and scaling report over training runs: see megallava/report.py.

    python tools/throughput_report.py runs/sweep/* --out reports/sweep
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megallava.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Layout planner: which TP/PP/VPP/DP/micro-batch/recompute layout fits and is fastest (megallava/plan.py).

    python tools/plan.py --model 33b --method qlora-64 --nodes 1 --gpu a100-80gb
    python tools/plan.py --config run.yaml --nodes 4 --gpu h100-80gb
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megallava.plan import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench memory|worker JSON``: the benchmark's child processes (see ``bench.trials``)."""

import json
import sys

from bench.trials import CHILD_MAINS

if len(sys.argv) == 3 and sys.argv[1] in CHILD_MAINS:
    CHILD_MAINS[sys.argv[1]](json.loads(sys.argv[2]))
else:
    sys.exit("usage: python -m bench memory|worker JSON (run benchmarks with `dsq bench`)")

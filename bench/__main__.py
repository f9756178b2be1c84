"""``python -m dsq.bench memory|worker JSON``: the benchmark's child processes (see ``dsq.bench.trials``)."""

import json
import sys

from dsq.bench.trials import CHILD_MAINS

if len(sys.argv) == 3 and sys.argv[1] in CHILD_MAINS:
    CHILD_MAINS[sys.argv[1]](json.loads(sys.argv[2]))
else:
    sys.exit("usage: python -m dsq.bench memory|worker JSON (run benchmarks with `dsq bench`)")

"""A benchmark worker for test_benchmark_harness: each timed call appends its side to a log."""

import json
import sys

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from benchmarks import interleave  # noqa: E402  pylint: disable=g-import-not-at-top


def _setup(case):
    def call():
        with open(case["log"], "a") as f:
            f.write(case["side"] + "\n")
    return call, dict(side=case["side"])


if __name__ == "__main__":
    interleave.serve(lambda: _setup(json.loads(sys.argv[sys.argv.index("--case") + 1])))

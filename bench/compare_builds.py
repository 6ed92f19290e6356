"""RQ encode of several builds of the native core, interleaved: the portable build (run-time ISA
dispatch) against a `-march=native` build of the same sources.

    python bench/compare_builds.py portable=DIR native=DIR [name=DIR ...] [--rounds 7]

Each DIR holds a `_C*.so`; every timing runs in a fresh child process (the modules share a name),
the order of the builds rotating round by round so drift hits all. Reports the median seconds per
build and each build's ratio to the first (first / build: < 1 means that build is slower).
"""
import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import sys, time, json
sys.path.insert(0, sys.argv[1])
import numpy as np
import _C
rng = np.random.default_rng(0)
x = rng.normal(size=(int(sys.argv[2]), 384)).astype(np.float32)
cb = rng.normal(size=(3, 256, 384)).astype(np.float32)
_C.rq_encode(x[:2000], cb, 1, int(sys.argv[3]))  # warm-up
t = []
for _ in range(3):
    t0 = time.perf_counter(); _C.rq_encode(x, cb, 1, int(sys.argv[3])); t.append(time.perf_counter() - t0)
print(json.dumps({"isa": _C.rq_isa() if hasattr(_C, "rq_isa") else "native", "s": min(t)}))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("builds", nargs="+", help="name=DIR of each build (the first is the reference)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    builds = dict(b.split("=", 1) for b in a.builds)
    names = list(builds)
    times = {n: [] for n in names}
    isa = {}
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out = subprocess.run([sys.executable, "-c", CHILD, builds[name], str(a.rows), str(a.threads)],
                                 capture_output=True, text=True, check=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            times[name].append(got["s"])
            isa[name] = got["isa"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"rows": a.rows, "threads": a.threads, "rounds": a.rounds, "isa": isa, "median_s": med,
                      "ratio_to_first": {k: med[names[0]] / v for k, v in med.items()}, "all_s": times}, indent=1))


if __name__ == "__main__":
    main()

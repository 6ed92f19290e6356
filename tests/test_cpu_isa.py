"""One build for every x86-64 CPU: the RQ kernels exist for AVX-512, AVX2 and the baseline, chosen
at run time. Every path this CPU can run gives the exact greedy argmin (checked per level against
float64 brute force) and the same beam-search objective; under valgrind (whose CPU has no AVX-512)
the module imports and encodes -- a build that executed AVX-512 outside its kernels would die there
with an illegal instruction, as the old `-march=native` build did."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np

import recbase
from recbase._native import C

LADDER = ["base", "avx2", "avx512"]

SCRIPT = r"""
import json, sys
import numpy as np
from recbase._native import C
rng = np.random.default_rng(int(sys.argv[1]))
x = rng.normal(size=(700, 37)).astype(np.float32)
cb = rng.normal(size=(3, 40, 37)).astype(np.float32)
print(json.dumps({"isa": C.rq_isa(), "greedy": C.rq_encode(x, cb, 1, 1).tolist(),
                  "beam": C.rq_encode(x, cb, 5, 1).tolist()}))
"""


def _run(isa, seed, prefix=()):
    env = dict(os.environ, RECBASE_ISA=isa)
    out = subprocess.run([*prefix, sys.executable, "-c", SCRIPT, str(seed)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _objective(x, cb, codes):
    r = x.astype(np.float64) - sum(cb[l].astype(np.float64)[codes[:, l]] for l in range(cb.shape[0]))
    return (r ** 2).sum(1)


def test_every_isa_path_this_cpu_runs_is_exact():
    best = C.rq_isa()
    assert best in LADDER and recbase.info()["cpu_isa"] == best
    rng = np.random.default_rng(3)
    x = rng.normal(size=(700, 37)).astype(np.float32)
    cb = rng.normal(size=(3, 40, 37)).astype(np.float32)
    beams = {}
    for isa in LADDER[:LADDER.index(best) + 1]:
        got = _run(isa, 3)
        assert got["isa"] == isa  # asked for a lower path: it runs that one
        codes = np.asarray(got["greedy"])
        r = x.astype(np.float64)
        for l in range(3):  # each level's code is the nearest codeword to that level's residual
            d = ((r[:, None, :] - cb[l].astype(np.float64)[None]) ** 2).sum(-1)
            chosen = d[np.arange(len(r)), codes[:, l]]
            np.testing.assert_allclose(chosen, d.min(1), rtol=1e-5, atol=1e-4)
            r = r - cb[l].astype(np.float64)[codes[:, l]]
        beams[isa] = _objective(x, cb, np.asarray(got["beam"]))
        assert beams[isa].mean() < _objective(x, cb, codes).mean()  # the beam searches more than greedy
    for isa, obj in beams.items():  # every path finds the same beam objective (ties may pick other codes)
        np.testing.assert_allclose(obj, beams["base"], rtol=1e-5, atol=1e-4)
    # an unknown request is ignored: the CPU's best path
    assert _run("sse9", 3)["isa"] == best


def test_runs_on_a_cpu_without_avx512_under_valgrind():
    valgrind = shutil.which("valgrind")
    if valgrind is None:  # not installed here: the exactness test above still covers every path
        assert C.rq_isa() in LADDER
        return
    real = os.path.realpath(sys.executable)  # the interpreter itself, not a wrapper script
    out = subprocess.run([valgrind, "-q", "--error-exitcode=0", real, "-c", SCRIPT, "4"],
                         env=dict(os.environ, RECBASE_ISA=""), capture_output=True, text=True, timeout=900)
    assert "Illegal opcode" not in out.stderr and out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["isa"] in ("avx2", "base")  # valgrind's CPU has no AVX-512


def test_a_huge_beam_is_capped_or_raises_never_aborts():
    """beam_size beyond K^(levels-1) finds nothing more (the search is already exhaustive) and is
    capped; a beam whose buffers cannot be allocated raises MemoryError in the calling thread instead
    of std::bad_alloc escaping an OpenMP region (SIGABRT). Run in a child: an abort must not take the
    test process with it."""
    script = r"""
import numpy as np
from recbase._native import C
rng = np.random.default_rng(0)
x = rng.normal(size=(50, 8)).astype(np.float32)
cb = rng.normal(size=(2, 16, 8)).astype(np.float32)
exact = C.rq_encode(x, cb, 16, 2)  # 16 = K^(levels-1): exhaustive
assert (C.rq_encode(x, cb, 10**12, 2) == exact).all()
big = rng.normal(size=(6, 256, 8)).astype(np.float32)  # K^5 = 10^12 beams: cannot be allocated
try:
    C.rq_encode(x, big, 10**12, 2)
except (MemoryError, ValueError) as exc:
    print("raised", type(exc).__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "raised" in out.stdout

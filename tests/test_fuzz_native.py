"""Every array-taking entry point of the native core, fuzzed with arbitrary inputs in a child
process (tests/fuzz_native.py): each call returns a sane result or raises a Python error; a crash
(signal), a hang or another exception fails here with the entry point and example that caused it."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")


def test_native_entry_points_survive_arbitrary_inputs():
    script = Path(__file__).with_name("fuzz_native.py")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, str(script), "150"], capture_output=True, text=True, timeout=600, env=env)
    last = out.stderr.strip().splitlines()[-1:] if out.stderr.strip() else []
    assert out.returncode == 0, f"rc {out.returncode} (negative: killed by that signal) at {last}\n{out.stderr[-3000:]}"
    tallies = dict(re.findall(r"^(.+): ok=(\d+) refused=\d+$", out.stdout, re.M))
    refused = dict(re.findall(r"^(.+): ok=\d+ refused=(\d+)$", out.stdout, re.M))
    assert set(tallies) == {"rq_encode", "rq_decode", "kmeans", "constrained_beam_step", "beam_search_level",
                            "ConceptTrie.from_arrays",
                            "ConceptTrie.build", "ConceptTrie methods"}, out.stdout
    for name in tallies:  # both valid calls (the kernels ran) and refused ones (the checks ran)
        assert int(tallies[name]) > 0 and int(refused[name]) > 0, (name, out.stdout)

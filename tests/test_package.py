"""The installed package: info(), the CLI, lazy public names, the kernels shipped inside."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import recbase


def test_info_reports_capabilities():
    info = recbase.info()
    assert info["version"] == recbase.__version__
    for key in ("cuda_compiled", "cuda_available", "triton", "threads", "openmp", "torch"):
        assert key in info
    assert isinstance(info["threads"], int) and info["threads"] >= 1


def test_cli_info_prints_json():
    out = subprocess.run([sys.executable, "-m", "recbase.cli", "info"], capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout)["version"] == recbase.__version__


def test_cli_bad_arguments_fail_cleanly():
    out = subprocess.run([sys.executable, "-m", "recbase.cli", "recommend", "--items", "nope.csv",
                          "--tokenizer", "nope", "--model", "nope", "--history", "a"],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr


def test_public_names_and_kernels_are_importable():
    for name in ("ResidualQuantizer", "ItemTokenizer", "ConceptTrie", "beam_search",
                 "RecBaseConfig", "RecBaseForCausalLM", "Recommender"):
        assert getattr(recbase, name) is not None
    kernels = importlib.import_module("recbase.kernels")  # shipped inside the package, no GPU needed
    assert kernels.__name__ == "recbase.kernels"
    with pytest.raises(AttributeError):
        recbase.not_a_name


def test_repository_root_does_not_shadow_the_pypi_kernels_package():
    # transformers imports the PyPI package `kernels`; run from the repository root (python -m
    # pytest, python -m recbase ...), a regular package named kernels there would be found first.
    root = Path(__file__).resolve().parents[1]
    code = ("import importlib.util, json; s = importlib.util.find_spec('kernels'); "
            "print(json.dumps(None if s is None else s.origin))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    origin = json.loads(out.stdout)
    # Only the repository's own kernels/ folder would shadow it (a venv inside the checkout is fine).
    own = (root / "kernels").resolve()
    assert origin is None or not Path(origin).resolve().is_relative_to(own), origin
    model = subprocess.run([sys.executable, "-c", "from recbase.model import RecBaseForCausalLM"], cwd=root,
                           capture_output=True, text=True)
    assert model.returncode == 0, model.stderr[-2000:]


def test_gpu_check_skips_cleanly_without_a_gpu(tmp_path):
    """bench/gpu_check.sh is the one-command GPU check; on a machine without CUDA it must say so and
    exit 0, writing nothing (on a GPU machine it is run by hand: it takes minutes)."""
    import os

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: run bash bench/gpu_check.sh itself")
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    out = subprocess.run(["bash", str(script), str(tmp_path / "results")], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    assert "no CUDA device here" in out.stdout and "skipped" in out.stdout
    assert not (tmp_path / "results").exists()

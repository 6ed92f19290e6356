"""Triton jagged concept attention vs the float64 reference (Triton interpreter on CPU)."""
import math
import os

import torch

if not torch.cuda.is_available():  # must precede the first Triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from recbase.ops.attention import (  # noqa: E402
    _attention_reference_bwd,
    _attention_reference_fwd,
    concept_attention,
)

triton = pytest.importorskip("triton")
import recbase.kernels.concept_attention as kca  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(lens, heads, kv_heads, dim, items_per_seq_gen, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    # item index: non-decreasing runs of random length (1..4 tokens per item)
    item = []
    for n in lens:
        cur, left, idx = [], n, 0
        while left > 0:
            run = int(torch.randint(1, items_per_seq_gen + 1, (1,), generator=gen))
            cur += [idx] * min(run, left)
            left -= run
            idx += 1
        item += cur
    item = torch.tensor(item, dtype=torch.int64)
    n = int(cu[-1])
    q = torch.randn(n, heads, dim, generator=gen)
    k = torch.randn(n, kv_heads, dim, generator=gen)
    v = torch.randn(n, kv_heads, dim, generator=gen)
    g = torch.randn(n, heads, dim, generator=gen)
    return [x.to(DEV, dtype) for x in (q, k, v, g)] + [cu.to(DEV), item.to(DEV)]


def _check(q, k, v, g, cu, item, mask, atol=2e-5, rel=None):
    scale = 1.0 / math.sqrt(q.shape[-1])
    qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
    out = concept_attention(qq, kk, vv, cu, item, mask=mask, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), g)
    d64 = [x.double() for x in (q, k, v, g)]
    ref, _ = _attention_reference_fwd(d64[0], d64[1], d64[2], cu, item, mask, scale)
    rdq, rdk, rdv = _attention_reference_bwd(d64[3], d64[0], d64[1], d64[2], cu, item, mask, scale)
    for name, got, exp in (("out", out, ref), ("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert torch.isfinite(got).all(), name
        if rel is not None:  # half precision: error relative to the largest magnitude
            err = float((got.double() - exp).abs().max() / exp.abs().max())
            assert err < rel, (name, err)
        else:
            torch.testing.assert_close(got.double(), exp, atol=atol, rtol=1e-3, msg=name)


@pytest.fixture
def small_tiles(monkeypatch):
    """16-token tiles: multi-tile loops and skipped (fully masked) tiles at tiny lengths."""
    monkeypatch.setattr(kca, "_INTERP_BLOCK", 16)


@pytest.mark.parametrize("mask", ["causal", "item"])
def test_forward_backward_match_float64_reference(mask, small_tiles):
    # length 1, an empty sequence, and a 40-token sequence (3 tiles: tiles above the diagonal skipped)
    q, k, v, g, cu, item = _batch([1, 40, 0, 7, 17], heads=4, kv_heads=2, dim=16,
                                  items_per_seq_gen=4, seed=11)
    _check(q, k, v, g, cu, item, mask)


def test_non_power_of_two_head_dim_and_mha():
    q, k, v, g, cu, item = _batch([5, 12, 3], heads=2, kv_heads=2, dim=24, items_per_seq_gen=3, seed=12)
    _check(q, k, v, g, cu, item, "item")


@settings(max_examples=4, deadline=None)
@given(lens=st.lists(st.integers(1, 12), min_size=2, max_size=3), seed=st.integers(0, 10_000),
       mask=st.sampled_from(["causal", "item"]))
def test_property_random_jagged(lens, seed, mask):
    q, k, v, g, cu, item = _batch(lens, heads=2, kv_heads=1, dim=16, items_per_seq_gen=3, seed=seed)
    _check(q, k, v, g, cu, item, mask)


def test_item_mask_sees_whole_item():
    # one sequence of one item: every query sees every key under "item", only a prefix under "causal"
    q, k, v, g, cu, item = _batch([6], heads=2, kv_heads=2, dim=16, items_per_seq_gen=1, seed=13)
    item = torch.zeros_like(item)
    out_item = concept_attention(q, k, v, cu, item, mask="item", backend="triton")
    out_causal = concept_attention(q, k, v, cu, item, mask="causal", backend="triton")
    torch.testing.assert_close(out_item[-1], out_causal[-1], atol=1e-5, rtol=1e-4)  # last token: same keys
    assert not torch.allclose(out_item[0], out_causal[0])


def test_triton_requires_device_or_interpreter(monkeypatch):
    q = torch.randn(3, 2, 16)
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        concept_attention(q.double(), q.double(), q.double(), torch.tensor([0, 3]),
                          torch.zeros(3, dtype=torch.long), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        concept_attention(q, q, q, torch.tensor([0, 3]), torch.zeros(3, dtype=torch.long), backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("mask", ["causal", "item"])
def test_gpu_half_precision(dtype, dim, mask):
    lens = [1, 200, 37, 800, 64]
    q, k, v, g, cu, item = _batch(lens, heads=8, kv_heads=2, dim=dim, items_per_seq_gen=4, seed=14, dtype=dtype)
    _check(q, k, v, g, cu, item, mask, rel=2e-2)


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import recbase.kernels.concept_attention as ka
import recbase.kernels.concept_embedding as ke
import recbase.kernels.level_cross_entropy as kl

def build(fn, types, consts):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    cx = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx), target=GPUTarget("cuda", 90, 32))

t = {n: "*bf16" for n in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ", "TW", "LW", "IW", "OUT", "DOUT", "W", "G")}
t.update({n: "*fp32" for n in ("LSE", "DELTA", "DTW", "DLW", "DIW", "LOSS", "DLOSS")})
t.update({n: "*i32" for n in ("CU", "ITEM", "KV_END", "ITEM_START", "BLK_LEVEL", "BLK_START", "BLK_END")})
t.update({n: "*i64" for n in ("TOK", "LVL", "TGT")})
t["sm_scale"] = "fp32"
att = dict(HEAD_DIM=64, BLOCK_D=64, ITEM_MASK=True, BLOCK_M=64, BLOCK_N=64)
for fn in (ka._fwd_kernel, ka._bwd_dkdv_kernel, ka._bwd_dq_kernel):
    build(fn, t, att)
t["ITEM"] = "*i64"
build(ke._emb_fwd_kernel, t, dict(HAS_ITEM=True, BLOCK_R=32, BLOCK_H=256))
build(ke._emb_bwd_kernel, t, dict(NUM_LEVELS=5, HAS_ITEM=True, BLOCK_R=32, BLOCK_H=256))
t["H"] = "*bf16"  # hidden states here (a head count in the attention kernels)
for fn in (kl._ce_fwd_kernel, kl._ce_bwd_kernel):
    build(fn, t, dict(BLOCK_R=64, BLOCK_K=128, BLOCK_H=64))
print("COMPILED")
"""


@pytest.mark.slow
def test_gpu_kernels_compile_for_sm90_without_gpu():
    """Ahead-of-time compile of every kernel to an sm_90 cubin (bf16): GPU-only compile errors show
    up on machines without a GPU. Runs in a subprocess: the interpreter must be off there."""
    import subprocess
    import sys

    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "COMPILED" in res.stdout, res.stderr[-4000:]

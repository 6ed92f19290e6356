"""Fused level-restricted output head + CE (Triton) vs the float64 unfused reference."""
import os

import torch

if not torch.cuda.is_available():  # must precede the first Triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from recbase.ops.attention import level_cross_entropy, level_cross_entropy_reference  # noqa: E402

pytest.importorskip("triton")
import recbase.kernels.level_cross_entropy as klce  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_reference_equals_full_vocab_masked_ce():
    """Restricting to the level block == full-vocab CE with the other levels' logits at -inf."""
    gen = torch.Generator().manual_seed(31)
    L, K, hid, n = 3, 7, 10, 20
    h = torch.randn(n, hid, generator=gen, dtype=torch.float64)
    w = torch.randn(L * K, hid, generator=gen, dtype=torch.float64)
    lvl = torch.randint(0, L, (n,), generator=gen)
    tgt = torch.randint(0, K, (n,), generator=gen)
    full = h @ w.T
    block = torch.arange(L * K) // K
    full = full.masked_fill(block[None, :] != lvl[:, None], float("-inf"))
    exp = F.cross_entropy(full, lvl * K + tgt, reduction="none")
    torch.testing.assert_close(level_cross_entropy_reference(h, w, lvl, tgt, L), exp)


def test_fused_ce_matches_reference(monkeypatch):
    calls = []
    real_fwd, real_bwd = klce.level_cross_entropy_fwd, klce.level_cross_entropy_bwd
    monkeypatch.setattr(klce, "level_cross_entropy_fwd", lambda *a: calls.append("f") or real_fwd(*a))
    monkeypatch.setattr(klce, "level_cross_entropy_bwd", lambda *a: calls.append("b") or real_bwd(*a))
    gen = torch.Generator().manual_seed(32)
    L, K, hid, n = 3, 20, 40, 45  # K, hid not multiples of the tiles; a level with > 1 row block
    h = torch.randn(n, hid, generator=gen, dtype=torch.float64)
    w = torch.randn(L * K, hid, generator=gen, dtype=torch.float64) * 0.5
    lvl = torch.randint(0, L, (n,), generator=gen)
    lvl[:34] = 1
    tgt = torch.randint(0, K, (n,), generator=gen)
    tgt[::7] = -100
    dl = torch.rand(n, generator=gen, dtype=torch.float64)
    hf, wf = h.float().to(DEV).requires_grad_(True), w.float().to(DEV).requires_grad_(True)
    loss = level_cross_entropy(hf, wf, lvl.to(DEV), tgt.to(DEV), L, backend="triton")
    dh, dw = torch.autograd.grad(loss, (hf, wf), dl.float().to(DEV))
    hr, wr = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = level_cross_entropy_reference(hr, wr, lvl, tgt, L)
    rdh, rdw = torch.autograd.grad(ref, (hr, wr), dl)
    torch.testing.assert_close(loss.double().cpu(), ref, atol=2e-5, rtol=1e-5)
    assert bool((loss[tgt.to(DEV) < 0] == 0).all())
    torch.testing.assert_close(dh.double().cpu(), rdh, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dw.double().cpu(), rdw, atol=2e-5, rtol=1e-4)
    assert calls == ["f", "b"]


def test_bad_level_and_shapes():
    h, w = torch.randn(2, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="next_level must lie"):
        level_cross_entropy(h, w, torch.tensor([0, 2]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="levels\\*K"):
        level_cross_entropy(h, torch.randn(7, 4), torch.tensor([0, 1]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="hidden"):
        level_cross_entropy(h, torch.randn(6, 5), torch.tensor([0, 1]), torch.tensor([0, 1]), 2)


def test_direct_op_calls_and_level_logits_validate_like_the_wrappers():
    """torch.ops.recbase.* called directly (skipping the wrappers) and level_logits refuse what the
    wrappers refuse, instead of returning uninitialised rows or reading an unknown mask as another."""
    import pytest
    import recbase.ops.attention  # noqa: F401  (registers the ops)
    from recbase.ops.attention import level_logits

    h, w = torch.randn(4, 8), torch.randn(2 * 5, 8)
    with pytest.raises(ValueError, match=r"next_level must lie in \[0, 2\)"):
        level_logits(h, w, torch.tensor([0, 1, 2, 0]), 2)
    with pytest.raises(ValueError, match=r"next_level must lie in \[0, 2\)"):
        torch.ops.recbase.level_cross_entropy(h, w, torch.tensor([0, 1, 5, 0]), torch.tensor([1, 2, 3, 4]), 2, 1)
    with pytest.raises(ValueError, match="target must be a code"):
        torch.ops.recbase.level_cross_entropy(h, w, torch.tensor([0, 1, 1, 0]), torch.tensor([1, 2, 9, 4]), 2, 1)
    q = torch.randn(6, 2, 4)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    item = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="mask must be one of"):
        torch.ops.recbase.concept_attention(q, q, q, cu, item, "items", 0.5, 1)
    with pytest.raises(ValueError, match="backend code"):
        torch.ops.recbase.concept_attention(q, q, q, cu, item, "causal", 0.5, 7)
    # valid direct calls still work and equal the wrappers
    nl, tg = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 2, 3, -100])
    loss, _ = torch.ops.recbase.level_cross_entropy(h, w, nl, tg, 2, 1)
    from recbase.ops.attention import level_cross_entropy
    torch.testing.assert_close(loss, level_cross_entropy(h, w, nl, tg, 2, backend="reference"))

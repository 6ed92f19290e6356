"""Fused concept embedding (Triton) vs the unfused PyTorch reference: values and gradients."""
import os

import torch

if not torch.cuda.is_available():  # must precede the first Triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from recbase.ops.attention import concept_embedding, concept_embedding_reference  # noqa: E402

pytest.importorskip("triton")
import recbase.kernels.concept_embedding as kce  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("with_item", [False, True])
def test_fused_embedding_matches_reference(with_item, monkeypatch):
    calls = []
    real_fwd, real_bwd = kce.concept_embedding_fwd, kce.concept_embedding_bwd
    monkeypatch.setattr(kce, "concept_embedding_fwd", lambda *a: calls.append("f") or real_fwd(*a))
    monkeypatch.setattr(kce, "concept_embedding_bwd", lambda *a: calls.append("b") or real_bwd(*a))
    gen = torch.Generator().manual_seed(21)
    n, hid = 53, 40  # hidden not a power of two: masked columns
    tw = torch.randn(30, hid, generator=gen, dtype=torch.float64)
    lw = torch.randn(5, hid, generator=gen, dtype=torch.float64)
    iw = torch.randn(9, hid, generator=gen, dtype=torch.float64)
    tok = torch.randint(0, 30, (n,), generator=gen)
    lvl = torch.randint(0, 5, (n,), generator=gen)
    item = torch.randint(0, 9, (n,), generator=gen)
    g = torch.randn(n, hid, generator=gen, dtype=torch.float64)
    ws = [tw, lw] + ([iw] if with_item else [])
    fused = [w.float().to(DEV).requires_grad_(True) for w in ws]
    out = concept_embedding(tok.to(DEV), lvl.to(DEV), fused[0], fused[1],
                            item.to(DEV) if with_item else None, fused[2] if with_item else None, backend="triton")
    grads = torch.autograd.grad(out, fused, g.float().to(DEV))
    refw = [w.clone().requires_grad_(True) for w in ws]
    ref = concept_embedding_reference(tok, lvl, refw[0], refw[1], item if with_item else None,
                                      refw[2] if with_item else None)
    rgrads = torch.autograd.grad(ref, refw, g)
    torch.testing.assert_close(out.double().cpu(), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a.double().cpu(), b, atol=1e-4, rtol=1e-5)
    assert calls == ["f", "b"]


def test_embedding_bad_ids():
    tw, lw = torch.randn(10, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="level_ids must lie in"):
        concept_embedding(torch.tensor([1, 2]), torch.tensor([0, 3]), tw, lw)
    with pytest.raises(ValueError, match="together"):
        concept_embedding(torch.tensor([1]), torch.tensor([0]), tw, lw, item_ids=torch.tensor([0]))

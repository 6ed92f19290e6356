"""Jagged concept attention: Triton kernel vs PyTorch SDPA (dense padded + boolean mask) and vs
FlexAttention (packed + block mask), forward and forward+backward, bf16, 8 heads, head dim 64,
256 users x {50, 200} items x 4 tokens (lengths vary per user). Reports TFLOP/s on the real
(unpadded, unmasked) work, achieved GB/s and the ratios to both anchors, measured in the same run.

    python -m pytest bench/bench_attention.py -q -s          # GPU rows skip without CUDA

A CPU row compares the PyTorch reference path of ``concept_attention`` with a per-sequence SDPA loop.
``RECBASE_BENCH_SMOKE=1`` runs the GPU rows on CPU at toy sizes (Triton interpreter, fp32) to check
the harness itself; its numbers mean nothing.
"""
from __future__ import annotations

import math
import os
import time

if os.environ.get("RECBASE_BENCH_SMOKE") == "1":  # before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

from recbase.ops.attention import concept_attention

USERS, TOKENS_PER_ITEM, HEADS, HEAD_DIM = 256, 4, 8, 64
SMOKE = os.environ.get("RECBASE_BENCH_SMOKE") == "1" and not torch.cuda.is_available()
_ROWS: list = []


def _time_ms(step):
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(step, warmup=10, rep=50)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _jagged(users, max_items, heads, kv_heads, dim, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(max(1, max_items // 4), max_items + 1, (users,), generator=gen)
    lens = items * TOKENS_PER_ITEM
    cu = torch.zeros(users + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    item = torch.cat([torch.arange(int(n)) // TOKENS_PER_ITEM for n in lens])
    n = int(cu[-1])
    q = torch.randn(n, heads, dim, generator=gen).to(device, dtype)
    k = torch.randn(n, kv_heads, dim, generator=gen).to(device, dtype)
    v = torch.randn(n, kv_heads, dim, generator=gen).to(device, dtype)
    return q, k, v, cu.to(device), item.to(device), lens


def _work(lens, mask, heads, dim):
    """(forward FLOPs, allowed (q, k) pairs) of the real work: 2 matmuls x 2 flops per pair and dim."""
    pairs = 0
    for n in lens.tolist():
        if mask == "causal":
            pairs += n * (n + 1) // 2
        else:  # a query sees every token of its item and earlier items
            items = n // TOKENS_PER_ITEM
            pairs += TOKENS_PER_ITEM * TOKENS_PER_ITEM * items * (items + 1) // 2
    return 4.0 * pairs * heads * dim, pairs


def _bytes(n, heads, kv_heads, dim, elt, backward):
    """Compulsory HBM traffic: fwd reads q, k, v, writes o and lse; bwd also reads o, dO, lse and
    writes dq, dk, dv."""
    qo = n * heads * dim * elt
    kv = n * kv_heads * dim * elt
    fwd = 2 * qo + 2 * kv + n * heads * 4
    if not backward:
        return fwd
    return fwd + (3 * qo + 2 * kv + n * heads * 4) + (qo + 2 * kv)


def _padded(q, k, v, lens, mask_kind):
    b, t = len(lens), int(lens.max())
    cu = torch.zeros(b + 1, dtype=torch.long)
    cu[1:] = lens.cumsum(0)
    seq = torch.repeat_interleave(torch.arange(b), lens).to(q.device)
    pos = (torch.arange(int(cu[-1])) - cu[:-1].repeat_interleave(lens)).to(q.device)

    def pad(x):
        out = x.new_zeros((b, t) + tuple(x.shape[1:]))
        out[seq, pos] = x
        return out.transpose(1, 2).contiguous()  # [B, H, T, D]

    ar = torch.arange(t, device=q.device)
    valid = ar[None, :] < lens.to(q.device)[:, None]
    if mask_kind == "causal":
        allowed = ar[:, None] >= ar[None, :]
    else:
        it = ar // TOKENS_PER_ITEM
        allowed = it[:, None] >= it[None, :]
    allowed = allowed[None] & valid[:, None, :]
    allowed = allowed | torch.eye(t, dtype=torch.bool, device=q.device)[None]  # padded rows: finite
    return pad(q), pad(k), pad(v), allowed[:, None]


def _flex(q, k, v, cu, item, mask_kind, requires_grad):
    """FlexAttention over the packed batch ([1, H, N, D]) with a document + causal/item block mask.
    Returns (callable, leaf inputs)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = q.shape[0]
    lens = (cu[1:] - cu[:-1]).long()
    doc = torch.repeat_interleave(torch.arange(lens.numel(), device=q.device), lens, output_size=n)
    it = item.long()

    def mask_mod(b, h, qi, ki):
        same = doc[qi] == doc[ki]
        return same & ((ki <= qi) if mask_kind == "causal" else (it[ki] <= it[qi]))

    try:  # compiled mask construction: never materialises the dense N x N mask
        block_mask = create_block_mask(mask_mod, None, None, n, n, device=q.device, _compile=True)
    except TypeError:
        block_mask = create_block_mask(mask_mod, None, None, n, n, device=q.device)
    fn = torch.compile(flex_attention)
    groups = q.shape[1] // k.shape[1]
    leaves = tuple(x.detach().transpose(0, 1)[None].contiguous().requires_grad_(requires_grad) for x in (q, k, v))
    return (lambda: fn(*leaves, block_mask=block_mask, enable_gqa=groups > 1)), leaves


def _unpad(out, name, lens):
    """Anchor outputs back to the packed [N, H, D] layout."""
    if name == "flex":
        return out[0].transpose(0, 1)
    b = torch.arange(len(lens)).repeat_interleave(lens)
    pos = torch.cat([torch.arange(int(n)) for n in lens])
    return out.transpose(1, 2)[b.to(out.device), pos.to(out.device)]


def _run_backward(fn, inputs):
    out = fn()
    out.backward(torch.ones_like(out))
    for x in inputs:
        x.grad = None


@pytest.mark.skipif(not (torch.cuda.is_available() or SMOKE), reason="needs CUDA (or RECBASE_BENCH_SMOKE=1)")
@pytest.mark.parametrize("max_items", [50, 200])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("mask", ["causal", "item"])
def test_attention_vs_sdpa_and_flex(benchmark, max_items, mode, mask):
    if SMOKE:
        dev, dt, users, max_items = "cpu", torch.float32, 3, max_items // 25
    else:
        dev, dt, users = "cuda", torch.bfloat16, USERS
    q, k, v, cu, item, lens = _jagged(users, max_items, HEADS, HEADS, HEAD_DIM, dev, dt)
    bwd = mode == "fwd+bwd"
    for x in (q, k, v):
        x.requires_grad_(bwd)
    ours = lambda: concept_attention(q, k, v, cu, item, mask=mask, backend="triton", check_inputs=False)  # noqa: E731
    qp, kp, vp, dense_mask = _padded(q.detach(), k.detach(), v.detach(), lens, mask)
    for x in (qp, kp, vp):
        x.requires_grad_(bwd)
    sdpa = lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=dense_mask)  # noqa: E731
    impls = {"triton": (ours, (q, k, v)), "sdpa_dense": (sdpa, (qp, kp, vp))}
    try:
        impls["flex"] = _flex(q, k, v, cu, item, mask, bwd)
    except Exception as exc:  # FlexAttention needs a recent torch + working inductor
        print(f"FlexAttention unavailable: {exc!r}")
    ref = ours().detach().float()
    times = {}
    for name, (fn, inputs) in impls.items():
        step = (lambda f=fn, i=inputs: _run_backward(f, i)) if bwd else fn
        try:
            got = fn().detach().float()
            got = got if name == "triton" else _unpad(got, name, lens)
            torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)  # same attention, checked
            step()
            _sync()
            times[name] = _time_ms(step)  # ms
        except Exception as exc:
            if name != "flex":
                raise
            print(f"FlexAttention failed: {exc!r}")
    benchmark.pedantic(lambda: (ours().sum().backward() if bwd else ours(), _sync()),
                       rounds=2 if SMOKE else 10, warmup_rounds=0 if SMOKE else 2)
    flops, _ = _work(lens, mask, HEADS, HEAD_DIM)
    flops *= 3.5 if bwd else 1.0  # backward = 2.5x forward matmul work
    nbytes = _bytes(int(cu[-1]), HEADS, HEADS, HEAD_DIM, q.element_size(), bwd)
    row = {"items": max_items, "mode": mode, "mask": mask, "tokens": int(cu[-1])}
    for name, ms in times.items():
        row[f"{name}_ms"] = round(ms, 4)
        row[f"{name}_TFLOPs"] = round(flops / ms / 1e9, 2)
    row["triton_GBs"] = round(nbytes / times["triton"] / 1e6, 1)
    for anchor in ("sdpa_dense", "flex"):
        if anchor in times:
            row[f"speedup_vs_{anchor}"] = round(times[anchor] / times["triton"], 2)
    benchmark.extra_info.update(row)
    _ROWS.append(row)
    print("\n" + " | ".join(f"{k}={v}" for k, v in row.items()))


def test_cpu_reference_path_vs_sdpa_loop(benchmark):
    """CPU: the reference path of concept_attention (padded, grouped) vs a per-sequence SDPA loop."""
    q, k, v, cu, item, lens = _jagged(32, 50, 4, 4, 64, "cpu", torch.float32)
    ours = lambda: concept_attention(q, k, v, cu, item, backend="reference", check_inputs=False)  # noqa: E731

    def sdpa_loop():
        outs = []
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            outs.append(F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                                       v[s:e].transpose(0, 1), is_causal=True).transpose(0, 1))
        return torch.cat(outs)

    torch.testing.assert_close(ours(), sdpa_loop(), atol=1e-4, rtol=1e-4)
    import time

    t0 = time.perf_counter()
    for _ in range(3):
        sdpa_loop()
    anchor = (time.perf_counter() - t0) / 3
    res = benchmark.pedantic(ours, rounds=3, warmup_rounds=1)
    del res
    ours_s = benchmark.stats.stats.mean if benchmark.stats else float("nan")
    flops, _ = _work(lens, "causal", 4, 64)
    benchmark.extra_info.update({"sdpa_loop_s": anchor, "ratio_sdpa_loop_over_ours": anchor / ours_s,
                                 "ours_GFLOPs": flops / ours_s / 1e9})
    print(f"\nCPU reference {ours_s * 1e3:.1f} ms vs SDPA loop {anchor * 1e3:.1f} ms "
          f"(ratio {anchor / ours_s:.2f}); {flops / ours_s / 1e9:.1f} GFLOP/s real work")


def test_cpu_model_train_step_vs_hf_qwen2(benchmark):
    """CPU: one training step (fwd+bwd) of RecBaseForCausalLM ("small" preset, packed jagged batch,
    level-restricted CE) vs transformers' Qwen2ForCausalLM of the same shape (padded batch +
    attention mask, full-vocabulary CE over the same 4 + L*K vocabulary)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from recbase.model import RecBaseConfig, RecBaseForCausalLM

    torch.manual_seed(0)
    cfg = RecBaseConfig.from_preset("small")
    ours = RecBaseForCausalLM(cfg).train()
    qcfg = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_tokens,
                       tie_word_embeddings=False)
    hf = Qwen2ForCausalLM(qcfg).train()
    gen = torch.Generator().manual_seed(1)
    seqs = []
    for _ in range(16):
        n_items = int(torch.randint(10, 51, (1,), generator=gen))
        codes = torch.randint(0, cfg.codebook_size, (n_items, cfg.levels), generator=gen)
        seqs.append(torch.cat([torch.tensor([1]), (4 + torch.arange(cfg.levels) * cfg.codebook_size + codes).flatten()]))
    ids = torch.cat(seqs)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.long)
    cu[1:] = torch.tensor([len(s) for s in seqs]).cumsum(0)
    t = max(len(s) for s in seqs)
    padded = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
    mask = (padded != 0).long()
    labels = padded.masked_fill(mask == 0, -100)

    def step_ours():
        ours(ids, cu_seqlens=cu, return_loss=True).loss.backward()

    def step_hf():
        hf(input_ids=padded, attention_mask=mask, labels=labels).loss.backward()

    step_hf()
    t0 = time.perf_counter()
    for _ in range(2):
        step_hf()
    anchor = (time.perf_counter() - t0) / 2
    benchmark.pedantic(step_ours, rounds=2, warmup_rounds=1)
    mean = benchmark.stats.stats.mean if benchmark.stats else float("nan")
    tokens = int(cu[-1])
    benchmark.extra_info.update({"tokens": tokens, "hf_qwen2_s": anchor, "ours_s": mean,
                                 "speedup_vs_hf_qwen2": anchor / mean, "ours_tokens_per_s": tokens / mean})
    print(f"\nCPU train step, {tokens} tokens: RecBase {mean * 1e3:.0f} ms ({tokens / mean:.0f} tok/s) vs "
          f"HF Qwen2 padded {anchor * 1e3:.0f} ms -> speedup {anchor / mean:.2f}x")

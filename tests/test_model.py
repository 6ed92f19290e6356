"""RecBase model: reference attention path, restricted CE, KV-cache generation, save/load, errors."""
import math
import os

import torch

if not torch.cuda.is_available():  # Triton-path test below runs in the interpreter; set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from recbase.model import PRESETS, RecBaseConfig, RecBaseForCausalLM
from recbase.ops.attention import (
    concept_attention,
    concept_attention_reference,
    level_cross_entropy,
    level_cross_entropy_reference,
)


def _model(seed=0, **over):
    torch.manual_seed(seed)
    cfg = RecBaseConfig.from_preset("tiny", initializer_range=0.3, **over)
    return RecBaseForCausalLM(cfg).eval()


def _seq(cfg, n_items, bos, gen):
    L, K = cfg.levels, cfg.codebook_size
    codes = torch.randint(0, K, (n_items, L), generator=gen)
    toks = (4 + torch.arange(L) * K + codes).flatten()
    return torch.cat([torch.tensor([1]), toks]) if bos else toks


def _pack(seqs):
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor([len(s) for s in seqs]).cumsum(0)
    return torch.cat(seqs), cu


@torch.no_grad()
def _manual_loss(model, seqs):
    """Brute force: full-vocab logits from the model's hidden states, restricted by hand."""
    cfg = model.config
    L, K = cfg.levels, cfg.codebook_size
    total, count = 0.0, 0
    for s in seqs:
        out = model(s[None], output_hidden_states=True, output_logits=False, return_loss=True)
        h = out.hidden_states.double()
        full = h @ model.lm_head.weight.double().T  # [T, V]
        for t in range(len(s) - 1):
            nxt = int(s[t + 1])
            lvl = (nxt - 4) // K
            block = full[t, 4 + lvl * K: 4 + (lvl + 1) * K]
            total += float(torch.logsumexp(block, 0) - block[nxt - 4 - lvl * K])
            count += 1
    return total / count


def test_presets_and_config_validation():
    assert set(PRESETS) == {"tiny", "small", "base", "large"}
    base = RecBaseConfig.from_preset("base")
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads) == (1024, 24, 16)
    large = RecBaseConfig.from_preset("large")
    assert (large.hidden_size, large.intermediate_size, large.num_hidden_layers,
            large.num_attention_heads, large.num_key_value_heads) == (1536, 8960, 28, 12, 2)
    assert base.vocab_size == 4 + base.levels * base.codebook_size
    with torch.device("meta"):  # parameter counts of the paper's sizes, without allocating
        n_base = sum(p.numel() for p in RecBaseForCausalLM(base).parameters())
        n_large = sum(p.numel() for p in RecBaseForCausalLM(large).parameters())
    assert 0.28e9 < n_base < 0.36e9 and 1.2e9 < n_large < 1.6e9
    with pytest.raises(ValueError, match="unknown preset"):
        RecBaseConfig.from_preset("huge")
    with pytest.raises(ValueError, match="must divide"):
        RecBaseConfig.from_preset("tiny", num_key_value_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        RecBaseConfig.from_preset("tiny", vocab_size=7)


def test_packed_and_padded_agree_and_loss_matches_bruteforce():
    model = _model()
    gen = torch.Generator().manual_seed(1)
    seqs = [_seq(model.config, 3, True, gen), _seq(model.config, 1, False, gen), _seq(model.config, 4, True, gen)]
    ids, cu = _pack(seqs)
    packed = model(ids, cu_seqlens=cu, return_loss=True, output_logits=True)
    t = max(len(s) for s in seqs)
    padded_ids = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        padded_ids[i, : len(s)] = s
    padded = model(padded_ids, return_loss=True, output_logits=True)
    assert padded.logits.shape == (3, t, model.config.codebook_size)
    mask = padded_ids != 0
    torch.testing.assert_close(padded.logits[mask], packed.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.loss, packed.loss)
    assert math.isclose(float(packed.loss.detach()), _manual_loss(model, seqs), rel_tol=1e-4)
    left = torch.zeros_like(padded_ids)
    for i, s in enumerate(seqs):
        left[i, t - len(s):] = s
    left_out = model(left, attention_mask=left != 0, return_loss=True, output_logits=True)
    torch.testing.assert_close(left_out.logits[left != 0], packed.logits, rtol=1e-5, atol=1e-5)
    # logits only when asked
    assert model(ids, cu_seqlens=cu, return_loss=True).logits is None


def test_labels_ignore_and_gradients_flow():
    model = _model().train()
    gen = torch.Generator().manual_seed(2)
    seqs = [_seq(model.config, 2, True, gen), _seq(model.config, 3, False, gen)]
    ids, cu = _pack(seqs)
    labels = ids.clone()
    labels[2] = -100
    out = model(ids, cu_seqlens=cu, labels=labels)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    full = model(ids, cu_seqlens=cu, return_loss=True)
    assert not torch.allclose(out.loss, full.loss)


def test_reference_ops_match_float64():
    gen = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 1, 6, 13], dtype=torch.int32)
    item = torch.tensor([0, 0, 0, 1, 1, 2, 0, 1, 1, 1, 2, 2, 3])
    q = torch.randn(13, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(13, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(13, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    for mask in ("causal", "item"):
        out = concept_attention(q, k, v, cu, item, mask=mask, backend="reference")
        # brute force per token
        ref = torch.zeros_like(out)
        for b in range(3):
            for i in range(int(cu[b]), int(cu[b + 1])):
                for hh in range(4):
                    keys = [j for j in range(int(cu[b]), int(cu[b + 1]))
                            if (j <= i if mask == "causal" else item[j] <= item[i])]
                    s = torch.stack([q[i, hh] @ k[j, hh // 2] for j in keys]) / math.sqrt(8)
                    ref[i, hh] = torch.softmax(s, 0) @ v[keys, hh // 2]
        torch.testing.assert_close(out, ref)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), g)
        exp = torch.autograd.grad(ref, (q, k, v), g)
        for a, e in zip(got, exp):
            torch.testing.assert_close(a, e)


def test_level_cross_entropy_reference_grad():
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3 * 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    lvl = torch.randint(0, 3, (9,), generator=gen)
    tgt = torch.randint(0, 5, (9,), generator=gen)
    tgt[3] = -100
    got = level_cross_entropy(h, w, lvl, tgt, 3, backend="reference")
    exp = level_cross_entropy_reference(h, w, lvl, tgt, 3)
    torch.testing.assert_close(got, exp)
    assert got[3] == 0
    gg = torch.rand(9, generator=gen, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(got, (h, w), gg), torch.autograd.grad(exp, (h, w), gg)):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_kv_cache_generation_equals_full_recompute(kv_heads):
    model = _model(seed=5, num_key_value_heads=kv_heads)
    cfg = model.config
    L, K = cfg.levels, cfg.codebook_size
    gen = torch.Generator().manual_seed(6)
    hist = [_seq(cfg, 2, True, gen), _seq(cfg, 1, False, gen), torch.tensor([], dtype=torch.long)]
    state, lp = model.start_generation(hist)
    assert lp.shape == (3, K) and lp.dtype == torch.float32
    padded = torch.zeros(3, 7, dtype=torch.long)
    for i, h in enumerate(hist):
        padded[i, : len(h)] = h
    torch.testing.assert_close(model.start_generation(padded)[1], lp)
    seqs = [h if h.numel() else torch.tensor([1]) for h in hist]
    # expand to 2 beams per user, reorder, decode two items
    index = torch.tensor([0, 0, 1, 1, 2, 2])
    state = model.select_generation(state, index)
    seqs = [seqs[i] for i in index.tolist()]
    for step in range(2 * L):
        level = step % L
        if step == 1:  # reorder beams by parent; users end up with 3, 2 and 1 rows
            perm = torch.tensor([1, 0, 0, 3, 3, 5])
            prev = state
            state = model.select_generation(state, perm)
            assert state.prefix_keys[0] is prev.prefix_keys[0]  # history cache shared, never copied
            seqs = [seqs[i] for i in perm.tolist()]
        codes = torch.randint(0, K, (len(seqs),), generator=gen)
        state, lp = model.step_generation(state, codes, level)
        seqs = [torch.cat([s, torch.tensor([4 + level * K + int(c)])]) for s, c in zip(seqs, codes)]
        ids, cu = _pack(seqs)
        full = model(ids, cu_seqlens=cu, output_logits=True)
        ref = torch.log_softmax(full.logits[cu[1:] - 1].float(), -1)
        assert (full.next_levels[cu[1:] - 1] == (level + 1) % L).all()
        torch.testing.assert_close(lp, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="level must be"):
        model.step_generation(state, torch.zeros(6, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="codes must lie"):
        model.step_generation(state, torch.full((6,), K), 0)
    with pytest.raises(ValueError, match="index values"):
        model.select_generation(state, torch.tensor([7]))
    with pytest.raises(ValueError, match="item-aligned"):
        model.start_generation([torch.tensor([1, 4])])


def test_generation_truncates_long_histories():
    model = _model(seed=17, max_items=4)
    L = model.config.levels
    gen = torch.Generator().manual_seed(18)
    long_hist = _seq(model.config, 6, True, gen)
    _, lp = model.start_generation([long_hist])
    kept = torch.cat([long_hist[:1], long_hist[-3 * L:]])  # BOS + the 3 most recent items
    _, exp = model.start_generation([kept], truncate=False)
    torch.testing.assert_close(lp, exp)
    with pytest.raises(ValueError, match="max_items"):
        model.start_generation([long_hist], truncate=False)


def test_save_pretrained_round_trip(tmp_path):
    model = _model(seed=7, item_position_embedding=True)
    gen = torch.Generator().manual_seed(8)
    seqs = [_seq(model.config, 3, True, gen), _seq(model.config, 2, False, gen)]
    ids, cu = _pack(seqs)
    before = model(ids, cu_seqlens=cu, return_loss=True, output_logits=True)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = RecBaseForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.levels == model.config.levels and loaded.config.item_position_embedding
    after = loaded(ids, cu_seqlens=cu, return_loss=True, output_logits=True)
    from transformers import AutoModelForCausalLM

    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(auto, RecBaseForCausalLM)
    torch.testing.assert_close(auto.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    torch.testing.assert_close(after.loss, before.loss, rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors():
    model = _model()
    cfg = model.config
    L, K = cfg.levels, cfg.codebook_size
    good = torch.tensor([1, 4, 4 + K, 4 + 2 * K])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 4 + L * K]]))
    with pytest.raises(ValueError, match="expected a level-1"):
        model(torch.tensor([[1, 4, 4]]))  # second concept token must be level 1
    with pytest.raises(ValueError, match="special token 2"):
        model(torch.tensor([[1, 4, 2]]))
    with pytest.raises(ValueError, match="BOS"):
        model(torch.tensor([[4, 1]]))
    long_seq = torch.cat([torch.tensor([1]), (4 + torch.arange(L) * K).repeat(cfg.max_items + 1)])
    with pytest.raises(ValueError, match="max_items"):
        model(long_seq[None])
    with pytest.raises(ValueError, match="must end at total_tokens"):
        model(good, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="must start at 0"):
        model(good, cu_seqlens=torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="non-decreasing"):
        model(torch.cat([good, good]), cu_seqlens=torch.tensor([0, 5, 4, 8]))
    with pytest.raises(ValueError, match="packed 1-D"):
        model(good[None], cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="contiguous run"):
        model(torch.tensor([[1, 4, 0, 4 + K]]), attention_mask=torch.tensor([[1, 1, 0, 1]]))
    with pytest.raises(ValueError, match="labels shape"):
        model(good[None], labels=good)
    q = torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="must divide"):
        concept_attention(q, torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.tensor([0, 4]), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask must be"):
        concept_attention(q, q, q, torch.tensor([0, 4]), torch.zeros(4, dtype=torch.long), mask="full")
    with pytest.raises(ValueError, match="item_index must be non-decreasing"):
        concept_attention(q, q, q, torch.tensor([0, 4]), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="target must be"):
        level_cross_entropy(torch.randn(2, 4), torch.randn(6, 4), torch.tensor([0, 1]), torch.tensor([0, 3]), 2)
    item_cfg = _model(attention_mask_type="item")
    with pytest.raises(NotImplementedError, match="causal"):
        item_cfg.start_generation([good])


def test_item_mask_model_runs_and_differs():
    causal = _model(seed=9)
    item = _model(seed=9, attention_mask_type="item")
    gen = torch.Generator().manual_seed(10)
    s = _seq(causal.config, 3, True, gen)[None]
    a, b = causal(s).logits, item(s).logits
    # the first token (BOS) sees only itself in both; later level-0 tokens see their whole item
    torch.testing.assert_close(a[0, 0], b[0, 0])
    assert not torch.allclose(a[0, 1], b[0, 1])


def test_concept_attention_compiles():
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    item = torch.tensor([0, 0, 1, 0, 0, 1, 1])
    q = torch.randn(7, 2, 8)
    fn = torch.compile(lambda q: concept_attention(q, q, q, cu, item, backend="reference", check_inputs=False),
                       backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(q), concept_attention_reference(q, q, q, cu, item))


@pytest.mark.parametrize("mask", ["causal", "item"])
def test_triton_path_equals_reference_path(mask):
    pytest.importorskip("triton")
    ref = _model(seed=11, attention_mask_type=mask, item_position_embedding=True).train()
    tri = RecBaseForCausalLM(RecBaseConfig(**{**ref.config.to_dict(), "kernel_backend": "triton"})).train()
    tri.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(12)
    seqs = [_seq(ref.config, 3, True, gen), _seq(ref.config, 1, False, gen), _seq(ref.config, 2, True, gen)]
    ids, cu = _pack(seqs)
    outs = []
    for m in (ref, tri):
        o = m(ids, cu_seqlens=cu, return_loss=True, output_logits=True)
        o.loss.backward()
        outs.append((o, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-4, rtol=1e-3, msg=name)


def test_reference_attention_grouping_matches_single_group(monkeypatch):
    import recbase.ops.attention as ops

    gen = torch.Generator().manual_seed(13)
    lens = [5, 1, 9, 0, 3, 7]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    n = int(cu[-1])
    item = torch.cat([torch.arange(x) // 2 for x in lens])
    q, k, v, g = (torch.randn(n, 2, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    whole = ops._attention_reference_fwd(q, k, v, cu, item, "item", 0.3)
    dwhole = ops._attention_reference_bwd(g, q, k, v, cu, item, "item", 0.3)
    monkeypatch.setattr(ops, "_REFERENCE_SCORE_BUDGET", 60)
    assert len(ops._reference_groups(cu, 2)) > 2
    split = ops._attention_reference_fwd(q, k, v, cu, item, "item", 0.3)
    dsplit = ops._attention_reference_bwd(g, q, k, v, cu, item, "item", 0.3)
    # each group fed its slice of the forward's out/lse (an empty sequence included)
    dsaved = ops._attention_reference_bwd(g, q, k, v, cu, item, "item", 0.3, *whole)
    for a, b in zip(whole + dwhole + dsaved, split + dsplit + dwhole):
        torch.testing.assert_close(a, b)
    # float32 (the training dtype): saved out/lse give the recomputing backward's gradients
    f32 = [x.float() for x in (g, q, k, v)]
    out32 = ops._attention_reference_fwd(*f32[1:], cu, item, "item", 0.3)
    for a, b in zip(ops._attention_reference_bwd(*f32, cu, item, "item", 0.3, *out32),
                    ops._attention_reference_bwd(*f32, cu, item, "item", 0.3)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_training_and_generation():
    model = _model(seed=14).train()
    gen = torch.Generator().manual_seed(15)
    seqs = [_seq(model.config, 3, True, gen), _seq(model.config, 2, False, gen)]
    ids, cu = _pack(seqs)
    exact = model(ids, cu_seqlens=cu, return_loss=True).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, cu_seqlens=cu, return_loss=True)
        out.loss.backward()
        _, lp = model.start_generation(seqs)
    assert abs(float(out.loss.detach()) - float(exact.detach())) < 0.05 * float(exact.detach())
    assert torch.isfinite(model.lm_head.weight.grad).all()
    assert lp.dtype == torch.float32 and torch.allclose(lp.exp().sum(-1), torch.ones(2), atol=1e-3)


def test_liger_style_entry_points_match_reference():
    pytest.importorskip("triton")
    from recbase.kernels import concept_attention_triton, concept_embedding_triton, level_cross_entropy_triton
    from recbase.ops.attention import concept_embedding_reference

    gen = torch.Generator().manual_seed(16)
    cu = torch.tensor([0, 1, 9], dtype=torch.int32)
    item = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])
    q, k, v = (torch.randn(9, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
    out = concept_attention_triton(q, k, v, cu, item, "item")
    ref = concept_attention_reference(q, k, v, cu, item, "item")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    tw, lw = torch.randn(12, 16, generator=gen), torch.randn(3, 16, generator=gen)
    tok, lvl = torch.randint(0, 12, (9,), generator=gen), torch.randint(0, 3, (9,), generator=gen)
    torch.testing.assert_close(concept_embedding_triton(tok, lvl, tw, lw), concept_embedding_reference(tok, lvl, tw, lw))
    h, w = torch.randn(9, 16, generator=gen), torch.randn(2 * 6, 16, generator=gen)
    nl, tg = torch.randint(0, 2, (9,), generator=gen), torch.randint(0, 6, (9,), generator=gen)
    torch.testing.assert_close(level_cross_entropy_triton(h, w, nl, tg, 2),
                               level_cross_entropy_reference(h, w, nl, tg, 2), atol=1e-5, rtol=1e-5)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration of the three recbase ops."""
    import recbase.ops.attention as ops

    gen = torch.Generator().manual_seed(19)
    cu = torch.tensor([0, 2, 7], dtype=torch.int32)
    item = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    q = torch.randn(7, 4, 8, generator=gen, requires_grad=True)
    k = torch.randn(7, 2, 8, generator=gen, requires_grad=True)
    v = torch.randn(7, 2, 8, generator=gen, requires_grad=True)
    torch.library.opcheck(ops._concept_attention_op, (q, k, v, cu, item, "item", 0.3, 1))
    tw = torch.randn(10, 8, generator=gen, requires_grad=True)
    lw = torch.randn(3, 8, generator=gen, requires_grad=True)
    ids, lv = torch.randint(0, 10, (7,), generator=gen), torch.randint(0, 3, (7,), generator=gen)
    torch.library.opcheck(ops._concept_embedding_op, (ids, lv, None, tw, lw, None, 1))
    h = torch.randn(7, 8, generator=gen, requires_grad=True)
    w = torch.randn(2 * 5, 8, generator=gen, requires_grad=True)
    nl, tg = torch.randint(0, 2, (7,), generator=gen), torch.randint(0, 5, (7,), generator=gen)
    torch.library.opcheck(ops._level_ce_op, (h, w, nl, tg, 2, 1))


@pytest.mark.parametrize("mask", ["causal", "item"])
def test_reference_einsum_fallback_equals_fused_cpu_path(mask, monkeypatch):
    """The einsum reference (used off-CPU when Triton is missing) == the ATen fused CPU path,
    with and without the forward's saved out/lse."""
    import recbase.ops.attention as ops

    gen = torch.Generator().manual_seed(20)
    lens = [3, 1, 11, 6]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    n = int(cu[-1])
    item = torch.cat([torch.arange(x) // 3 for x in lens])
    q, g = (torch.randn(n, 4, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(n, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    fused = ops._attention_reference_fwd(q, k, v, cu, item, mask, 0.4)
    dfused = ops._attention_reference_bwd(g, q, k, v, cu, item, mask, 0.4)
    # the backward fed the forward's out/lse (no recomputation; padded rows get lse = +inf)
    dsaved = ops._attention_reference_bwd(g, q, k, v, cu, item, mask, 0.4, *fused)
    monkeypatch.setattr(ops, "_flash_cpu_ok", lambda t: False)
    plain = ops._attention_reference_fwd(q, k, v, cu, item, mask, 0.4)
    dplain = ops._attention_reference_bwd(g, q, k, v, cu, item, mask, 0.4)
    for a, b in zip(fused + dfused + dsaved, plain + dplain + dplain):
        torch.testing.assert_close(a, b)


def test_concept_vectors_reach_embeddings_head_generation_and_checkpoints(tmp_path):
    """concept_vector_dim: token embedding = free row + W_in v, head row = lm_head row + W_out v,
    checked in float64 by brute force; gradients reach both projections; KV-cache generation
    agrees with full recompute; save/load keeps the vectors."""
    torch.manual_seed(11)
    d = 6
    model = _model(seed=11, concept_vector_dim=d)
    cfg = model.config
    L, K = cfg.levels, cfg.codebook_size
    vec = torch.randn(L - 1, K, d, generator=torch.Generator().manual_seed(12))
    model.set_concept_vectors(vec)  # the last level (e.g. disambiguation) gets no content
    gen = torch.Generator().manual_seed(13)
    seqs = [_seq(cfg, 3, True, gen), _seq(cfg, 2, False, gen)]
    ids, cu = _pack(seqs)
    out = model(ids, cu_seqlens=cu, output_logits=True, output_hidden_states=True)

    full_vec = torch.cat([vec.reshape(-1, d), torch.zeros(K, d)]).double()
    head = model.lm_head.weight.double()[4:] + full_vec @ model.concept_out.weight.double().T
    emb = model.model.embed_tokens.weight.double()[4:] + full_vec @ model.model.concept_in.weight.double().T
    torch.testing.assert_close(model._concept_head().double(), head, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.model.token_embedding_weight()[4:].double(), emb, rtol=1e-5, atol=1e-6)
    h = out.hidden_states.double()
    nl = out.next_levels
    expect = torch.stack([h[t] @ head.view(L, K, -1)[int(nl[t])].T for t in range(len(ids))])
    torch.testing.assert_close(out.logits.double(), expect, rtol=1e-4, atol=1e-5)
    # the content matters: other vectors give other logits
    model.set_concept_vectors(vec.flip(1))
    assert not torch.allclose(model(ids, cu_seqlens=cu, output_logits=True).logits, out.logits)
    model.set_concept_vectors(vec)

    model.train()
    model(ids, cu_seqlens=cu, return_loss=True).loss.backward()
    assert model.model.concept_in.weight.grad.abs().sum() > 0
    assert model.concept_out.weight.grad.abs().sum() > 0
    model.eval()

    state, lp = model.start_generation([seqs[0]])
    step_ids = torch.cat([seqs[0], torch.tensor([4 + 3])])
    state, lp1 = model.step_generation(state, torch.tensor([3]), 0)
    ref = model(step_ids[None], output_logits=True).logits[0, -1]
    torch.testing.assert_close(lp1[0], torch.log_softmax(ref.float(), -1), rtol=1e-4, atol=1e-4)

    model.save_pretrained(tmp_path)
    loaded = RecBaseForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded.model.concept_vectors, model.model.concept_vectors, rtol=0, atol=0)
    torch.testing.assert_close(loaded(ids, cu_seqlens=cu, output_logits=True).logits, out.logits, rtol=0, atol=0)

    with pytest.raises(ValueError, match="expected shape"):
        model.set_concept_vectors(torch.randn(L, K + 1, d))
    with pytest.raises(ValueError, match="NaN"):
        model.set_concept_vectors(torch.full((1, K, d), float("nan")))
    with pytest.raises(ValueError, match="concept_vector_dim > 0"):
        _model().set_concept_vectors(vec)
    with pytest.raises(ValueError, match="concept_vector_dim must be"):
        RecBaseConfig.from_preset("tiny", concept_vector_dim=-1)


def test_from_pretrained_is_strict_about_missing_unexpected_and_misshapen_tensors(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    model = _model(seed=3, concept_vector_dim=4)
    model.save_pretrained(tmp_path / "ok")
    weights = load_file(tmp_path / "ok" / "model.safetensors")
    for name, edit in (("missing", lambda w: w.pop("lm_head.weight")),
                       ("unexpected", lambda w: w.__setitem__("extra.weight", torch.zeros(2)))):
        model.save_pretrained(tmp_path / name)
        w = dict(weights)
        edit(w)
        save_file(w, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=f"{name} tensors"):
            RecBaseForCausalLM.from_pretrained(tmp_path / name)
        RecBaseForCausalLM.from_pretrained(tmp_path / name, strict=False)  # HF's lenient behaviour
    model.save_pretrained(tmp_path / "config")
    cfg = json.loads((tmp_path / "config" / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (tmp_path / "config" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape differs from the config.*mlp"):
        RecBaseForCausalLM.from_pretrained(tmp_path / "config")
    loaded, info = RecBaseForCausalLM.from_pretrained(tmp_path / "ok", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)

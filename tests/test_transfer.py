"""Zero-shot transfer machinery: concept content vectors, ``content_only`` reading, random
content rotations in training, and ``Recommender(unseen_domains=...)``."""
import numpy as np
import pytest
import torch

from recbase.model import RecBaseConfig, RecBaseForCausalLM
from recbase.recommend import Recommender, history_tokens, score_candidates
from recbase.tokenizer import ConceptVocab
from recbase.train import Trainer, TrainConfig, random_rotation
from test_train import L, K, synthetic_sequences

torch.set_num_threads(1)
D = 6


def content_model(seed=0, levels=L, k=K, **over):
    torch.manual_seed(seed)
    cfg = RecBaseConfig.from_preset("tiny", levels=levels, codebook_size=k, max_items=16,
                                    concept_vector_dim=D, initializer_range=0.2, **over)
    model = RecBaseForCausalLM(cfg)
    model.set_concept_vectors(torch.randn(levels - 1, k, D, generator=torch.Generator().manual_seed(seed + 1)))
    return model.eval()


def _batch(seed=3):
    seqs = [torch.as_tensor(s) for s in synthetic_sequences(4, seed=seed)]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor([len(s) for s in seqs]).cumsum(0)
    return torch.cat(seqs), cu


@torch.no_grad()
def test_content_only_drops_free_rows_and_a_rotation_equals_rotated_vectors():
    model = content_model(seed=1)
    ids, cu = _batch()
    plain = model(ids, cu_seqlens=cu, output_logits=True).logits
    with model.content_only():
        alone = model(ids, cu_seqlens=cu, output_logits=True).logits
        # by brute force: concept rows are the projected content, nothing else
        v = model.model.concept_vectors.double()
        torch.testing.assert_close(model._concept_head().double(), v @ model.concept_out.weight.double().T,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.model.token_embedding_weight()[4:].double(),
                                   v @ model.model.concept_in.weight.double().T, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, alone, atol=1e-3)  # the free rows did matter outside
    assert model.model.content_mode is None  # the block restores the mode
    # free concept rows are invisible in content-only mode
    model.model.embed_tokens.weight[4:] += torch.randn_like(model.model.embed_tokens.weight[4:])
    model.lm_head.weight[4:] += torch.randn_like(model.lm_head.weight[4:])
    with model.content_only():
        torch.testing.assert_close(model(ids, cu_seqlens=cu, output_logits=True).logits, alone)
    # turning the content space by R == reading vectors that were turned by R beforehand
    R = random_rotation(D, np.random.default_rng(5))
    with model.content_only(R):
        turned = model(ids, cu_seqlens=cu, output_logits=True).logits
    original = model.model.concept_vectors.clone()
    model.set_concept_vectors((original @ R).view(L, K, D)[:L - 1])
    with model.content_only():
        torch.testing.assert_close(model(ids, cu_seqlens=cu, output_logits=True).logits, turned,
                                   rtol=1e-4, atol=1e-5)
    # a projection that is not a bare Linear (e.g. wrapped by an adapter) is turned by its input
    model.concept_out = torch.nn.Sequential(model.concept_out)
    model.model.concept_in = torch.nn.Sequential(model.model.concept_in)
    model.set_concept_vectors(original.view(L, K, D)[:L - 1])
    with model.content_only(R):
        torch.testing.assert_close(model(ids, cu_seqlens=cu, output_logits=True).logits, turned,
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="rotation: expected"):
        with model.content_only(torch.eye(D + 1)):
            pass
    with pytest.raises(ValueError, match="concept_vector_dim > 0"):
        with RecBaseForCausalLM(RecBaseConfig.from_preset("tiny", levels=L, codebook_size=K)).content_only():
            pass


def test_step_rotations_are_seeded_orthogonal_and_at_the_rate():
    seqs = synthetic_sequences(20, seed=0)
    cfg = TrainConfig(epochs=1, seed=4, progress=False, content_rotation_rate=0.3)
    trainer = Trainer(content_model(), seqs, [], cfg)
    rots = [trainer.step_rotation(s) for s in range(600)]
    share = np.mean([r is not None for r in rots])
    assert 0.24 < share < 0.36, share
    r = next(x for x in rots if x is not None)
    torch.testing.assert_close(r.double() @ r.double().T, torch.eye(D, dtype=torch.float64), atol=1e-6, rtol=0)
    again = Trainer(content_model(), seqs, [], cfg)
    for s in range(50):
        a, b = rots[s], again.step_rotation(s)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    distinct = [x for x in rots if x is not None][:2]
    assert not torch.allclose(distinct[0], distinct[1])
    with pytest.raises(ValueError, match="content_rotation_rate must be in"):
        Trainer(content_model(), seqs, [], TrainConfig(content_rotation_rate=1.5))
    plain = RecBaseForCausalLM(RecBaseConfig.from_preset("tiny", levels=L, codebook_size=K, max_items=16))
    with pytest.raises(ValueError, match="needs a model with concept vectors"):
        Trainer(plain, seqs, [], TrainConfig(content_rotation_rate=0.5))


def test_shuffled_windows_permute_whole_items_seeded_at_the_rate():
    seqs = synthetic_sequences(40, seed=5)
    cfg = TrainConfig(epochs=1, seed=2, progress=False, shuffle_rate=0.4)
    trainer = Trainer(content_model(), seqs, [], cfg)
    shuffled, total = 0, 0
    for step in range(30):
        for i, seq in enumerate(seqs):
            got = trainer.shuffled_example(i, step).numpy()
            seq = np.asarray(seq)
            assert got[0] == seq[0] and len(got) == len(seq)
            items, orig = got[1:].reshape(-1, L), seq[1:].reshape(-1, L)
            # the same items (as whole L-token blocks, BOS first), in some order
            assert sorted(map(tuple, items)) == sorted(map(tuple, orig))
            total += 1
            shuffled += not np.array_equal(got, seq)
            again = Trainer(content_model(), seqs, [], cfg).shuffled_example(i, step) if step < 2 else None
            assert again is None or np.array_equal(again.numpy(), got)
    # a drawn permutation can be the identity (a 4-item window: 1 in 24), so a little under 0.4
    assert 0.3 < shuffled / total < 0.42, shuffled / total
    off = Trainer(content_model(), seqs, [], TrainConfig(progress=False))
    assert all(off.shuffled_example(i, 0) is off.train_seqs[i] for i in range(len(seqs)))
    with pytest.raises(ValueError, match="shuffle_rate must be in"):
        Trainer(content_model(), seqs, [], TrainConfig(shuffle_rate=-0.1))


def test_a_shuffled_training_step_is_a_plain_step_on_the_shuffled_sequences():
    seqs = synthetic_sequences(12, seed=6)
    batch = np.arange(len(seqs))
    common = dict(epochs=1, tokens_per_batch=10_000, lr=1e-2, warmup_steps=1, seed=3, progress=False)
    shuffling = Trainer(content_model(seed=1), seqs, [], TrainConfig(shuffle_rate=1.0, **common))
    order = [shuffling.shuffled_example(i, 0).numpy() for i in batch]
    loss_a = shuffling.train_step(batch)
    plain = Trainer(content_model(seed=1), order, [], TrainConfig(**common))
    loss_b = plain.train_step(batch)
    assert abs(loss_a - loss_b) < 1e-6
    for (name, a), b in zip(shuffling.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_a_rotated_training_step_is_a_plain_step_read_under_that_rotation():
    seqs = synthetic_sequences(16, seed=2)
    batch = np.arange(len(seqs))
    common = dict(epochs=1, tokens_per_batch=10_000, lr=1e-2, warmup_steps=1, seed=7, progress=False)
    rotated = Trainer(content_model(seed=3), seqs, [], TrainConfig(content_rotation_rate=1.0, **common))
    R = rotated.step_rotation(0)
    assert R is not None
    loss_a = rotated.train_step(batch)
    model_b = content_model(seed=3)
    plain = Trainer(model_b, seqs, [], TrainConfig(**common))
    with model_b.content_only(R):
        loss_b = plain.train_step(batch)
    assert abs(loss_a - loss_b) < 1e-6
    for (name, a), b in zip(rotated.model.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert rotated.model.model.content_mode is None


def test_recommender_reads_unseen_domains_from_content_alone():
    model = content_model(seed=4)
    vocab = ConceptVocab(L, K)
    rng = np.random.default_rng(4)
    seen = np.unique(rng.integers(0, K, size=(30, L)), axis=0)
    new = np.unique(rng.integers(0, K, size=(25, L)), axis=0)
    rec = Recommender(model, vocab, {"seen": seen, "new": new}, unseen_domains=["new"])
    hist = [rng.integers(0, len(new), size=n).tolist() for n in (3, 1, 5)]
    cands = [rng.integers(0, len(new), size=6) for _ in hist]
    got = rec.score(hist, cands, domain="new")
    toks = history_tokens(hist, new, vocab, rec.max_items)
    with model.content_only():
        want = score_candidates(model, toks, cands, new)
    plain = score_candidates(model, toks, cands, new)
    for g, w, p in zip(got, want, plain):
        np.testing.assert_allclose(g, w, rtol=1e-6)
        assert not np.allclose(g, p)
    # ranking in the unseen domain goes through the same mode (compare with an exhaustive ranking)
    items, scores = rec.recommend(hist[:1], k=5, domain="new", num_beams=len(new), exclude_history=False)
    every = rec.score(hist[:1], [np.arange(len(new))], domain="new")[0]
    np.testing.assert_array_equal(items[0], np.argsort(-every, kind="stable")[:5])
    np.testing.assert_allclose(scores[0], np.sort(every)[::-1][:5], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not among the catalogs"):
        Recommender(model, vocab, {"seen": seen}, unseen_domains=["books"])
    plain_model = RecBaseForCausalLM(RecBaseConfig.from_preset("tiny", levels=L, codebook_size=K))
    with pytest.raises(ValueError, match="needs a model with concept vectors"):
        Recommender(plain_model, vocab, {"new": new}, unseen_domains=["new"])

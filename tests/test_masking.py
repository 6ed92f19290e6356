"""Entity-aware masking (recbase.masking) and the masked-entity objective in Trainer."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recbase.masking import mask_entities
from recbase.train import Trainer, TrainConfig, collate
from test_train import L, K, _run, synthetic_sequences, tiny_model

torch.set_num_threads(1)
BOS, MASK, IGNORE = 1, 3, -100


def random_sequence(rng, levels, n_items, bos):
    codes = rng.integers(0, K, size=(n_items, levels))
    body = (4 + np.arange(levels) * K + codes).reshape(-1)
    return np.concatenate([[BOS], body]) if bos else body


def reference_masking(tokens, levels, masked_items, has_bos):
    """Brute force: the (input_ids, labels) that masking exactly the items ``masked_items`` gives."""
    inputs, labels = [], []
    for pos, tok in enumerate(tokens.tolist()):
        item = None if (has_bos and pos == 0) else (pos - has_bos) // levels
        if item in masked_items:
            inputs.append(MASK)
            labels.append(tok)
        else:
            inputs.append(tok)
            labels.append(IGNORE)
    return inputs, labels


def test_masks_exactly_whole_items_never_bos_labels_only_there():
    rng = np.random.default_rng(0)
    for trial in range(300):
        levels = int(rng.integers(1, 4))
        n_items = int(rng.integers(0, 15))
        bos = bool(rng.integers(2)) or n_items == 0
        rate = float(rng.uniform(0.01, 1.0))
        tokens = random_sequence(rng, levels, n_items, bos)
        inputs, labels = mask_entities(tokens, levels, rate, np.random.default_rng(trial))
        assert inputs.dtype == labels.dtype == torch.int64
        # the masked items, read off the output; the brute-force reference must then match exactly
        starts = int(bos) + levels * np.arange(n_items)
        masked = {i for i in range(n_items) if int(inputs[starts[i]]) == MASK}
        ref_inputs, ref_labels = reference_masking(tokens, levels, masked, bos)
        assert inputs.tolist() == ref_inputs
        assert labels.tolist() == ref_labels
        if bos:
            assert int(inputs[0]) == BOS and int(labels[0]) == IGNORE
        exact = rate * n_items  # rounded to one side or the other, at least one item
        if n_items:
            assert max(1, int(np.floor(exact))) <= len(masked) <= max(1, int(np.ceil(exact)))
        else:
            assert not masked


def test_rate_is_honoured_in_expectation_and_items_are_picked_uniformly():
    rng = np.random.default_rng(1)
    n_items, rate, trials = 10, 0.35, 4000
    tokens = random_sequence(rng, L, n_items, bos=True)
    hits = np.zeros(n_items)
    for seed in range(trials):
        inputs, _ = mask_entities(tokens, L, rate, seed)
        hits += (inputs[1::L] == MASK).numpy()
    # the fraction of masked items: its sd per draw is <= 0.05 here (count 3 or 4 of 10)
    assert abs(hits.sum() / (trials * n_items) - rate) < 0.005
    # each item equally likely: sd of one item's frequency is sqrt(.35 * .65 / 4000) ~ 0.0075
    assert np.abs(hits / trials - rate).max() < 0.04
    # a rate too low for one item still masks one
    few = [int((mask_entities(tokens, L, 0.01, s)[0] == MASK).sum()) for s in range(50)]
    assert few == [L] * 50


def test_equal_seeds_give_equal_masks_and_seeds_matter():
    rng = np.random.default_rng(2)
    tokens = torch.as_tensor(random_sequence(rng, L, 12, bos=True))
    original = tokens.clone()
    outs = [mask_entities(tokens, L, 0.3, s) for s in range(20)]
    again = [mask_entities(tokens, L, 0.3, np.random.default_rng(s)) for s in range(20)]
    for (a, b), (c, d) in zip(outs, again):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert len({tuple(a.tolist()) for a, _ in outs}) > 5
    assert torch.equal(tokens, original)  # the input is not modified


def test_bad_arguments_are_clear_errors():
    tokens = random_sequence(np.random.default_rng(3), L, 4, bos=True)
    with pytest.raises(ValueError, match="not a multiple of levels=3"):
        mask_entities(tokens[:-1], L, 0.5, 0)
    with pytest.raises(ValueError, match=r"rate must be in \(0, 1\], got 0"):
        mask_entities(tokens, L, 0.0, 0)
    with pytest.raises(ValueError, match=r"rate must be in \(0, 1\], got 1.5"):
        mask_entities(tokens, L, 1.5, 0)
    with pytest.raises(ValueError, match="levels must be an integer >= 1"):
        mask_entities(tokens, 0, 0.5, 0)
    with pytest.raises(ValueError, match="1-D integer sequence"):
        mask_entities(tokens.reshape(1, -1), L, 0.5, 0)
    with pytest.raises(ValueError, match=r"mask_rate must be in \[0, 1\]"):
        Trainer(tiny_model(), [tokens], [], TrainConfig(mask_rate=2.0, progress=False))


def test_model_scores_a_masked_item_at_the_token_before_it_and_its_masks():
    gen = np.random.default_rng(4)
    model = tiny_model(seed=5).eval()
    seqs = [random_sequence(gen, L, int(n), bos=b) for n, b in ((5, True), (3, False), (7, True))]
    examples = [mask_entities(s, L, 0.4, 10 + i) for i, s in enumerate(seqs)]
    ids, cu, labels = collate([x for x, _ in examples], labels=[y for _, y in examples])
    with torch.no_grad():
        out = model(input_ids=ids, cu_seqlens=cu, labels=labels, output_logits=True)
    # reference: position p-1 of the same sequence scores the code of masked token p at its level
    losses = []
    for b in range(len(seqs)):
        lo, hi = int(cu[b]), int(cu[b + 1])
        has_bos = int(ids[lo]) == BOS
        for p in range(lo + 1, hi):
            if int(labels[p]) == IGNORE:
                continue
            level = (p - lo - has_bos) % L
            code = int(labels[p]) - 4 - level * K
            assert int(out.next_levels[p - 1]) == level
            losses.append(F.cross_entropy(out.logits[p - 1][None], torch.tensor([code])))
    assert len(losses) > 0
    torch.testing.assert_close(out.loss, torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)


def masked_item_loss(model, seqs, rate=0.3):
    """Mean loss over the tokens of masked items (fixed seeds, so comparable across models)."""
    examples = [mask_entities(s, L, rate, 1000 + i) for i, s in enumerate(seqs)]
    ids, cu, labels = collate([x for x, _ in examples], labels=[y for _, y in examples])
    with torch.no_grad():
        return float(model.eval()(input_ids=ids, cu_seqlens=cu, labels=labels).loss)


def test_training_step_loss_is_the_mean_over_plain_and_masked_targets():
    seqs = synthetic_sequences(12, seed=6)
    model = tiny_model(seed=6)
    cfg = TrainConfig(epochs=1, tokens_per_batch=10_000, lr=1e-2, warmup_steps=1, seed=3, progress=False,
                      mask_rate=0.5)
    trainer = Trainer(model, seqs, [], cfg)
    batch = np.arange(len(seqs))
    masked = [trainer.masked_example(i, 0) for i in batch]
    # independent reference: one model call per sequence, loss sums added, divided by the targets
    total, count = 0.0, 0
    with torch.no_grad():
        for s, (x, y) in zip(seqs, masked):
            for inputs, labels in ((torch.as_tensor(s), torch.as_tensor(s)), (x, y)):
                n = int((labels[1:] != IGNORE).sum())
                out = model.train()(inputs[None], labels=labels[None])
                total += float(out.loss) * n
                count += n
    got = trainer.train_step(batch)
    assert abs(got - total / count) < 1e-5
    assert count > sum(len(s) - 1 for s in seqs)  # the masked targets were counted


def test_masked_entity_training_lowers_the_masked_item_loss():
    domain = synthetic_sequences(150, seed=1)
    train, held_out = domain[:120], domain[120:]
    start = masked_item_loss(tiny_model(), held_out)
    trained = {}
    for rate in (0.0, 0.3):
        model = tiny_model()  # the same initial weights for both runs
        cfg = TrainConfig(epochs=12, tokens_per_batch=1024, lr=1e-2, warmup_steps=3, seed=0, progress=False,
                          patience=10, mask_rate=rate)
        Trainer(model, train, [], cfg).fit()
        trained[rate] = masked_item_loss(model, held_out)
    assert trained[0.3] < 0.75 * start, (start, trained)
    # next-token training alone never sees MASK: the masked objective is what teaches this task
    assert trained[0.3] < trained[0.0], trained


def test_killed_and_resumed_masked_run_equals_uninterrupted(tmp_path):
    ref, _ = _run(tmp_path / "a", mask_rate=0.4)
    _run(tmp_path / "b", kill_at=5, mask_rate=0.4)
    got, _ = _run(tmp_path / "b", mask_rate=0.4)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)

"""Pretraining: packing, learning, exact resume after a kill, 2-process DDP == 1 process."""
import json
import os
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from recbase.model import RecBaseConfig, RecBaseForCausalLM
from recbase.train import Trainer, TrainConfig, collate, pack_batches

L, K = 3, 8


def synthetic_sequences(n_users, n_items=40, seed=0, length=(4, 12)):
    """Users walk a fixed random item chain: item i is followed by nxt[i] (learnable)."""
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.permutation(n_items) % K for _ in range(L)], 1)
    codes[:, -1] = np.arange(n_items) % K  # make rows distinct enough for a toy catalog
    tokens = 4 + np.arange(L) * K + codes
    nxt = rng.permutation(n_items)
    seqs = []
    for _ in range(n_users):
        n = rng.integers(*length)
        items = [rng.integers(n_items)]
        for _ in range(n - 1):
            items.append(nxt[items[-1]])
        seqs.append(np.concatenate([[1], tokens[items].reshape(-1)]))
    return seqs


def tiny_model(seed=0, content_dim=0):
    """A tiny model; with ``content_dim`` it also holds seeded concept content vectors."""
    torch.manual_seed(seed)
    cfg = RecBaseConfig.from_preset("tiny", levels=L, codebook_size=K, max_items=16,
                                    concept_vector_dim=content_dim)
    model = RecBaseForCausalLM(cfg)
    if content_dim:
        model.set_concept_vectors(torch.randn(L - 1, K, content_dim,
                                              generator=torch.Generator().manual_seed(seed + 1)))
    return model


def test_pack_batches_is_a_seeded_partition():
    lengths = np.random.default_rng(0).integers(1, 50, size=300)
    batches = pack_batches(lengths, 200, seed=1, epoch=2)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(300))
    assert all(lengths[b].sum() <= 200 for b in batches)
    again = pack_batches(lengths, 200, seed=1, epoch=2)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = pack_batches(lengths, 200, seed=1, epoch=3)
    assert not np.array_equal(np.concatenate(other), flat)
    with pytest.raises(ValueError, match="tokens_per_batch"):
        pack_batches(lengths, 10, 0, 0)


def test_collate_masks_all_but_target_item():
    seqs = [torch.arange(1, 8), torch.arange(1, 5)]
    ids, cu, labels = collate(seqs, target_items_only=3)
    assert cu.tolist() == [0, 7, 11]
    kept = (labels != -100).nonzero().flatten().tolist()
    assert kept == [4, 5, 6, 8, 9, 10]


def test_pretraining_learns_the_chain(tmp_path):
    train = synthetic_sequences(120, seed=1)
    valid = synthetic_sequences(30, seed=1)
    model = tiny_model()
    cfg = TrainConfig(epochs=8, tokens_per_batch=1024, lr=1e-2, warmup_steps=3, seed=0,
                      progress=False, patience=10)
    trainer = Trainer(model, train, valid, cfg)
    before = trainer.validate()
    state = trainer.fit()
    after = trainer.validate()
    assert after < 0.6 * before  # the chain is deterministic given the last item: loss falls far
    assert state["history"][-1]["train_loss"] < state["history"][0]["train_loss"]


def test_validation_loss_per_group_is_logged_and_partitions_the_total(tmp_path):
    train, valid = synthetic_sequences(40, seed=2), synthetic_sequences(20, seed=3)
    groups = {"a": np.arange(0, 12), "b": np.arange(12, 20)}
    cfg = TrainConfig(epochs=2, tokens_per_batch=1024, lr=1e-2, warmup_steps=1, seed=0, progress=False)
    trainer = Trainer(tiny_model(), train, valid, cfg, output_dir=tmp_path, valid_groups=groups)
    state = trainer.fit()
    logged = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and all(set(r["valid_loss_by_group"]) == {"a", "b"} for r in logged)
    last = min(state["history"], key=lambda r: r["valid_loss"])  # the epoch fit() restores
    # every validation sequence scores its last item's L tokens: the total is the size-weighted mean
    by = last["valid_loss_by_group"]
    assert last["valid_loss"] == pytest.approx((12 * by["a"] + 8 * by["b"]) / 20, rel=1e-5)
    # and each group's loss is what a trainer holding only that group's sequences reports
    alone = Trainer(trainer.model, train, [valid[i] for i in groups["b"]], cfg)
    assert alone.validate() == pytest.approx(by["b"], rel=1e-5)
    with pytest.raises(ValueError, match=r"valid_groups\['x'\]: indices must lie in \[0, 20\)"):
        Trainer(tiny_model(), train, valid, cfg, valid_groups={"x": [3, 20]})


def _run(tmp, kill_at=None, mask_rate=0.0):
    """Train (or train until killed at step ``kill_at``); returns (state dict, trainer state)."""
    model = tiny_model()
    cfg = TrainConfig(epochs=2, tokens_per_batch=256, lr=3e-3, warmup_steps=3, seed=0,
                      progress=False, checkpoint_every=2, patience=5, mask_rate=mask_rate)
    trainer = Trainer(model, synthetic_sequences(60, seed=2), synthetic_sequences(10, seed=3), cfg,
                      output_dir=tmp)
    if kill_at is not None:
        real = trainer.train_step

        def step(batch):
            if trainer.state["global_step"] == kill_at:
                raise KeyboardInterrupt("killed")
            return real(batch)
        trainer.train_step = step
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
        return None
    trainer.fit()
    return {k: v.clone() for k, v in model.state_dict().items()}, trainer.state


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    ref, ref_state = _run(tmp_path / "a")
    _run(tmp_path / "b", kill_at=5)
    got, state = _run(tmp_path / "b")
    assert state["global_step"] == ref_state["global_step"]
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    _run(tmp_path / "c", kill_at=3)
    (tmp_path / "c" / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        _run(tmp_path / "c")


def test_a_sharded_runs_checkpoint_is_not_resumed_by_a_plain_run(tmp_path):
    # its optimizer state is keyed by parameter name: loading it into a plain AdamW must not be tried
    _run(tmp_path / "s", kill_at=3)
    path = tmp_path / "s" / "checkpoint.pt"
    ck = torch.load(path, weights_only=False)
    assert ck["fsdp"] is False
    torch.save({**ck, "fsdp": True}, path)
    with pytest.raises(ValueError, match="fsdp=True"):
        _run(tmp_path / "s")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full(t):
    """A DTensor shard (FSDP) gathered whole -- a collective -- or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _ddp_worker(rank, world, init_method, out_dir, batch, rotation_rate=0.0, fsdp=False):
    import datetime
    import faulthandler

    import torch.distributed as dist
    # a stuck worker prints where it is stuck and exits, so a hang is diagnosable in CI logs
    faulthandler.dump_traceback_later(90, exit=True)
    torch.set_num_threads(1)
    # a bounded timeout: a worker that cannot reach its peer fails instead of waiting 30 min
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    model = tiny_model(content_dim=6 if rotation_rate else 0)
    cfg = TrainConfig(epochs=1, tokens_per_batch=10_000, lr=1e-2, warmup_steps=1, seed=0, progress=False,
                      content_rotation_rate=rotation_rate, fsdp=fsdp)
    seqs = synthetic_sequences(16, seed=4)
    trainer = Trainer(model, seqs, [], cfg, output_dir=os.path.join(out_dir, "run") if fsdp else None)
    assert trainer.fsdp == fsdp and (trainer.ddp is None) == fsdp
    trainer.train_step(np.asarray(batch))
    grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in trainer.full_state_dict().items()}  # DDP: live tensors
    resumed = None
    if fsdp:
        # a sharded checkpoint resumes exactly: a fresh (differently initialised) sharded model
        # loads it, then one more step on both gives the same weights (Adam's moments restored)
        trainer.save_checkpoint()
        other = Trainer(tiny_model(seed=5, content_dim=6 if rotation_rate else 0), seqs, [], cfg,
                        output_dir=os.path.join(out_dir, "run"))
        assert other.load_checkpoint()
        loaded = other.full_state_dict()
        for t in (trainer, other):
            t.train_step(np.asarray(batch[::-1]))
        resumed = (loaded, trainer.full_state_dict(), other.full_state_dict())
    # a batch of one sequence: rank 1 has none and must still take part (no hang, no NaN)
    assert np.isfinite(trainer.train_step(np.asarray([3])))
    if rank == 0:
        torch.save((state, grads, resumed), os.path.join(out_dir, "ddp.pt"))
    dist.barrier()  # rank 0's results are on disk
    dist.destroy_process_group()
    # leave without running destructors: the DDP/gloo objects' teardown at interpreter exit was
    # seen to block (faulthandler showed the worker stuck after the function returned) on a loaded
    # 2-core machine; everything this worker owed is written above
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


# rotation_rate=1: a content-only step, whose free concept rows get zero gradients (DDP must
# still see every parameter used). fsdp: parameters, gradients and Adam's state sharded over the
# two ranks instead of replicated -- the same step.
@pytest.mark.parametrize("rotation_rate,fsdp", [(0.0, False), (1.0, False), (0.0, True), (1.0, True)])
def test_two_process_ddp_step_equals_one_process_step(tmp_path, monkeypatch, rotation_rate, fsdp):
    # Both workers talk over loopback only: gloo otherwise picks its address from the hostname,
    # which in sandboxed CI may resolve to an interface that does not answer.
    import socket
    if "lo" in {name for _, name in socket.if_nameindex()}:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    batch = list(range(16))
    # 1 process, the whole batch
    model = tiny_model(content_dim=6 if rotation_rate else 0)
    cfg = TrainConfig(epochs=1, tokens_per_batch=10_000, lr=1e-2, warmup_steps=1, seed=0, progress=False,
                      content_rotation_rate=rotation_rate, fsdp=fsdp)  # fsdp is a no-op in 1 process
    single = Trainer(model, synthetic_sequences(16, seed=4), [], cfg)
    assert not single.fsdp
    single.train_step(np.asarray(batch))
    # 2 processes on gloo, each half of the batch (sequences of different lengths). A run that
    # stalls (a transport problem of the host, seen once on a loaded machine) is retried once
    # from scratch; a failed or wrong run is not.
    for attempt in range(2):
        init = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.start_processes(_ddp_worker, args=(2, init, str(tmp_path), batch, rotation_rate, fsdp),
                                 nprocs=2, join=False, start_method="spawn")
        deadline = time.monotonic() + 120
        try:
            while not ctx.join(timeout=2):  # raises if a worker failed
                if time.monotonic() > deadline:
                    raise TimeoutError
            break
        except (TimeoutError, mp.ProcessExitedException) as e:  # a stall (faulthandler exit)
            for p in ctx.processes:
                p.kill()
            if attempt == 1:
                pytest.fail(f"2-process gloo step stalled twice ({type(e).__name__}: {e})")
    ddp, ddp_grads, resumed = torch.load(tmp_path / "ddp.pt")
    # the averaged gradient is the gradient of the whole batch (up to float32 summation order)
    for n, p in model.named_parameters():
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(ddp_grads[n], p.grad, rtol=1e-4, atol=1e-5 * scale)
    # Adam's first step is ~lr*sign(g): entries with |g| near eps may differ slightly; a wrong
    # gradient would move parameters by ~lr = 1e-2
    assert ddp.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-4)
    if fsdp:
        loaded, continued, resumed_then_continued = resumed
        for k in ddp:
            torch.testing.assert_close(loaded[k], ddp[k], rtol=0, atol=0)
            torch.testing.assert_close(resumed_then_continued[k], continued[k], rtol=0, atol=0)
        assert any(not torch.equal(continued[k], ddp[k]) for k in ddp)  # the second step moved them


def test_item_windows_cover_every_transition_once():
    from recbase.train import item_windows
    rng = np.random.default_rng(5)
    for n in (1, 2, 5, 20, 21, 57):
        seq = rng.permutation(100)[:n]
        wins = item_windows(seq, 8)
        assert all(2 <= len(w) <= 8 for w in wins)
        pairs = [(int(w[i]), int(w[i + 1])) for w in wins for i in range(len(w) - 1)]
        assert sorted(pairs) == sorted((int(a), int(b)) for a, b in zip(seq[:-1], seq[1:]))


def test_recent_pass_trains_each_users_latest_window_unrotated():
    """``recent_pass`` == a plain Trainer (no rotation) on windows cut here by hand: the last
    ``max_items`` training items of every user; and it learns (the validation loss falls)."""
    from types import SimpleNamespace

    from recbase.train import recent_pass

    rng = np.random.default_rng(11)
    n_items, max_items = 40, 5
    item_tokens = 4 + np.arange(L) * K + rng.integers(0, K, size=(n_items, L))
    nxt = rng.permutation(n_items)
    walks = []
    for _ in range(60):
        walk = [int(rng.integers(n_items))]
        for _ in range(int(rng.integers(2, 14)) - 1):
            walk.append(int(nxt[walk[-1]]))
        walks.append(np.array(walk))
    users, held_out = walks[:50], walks[50:]
    assert any(len(u) > max_items for u in users) and any(len(u) <= max_items for u in users)
    split = SimpleNamespace(train_sequences=users)
    valid = [np.r_[1, item_tokens[w[-max_items:]].reshape(-1)] for w in held_out]
    kw = dict(epochs=2, lr=1e-2, tokens_per_batch=128, seed=4, progress=False)

    model = tiny_model(content_dim=6)
    state = recent_pass(model, split, item_tokens, 1, max_items, valid, **kw)

    by_hand = [np.r_[1, item_tokens[u[-max_items:]].reshape(-1)] for u in users]
    ref = tiny_model(content_dim=6)
    cfg = TrainConfig(epochs=2, lr=1e-2, tokens_per_batch=128, warmup_steps=10, seed=4, progress=False)
    ref_state = Trainer(ref, by_hand, valid, cfg).fit()
    assert state["global_step"] == ref_state["global_step"] > 0
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)

    fresh = Trainer(tiny_model(content_dim=6), by_hand, valid, cfg)
    assert state["history"][-1]["valid_loss"] < fresh.validate()

    for bad in ({"epochs": 0}, {"epochs": -1}, {"epochs": 1.5}, {"lr": 0.0}):
        with pytest.raises(ValueError, match="recent_pass: " + next(iter(bad))):
            recent_pass(tiny_model(), split, item_tokens, 1, max_items, valid, **{**kw, **bad})


def test_a_planted_pickle_checkpoint_is_refused_without_running(tmp_path):
    """A crafted checkpoint.pt in a run folder must not run code on resume (weights_only load)."""
    import os
    import pickle

    import pytest

    from recbase.model import RecBaseConfig, RecBaseForCausalLM
    from recbase.train import Trainer, TrainConfig

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run = tmp_path / "run"
    run.mkdir()
    with open(run / "checkpoint.pt", "wb") as f:
        pickle.dump({"model": Payload()}, f)
    model = RecBaseForCausalLM(RecBaseConfig.from_preset("tiny", levels=2, codebook_size=4))
    trainer = Trainer(model, [[1, 4, 8, 5, 9]], [], TrainConfig(epochs=1, progress=False), output_dir=run)
    with pytest.raises(ValueError, match="corrupt"):
        trainer.fit()
    assert not marker.exists()


def test_item_windows_refuse_a_window_that_cannot_advance():
    import numpy as np
    import pytest

    from recbase.train import item_windows

    for size in (1, 0, -3):
        with pytest.raises(ValueError, match="max_items"):
            item_windows(np.arange(5), size)
    windows = item_windows(np.arange(5), 3)  # every transition exactly once, windows of <= 3 items
    pairs = [(int(a), int(b)) for w in windows for a, b in zip(w[:-1], w[1:])]
    assert sorted(pairs) == [(0, 1), (1, 2), (2, 3), (3, 4)] and max(len(w) for w in windows) <= 3


@pytest.mark.parametrize("change, differs", [
    ({"seed": 1}, "settings"), ({"lr": 1e-2}, "settings"), ({"train_seed": 9}, "train_data"),
    ({"valid_seed": 8}, "valid_data"), ({"model_seed": 0, "layers": 1}, "model_config")])
def test_resuming_another_runs_checkpoint_is_refused(tmp_path, change, differs):
    """A run folder remembers what it was: other data, seed, lr or model config -> a clear error that
    names what differs and how to start fresh; the same run resumes (the test above)."""
    def trainer(seed=0, lr=3e-3, train_seed=2, valid_seed=3, layers=None, **_):
        model = tiny_model()
        if layers is not None:
            torch.manual_seed(0)
            model = RecBaseForCausalLM(RecBaseConfig.from_preset("tiny", levels=L, codebook_size=K, max_items=16,
                                                                 num_hidden_layers=layers))
        cfg = TrainConfig(epochs=1, tokens_per_batch=256, lr=lr, warmup_steps=3, seed=seed, progress=False)
        return Trainer(model, synthetic_sequences(40, seed=train_seed), synthetic_sequences(8, seed=valid_seed), cfg,
                       output_dir=tmp_path)
    trainer().fit()
    assert (tmp_path / "checkpoint.pt").exists()
    trainer().fit()  # the same run: resumes (finished: no step), no error
    with pytest.raises(ValueError, match=rf"belongs to another run \(these differ: {differs}\).*delete"):
        trainer(**change).fit()

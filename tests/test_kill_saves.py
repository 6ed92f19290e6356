"""kill -9 during every kind of save: the folder always loads, as the old or the new version.

A child saves versions 1, 2, 3, ... of one artifact into the same path in a loop; the parent kills
it with SIGKILL at a random moment (20 times per kind, seeded) and loads what is on disk. Children
come from a fork server (a fresh single-threaded process), not a fork of pytest: a fork copies the
locks that the parent's other threads (OpenMP, tqdm's monitor) hold at that instant, and a child
that needs one of them hangs.
"""
import multiprocessing as mp
import os
import random
import signal
import time

import numpy as np
import pytest
import torch

from recbase.model import RecBaseConfig, RecBaseForCausalLM
from recbase.tokenizer import ConceptVocab, ItemTokenizer
from recbase.train import _atomic_torch_save

KILLS = 20
pytestmark = pytest.mark.skipif("forkserver" not in mp.get_all_start_methods(), reason="needs a fork server")


def _tiny_model(version: int) -> RecBaseForCausalLM:
    torch.manual_seed(0)
    model = RecBaseForCausalLM(RecBaseConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        model.lm_head.weight.fill_(float(version))
    return model


def _tokenizer(version: int) -> ItemTokenizer:
    x = np.random.default_rng(version).standard_normal((32, 8)).astype(np.float32)
    return ItemTokenizer(levels=2, codebook_size=8, seed=version).fit(x, progress=False)


def _save_model(path, v):
    _tiny_model(v).save_pretrained(path)


def _load_model(path):
    return int(RecBaseForCausalLM.from_pretrained(path).lm_head.weight[0, 0])


_TOKENIZERS = {}


def _save_tokenizer(path, v):
    if not _TOKENIZERS:
        _TOKENIZERS.update({0: _tokenizer(0), 1: _tokenizer(1)})
    tok = _TOKENIZERS[v % 2]
    tok.save(path)
    (path / "version.txt").write_text(str(v))  # a file recbase did not write: must survive too


def _load_tokenizer(path):
    tok = ItemTokenizer.load(path)
    assert tok.levels == 2
    return int(tok.seed)


def _save_checkpoint(path, v):
    _atomic_torch_save({"model": {"w": torch.full((256, 64), float(v))}, "state": {"step": v}},
                       path / "checkpoint.pt")


def _load_checkpoint(path):
    ck = torch.load(path / "checkpoint.pt", weights_only=True)
    assert bool((ck["model"]["w"] == ck["state"]["step"]).all())
    return ck["state"]["step"]


def _save_adapters(path, v, cache={}):
    from recbase.finetune import lora_model, save_lora

    peft = cache.get("m")
    if peft is None:
        peft = cache["m"] = lora_model(_tiny_model(0), rank=2)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.fill_(float(v))
    save_lora(peft, path)


def _load_adapters(path):
    from recbase.finetune import load_lora

    peft = load_lora(_tiny_model(0), path)
    vals = {float(p.flatten()[0]) for n, p in peft.named_parameters() if "lora_B" in n}
    assert len(vals) == 1
    return int(vals.pop())


def _save_bundle(path, v, cache={}):
    from recbase.recommend import Recommender

    if "codes" not in cache:
        cache["codes"] = np.array([[a, b, c] for a in range(4) for b in range(4) for c in range(2)])
        cache["model"] = RecBaseForCausalLM(RecBaseConfig.from_preset("tiny", levels=3, codebook_size=4))
    codes = cache["codes"][: 8 + v % 8]  # the catalog's size changes with the version
    rec = Recommender(cache["model"], ConceptVocab(3, 4), {"shop": codes},
                      item_ids={"shop": [f"v{v}-{i}" for i in range(len(codes))]})
    rec.save(path)


def _load_bundle(path):
    from recbase.recommend import Recommender

    rec = Recommender.load(path)
    ids = rec.item_ids["shop"]
    versions = {i.split("-")[0] for i in ids}
    assert len(versions) == 1 and len(ids) == len(rec.codes["shop"]) == 8 + int(ids[0][1:].split("-")[0]) % 8
    return int(versions.pop()[1:])


KINDS = {
    "bundle": (_save_bundle, _load_bundle),
    "model": (_save_model, _load_model),
    "tokenizer": (_save_tokenizer, _load_tokenizer),
    "checkpoint": (_save_checkpoint, _load_checkpoint),
    "adapters": (_save_adapters, _load_adapters),
}


def _loop(save, path, ready):
    torch.set_num_threads(1)
    v = 1
    while True:
        save(path, v)
        if v == 1:
            ready.set()
        v += 1


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_kill_9_during_saves_leaves_a_loadable_version(tmp_path, kind):
    if kind == "adapters":
        pytest.importorskip("peft")
    save, load = KINDS[kind]
    rng = random.Random(f"kill-{kind}")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["recbase.model", "recbase.tokenizer", "recbase.train", "recbase.recommend",
                                "recbase.bundle", __name__])
    path = tmp_path / kind
    if kind == "checkpoint":
        path.mkdir()
    save(path, 0)  # a complete version is on disk before the first kill
    seen = set()
    for i in range(KILLS):
        ready = ctx.Event()
        child = ctx.Process(target=_loop, args=(save, path, ready), daemon=True)
        child.start()
        try:
            assert ready.wait(60), f"{kind}: the saving child did not start"
            time.sleep(rng.uniform(0.0, 0.05))
        finally:  # a child left looping would eat a core (and the disk) for the rest of the run
            os.kill(child.pid, signal.SIGKILL)
            child.join(10)
        got = load(path)  # raises if neither the old nor the new version is whole
        seen.add(got)
        if kind == "tokenizer":
            assert (path / "version.txt").exists(), f"kill {i}: a file recbase did not write was lost"
    assert seen, kind

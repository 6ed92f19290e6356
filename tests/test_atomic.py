"""Atomic writes: an interrupted save leaves the previous files whole, and no temporaries."""
import pytest
import torch

from recbase._atomic import atomic_dir, atomic_file, atomic_files_into
from recbase.model import RecBaseConfig, RecBaseForCausalLM


class Boom(RuntimeError):
    pass


def test_atomic_file_and_dir_keep_the_old_version_on_failure(tmp_path):
    f = tmp_path / "a.bin"
    with atomic_file(f) as tmp:
        tmp.write_bytes(b"old")
    with pytest.raises(Boom):
        with atomic_file(f) as tmp:
            tmp.write_bytes(b"half-writ")
            raise Boom
    assert f.read_bytes() == b"old"
    d = tmp_path / "d"
    with atomic_dir(d) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(Boom):
        with atomic_dir(d) as tmp:
            (tmp / "x").write_text("2")
            raise Boom
    assert (d / "x").read_text() == "1"
    with atomic_dir(d) as tmp:  # success swaps in the new folder; what it did not write is kept
        (tmp / "y").write_text("3")
        (tmp / "x").write_text("4")
    assert sorted(p.name for p in d.iterdir()) == ["x", "y"] and (d / "x").read_text() == "4"
    (d / "notes.txt").write_text("mine")
    with atomic_dir(d) as tmp:
        (tmp / "y").write_text("5")
    assert (d / "notes.txt").read_text() == "mine" and (d / "y").read_text() == "5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "d"]  # no temporaries left


def test_leftovers_of_a_killed_save_are_cleaned_by_the_next(tmp_path):
    """A save killed mid-way leaves its temporaries (names only recbase makes); the next save of the
    same path removes them, and nothing else."""
    (tmp_path / ".d.abcd1234").mkdir()  # a killed atomic_dir
    (tmp_path / ".d.abcd1234" / "x").write_text("half")
    (tmp_path / ".d.old").mkdir()
    (tmp_path / ".a.bin.k2j4h5g6.tmp").write_text("half")  # a killed atomic_file
    (tmp_path / ".other.abcd1234").mkdir()  # another artifact's: untouched
    (tmp_path / "user.txt").write_text("mine")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "y").write_text("1")
    with atomic_file(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.abcd1234", "a.bin", "d", "user.txt"]


def test_atomic_files_into_keeps_other_files_and_moves_config_last(tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("mine")
    order = []
    import os
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(os.path.basename(b)), real(a, b)))
    with atomic_files_into(tmp_path) as tmp:
        for name in ("config.json", "model.safetensors", "a.json"):
            (tmp / name).write_text(name)
    assert order == ["a.json", "model.safetensors", "config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "config.json", "keep.txt",
                                                          "model.safetensors"]


def test_interrupted_save_pretrained_leaves_the_previous_model(tmp_path, monkeypatch):
    cfg = RecBaseConfig.from_preset("tiny", levels=2, codebook_size=8, max_items=4)
    torch.manual_seed(0)
    old = RecBaseForCausalLM(cfg)
    old.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")  # a user's file beside the model survives
    torch.manual_seed(1)
    new = RecBaseForCausalLM(cfg)
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def crash_after_weights(self, directory, *a, **k):
        real(self, directory, *a, **k)
        raise Boom  # e.g. killed after writing the new files into the temporary folder

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash_after_weights)
    with pytest.raises(Boom):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    loaded = RecBaseForCausalLM.from_pretrained(tmp_path)
    for k, v in old.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors",
                                                          "tokenizer.json"]


def _listing(folder):
    return {p.name: p.read_text() for p in folder.iterdir()}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_user_files_survive_a_failure_at_every_step_of_the_swap(tmp_path, monkeypatch, exchange):
    """Whichever rename of the swap fails (a full disk, a kill), the folder holds the old artifact
    and every file of the user's, or the new artifact and every file of the user's."""
    import os

    from recbase import _atomic

    if not exchange:
        monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    d = tmp_path / "d"
    real = os.replace
    for fail_at in range(1, 8):
        if d.exists():
            import shutil
            shutil.rmtree(d)
        with atomic_dir(d) as tmp:
            (tmp / "x").write_text("old")
        for i in range(3):
            (d / f"user{i}.txt").write_text(f"mine{i}")
        calls = {"n": 0}

        def flaky(a, b, _fail=fail_at):
            calls["n"] += 1
            if calls["n"] == _fail:
                raise Boom(f"rename {calls['n']}")
            return real(a, b)

        monkeypatch.setattr(_atomic.os, "replace", flaky)
        try:
            with atomic_dir(d) as tmp:
                (tmp / "x").write_text("new")
            finished = True
        except Boom:
            finished = False
        monkeypatch.setattr(_atomic.os, "replace", real)
        got = _listing(d)
        users = {f"user{i}.txt": f"mine{i}" for i in range(3)}
        assert got in ({"x": "old", **users}, {"x": "new", **users}), (fail_at, got)
        if finished:
            assert got["x"] == "new"
        with atomic_dir(d) as tmp:  # the next save repairs and cleans whatever was left
            (tmp / "x").write_text("next")
        assert _listing(d) == {"x": "next", **users}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_save_killed_while_carrying_user_files_gives_them_back(tmp_path):
    """The state a kill -9 leaves in the middle of carrying over: some of the user's files already
    in the temp folder (listed in its journal). The next save moves them back, deletes nothing of
    theirs, and an old version set aside by a fallback swap killed between its renames comes back."""
    import json

    d = tmp_path / "d"
    with atomic_dir(d) as tmp:
        (tmp / "x").write_text("old")
    (d / "keep.txt").write_text("mine")
    left = tmp_path / ".d.k1ll3d00"
    left.mkdir()
    (left / "x").write_text("half")
    (left / "moved.txt").write_text("mine too")
    (left / ".recbase-carried.json").write_text(json.dumps(["moved.txt", "keep.txt", "../evil"]))
    with atomic_dir(d) as tmp:
        (tmp / "x").write_text("new")
    assert _listing(d) == {"x": "new", "keep.txt": "mine", "moved.txt": "mine too"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    # the fallback swap killed between its two renames: no folder at the path, the old one aside
    import os
    os.replace(d, tmp_path / ".d.old")
    with atomic_dir(d) as tmp:
        (tmp / "x").write_text("newer")
    assert _listing(d) == {"x": "newer", "keep.txt": "mine", "moved.txt": "mine too"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "copies"])
def test_user_entries_are_in_the_folder_at_every_step_of_a_save(tmp_path, monkeypatch, links):
    """A kill -9 can land between any two filesystem calls of a save: at each of them the folder
    at the path must already hold the user's files, folders and symlinks, with their contents (a
    file that is only back after the next save is, to its owner, lost)."""
    import os
    import shutil

    from recbase import _atomic

    d = tmp_path / "d"
    with atomic_dir(d) as tmp:
        (tmp / "x").write_text("old")
    (d / "notes.txt").write_text("mine")
    (d / "sub").mkdir()
    (d / "sub" / "deep.txt").write_text("deep")
    os.symlink("notes.txt", d / "link")
    mine = {"notes.txt": "mine", "sub/deep.txt": "deep", "link": "mine"}

    def check(step):
        for rel, text in mine.items():
            assert (d / rel).read_text() == text, (step, rel)
        assert os.readlink(d / "link") == "notes.txt", step

    steps = []
    for name, mod in (("replace", os), ("link", os), ("rmtree", shutil), ("copy2", shutil)):
        real = getattr(mod, name)

        def spy(*a, _real=real, _name=name, **k):
            check(_name)
            steps.append(_name)
            return _real(*a, **k)
        monkeypatch.setattr(_atomic.__dict__[mod.__name__], name, spy)
    real_exchange = _atomic._exchange

    def exchange(a, b):
        check("exchange")
        steps.append("exchange")
        ok = real_exchange(a, b)
        check("after exchange")
        return ok
    monkeypatch.setattr(_atomic, "_exchange", exchange)
    if not links:
        def no_links(*a, **k):
            raise OSError("no hard links here")
        monkeypatch.setattr(os, "link", no_links)
    with atomic_dir(d) as tmp:
        (tmp / "x").write_text("new")
    monkeypatch.undo()
    check("done")
    assert (d / "x").read_text() == "new" and "exchange" in steps
    assert ("link" in steps) == links and ("copy2" in steps) != links
    if links:  # the same file, not a copy: a large user file costs nothing to carry
        (d / "notes.txt").write_text("edited")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]

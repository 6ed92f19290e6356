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

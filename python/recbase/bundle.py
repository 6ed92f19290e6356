"""A recommender bundle: everything a ``Recommender`` serves from, in one folder.

Layout (written atomically by ``atomic_dir``: a save killed at any moment leaves the previous
bundle, or the new one, at the path)::

    bundle.json            format, recbase version, settings, the domains and their flags
    model/                 RecBaseForCausalLM.save_pretrained (safetensors + config.json)
    tokenizer/             ItemTokenizer.save (the codebooks ``add_items`` encodes on), optional
    catalogs/<k>.safetensors   codes (N, L) int64, removed (N,) uint8, and where the domain has
                               them: embeddings (N, d) float32, mean (d,), frame (d, d)
    catalogs/<k>.ids.json      the N item ids, row order

Domains are numbered (``<k>``), their names live in ``bundle.json`` only, so any domain name is
safe. Nothing is unpickled: JSON and safetensors only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from recbase._atomic import atomic_dir

FORMAT = "recbase-bundle"
FORMAT_VERSION = 1
_MARKER = "bundle.json"


def save_bundle(rec, path: str | os.PathLike) -> None:
    """Write ``rec`` (a ``Recommender``) to folder ``path`` (see the module docstring)."""
    from safetensors.numpy import save_file

    from recbase import __version__

    domains = []
    with atomic_dir(path, marker=_MARKER) as tmp:
        rec.model.save_pretrained(tmp / "model")
        if rec.tokenizer is not None:
            rec.tokenizer.save(tmp / "tokenizer")
        (tmp / "catalogs").mkdir()
        for k, name in enumerate(rec.codes):
            arrays = {"codes": np.ascontiguousarray(rec.codes[name]),
                      "removed": rec.removed[name].astype(np.uint8)}
            if name in rec.embeddings:
                arrays["embeddings"] = rec.embeddings[name].detach().cpu().numpy().astype(np.float32)
            if name in rec.means:
                arrays["mean"] = rec.means[name]
            if name in rec.frames:
                arrays["frame"] = rec.frames[name].detach().cpu().numpy().astype(np.float32)
            save_file(arrays, str(tmp / "catalogs" / f"{k}.safetensors"))
            (tmp / "catalogs" / f"{k}.ids.json").write_text(json.dumps(rec.item_ids[name]))
            domains.append({"name": name, "items": len(rec.codes[name]), "unseen": name in rec.unseen_domains,
                            "unordered": name in rec.unordered_domains, "arrays": sorted(arrays),
                            "text": rec.text_settings.get(name)})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "recbase_version": __version__,
                "max_items": rec.max_items, "unseen_frame": rec.unseen_frame,
                "tokenizer": rec.tokenizer is not None, "domains": domains}
        (tmp / _MARKER).write_text(json.dumps(meta, indent=2))


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"path: the bundle has no {what} ({path} is missing)")
    return path


def read_meta(path: str | os.PathLike) -> dict:
    """``bundle.json`` of a bundle folder, checked to be a bundle this recbase reads."""
    from recbase import __version__

    path = Path(path)
    meta_file = path / _MARKER
    if not meta_file.is_file():
        raise FileNotFoundError(f"path: {path} is not a recbase bundle (no {_MARKER}; written by Recommender.save)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"path: {meta_file} is corrupt ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"path: {meta_file} is not a recbase bundle description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"path: bundle format {meta.get('format_version')!r} (written by recbase "
                         f"{meta.get('recbase_version')}) is not the one this recbase {__version__} reads "
                         f"({FORMAT_VERSION}); re-save it with the recbase that wrote it, or re-build it")
    return meta


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """The ``Recommender`` saved in folder ``path`` (identical recommendations)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from recbase.model import RecBaseForCausalLM
    from recbase.recommend import Recommender
    from recbase.tokenizer import ItemTokenizer

    path = Path(path)
    meta = read_meta(path)
    try:
        domains = list(meta["domains"])
        names = [str(d["name"]) for d in domains]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"path: {path / _MARKER} lacks the domain list ({exc})") from exc
    if not domains or len(set(names)) != len(names):
        raise ValueError(f"path: {path / _MARKER} names no domains, or one twice: {names}")
    model = RecBaseForCausalLM.from_pretrained(_need(path / "model", "model folder"))
    tokenizer = ItemTokenizer.load(_need(path / "tokenizer", "tokenizer folder")) if meta.get("tokenizer") else None
    codes, ids, embeddings, means, frames, removed = {}, {}, {}, {}, {}, {}
    for k, (d, name) in enumerate(zip(domains, names)):
        arrays_file = _need(path / "catalogs" / f"{k}.safetensors", f"catalog arrays of domain {name!r}")
        ids_file = _need(path / "catalogs" / f"{k}.ids.json", f"item ids of domain {name!r}")
        try:
            arrays = load_file(str(arrays_file))
            item_ids = json.loads(ids_file.read_text())
        except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"path: the catalog of domain {name!r} is corrupt ({exc})") from exc
        missing = sorted(set(d.get("arrays", ())) - set(arrays))
        if "codes" not in arrays or "removed" not in arrays or missing:
            raise ValueError(f"path: {arrays_file} lacks {missing or ['codes', 'removed']}")
        n = len(arrays["codes"])
        if arrays["removed"].shape != (n,) or not isinstance(item_ids, list):
            raise ValueError(f"path: {arrays_file}: 'removed' has shape {arrays['removed'].shape}, expected ({n},)")
        codes[name], ids[name], removed[name] = arrays["codes"], item_ids, arrays["removed"].astype(bool)
        for key, into in (("embeddings", embeddings), ("mean", means), ("frame", frames)):
            if key in arrays:
                into[name] = arrays[key]
    unseen = [n for d, n in zip(domains, names) if d.get("unseen")]
    text = {n: d["text"] for d, n in zip(domains, names) if isinstance(d.get("text"), dict)}
    unordered = [n for d, n in zip(domains, names) if d.get("unordered")]
    # the window the bundle was saved with (Recommender keeps max_items - 1 history items)
    max_items = None if meta.get("max_items") is None else int(meta["max_items"]) + 1
    rec = Recommender(model, _vocab(model), codes, max_items=max_items, device=device,
                      unseen_domains=unseen, item_embeddings=embeddings or None,
                      unseen_frame="identity", unordered_domains=unordered, item_ids=ids,
                      tokenizer=tokenizer, embedding_means=means or None, text_settings=text or None)
    rec.unseen_frame = str(meta.get("unseen_frame", "identity"))
    for name, frame in frames.items():  # as saved: a frame is not re-derived from a grown catalog
        rec.frames[name] = torch.as_tensor(frame).to(rec.device)
    for name, mask in removed.items():
        if mask.all():
            raise ValueError(f"path: every item of domain {name!r} is marked removed")
        if mask.any():
            rec.removed[name] = mask
            rec._refresh_trie(name)
    return rec


def _vocab(model):
    from recbase.tokenizer import ConceptVocab

    return ConceptVocab(int(model.config.levels), int(model.config.codebook_size))

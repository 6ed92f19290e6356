"""The ``recbase`` command.

    recbase info                                   what this install can do
    recbase demo [--output DIR] [--device cpu|cuda] the main job on real data
                 [--evaluate-on valid]             ... scored on the validation items instead
    recbase tokenize  --items I --domain D --output DIR          item text -> concept IDs
                      [--encoder DIR | --embeddings E.npy]       ... another encoder, or your vectors
    recbase pretrain  --items I --interactions X --tokenizer DIR --output DIR
    recbase pretrain  --corpus C.toml [--hold-out D ...] --output RUN   several domains, one model
    recbase evaluate  --items I --interactions X --tokenizer DIR --model DIR
    recbase evaluate  --corpus C.toml --model RUN --domain D [--zero-shot]  with the baselines
    recbase zeroshot  --corpus C.toml --output DIR   leave-one-domain-out table + plot
    recbase recommend --tokenizer DIR --model DIR --history ID [ID ...]
    recbase bundle    --tokenizer DIR --model DIR --output B   one folder that serving loads
    recbase recommend --bundle B --histories H.parquet --output recs.parquet   batch, for pipelines
    recbase evaluate  --bundle B --interactions X
    recbase catalog   --bundle B [--add NEW_ITEMS.csv] [--remove ID ...]   a living catalog, in place

Zero-shot in a new domain: pretrain with ``--content-rotation-rate 0.5`` (the demo adds
``--recent-pass-epochs 1``: one unrotated pass over each user's latest items), tokenize the new
catalog on the pretraining tokenizer's codebooks (``tokenize --codebooks DIR``), then
``evaluate`` / ``recommend`` with ``--unseen`` (the domain is read by concept content alone).
``pretrain --dense`` adds the dense item channel (each item also read through its text embedding,
the tokenizer folder's ``embeddings.npy``) and chooses the hybrid fusion weights on the
validation items; ``evaluate`` / ``recommend`` then take ``--mode generative|dense|hybrid``.

``--items`` / ``--interactions`` are CSV or Parquet files (columns ``item_id`` + attributes;
``user_id, item_id[, timestamp][, rating]``), read by ``recbase.datasets.from_files``.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    from recbase._info import info

    print(json.dumps(info(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from recbase.demo import DemoConfig, run_demo

    cfg = DemoConfig(output=args.output, device=args.device, seed=args.seed, evaluate_on=args.evaluate_on,
                     also_unseen=tuple(args.also_unseen))
    if args.quick:  # a small variant for smoke tests: fewer users, one epoch (same work anywhere)
        cfg.max_eval_users, cfg.epochs, cfg.time_budget_s, cfg.sasrec_epochs = 200, 1, None, 1
        cfg.text_sasrec_epochs = 1
    if args.max_eval_users is not None:
        cfg.max_eval_users = args.max_eval_users or None
    if args.time_budget is not None:
        cfg.time_budget_s = args.time_budget
    run_demo(cfg)
    return 0


def _template(domain: str, fields: str | None):
    from recbase.data.text import ItemTemplate, template_for

    if not fields:
        return template_for(domain)
    mapping = dict(f.split("=", 1) for f in fields.split(","))
    return ItemTemplate(domain.rstrip("s"), mapping)


def _load_embeddings(path: str, num_items: int):
    import numpy as np

    try:
        emb = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--embeddings: cannot read {path} as a .npy array ({exc})") from exc
    if emb.ndim != 2 or emb.shape[0] != num_items or not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"--embeddings: expected a float array of shape ({num_items} items, dim), "
                         f"got {emb.dtype} {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError(f"--embeddings: {path} contains NaN or inf")
    return emb.astype(np.float32)


def _cmd_tokenize(args: argparse.Namespace) -> int:
    import numpy as np

    from recbase import datasets
    from recbase.data import TextEncoder
    from recbase.data.encoder import DEFAULT_MODEL
    from recbase.data.text import render_items
    from recbase.tokenizer import ItemTokenizer, centre_embeddings

    # ids as written ("000" stays "000"), never parsed as numbers
    csv_ids = {} if str(args.items).lower().endswith((".parquet", ".pq")) else {"dtype": {"item_id": str},
                                                                                 "keep_default_na": False}
    items = datasets._read_table(args.items, "items", **csv_ids)
    if "item_id" not in items.columns:
        raise ValueError(f"--items: {args.items} has no item_id column (got {list(items.columns)})")
    ids = items["item_id"].astype(str).str.strip()
    if items["item_id"].isna().any() or (ids == "").any():
        raise ValueError(f"--items: {args.items} has {int(items['item_id'].isna().sum() + (ids == '').sum())} "
                         "row(s) without an item_id")
    dup = ids[ids.duplicated()]
    if len(dup):
        raise ValueError(f"--items: item_id must be unique in {args.items}; {len(dup)} duplicate(s), "
                         f"e.g. {dup.iloc[:5].tolist()}")
    items = items.assign(item_id=ids)
    if args.embeddings:  # the user's own item vectors, row i = row i of --items
        if args.encoder or args.fields:
            raise ValueError("--embeddings replaces the text encoder: drop --encoder / --fields")
        emb = _load_embeddings(args.embeddings, len(items))
    else:
        texts = render_items(items, _template(args.domain, args.fields))
        emb = TextEncoder(args.encoder or DEFAULT_MODEL, device=args.device).encode(texts)
    mean = emb.mean(0)  # what new items' embeddings are centred on later (Recommender.add_items)
    emb = centre_embeddings(emb)
    if args.codebooks:  # a new domain on an existing vocabulary (zero-shot)
        tok = ItemTokenizer.load(args.codebooks).for_catalog(emb)
    else:
        tok = ItemTokenizer(levels=args.levels, codebook_size=args.codebook_size, dedup=args.dedup,
                            seed=args.seed).fit(emb)
    out = Path(args.output)
    tok.save(out)
    _write_atomic(out / "item_ids.json", json.dumps(items["item_id"].astype(str).tolist()).encode())
    # how this catalog's text became vectors: what `recbase catalog --add` does for new items
    text = None if args.embeddings else {"domain": args.domain, "fields": args.fields,
                                         "encoder": args.encoder or DEFAULT_MODEL}
    _write_atomic(out / "text.json", json.dumps(text).encode())
    for name, array in (("embeddings.npy", emb), ("embedding_mean.npy", mean.astype(np.float32))):
        buf = io.BytesIO()
        np.save(buf, array)
        _write_atomic(out / name, buf.getvalue())
    print(json.dumps({k: v for k, v in tok.report().items() if k != "per_level"}, indent=2))
    return 0


def _write_atomic(path: Path, data: bytes) -> None:
    from recbase._atomic import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def _tokenizer_embeddings(tok_dir: Path, num_items: int):
    path = tok_dir / "embeddings.npy"
    if not path.exists():
        raise ValueError(f"--tokenizer: {tok_dir} has no embeddings.npy (written by `recbase tokenize`), "
                         "which the dense item channel reads")
    return _load_embeddings(str(path), num_items)


def _catalog(tok_dir: Path):
    from recbase.data.sequences import ItemIndex
    from recbase.tokenizer import ItemTokenizer

    tok = ItemTokenizer.load(tok_dir)
    ids_file = tok_dir / "item_ids.json"
    if not ids_file.exists():
        raise ValueError(f"--tokenizer: {tok_dir} has no item_ids.json (make it with `recbase tokenize`)")
    ids = json.loads(ids_file.read_text())
    if not isinstance(ids, list) or len(ids) != len(tok.codes):
        raise ValueError(f"--tokenizer: {ids_file} must list one item id per concept ID ({len(tok.codes)}), "
                         f"got {len(ids) if isinstance(ids, list) else type(ids).__name__}")
    return tok, ItemIndex(ids)


def _tokenizer_fingerprint(tok, index) -> dict:
    """sha256 digests of what a model is tied to: the codebooks (the vocabulary's content) and the
    catalog (every item's concept ID, in order, with its item id)."""
    import hashlib

    import numpy as np

    books = hashlib.sha256(np.ascontiguousarray(tok.quantizer.codebooks, dtype=np.float32).tobytes()).hexdigest()
    cat = hashlib.sha256(np.ascontiguousarray(tok.codes, dtype=np.int64).tobytes())
    cat.update(json.dumps([str(x) for x in index.decode(np.arange(len(tok.codes)))]).encode())
    return {"codebooks": books, "catalog": cat.hexdigest()}


def _check_pairing(model, tok, index, args) -> None:
    """--model and --tokenizer must belong together: a model pretrained by `recbase pretrain` knows
    its tokenizer's digests. In-domain both must match (another catalog or item order would give
    wrong ids silently); with --unseen (another catalog on the same codebooks) the codebooks must."""
    saved = getattr(model.config, "tokenizer_fingerprint", None)
    if not isinstance(saved, dict):
        return  # a model built outside `recbase pretrain`: nothing recorded to compare with
    mine = _tokenizer_fingerprint(tok, index)
    keys = ("codebooks",) if getattr(args, "unseen", False) else ("codebooks", "catalog")
    wrong = [k for k in keys if saved.get(k) != mine[k]]
    if wrong:
        raise ValueError(f"--tokenizer: {args.tokenizer} is not the tokenizer {args.model} was pretrained with "
                         f"(its {' and '.join(wrong)} differ); use that tokenizer folder"
                         + ("" if getattr(args, "unseen", False) else
                            ", or --unseen for another catalog tokenized on its codebooks (tokenize --codebooks)"))


def _single_domain_files(args):
    """(tokenizer, item index, dataset) from --tokenizer / --items / --interactions (without --corpus)."""
    from recbase import datasets

    for flag in ("items", "interactions", "tokenizer"):
        if getattr(args, flag) is None:
            raise ValueError(f"--{flag} is required (or give --corpus, or --bundle)")
    tok, index = _catalog(Path(args.tokenizer))
    return tok, index, datasets.from_files(args.items, args.interactions, domain=args.domain)


def _load_model(path: str):
    """A model folder written by `recbase pretrain` (never a download: a missing folder is an error)."""
    from recbase.model import RecBaseForCausalLM

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model: {path} is not a model folder (no config.json; write one with `recbase pretrain`)")
    return RecBaseForCausalLM.from_pretrained(folder)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    import numpy as np

    from recbase.data.splits import leave_one_out
    from recbase.model import RecBaseConfig, RecBaseForCausalLM
    from recbase.recommend import Recommender, choose_fusion
    from recbase.train import ItemVectors, Trainer, TrainConfig, pretraining_sequences, recent_pass

    if args.recent_pass_epochs < 0:  # refused before pretraining, not after it
        raise ValueError(f"--recent-pass-epochs must be >= 0, got {args.recent_pass_epochs}")
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.max_items < 2:
        raise ValueError(f"--max-items must be >= 2 (one history item and its next), got {args.max_items}")
    _check_rates(args)
    if args.corpus:
        return _pretrain_corpus(args)
    if args.hold_out:
        raise ValueError("--hold-out needs --corpus")
    tasks = _tasks(args)
    tok, index, data = _single_domain_files(args)
    split = leave_one_out(data, index)
    train, valid = pretraining_sequences(split, tok.tokens(tok.codes), tok.vocab.BOS, args.max_items)
    ratings, scales = None, {}
    if TrainConfig(tasks=tasks).rating_share():
        from recbase.pipeline import rating_scale, rating_windows

        scale = rating_scale(split)
        if scale is None:
            raise ValueError(f"--tasks {args.tasks}: --interactions has no explicit ratings (no 'rating' column, "
                             "or one value everywhere)")
        ratings, scales = rating_windows(split, args.max_items, None, scale), {args.domain: scale}
    content = args.content_rotation_rate > 0  # concept content vectors: needed to go zero-shot
    emb = _tokenizer_embeddings(Path(args.tokenizer), len(tok.codes)) if args.dense else None
    vectors = ItemVectors(tok.tokens(tok.codes), emb, tok.codebook_size) if args.dense else None
    cfg = RecBaseConfig.from_preset(args.preset, levels=tok.id_length, codebook_size=tok.codebook_size,
                                    max_items=args.max_items,
                                    concept_vector_dim=tok.quantizer.codebooks.shape[2] if content else 0,
                                    item_vector_dim=emb.shape[1] if args.dense else 0,
                                    rating_task=ratings is not None, rating_scales=scales)
    model = RecBaseForCausalLM(cfg)
    if content:
        model.set_concept_vectors(tok.quantizer.codebooks)
    out = Path(args.output)
    batch = {} if args.tokens_per_batch is None else {"tokens_per_batch": args.tokens_per_batch}
    Trainer(model, train, valid, TrainConfig(epochs=args.epochs, lr=args.lr, device=args.device, seed=args.seed,
                                             content_rotation_rate=args.content_rotation_rate,
                                             shuffle_rate=args.shuffle_rate, tasks=tasks, **batch),
            output_dir=out / "run", item_vectors=vectors, ratings=ratings).fit()
    if args.recent_pass_epochs:
        recent_pass(model, split, tok.tokens(tok.codes), tok.vocab.BOS, args.max_items, valid,
                    epochs=args.recent_pass_epochs, seed=args.seed + 1, device=args.device,
                    output_dir=out / "recent-pass", item_vectors=vectors, **batch)
    if args.dense:  # hybrid fusion weights from the validation items (up to 1,000 users, seeded)
        users = np.random.default_rng(args.seed).permutation(split.num_users)[:1000]
        rec = Recommender(model, tok.vocab, {args.domain: tok.codes}, device=args.device,
                          item_embeddings={args.domain: emb})
        for reading in ("seen", "unseen") if content else ("seen",):
            chosen = choose_fusion(rec, args.domain, [split.valid_histories[u] for u in users],
                                   split.valid_targets[users], reading=reading, num_beams=20)
            print(f"fusion weight ({reading}): {chosen['weight']}")
    model.config.tokenizer_fingerprint = _tokenizer_fingerprint(tok, index)
    model.save_pretrained(out)
    print(f"model saved to {out}")
    return 0


def _tasks(args) -> dict:
    """--tasks "sequential=1,rating=1" -> {"sequential": 1.0, "rating": 1.0} (checked like TrainConfig.tasks)."""
    from recbase.train import TrainConfig

    tasks = {}
    for part in str(getattr(args, "tasks", "sequential=1")).split(","):
        name, sep, weight = part.partition("=")
        try:
            tasks[name.strip()] = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"--tasks: expected task=weight pairs such as 'sequential=1,rating=1', got {args.tasks!r}") from None
    TrainConfig(tasks=tasks).rating_share()  # unknown task names, negative or all-zero weights
    return tasks


def _check_rates(args) -> None:
    """The share options of pretraining, refused before any data is loaded."""
    for flag in ("content_rotation_rate", "shuffle_rate"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            raise ValueError(f"--{flag.replace('_', '-')} must be in [0, 1], got {getattr(args, flag)}")


def _corpus_settings(args):
    from recbase.pipeline import PretrainSettings

    _check_rates(args)
    return PretrainSettings(preset=args.preset, hidden_size=getattr(args, "hidden_size", None),
                            num_layers=getattr(args, "layers", None), max_items=args.max_items, epochs=args.epochs, lr=args.lr,
                            content_rotation_rate=args.content_rotation_rate, shuffle_rate=args.shuffle_rate,
                            recent_pass_epochs=args.recent_pass_epochs, dense=args.dense, seed=args.seed,
                            device=args.device, tasks=_tasks(args), **({} if args.tokens_per_batch is None
                                                   else {"tokens_per_batch": args.tokens_per_batch}))


def _own_folder(path: str, marker: str, kind: str) -> Path:
    """``--output`` as a folder recbase may write into: new, empty, or one it wrote (has ``marker``)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise FileExistsError(f"--output: {out} is a non-empty folder that is not {kind} (no {marker}); "
                              "refusing to write into it. Use a new or empty folder.")
    return out


def _corpus_stages(args, corpus):
    """Settings from the options, every domain loaded and embedded, one tokenizer over all of them."""
    from recbase.pipeline import prepare_domains, tokenize_domains

    settings = _corpus_settings(args)
    settings.alpha = corpus.alpha
    domains = prepare_domains(corpus, device=args.device)
    return settings, domains, tokenize_domains(domains, levels=args.levels, codebook_size=args.codebook_size,
                                               seed=args.seed)


def _pretrain_corpus(args) -> int:
    """pretrain --corpus: every domain tokenized on one tokenizer, the others' sequences mixed."""
    from recbase.data.corpus import load_corpus
    from recbase.pipeline import pretrain_domains, save_run

    corpus = load_corpus(args.corpus)  # every check before any work
    for flag in ("items", "interactions", "tokenizer"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag} and --corpus exclude each other (the corpus lists the files)")
    unknown = sorted(set(args.hold_out) - set(corpus.names()))
    if unknown:
        raise ValueError(f"--hold-out: {unknown} not among the corpus domains {corpus.names()}")
    train_on = [n for n in corpus.names() if n not in args.hold_out]
    if not train_on:
        raise ValueError("--hold-out: every domain is held out; nothing is left to pretrain on")
    out = _own_folder(args.output, "run.json", "a recbase run")
    settings, domains, tok = _corpus_stages(args, corpus)
    model = pretrain_domains(domains, tok, train_on, settings, output_dir=out / "run").model
    save_run(out, domains, tok, model, train_on, corpus_source=str(Path(args.corpus).resolve()))
    print(json.dumps({"trained_on": train_on, "held_out": list(args.hold_out),
                      "fusion_weights": getattr(model.config, "fusion_weights", {})}))
    print(f"run saved to {out}")
    return 0


def _evaluate_corpus(args) -> int:
    import numpy as np

    from recbase.data.corpus import load_corpus
    from recbase.pipeline import evaluate_domain, load_run, prepare_domains

    if args.model is None or args.bundle:
        raise ValueError("--corpus needs --model RUN (the run folder of `pretrain --corpus`), not --bundle")
    corpus = load_corpus(args.corpus)
    corpus.domain(args.domain)  # a clear error for a domain the corpus does not have
    tok, model, meta = load_run(args.model)
    if args.zero_shot and args.domain in meta["trained_on"]:
        raise ValueError(f"--zero-shot: the model in {args.model} trained on {args.domain!r} (trained on "
                         f"{meta['trained_on']}); pretrain with --hold-out {args.domain}")
    if args.domain not in meta["domains"]:
        raise ValueError(f"--domain: {args.domain!r} is not in the run {args.model} ({sorted(meta['domains'])})")
    if args.text_sasrec_epochs < 0:
        raise ValueError(f"--text-sasrec-epochs must be >= 0, got {args.text_sasrec_epochs}")
    # the peer reads what the model read: the run's trained domains (never the domain itself when
    # --zero-shot, which was checked above), so its row's label says the same as recbase's
    peers_on = list(meta["trained_on"]) if args.text_sasrec_epochs else []
    corpus.domains = [corpus.domain(n) for n in dict.fromkeys([*peers_on, args.domain])]
    domains = prepare_domains(corpus, device=args.device)
    peer = None
    if peers_on:
        from recbase.pipeline import fit_text_sasrec

        peer = fit_text_sasrec(domains, peers_on, epochs=args.text_sasrec_epochs, seed=args.seed, device=args.device)
    d = domains[args.domain]
    lo, hi = meta["domains"][args.domain]["rows"]
    saved_ids = json.loads((Path(args.model) / "catalogs" / args.domain / "item_ids.json").read_text())
    ids = d.split.item_index.decode(np.arange(d.split.num_items)).tolist()
    if saved_ids != ids:  # another catalog than the one tokenized: the IDs would be wrong
        raise ValueError(f"--corpus: domain {args.domain!r} has other items than the run in {args.model} "
                         "was tokenized on (item_ids.json differs); pretrain again on this corpus")
    d.codes = tok.codes[lo:hi]
    if args.task == "rating":
        from recbase.recommend import Recommender

        rec = Recommender(model, tok.vocab, {args.domain: d.codes}, device=args.device,
                          unseen_domains=[args.domain] if args.zero_shot else [],
                          item_embeddings={args.domain: d.embeddings} if getattr(model.config, "item_vector_dim", 0)
                          else None)
        rows = _rating_rows(rec, args.domain, d.split, args)
        print("| domain | model | rmse | se_rmse | mae | se_mae |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {args.domain} | {r['model']} | " + " | ".join(f"{r[c]:.4f}" for c in ("rmse", "se_rmse", "mae", "se_mae"))
                  + " |")
        return 0
    rows = evaluate_domain(model, tok, domains, args.domain, zero_shot=args.zero_shot,
                           max_users=args.max_users or None, num_beams=max(args.num_beams, 20), seed=args.seed,
                           device=args.device, text_sasrec=peer, direct=args.task == "direct",
                           direct_negatives=args.num_negatives)
    cols = (["direct_hr@1", "direct_hr@5", "direct_hr@10", "direct_se_hr@10", "direct_ndcg@5", "direct_ndcg@10"]
            if args.task == "direct" else ["recall@10", "se_recall@10", "ndcg@10", "se_ndcg@10", "mrr", "auc"])
    print("| domain | model | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['domain']} | {r['model']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    return 0


def _cmd_zeroshot(args: argparse.Namespace) -> int:
    """For each domain of the corpus: pretrain on the others, evaluate it zero-shot; one table + plot."""
    from recbase.data.corpus import load_corpus
    from recbase.pipeline import leave_one_domain_out, plot_zero_shot

    corpus = load_corpus(args.corpus)
    if len(corpus.domains) < 2:
        raise ValueError(f"--corpus: leave-one-domain-out needs at least two domains, {args.corpus} has "
                         f"{corpus.names()}")
    if args.epochs < 1 or args.max_items < 2:
        raise ValueError(f"--epochs must be >= 1 and --max-items >= 2, got {args.epochs} and {args.max_items}")
    if args.text_sasrec_epochs < 0:
        raise ValueError(f"--text-sasrec-epochs must be >= 0, got {args.text_sasrec_epochs}")
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # checked before hours of work, not after
        raise ValueError('the plot needs matplotlib: pip install "recbase[plot]"')
    out = _own_folder(args.output, "zeroshot.md", "a `recbase zeroshot` folder")
    settings, domains, tok = _corpus_stages(args, corpus)
    rows = leave_one_domain_out(domains, tok, settings, max_users=args.max_users or None, output_dir=out / "runs",
                                text_sasrec_epochs=args.text_sasrec_epochs)
    cols = ["recall@10", "se_recall@10", "ndcg@10", "se_ndcg@10", "mrr", "auc"]
    lines = ["| held out | pretrained on (interactions) | model | " + " | ".join(cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['held_out']} | {r['trained_on']} ({r['pretrain_interactions']:,}) | {r['model']} | "
                     + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    table = "\n".join(lines)
    from recbase._atomic import atomic_file

    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "zeroshot.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=2, default=float))
    plot_zero_shot(rows, out / "zeroshot.png")
    with atomic_file(out / "zeroshot.md") as tmp:
        tmp.write_text(table + "\n")
    print(table)
    print(f"table, rows and plot written to {out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from recbase.data.splits import leave_one_out
    from recbase.evaluate import evaluate_rankings

    if args.corpus:
        return _evaluate_corpus(args)
    if args.zero_shot:
        raise ValueError("--zero-shot needs --corpus (without it, say --unseen)")
    if args.bundle:
        rec, domain = _bundle_recommender(args)
        if args.interactions is None:
            raise ValueError("--interactions is required")
        from recbase import datasets
        from recbase.data.sequences import ItemIndex

        inter = datasets._read_table(args.interactions, "interactions", dtype={"user_id": str, "item_id": str})
        split = leave_one_out(inter, ItemIndex(rec.item_ids[domain]))
    else:
        tok, index, data = _single_domain_files(args)
        split = leave_one_out(data, index)
        rec, domain = _files_recommender(args, tok, index, args.domain), args.domain
    if args.task == "direct":
        print(json.dumps(_direct_on_split(rec, domain, split, args), indent=2))
        return 0
    if args.task == "rating":
        print(json.dumps({r.pop("model"): r for r in _rating_rows(rec, domain, split, args)}, indent=2))
        return 0
    items, _ = rec.recommend(split.test_histories, k=20, domain=domain, num_beams=args.num_beams, mode=args.mode)
    print(json.dumps(evaluate_rankings(items, split.test_targets), indent=2))
    return 0


def _rating_rows(rec, domain, split, args) -> list[dict]:
    """--task rating: each user's last rated item, recbase next to the global mean, user + item
    biases and matrix factorisation fitted on the same training ratings."""
    from recbase.pipeline import evaluate_ratings, rating_baselines, rating_scale, sample_users

    if rating_scale(split) is None:
        raise ValueError("--task rating: the interactions have no explicit ratings (no 'rating' column, or one "
                         "value everywhere)")
    if not getattr(rec.model.config, "rating_task", False):
        raise ValueError("--task rating needs a model pretrained with --tasks sequential=1,rating=1")
    users = sample_users(split.num_users, args.max_users or None, args.seed)
    return evaluate_ratings(split, users, {
        "recbase": lambda u, h, hr, items: rec.predict_rating(h, hr, items, domain=domain),
        **rating_baselines(split)})


def _direct_on_split(rec, domain, split, args) -> dict:
    """--task direct on one catalog: recbase next to popularity (and text-kNN when the catalog has
    embeddings) on P5's 1 + 99 candidates of the test item, every model on the same candidates."""
    from recbase.baselines import Popularity, TextKNN
    from recbase.pipeline import direct_metrics, sample_users

    users = sample_users(split.num_users, args.max_users or None, args.seed)
    scorers = {"recbase": lambda h, c: rec.score(h, c, domain=domain, mode=args.mode),
               "popularity": Popularity().fit(split.train_sequences, num_items=split.num_items).score}
    if domain in rec.embeddings:
        scorers["text-kNN"] = TextKNN(rec.embeddings[domain].cpu().numpy(), max_history=20).score
    return direct_metrics(split, users, scorers, num_negatives=args.num_negatives, seed=args.seed)


def _files_recommender(args, tok, index, domain):
    """A Recommender from --tokenizer + --model folders (checked to belong together)."""
    from recbase.recommend import Recommender

    if args.model is None:
        raise ValueError("--model is required (or give --bundle)")
    model = _load_model(args.model)
    _check_pairing(model, tok, index, args)
    mean_file = Path(args.tokenizer) / "embedding_mean.npy"
    mean = {domain: _load_vector(mean_file)} if mean_file.is_file() else None
    text_file = Path(args.tokenizer) / "text.json"
    try:
        text = json.loads(text_file.read_text()) if text_file.is_file() else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"--tokenizer: {text_file} is corrupt ({exc})") from exc
    return Recommender(model, tok.vocab, {domain: tok.codes}, device=args.device,
                       unseen_domains=[domain] if args.unseen else [],
                       unordered_domains=[domain] if args.unordered else [],
                       item_embeddings=_dense_embeddings(args, model, tok, domain),
                       item_ids={domain: [str(i) for i in index.ids]}, tokenizer=tok, embedding_means=mean,
                       text_settings={domain: text} if isinstance(text, dict) else None)


def _load_vector(path: Path):
    import numpy as np

    try:
        v = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--tokenizer: cannot read {path} as a .npy array ({exc})") from exc
    if v.ndim != 1 or not np.issubdtype(v.dtype, np.floating) or not np.isfinite(v).all():
        raise ValueError(f"--tokenizer: {path} must hold a finite float vector, got {v.dtype} {v.shape}")
    return v


def _bundle_recommender(args):
    """(Recommender, domain) of --bundle; --tokenizer / --model / --unseen / --unordered belong to
    the bundle then (it keeps them), so giving them too is an error."""
    from recbase.recommend import Recommender

    clash = [f"--{f}" for f in ("tokenizer", "model") if getattr(args, f, None)]
    clash += [f"--{f}" for f in ("unseen", "unordered") if getattr(args, f, False)]
    if clash:
        raise ValueError(f"--bundle holds the model, tokenizer and catalog flags: drop {' '.join(clash)}")
    rec = Recommender.load(args.bundle, device=args.device)
    return rec, _bundle_domain(rec, args.domain)


def _bundle_domain(rec, requested):
    """The bundle's catalog a command works on: the one asked for, or its only one (the --domain
    default names no catalog of a one-catalog bundle)."""
    return rec._domain(requested if requested in rec.codes or len(rec.codes) > 1 else None)


def _dense_embeddings(args, model, tok, domain):
    """The catalog's embeddings for a model with a dense channel (else None: generative only)."""
    if not getattr(model.config, "item_vector_dim", 0):
        if args.mode not in (None, "generative"):
            raise ValueError(f"--mode {args.mode}: the model has no dense item channel (pretrain it with --dense)")
        return None
    return {domain: _tokenizer_embeddings(Path(args.tokenizer), len(tok.codes))}


def _cmd_recommend(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    if (args.history is None) == (args.histories is None):
        raise ValueError("give --history (one history, item ids) or --histories (a file of many), not both")
    if (args.histories is None) != (args.output is None):
        raise ValueError("--histories and --output go together (a file of histories in, a file of recommendations out)")
    if args.bundle:
        rec, domain = _bundle_recommender(args)
    else:
        if args.tokenizer is None:
            raise ValueError("--tokenizer is required (or give --bundle)")
        tok, index = _catalog(Path(args.tokenizer))
        rec, domain = _files_recommender(args, tok, index, "catalog"), "catalog"
    beams = max(args.num_beams, args.k)
    if args.histories is not None:
        return _recommend_file(rec, domain, args, beams)
    history = rec.indices_of(domain, args.history)
    items, scores = rec.recommend([history], k=args.k, domain=domain, num_beams=beams, mode=args.mode)
    for item, score in zip(rec.ids_of(domain, items[0][items[0] >= 0]), scores[0]):
        print(f"{score:10.4f}  {item}")
    return 0


def _recommend_file(rec, domain, args, beams) -> int:
    """--histories F (CSV / Parquet: user_id, item_id[, timestamp]) -> --output (user_id, rank, item_id, score)."""
    from recbase import datasets
    from recbase._atomic import atomic_file

    out = Path(args.output)
    if out.suffix.lower() not in (".parquet", ".pq", ".csv"):
        raise ValueError(f"--output: expected a .parquet or .csv file name, got {args.output}")
    csv = {} if str(args.histories).lower().endswith((".parquet", ".pq")) else {"dtype": {"user_id": str, "item_id": str}}
    frame = datasets._read_table(args.histories, "histories", **csv)
    time_col = "timestamp" if "timestamp" in frame.columns else None
    try:
        recs = rec.recommend_frame(frame, k=args.k, domain=domain, time_col=time_col, num_beams=beams, mode=args.mode)
    except ValueError as exc:
        raise ValueError(f"--histories: {args.histories}: {exc}") from exc
    with atomic_file(out) as tmp:
        if out.suffix.lower() == ".csv":
            recs.to_csv(tmp, index=False)
        else:
            recs.to_parquet(tmp, index=False)
    print(f"{len(recs)} recommendations for {recs['user_id'].nunique()} users -> {out}")
    return 0


def _cmd_catalog(args: argparse.Namespace) -> int:
    """Items in and out of a bundle's catalog, in place (Recommender.add_items / remove_items)."""
    import numpy as np

    from recbase import datasets
    from recbase.recommend import Recommender

    if not (args.add or args.remove):
        raise ValueError("give --add ITEMS_FILE and/or --remove ID [ID ...]")
    rec = Recommender.load(args.bundle)
    domain = _bundle_domain(rec, args.domain)
    if args.remove:
        rec.remove_items(domain, args.remove)
    if args.add:
        csv = {} if str(args.add).lower().endswith((".parquet", ".pq")) else {"dtype": {"item_id": str},
                                                                              "keep_default_na": False}
        items = datasets._read_table(args.add, "add", **csv)
        if "item_id" not in items.columns:
            raise ValueError(f"--add: {args.add} has no item_id column (got {list(items.columns)})")
        if args.embeddings:
            emb = _load_embeddings(args.embeddings, len(items))
        else:
            text = rec.text_settings.get(domain)
            if not text:
                raise ValueError(f"--add: the {domain!r} catalog was tokenized from your own vectors (no text "
                                 "settings in the bundle): give the new items' vectors with --embeddings")
            from recbase.data import TextEncoder
            from recbase.data.text import render_items

            emb = TextEncoder(text["encoder"], device="cpu").encode(
                render_items(items, _template(text["domain"], text["fields"])))
        try:
            rec.add_items(domain, items["item_id"].astype(str).str.strip().tolist(), np.asarray(emb))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"--add: {exc}") from exc
    rec.save(args.bundle)
    live = int((~rec.removed[domain]).sum())
    print(f"{domain}: {len(rec.codes[domain])} items ({live} live) -> {args.bundle}")
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    """tokenizer + model folders -> one bundle folder (Recommender.save)."""
    tok, index = _catalog(Path(args.tokenizer))
    rec = _files_recommender(args, tok, index, args.domain)
    rec.save(args.output)
    n = len(rec.codes[args.domain])
    print(f"bundle of {n} {args.domain} items -> {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recbase", description="Generative zero-shot recommendation.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="show version, CUDA/Triton availability and threads")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("demo", help="the main job: movies in-domain, books zero-shot, with baselines")
    s.add_argument("--output", default="recbase-demo", help="folder for the table, config and logs")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-eval-users", type=int, default=None,
                   help="evaluated users per domain (seeded sample; 0 = all; default 2000)")
    s.add_argument("--time-budget", type=float, default=None, help="cap on pretraining seconds (default: none, the configured epochs run in full)")
    s.add_argument("--evaluate-on", default="test", choices=["test", "valid"],
                   help="score the held-out test items (default) or the validation items, to compare "
                        "settings without looking at the test items")
    s.add_argument("--also-unseen", nargs="*", default=[], choices=["ml-100k"],
                   help="more held-out catalogs read zero-shot like the books (ml-100k: a newer movie catalog, "
                        "tokenized on the demo's codebooks; adds about a minute)")
    s.add_argument("--quick", action="store_true", help="a small, fast variant (smoke test)")
    s.set_defaults(func=_cmd_demo)

    def common(s, need_model=False, need_inter=False, corpus=False):
        s.add_argument("--items", required=not (corpus or need_model),
                       help="CSV/Parquet with item_id + attributes")
        if need_inter:
            s.add_argument("--interactions", required=not corpus, help="CSV/Parquet: user_id, item_id[, timestamp]")
        if corpus:
            s.add_argument("--corpus", default=None,
                           help="a corpus TOML file (recbase.data.corpus): several domains instead of "
                                "--items/--interactions")
        s.add_argument("--domain", default="movies", help="domain name (built-in templates: movies, books)")
        s.add_argument("--device", default="cpu")
        s.add_argument("--seed", type=int, default=0)
        if need_model:
            s.add_argument("--tokenizer", default=None, help="folder written by `recbase tokenize`")
            s.add_argument("--model", default=None, help="folder written by `recbase pretrain` "
                                                         "(with --corpus: the run folder of `pretrain --corpus`)")
            s.add_argument("--bundle", default=None,
                           help="a recommender bundle (`recbase bundle`, Recommender.save) instead of "
                                "--tokenizer and --model")
            s.add_argument("--num-beams", type=int, default=20)
            s.add_argument("--unseen", action="store_true",
                           help="a domain the model never trained on: read it by concept content alone "
                                "(needs a model pretrained with --content-rotation-rate > 0)")
            s.add_argument("--unordered", action="store_true",
                           help="the histories have no meaningful order (no timestamps): the dense channel "
                                "reads each history as a set (recbase.recommend)")
            s.add_argument("--mode", default=None, choices=["generative", "dense", "hybrid"],
                           help="beam search, the dense head, or both fused (default: hybrid for a model "
                                "pretrained with --dense, else generative)")

    s = sub.add_parser("tokenize", help="item text -> embeddings -> unique concept IDs")
    common(s)
    s.add_argument("--fields", default=None, help="template fields, e.g. 'Title=title,Year=year'")
    s.add_argument("--encoder", default=None,
                   help="folder of a local HuggingFace text encoder (default: the packaged all-MiniLM-L6-v2)")
    s.add_argument("--embeddings", default=None,
                   help="a .npy array of your own item vectors (row i = item i of --items) instead of "
                        "encoding the item text")
    s.add_argument("--levels", type=int, default=3)
    s.add_argument("--codebook-size", type=int, default=256)
    s.add_argument("--dedup", choices=("extra_level", "reassign"), default="extra_level",
                   help="how items sharing a tuple get unique IDs: one more level numbering them "
                        "(IDs of levels + 1 tokens), or moving all but one to the nearest free "
                        "last-level code (IDs of levels tokens)")
    s.add_argument("--codebooks", default=None,
                   help="tokenizer folder whose codebooks to reuse (a new domain, zero-shot) instead of fitting")
    s.add_argument("--output", required=True)
    s.set_defaults(func=_cmd_tokenize)

    s = sub.add_parser("pretrain", help="pretrain a model on interaction sequences")
    common(s, need_inter=True, corpus=True)
    s.add_argument("--tokenizer", default=None, help="folder written by `recbase tokenize` (not with --corpus)")
    s.add_argument("--hold-out", nargs="*", default=[],
                   help="with --corpus: domains whose interactions are never trained on (tokenized from their "
                        "text only), to evaluate them zero-shot")
    s.add_argument("--levels", type=int, default=3, help="with --corpus: concept ID levels")
    s.add_argument("--codebook-size", type=int, default=256, help="with --corpus: codes per level")
    s.add_argument("--preset", default="small", choices=["tiny", "small", "base", "large"])
    s.add_argument("--max-items", type=int, default=20)
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--tokens-per-batch", type=int, default=None,
                   help="tokens per optimizer step (default: TrainConfig's, 16384); on a few CPU cores "
                        "smaller batches learn more per second (the demo uses 2048)")
    s.add_argument("--content-rotation-rate", type=float, default=0.0,
                   help="> 0: give concepts their codebook content and read this share of steps by content "
                        "alone, randomly rotated, so the model can go zero-shot (the demo uses 0.5)")
    s.add_argument("--shuffle-rate", type=float, default=0.0,
                   help="share of training windows read in a random item order, so the model also learns "
                        "histories whose order carries nothing (recbase.train.TrainConfig.shuffle_rate)")
    s.add_argument("--recent-pass-epochs", type=int, default=0,
                   help="then pass this often over each user's latest --max-items items, concepts read "
                        "normally, at lr 5e-4 (the demo uses 1; see recbase.train.recent_pass)")
    s.add_argument("--dense", action="store_true",
                   help="add the dense item channel (items also read through the tokenizer's embeddings.npy) "
                        "and choose the hybrid fusion weights on the validation items")
    s.add_argument("--tasks", default="sequential=1",
                   help="the task mixture, e.g. 'sequential=1,rating=1': that share of training windows is also "
                        "read with its items' ratings and trains rating prediction (needs a 'rating' column)")
    s.add_argument("--output", required=True)
    s.set_defaults(func=_cmd_pretrain)

    s = sub.add_parser("evaluate", help="leave-one-out next-item metrics")
    common(s, need_model=True, need_inter=True, corpus=True)
    s.add_argument("--zero-shot", action="store_true",
                   help="with --corpus: the domain was held out from pretraining; read it zero-shot")
    s.add_argument("--task", default="sequential", choices=["sequential", "direct", "rating"],
                   help="sequential: the next item over the whole catalog; direct: the held-out item among 99 "
                        "sampled items the user never interacted with (P5), next to the baselines; rating: the "
                        "last rated item's rating (RMSE / MAE) next to the global mean, biases and MF")
    s.add_argument("--num-negatives", type=int, default=99,
                   help="with --task direct: sampled negatives per user (P5: 99)")
    s.add_argument("--max-users", type=int, default=2000,
                   help="with --corpus or --task direct: evaluated users (seeded sample; 0 = all)")
    s.add_argument("--text-sasrec-epochs", type=int, default=0,
                   help="with --corpus: add the zero-shot text-sequence peer (TextSASRec), trained this many "
                        "epochs on the domains the model pretrained on (0 = no such row)")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("zeroshot", help="leave-one-domain-out: for each corpus domain, pretrain on the others "
                                        "and evaluate it zero-shot; one table and a plot")
    s.add_argument("--corpus", required=True, help="a corpus TOML file (recbase.data.corpus)")
    s.add_argument("--output", required=True, help="folder for zeroshot.md / .json / .png and the runs")
    s.add_argument("--device", default="cpu")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--preset", default="small", choices=["tiny", "small", "base", "large"])
    s.add_argument("--max-items", type=int, default=15)
    s.add_argument("--epochs", type=int, default=5)
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--tokens-per-batch", type=int, default=2048)
    s.add_argument("--content-rotation-rate", type=float, default=0.5)
    s.add_argument("--shuffle-rate", type=float, default=0.0, help="share of windows read in a random item order")
    s.add_argument("--recent-pass-epochs", type=int, default=1)
    s.add_argument("--no-dense", dest="dense", action="store_false", help="concept IDs only (no dense item channel)")
    s.add_argument("--hidden-size", type=int, default=128, help="model width (the demo's 128)")
    s.add_argument("--layers", type=int, default=2, help="decoder layers (the demo's 2)")
    s.add_argument("--levels", type=int, default=3)
    s.add_argument("--codebook-size", type=int, default=256)
    s.add_argument("--max-users", type=int, default=2000, help="evaluated users per domain (seeded; 0 = all)")
    s.add_argument("--text-sasrec-epochs", type=int, default=1,
                   help="the zero-shot text-sequence peer (TextSASRec) trained on the same other domains, "
                        "this many epochs (0 = no such row)")
    s.set_defaults(func=_cmd_zeroshot)

    s = sub.add_parser("recommend", help="top-k items for one history, or for a file of histories")
    common(s, need_model=True)
    s.add_argument("--history", nargs="+", default=None, help="item ids, oldest first")
    s.add_argument("--histories", default=None,
                   help="CSV/Parquet of interactions (user_id, item_id[, timestamp]): every user's history")
    s.add_argument("--output", default=None, help="with --histories: .parquet or .csv of (user_id, rank, item_id, score)")
    s.add_argument("-k", type=int, default=10)
    s.set_defaults(func=_cmd_recommend)

    s = sub.add_parser("bundle", help="tokenizer + model -> one recommender bundle folder (what serving loads)")
    s.add_argument("--tokenizer", required=True, help="folder written by `recbase tokenize`")
    s.add_argument("--model", required=True, help="folder written by `recbase pretrain`")
    s.add_argument("--domain", default="catalog", help="the catalog's name in the bundle")
    s.add_argument("--unseen", action="store_true", help="the model never trained on this catalog (read zero-shot)")
    s.add_argument("--unordered", action="store_true", help="its histories have no order (read as sets)")
    s.add_argument("--mode", default=None, choices=["generative", "dense", "hybrid"], help=argparse.SUPPRESS)
    s.add_argument("--device", default="cpu")
    s.add_argument("--output", required=True, help="the bundle folder")
    s.set_defaults(func=_cmd_bundle)

    s = sub.add_parser("catalog", help="add items (from their text) to, or remove items from, a bundle's catalog")
    s.add_argument("--bundle", required=True, help="the bundle folder (updated in place, atomically)")
    s.add_argument("--domain", default=None, help="which catalog (needed when the bundle has several)")
    s.add_argument("--add", default=None, help="CSV/Parquet of new items: item_id + the catalog's text fields")
    s.add_argument("--embeddings", default=None, help="with --add: a .npy of the new items' vectors instead of their text")
    s.add_argument("--remove", nargs="+", default=None, help="item ids to take out (never recommended again)")
    s.set_defaults(func=_cmd_catalog)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error is one line ``recbase CMD: error: ...`` on stderr and exit code 2
    (130 on Ctrl-C); ``--debug`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"recbase {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a tool reports, it does not dump a traceback
        if args.debug:
            raise
        expected = isinstance(exc, (ValueError, FileNotFoundError, FileExistsError))
        kind = "" if expected else f"{type(exc).__name__}: "
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, (ValueError, FileNotFoundError, FileExistsError)) and "\n" in str(exc).strip():
            msg = " ".join(line.strip() for line in str(exc).strip().splitlines())
        print(f"recbase {args.command}: error: {kind}{msg}" + ("" if expected else " (--debug shows the traceback)"),
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

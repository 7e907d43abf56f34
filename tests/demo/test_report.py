"""The multi-seed report: scenario configs, aggregation over seeds, markdown and plot."""
import numpy as np
import pandas as pd
import pytest

from fastfill_udfs.demo.report import aggregate, plot_report, report_markdown, scenario_config


def _tables():
    rng = np.random.default_rng(0)
    summary, curves, refs = [], [], []
    for scenario in ("new_classes", "bigger_model"):
        for seed in (0, 1, 2):
            for policy, auc in (("fct_random", 0.80), ("fastfill_benefit", 0.83)):
                summary.append({"scenario": scenario, "seed": seed, "policy": policy,
                                "mAP_auc": auc + 0.01 * seed, "mAP_mean": auc,
                                "top1_auc": 0.9, "top1_mean": 0.9, "mAP_t0": 0.78,
                                "reach_0.5pt": 0.2 if policy != "fct_random" else np.nan,
                                "closure": 0.0 if policy == "fct_random" else 0.9,
                                "top1_min_vs_fct_random": -0.001 * seed,
                                "top1_min_vs_fastfill_random": (np.nan if policy == "fct_random"
                                                                else 0.003 - 0.002 * seed)})
                for t in np.linspace(0, 1, 5):
                    curves.append({"scenario": scenario, "seed": seed, "policy": policy,
                                   "backfill_fraction": t, "mAP": auc + 0.02 * t + rng.random() * 1e-3,
                                   "top1": 0.9 + 0.01 * t})
            refs.append({"scenario": scenario, "seed": seed, "setting": "new/new", "mAP": 0.84,
                         "top1": 0.91})
    return pd.DataFrame(summary), pd.DataFrame(curves), pd.DataFrame(refs)


def test_aggregate_markdown_and_plot(tmp_path):
    summary, curves, refs = _tables()
    agg = aggregate(summary)
    row = agg[(agg.scenario == "new_classes") & (agg.policy == "fct_random")].iloc[0]
    assert row["mAP_auc_mean"] == pytest.approx(0.81)
    assert row["mAP_auc_std"] == pytest.approx(np.std([0.80, 0.81, 0.82]))
    assert row["n_seeds"] == 3 and row["top1_min_vs_fct_random_min"] == pytest.approx(-0.002)
    md = report_markdown(agg, refs, {"fastfill_benefit": "FastFill, benefit head"}, [0, 1, 2])
    assert "FastFill, benefit head" in md and "0.8100 ± 0.0082" in md
    assert "never (some seed)" in md                       # FCT-random never got there
    assert md.count("### ") == 2
    # worst point over the seeds against each random order; n/a where a reference is missing
    assert "lowest top-1 vs FastFill-random" in md and "-0.20 pt" in md and "-0.10 pt" in md
    assert "n/a" in md
    png = plot_report(curves, refs, tmp_path / "r.png", {})
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_scenario_configs():
    nc = scenario_config("new_classes", 2)
    assert nc.get_path("seed") == 2
    assert nc.get_path("demo.old_model.channels") == nc.get_path("demo.new_model.channels")
    assert nc.get_path("demo.new_model.epochs") == 8 and nc.get_path("demo.old_model.epochs") == 8
    bm = scenario_config("bigger_model", 0, ["evaluation.distance=cosine"])
    assert bm.get_path("demo.old_model.embedding_dim") == 64
    assert bm.get_path("demo.old_model.epochs") == 4 and bm.get_path("demo.new_model.epochs") == 8
    assert bm.get_path("evaluation.distance") == "cosine"
    # the report's h (wider and longer than the demo's), in both scenarios; --set still wins
    for cfg in (nc, bm):
        assert cfg.get_path("transformation.hidden_dim") == 1024
        assert cfg.get_path("transformation.epochs") == 40
    short = scenario_config("new_classes", 0, ["transformation.epochs=5"])
    assert short.get_path("transformation.epochs") == 5
    with pytest.raises(KeyError):
        scenario_config("smaller_model", 0)


def test_collect_keeps_each_study_and_reruns_only_changed_configs(tmp_path, monkeypatch):
    import fastfill_udfs.demo.study as study
    from fastfill_udfs.demo.report import collect

    runs = []

    def fake_study(cfg):               # the study itself is tested in tests/demo/test_study.py
        runs.append((cfg["seed"], cfg.get_path("backfill.batch_size")))
        summary, curves, refs = (df[(df.scenario == "new_classes") & (df.seed == 0)]
                                 .drop(columns=["scenario", "seed"]) for df in _tables())
        summary = summary.assign(mAP_auc=summary["mAP_auc"] + cfg["seed"])
        return study.StudyResult(None, refs, curves, summary)

    monkeypatch.setattr(study, "run_study", fake_study)
    cache = tmp_path / "studies"
    first = collect(["new_classes"], [0, 1], cache_dir=cache)
    assert len(runs) == 2 and sorted(first["summary"]["seed"].unique()) == [0, 1]
    again = collect(["new_classes"], [0, 1], cache_dir=cache)
    assert len(runs) == 2                                   # both reused
    pd.testing.assert_frame_equal(again["summary"], first["summary"])
    assert list(again["seconds"]["seconds"]) == list(first["seconds"]["seconds"])
    collect(["new_classes"], [1], ["backfill.batch_size=1000"], cache_dir=cache)
    assert runs[-1] == (1, 1000)                          # another setting: run again
    collect(["new_classes"], [0], cache_dir=cache, reuse=False)
    assert len(runs) == 4
    # a study whose tables were cut off while being written is run again, not half-read
    for kept_dir in cache.glob("new_classes_seed1_*"):   # both seed-1 configs; glob order varies
        (kept_dir / "seconds.json").unlink()
    collect(["new_classes"], [0, 1], cache_dir=cache)
    assert len(runs) == 5 and runs[-1][0] == 1
    # kept_only: report what is kept, run nothing
    kept = collect(["new_classes"], [0, 1, 7], cache_dir=cache, kept_only=True)
    assert len(runs) == 5 and sorted(kept["summary"]["seed"].unique()) == [0, 1]
    with pytest.raises(ValueError, match="no kept study"):
        collect(["bigger_model"], [0], cache_dir=cache, kept_only=True)


def test_markdown_names_the_seeds_of_each_scenario():
    summary, _, refs = _tables()
    md = report_markdown(aggregate(summary), refs, {}, {"new_classes": [0, 1, 2],
                                                        "bigger_model": [0]})
    assert "Seeds 0, 1, 2." in md and "Seeds 0." in md
    assert "Seeds 0, 1, 2:" not in md and "(seeds" not in md

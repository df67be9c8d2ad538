"""Compare training runs: one subplot per metric, x = epoch (or reward queries), one colour per label.

    python -m prdp_ds.plot RUN_DIR [LABEL=RUN_DIR ...] [--out comparison.png] [--metrics reward_mean,loss] [--x queries]

Each positional argument is a run directory holding metrics.jsonl, optionally prefixed ``LABEL=`` (without
one, the directory name plus ``algo.name`` from its config.yaml). Bands are mean ± standard error: runs under
one label (seeds of one config) give, per epoch, the mean over the runs with a finite value there ± std
across them (ddof=1) / sqrt(n_runs), no band below 2 runs; a single run gives its value ± ``<key>_std /
sqrt(num_images)`` when it logs ``<key>_std`` (reward_std for reward_mean). NaN values (skipped steps) are
dropped; a repeated epoch (a resume) keeps its last record. ``--x queries`` puts the reward queries made up to
the end of each epoch on the x axis (the running sum of num_images: the paper's sample-efficiency axis); runs
under one label must agree on it. Default panels and options: docs/evaluate.md.

Library use: ``read_metrics(run_dir)``, ``aggregate(records_per_run, key)``, ``plot_runs(runs, out)``.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

BASE_METRICS = ("loss", "clip_frac", "kl", "grad_norm")


class PlotError(ValueError):
    """A run directory or metrics file that cannot be plotted."""


def read_metrics(run_dir):
    """{epoch: record} from RUN_DIR/metrics.jsonl, sorted by epoch; the last record of an epoch wins."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir}: no metrics.jsonl (expected {path})")
    records = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[int(record["epoch"])] = record
        except (ValueError, KeyError, TypeError) as err:
            raise PlotError(f"{path}:{lineno}: malformed metrics line ({err!r})") from None
    return dict(sorted(records.items()))


def default_label(run_dir):
    """Directory name, plus the algorithm from config.yaml when it names one."""
    run_dir = Path(run_dir)
    try:
        algo = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("algo", {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        algo = None
    name = run_dir.resolve().name
    return f"{name} ({algo})" if algo else name


def _value(record, key):
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _single(records, key):
    std_key = "reward_std" if key == "reward_mean" else f"{key}_std"
    rows = []
    for epoch, record in records.items():
        value = _value(record, key)
        if value is None:
            continue
        std, n = _value(record, std_key), _value(record, "num_images")
        se = std / math.sqrt(max(n, 1)) if std is not None and n is not None else math.nan
        rows.append((epoch, value, se))
    return rows


def _across(runs, key):
    by_epoch = {}
    for records in runs:
        for epoch, record in records.items():
            value = _value(record, key)
            if value is not None:
                by_epoch.setdefault(epoch, []).append(value)
    rows = []
    for epoch in sorted(by_epoch):
        values = np.array(by_epoch[epoch])
        se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else math.nan
        rows.append((epoch, float(values.mean()), float(se)))
    return rows


def aggregate(runs, key):
    """(epochs, mean, se) arrays of `key` for one label; `runs` is a list of read_metrics() results.
    One run: its own values and within-run SE; several: mean across runs ± SE across runs
    (see the module docstring). Epochs with no finite value are omitted; a missing SE is NaN."""
    rows = _single(runs[0], key) if len(runs) == 1 else _across(runs, key)
    epochs, mean, se = (np.array(col, dtype=float) for col in zip(*rows)) if rows else (np.array([]),) * 3
    return epochs, mean, se


def reward_queries(runs):
    """{epoch: reward queries made up to the end of that epoch} of one label's runs (the running sum of
    num_images); raises PlotError when the runs disagree (different batch sizes) or one does not log it."""
    tables = []
    for records in runs:
        total, table = 0, {}
        for epoch, record in records.items():
            n = _value(record, "num_images")
            if n is None:
                raise PlotError(f"epoch {epoch}: no num_images logged, so no reward-query axis")
            total += int(n)
            table[epoch] = total
        tables.append(table)
    for table in tables[1:]:
        if any(table.get(e, q) != q for e, q in tables[0].items()):
            raise PlotError("runs under one label differ in reward queries per epoch; plot them under separate labels")
    return {e: q for table in reversed(tables) for e, q in table.items()}


def default_metrics(all_records):
    keys = {key for records in all_records for record in records.values() for key in record if not key.endswith("_std")}
    components = sorted(key for key in keys if key.startswith("reward/"))
    grid = sorted(key for key in keys if key.startswith("eval/"))
    return ["reward_mean", *components, *grid, *BASE_METRICS]


def plot_runs(runs, out_path, metrics=None, x="epoch"):
    """Plot {label: [run_dir, ...]} to out_path (PNG) and return it as a Path. `metrics` defaults to
    default_metrics(); metrics without data in any run get no panel; x is "epoch" or "queries" (reward
    queries, see reward_queries). Raises PlotError."""
    if x not in ("epoch", "queries"):
        raise PlotError(f"x: expected 'epoch' or 'queries', got {x!r}")
    loaded = {label: [read_metrics(d) for d in dirs] for label, dirs in runs.items()}
    queries = {label: reward_queries(records) for label, records in loaded.items()} if x == "queries" else None
    metrics = metrics or default_metrics([r for records in loaded.values() for r in records])
    series = {key: {label: aggregate(records, key) for label, records in loaded.items()} for key in metrics}
    series = {
        key: per_label for key, per_label in series.items() if any(len(epochs) for epochs, _, _ in per_label.values())
    }
    if not series:
        raise PlotError(f"none of the metrics {', '.join(metrics)} has data in any run")
    ncols = min(3, len(series))
    nrows = math.ceil(len(series) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.5 * nrows), squeeze=False)
    for ax, (key, per_label) in zip(axes.flat, series.items()):
        for i, (label, (epochs, mean, se)) in enumerate(per_label.items()):
            if queries is not None:
                epochs = np.array([queries[label][int(e)] for e in epochs], dtype=float)
            if len(epochs):
                ax.plot(epochs, mean, color=f"C{i % 10}", marker="o", ms=3, label=label)
                ax.fill_between(epochs, mean - se, mean + se, color=f"C{i % 10}", alpha=0.25, linewidth=0)
        ax.set_title(key)
        ax.set_xlabel("epoch" if x == "epoch" else "reward queries")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(series) :]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=f"C{i % 10}", marker="o", ms=3) for i in range(len(loaded))]
    names = [f"{label} (n={len(records)} runs)" if len(records) > 1 else label for label, records in loaded.items()]
    fig.legend(handles, names, loc="upper center", ncol=min(len(loaded), 4), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.5 * nrows)))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def parse_runs(args):
    """Positional arguments ("DIR" or "LABEL=DIR") -> {label: [dirs]}, in first-seen order."""
    runs = {}
    for arg in args:
        label, sep, run_dir = arg.partition("=")
        if not sep or Path(arg).is_dir():
            label, run_dir = default_label(arg), arg
        runs.setdefault(label, []).append(run_dir)
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m prdp_ds.plot", description=__doc__.split("\n")[0])
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="[LABEL=]RUN_DIR",
        help="run directory with metrics.jsonl; runs sharing a LABEL are aggregated",
    )
    parser.add_argument("--out", default="comparison.png", help="figure path (default: ./comparison.png)")
    parser.add_argument("--metrics", help="comma-separated keys (default: rewards, loss, clip_frac, kl, grad_norm)")
    parser.add_argument("--x", choices=("epoch", "queries"), default="epoch", help="x axis: epoch or reward queries")
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        path = plot_runs(parse_runs(args.runs), args.out, metrics, args.x)
    except PlotError as err:
        sys.exit(f"prdp_ds.plot: error: {err}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

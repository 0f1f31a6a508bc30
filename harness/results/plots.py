"""The sweep report's figures (matplotlib, no display needed).

Each function takes the trial records and summary rows of harness/results/report.py and
writes one PNG; nothing here reads MLflow or computes a metric.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def draw_all(trials, rows, directory: Path, target_label: str = "target") -> list[Path]:
    return [accuracy_and_gap(rows, directory / "accuracy_gap_vs_batch.png"),
            loss_curves(trials, directory / "loss_curves_epochs.png", against="epoch"),
            loss_curves(trials, directory / "loss_curves_steps.png", against="steps"),
            steps_to_target(trials, rows, directory / "steps_to_target.png", target_label)]


def _by_rule(rows):
    grouped = defaultdict(list)
    for row in rows:
        grouped[row.lr_rule].append(row)
    return grouped


def accuracy_and_gap(rows, path: Path) -> Path:
    fig, (acc_ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for rule, members in _by_rule(rows).items():
        batch = [r.batch_size for r in members]
        for ax, column in ((acc_ax, "test_accuracy"), (gap_ax, "gap_accuracy")):
            mean = [r.stats[column][0] for r in members]
            std = [r.stats[column][1] for r in members]
            ax.errorbar(batch, mean, yerr=std, marker="o", capsize=3, label=f"lr rule: {rule}")
    acc_ax.set(title="Final test accuracy", ylabel="test accuracy")
    gap_ax.set(title="Generalisation gap", ylabel="train accuracy − test accuracy")
    for ax in (acc_ax, gap_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch size")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(trials, path: Path, against: str) -> Path:
    """Training and test loss per batch size (mean over seeds), one panel per LR rule."""
    rules = sorted({t.lr_rule for t in trials})
    fig, axes = plt.subplots(1, len(rules), figsize=(6 * len(rules), 4.2), squeeze=False)
    cmap = plt.get_cmap("viridis")
    sizes = sorted({t.batch_size for t in trials})
    for ax, rule in zip(axes[0], rules):
        for i, batch_size in enumerate(sizes):
            members = [t for t in trials if t.lr_rule == rule and t.batch_size == batch_size and not t.diverged]
            curves = [_curve(t, "train_loss", against) for t in members]
            curves = [c for c in curves if c]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            xs = [curves[0][k][0] for k in range(length)]
            ys = [statistics.fmean(c[k][1] for c in curves) for k in range(length)]
            colour = cmap(i / max(1, len(sizes) - 1))
            ax.plot(xs, ys, color=colour, label=f"B={batch_size} train")
            test_curves = [c for c in (_curve(t, "test_loss", against) for t in members) if c]
            if test_curves:
                test_len = min(len(c) for c in test_curves)
                ax.plot([test_curves[0][k][0] for k in range(test_len)],
                        [statistics.fmean(c[k][1] for c in test_curves) for k in range(test_len)],
                        color=colour, linestyle="--")
        ax.set(title=f"Loss (solid: train, dashed: test), lr rule {rule}", ylabel="cross-entropy",
               xlabel="epoch" if against == "epoch" else "optimizer steps")
        if against == "steps":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curve(trial, key: str, against: str) -> list[tuple[float, float]]:
    values = trial.history.get(key, [])
    if against == "epoch":
        return [(float(step), value) for step, value in values]
    steps = dict(trial.history.get("global_step", []))
    return [(steps[step], value) for step, value in values if step in steps]


def steps_to_target(trials, rows, path: Path, target_label: str) -> Path:
    """Steps-to-target vs batch size (log-log), the ideal linear-scaling line, and the measured noise scale."""
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for rule, members in _by_rule(rows).items():
        reached = [r for r in members if not math.isnan(r.stats["steps_to_target"][0])]
        if not reached:
            continue
        batch = [r.batch_size for r in reached]
        mean = [r.stats["steps_to_target"][0] for r in reached]
        std = [r.stats["steps_to_target"][1] for r in reached]
        ax.errorbar(batch, mean, yerr=std, marker="o", capsize=3, label=f"measured, lr rule {rule}")
        # Perfect scaling: doubling the batch halves the steps (from the smallest batch).
        ideal = [mean[0] * batch[0] / b for b in batch]
        ax.plot(batch, ideal, linestyle=":", color="grey", label="ideal linear scaling" if rule == min(_by_rule(rows)) else None)
    noise_scales = [t.final["grad_noise_scale"] for t in trials if "grad_noise_scale" in t.final and not t.diverged
                    and math.isfinite(t.final["grad_noise_scale"])]
    if noise_scales:
        measured = statistics.median(noise_scales)
        ax.axvline(measured, color="crimson", linestyle="--", label=f"noise scale B_simple ≈ {measured:.0f} (median)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(title=f"Steps to reach {target_label}", xlabel="global batch size", ylabel="optimizer steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

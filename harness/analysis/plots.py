"""The report's figures (matplotlib, no display needed).

Each function takes what harness/analysis computed and writes one PNG; nothing here reads
MLflow or computes a metric beyond evaluating a fitted curve.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (harness/analysis/critical.CriticalBatch attribute, line style, name) of the noise scales read near B_crit.
NOISE_SCALES = (("noise_scale", "-.", "B_simple (probe)"), ("noise_scale_exact", (0, (1, 1)), "B_simple (exact)"),
                ("noise_scale_hessian", (0, (5, 1, 1, 1)), "B_noise"))


def draw_all(trials, rows, directory: Path, target_label: str = "target") -> list[Path]:
    return [accuracy_and_gap(rows, directory / "accuracy_gap_vs_batch.png"),
            loss_curves(trials, directory / "loss_curves_epochs.png", against="epoch"),
            loss_curves(trials, directory / "loss_curves_steps.png", against="steps"),
            steps_to_target(trials, rows, directory / "steps_to_target.png", target_label)]


def _by_rule(rows) -> dict[str, list]:
    return {rule: [r for r in rows if r.lr_rule == rule] for rule in dict.fromkeys(r.lr_rule for r in rows)}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finish(fig, path: Path, *axes, notes: list[str] = (), fontsize=7) -> Path:
    """Grid and legend on ``axes``, ``notes`` on the first, then save."""
    if notes:  # say on the figure why a curve is missing, not only in the table
        axes[0].text(0.02, 0.02, "\n".join(notes), transform=axes[0].transAxes, fontsize=7, va="bottom", wrap=True)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:  # e.g. a sweep without a target has nothing to plot
            ax.legend(fontsize=fontsize)
    return _save(fig, path)


def _errorbar(ax, rows, column: str, label: str) -> None:
    """``column``'s mean ± std over seeds against batch size."""
    ax.errorbar([r.batch_size for r in rows], [r.stats[column][0] for r in rows],
                yerr=[r.stats[column][1] for r in rows], marker="o", capsize=3, label=label)


def accuracy_and_gap(rows, path: Path) -> Path:
    fig, (acc_ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for rule, members in _by_rule(rows).items():
        for ax, column in ((acc_ax, "test_accuracy"), (gap_ax, "gap_accuracy")):
            _errorbar(ax, members, column, f"lr rule: {rule}")
    acc_ax.set(title="Final test accuracy", ylabel="test accuracy")
    gap_ax.set(title="Generalisation gap", ylabel="train accuracy − test accuracy")
    for ax in (acc_ax, gap_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch size")
    return _finish(fig, path, acc_ax, gap_ax, fontsize=None)


def loss_curves(trials, path: Path, against: str) -> Path:
    """Training and test loss per batch size (mean over seeds), one panel per LR rule."""
    rules = sorted({t.lr_rule for t in trials})
    fig, axes = plt.subplots(1, len(rules), figsize=(6 * len(rules), 4.2), squeeze=False)
    cmap = plt.get_cmap("viridis")
    sizes = sorted({t.batch_size for t in trials})
    for ax, rule in zip(axes[0], rules):
        for i, batch_size in enumerate(sizes):
            members = [t for t in trials if t.lr_rule == rule and t.batch_size == batch_size and not t.diverged]
            train, test = (_mean_curve(members, key, against) for key in ("train_loss", "test_loss"))
            if not train:
                continue
            colour = cmap(i / max(1, len(sizes) - 1))
            ax.plot(*train, color=colour, label=f"B={batch_size} train")
            if test:
                ax.plot(*test, color=colour, linestyle="--")
        ax.set(title=f"Loss (solid: train, dashed: test), lr rule {rule}", ylabel="cross-entropy",
               xlabel="epoch" if against == "epoch" else "optimizer steps")
        if against == "steps":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # every trial of the rule diverged: no curve to name
            ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _mean_curve(trials, key: str, against: str):
    """(x, mean over the trials of ``key``) up to the shortest trial's end; None where no trial logged it."""
    curves = [c for c in (_curve(t, key, against) for t in trials) if c]
    if not curves:
        return None
    length = min(len(c) for c in curves)
    return [x for x, _ in curves[0][:length]], [statistics.fmean(c[k][1] for c in curves) for k in range(length)]


def _curve(trial, key: str, against: str) -> list[tuple[float, float]]:
    values = trial.history.get(key, [])
    if against == "epoch":
        return [(float(step), value) for step, value in values]
    steps = dict(trial.history.get("global_step", []))
    return [(steps[step], value) for step, value in values if step in steps]


def steps_to_target(trials, rows, path: Path, target_label: str) -> Path:
    """Steps-to-target vs batch size (log-log), the ideal linear-scaling line, and the measured noise scale."""
    fig, ax = plt.subplots(figsize=(7, 4.8))
    groups = _by_rule(rows)
    for rule, members in groups.items():
        reached = [r for r in members if not math.isnan(r.stats["steps_to_target"][0])]
        if not reached:
            continue
        _errorbar(ax, reached, "steps_to_target", f"measured, lr rule {rule}")
        # Perfect scaling: doubling the batch halves the steps (from the smallest batch).
        batch, first = [r.batch_size for r in reached], reached[0].stats["steps_to_target"][0] * reached[0].batch_size
        ax.plot(batch, [first / b for b in batch], linestyle=":", color="grey",
                label="ideal linear scaling" if rule == min(groups) else None)
    noise_scales = [t.final["grad_noise_scale"] for t in trials if "grad_noise_scale" in t.final and not t.diverged
                    and math.isfinite(t.final["grad_noise_scale"])]
    if noise_scales:
        measured = statistics.median(noise_scales)
        ax.axvline(measured, color="crimson", linestyle="--", label=f"noise scale B_simple ≈ {measured:.0f} (median)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(title=f"Steps to reach {target_label}", xlabel="global batch size", ylabel="optimizer steps")
    return _finish(fig, path, ax, fontsize=8)


def draw_critical(results, directory: Path, target_label: str = "target") -> list[Path]:
    """The trade-off of the LR tuned per batch size (McCandlish et al. 2018, Fig. 1 and 7)."""
    return [tuned_vs_batch(results, directory / "tuned_steps_vs_batch.png", "steps", target_label),
            tuned_vs_batch(results, directory / "tuned_samples_vs_batch.png", "samples", target_label),
            pareto_front(results, directory / "pareto_front.png", target_label)]


def _tuned_points(result, key: str):
    """(batch sizes, medians, lower, upper errors) over the best LR's seeds, reached batch sizes only."""
    points = [(t.batch_size, statistics.median(t.values(key)), t.values(key)) for t in result.tuned if t.values(key)]
    return ([b for b, _, _ in points], [m for _, m, _ in points], [m - min(v) for _, m, v in points],
            [max(v) - m for _, m, v in points])


def _dense(batch: list[int]) -> list[float]:
    lo, hi = math.log(min(batch) / 2), math.log(max(batch) * 2)
    return [math.exp(lo + (hi - lo) * k / 99) for k in range(100)]


def tuned_vs_batch(results, path: Path, quantity: str, target_label: str) -> Path:
    """Steps (or samples) to target at the tuned LR vs batch size, log-log: median and range over seeds, the
    fitted S(B) = S_min + E_min/B (E = B S), perfect scaling, B_crit with its interval and B_simple."""
    steps = quantity == "steps"
    fig, ax = plt.subplots(figsize=(7.5, 5))
    notes = []
    for i, result in enumerate(results):
        colour = f"C{i}"
        batch, median, low, high = _tuned_points(result, "steps_to_target" if steps else "samples_to_target")
        if not batch:
            notes.append(f"lr rule {result.lr_rule}: no batch size reached the target")
            continue
        ax.errorbar(batch, median, yerr=[low, high], marker="o", capsize=3, color=colour,
                    linestyle="none", label=f"tuned LR, lr rule {result.lr_rule} (median, range over seeds)")
        fit = result.fit
        if fit is None:
            notes.append(result.why_no_fit)
            continue
        xs = _dense(batch)
        ax.plot(xs, [fit.steps_at(b) * (1 if steps else b) for b in xs], color=colour,
                label=f"{fit.method}: S_min={fit.s_min:.0f}, E_min={fit.e_min:.0f}")
        if result.least_squares:
            other = result.least_squares
            ax.plot(xs, [other.steps_at(b) * (1 if steps else b) for b in xs], color=colour, linestyle="-.",
                    linewidth=1, label=f"{other.method}: B_crit={other.b_crit:.0f}")
        ax.plot(xs, [fit.e_min / b if steps else fit.e_min for b in xs], color=colour, linestyle=":",
                label="perfect scaling" + (" S = E_min/B" if steps else " E = E_min"))
        _vertical_lines(ax, result, colour)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(title=f"{quantity.capitalize()} to reach {target_label}, LR tuned per batch size",
           xlabel="global batch size",
           ylabel="optimizer steps to target" if steps else "training samples to target")
    return _finish(fig, path, ax, notes=notes)


def _vertical_lines(ax, result, colour) -> None:
    fit = result.fit
    ax.axvline(fit.b_crit, color=colour, linestyle="--", label=f"B_crit ({fit.method}) = {fit.b_crit:.0f}")
    if math.isfinite(result.low) and math.isfinite(result.high):
        ax.axvspan(max(result.low, 1e-9), result.high, color=colour, alpha=0.1, label="B_crit interval")
    for attribute, style, name in NOISE_SCALES:
        value = getattr(result, attribute)
        if math.isfinite(value) and value > 0:
            ax.axvline(value, color="crimson", linestyle=style, label=f"{name} = {value:.0f}")


def pareto_front(results, path: Path, target_label: str) -> Path:
    """Samples vs steps to target at the tuned LR (each point a batch size), with the fitted front
    (S/S_min - 1)(E/E_min - 1) = 1."""
    fig, ax = plt.subplots(figsize=(7, 5))
    notes = []
    for i, result in enumerate(results):
        colour = f"C{i}"
        batch, steps, _, _ = _tuned_points(result, "steps_to_target")
        samples_by_batch = dict(zip(*_tuned_points(result, "samples_to_target")[:2]))
        points = [(s, samples_by_batch[b], b) for b, s in zip(batch, steps) if b in samples_by_batch]
        if not points:
            notes.append(f"lr rule {result.lr_rule}: no batch size reached the target")
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", linestyle="none", color=colour,
                label=f"tuned LR, lr rule {result.lr_rule}")
        for s, e, b in points:
            ax.annotate(f"B={b}", (s, e), textcoords="offset points", xytext=(4, 4), fontsize=7)
        fit = result.fit
        if fit is None:
            notes.append(result.why_no_fit)
            continue
        xs = _dense(batch)
        ax.plot([fit.steps_at(b) for b in xs], [b * fit.steps_at(b) for b in xs], color=colour,
                label=f"fit: S_min={fit.s_min:.0f}, E_min={fit.e_min:.0f}, B_crit={fit.b_crit:.0f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(title=f"Pareto front to reach {target_label}", xlabel="optimizer steps", ylabel="training samples")
    return _finish(fig, path, ax, notes=notes)


def critical_vs_target(results, path: Path) -> Path:
    """B_crit (relative-error fit, with its bootstrap interval) and the noise scales read near it, against the
    held-out accuracy target (log y): McCandlish et al. 2018 expect B_crit to grow as the target gets harder."""
    fig, ax = plt.subplots(figsize=(7, 4.8))
    notes = []
    for i, rule in enumerate(dict.fromkeys(r.lr_rule for r in results)):
        mine = [r for r in results if r.lr_rule == rule and r.target is not None]
        fitted = [r for r in mine if r.fit]
        notes += [f"lr rule {rule}, target {r.target:g}: no valid fit" for r in mine if not r.fit]
        if fitted:
            targets, b_crit = [r.target for r in fitted], [r.fit.b_crit for r in fitted]
            # A percentile interval need not hold the point estimate: a bar of negative length draws nothing.
            below = [max(b - r.low, 0) if math.isfinite(r.low) else 0 for b, r in zip(b_crit, fitted)]
            above = [max(r.high - b, 0) if math.isfinite(r.high) else 0 for b, r in zip(b_crit, fitted)]
            ax.errorbar(targets, b_crit, yerr=[below, above], marker="o", capsize=3, color=f"C{i}",
                        label=f"B_crit ({fitted[0].fit.method}), lr rule {rule}")
        for (attribute, style, name), marker in zip(NOISE_SCALES, "sv^"):
            points = [(r.target, getattr(r, attribute)) for r in mine]
            points = [(t, v) for t, v in points if math.isfinite(v) and v > 0]
            if points:
                ax.plot(*zip(*points), marker=marker, linestyle=style, color=f"C{i}", alpha=0.7,
                        label=f"{name}, lr rule {rule}")
    ax.set_yscale("log")
    ax.set(title="Critical batch size against the target", xlabel="held-out accuracy target", ylabel="batch size")
    return _finish(fig, path, ax, notes=notes)


def sharpness_trajectories(curves, path: Path, title: str) -> Path:
    """λ_max against optimizer steps, one colour per group, with each group's stability limit dashed.
    ``curves``: (group label, [(step, λ_max)], limit or None), one per trial. A symlog axis: step 0 is
    a reading too, and the batch sizes' step counts differ by orders of magnitude."""
    fig, ax = plt.subplots(figsize=(8, 5))
    groups = list(dict.fromkeys(label for label, _, _ in curves))
    cmap = plt.get_cmap("viridis")
    notes = []
    for i, group in enumerate(groups):
        colour = cmap(i / max(1, len(groups) - 1))
        drawn = [sorted(points) for label, points, _ in curves if label == group and points]
        for k, points in enumerate(drawn):
            ax.plot(*zip(*points), marker=".", color=colour, alpha=0.85, label=None if k else group)
        for limit in sorted({limit for label, _, limit in curves if label == group and limit is not None}):
            ax.axhline(limit, color=colour, linestyle="--", linewidth=1)
        if not drawn:
            notes.append(f"{group}: no sharpness readings logged")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(left=0)
    ax.set_yscale("log")
    ax.set(title=title, xlabel="optimizer steps", ylabel="top Hessian eigenvalue λ_max")
    return _finish(fig, path, ax, notes=notes)


def interpolation(rows: list[dict[str, float]], path: Path, label_a: str, label_b: str) -> Path:
    """Keskar et al. (2017)'s figure: loss and accuracy along θ(α) = (1 − α)·θ_a + α·θ_b, train and test,
    with α = 0 and α = 1 (the two solutions) marked. ``rows``: harness/analysis/interpolation.py's."""
    # A user's label is text, not mathtext: an unpaired "$" would stop the figure from rendering.
    label_a, label_b = (label.replace("$", r"\$") for label in (label_a, label_b))
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    alphas = [row["alpha"] for row in rows]
    for ax, quantity in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        for split, style in (("train", "-"), ("test", "--")):
            ax.plot(alphas, [row[f"{split}_{quantity}"] for row in rows], linestyle=style, marker=".",
                    label=f"{split} {quantity}")
        for alpha in (0.0, 1.0):
            ax.axvline(alpha, color="grey", linestyle=":", linewidth=1)
        # The two solutions' names on a top axis, where no curve runs through them.
        ax.secondary_xaxis("top").set_xticks([0.0, 1.0], [label_a, label_b], fontsize=8)
        ax.set_xlabel(f"α   (0: {label_a}, 1: {label_b})")
    # Cross-entropy far from both solutions can grow by orders of magnitude: then a log axis keeps the basin
    # readable (a loss that stays within a factor of 10 reads better on a linear one).
    losses = [row[f"{split}_loss"] for row in rows for split in ("train", "test")
              if math.isfinite(row[f"{split}_loss"]) and row[f"{split}_loss"] > 0]
    if losses and max(losses) > 10 * min(losses):
        loss_ax.set_yscale("log")
    loss_ax.set(title="Loss along the line between the two solutions", ylabel="cross-entropy")
    acc_ax.set(title="Accuracy along the same line", ylabel="accuracy")
    return _finish(fig, path, loss_ax, acc_ax, fontsize=8)


def json_and_figure(result: dict, directory: Path, stem: str, draw) -> list[Path]:
    """A measuring command's result as ``<stem>.json`` and its figure ``draw(result, path)`` as ``<stem>.png`` in
    ``directory``: the files its MLflow run carries."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    files = [directory / f"{stem}.json", directory / f"{stem}.png"]
    files[0].write_text(json.dumps(result, indent=2))
    draw(result, files[1])
    return files


def capacity(result: dict, path: Path) -> Path:
    """``harness capacity``'s figure, log-log: time per step and time per sample against the batch size,
    with the end of the flat range and the largest measured batch marked. ``result``: bench/capacity.py's."""
    points = result["points"]
    batches = [p["batch_size"] for p in points]
    fig, (step_ax, sample_ax) = plt.subplots(1, 2, figsize=(11, 4))
    step_ax.plot(batches, [p["step_s"] * 1e3 for p in points], marker="o", label="time per step")
    sample_ax.plot(batches, [p["sample_s"] * 1e6 for p in points], marker="o", color="C1", label="time per sample")
    for ax in (step_ax, sample_ax):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axvline(result["flat_until_batch"], color="green", linestyle="--", linewidth=1,
                   label=f"flat until {result['flat_until_batch']} (≤ {result['flat_factor']:g}x batch 1)")
        ax.axvline(result["largest_batch"], color="red", linestyle=":", linewidth=1,
                   label=f"largest {result['largest_batch']} ({result['cap_reason'][:40]})")
        ax.set_xlabel("batch size")
    step_ax.set(title=f"Time per step, {result['device_name'][:40]}", ylabel="ms per step")
    sample_ax.set(title="Time per sample", ylabel="µs per sample")
    return _finish(fig, path, step_ax, sample_ax, fontsize=8)


def batch_size_answer(result: dict, path: Path) -> Path:
    """``harness batch-size``'s figure: per target, predicted steps against the batch size (log-log, S_min and
    B_crit marked, the measured run's point), and predicted time to the target where time per step was
    measured. ``result``: bench/batch_size.py's."""
    fig, (steps_ax, wall_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for k, answer in enumerate(result["answers"]):
        rows = answer["rows"]
        label = f"to {answer['target']:g}" if answer["target"] is not None else f"to step {answer['measured_steps']}"
        batches = [r["batch_size"] for r in rows]
        steps_ax.plot(batches, [r["steps"] for r in rows], marker="o", color=f"C{k}", label=f"predicted {label}")
        steps_ax.axhline(answer["s_min"], color=f"C{k}", linestyle=":", linewidth=1)
        steps_ax.axvline(answer["b_crit"], color=f"C{k}", linestyle="--", linewidth=1,
                         label=f"B_crit ~ {answer['b_crit']:.0f}")
        steps_ax.plot([result["batch"]], [answer["measured_steps"]], marker="*", markersize=12, color=f"C{k}",
                      linestyle="none", label=f"measured at batch {result['batch']}")
        timed = [r for r in rows if r["wall_s"] is not None]
        if timed:
            wall_ax.plot([r["batch_size"] for r in timed], [r["wall_s"] for r in timed], marker="o", color=f"C{k}",
                         label=label)
    for ax in (steps_ax, wall_ax):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
    steps_ax.set(title="Predicted steps to target (S_min dotted)", ylabel="steps")
    wall_ax.set(title=f"Predicted time to target, {result['device']}", ylabel="seconds (steps x time per step)")
    return _finish(fig, path, steps_ax, wall_ax, fontsize=7)

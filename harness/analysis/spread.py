"""Mean ± standard deviation over seeds, as every report table computes and prints it, and the CSV files.

Non-finite values are left out; no value at all gives NaN, printed as "-".
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of the finite values; std 0 for one value, NaNs for none."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(mean: float, std: float, digits: int) -> str:
    """``0.8576 ± 0.0036``, or ``-`` where there was nothing to average."""
    return "-" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_rows(path: Path, header: list[str], rows) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path

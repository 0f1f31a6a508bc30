"""``harness scaling``: when data parallelism pays, on paper (a cost model of one synchronous SGD step).

The alpha-beta model of collectives (Thakur, Rabenseifner and Gropp 2005; Patarasuk and Yuan 2009 for
the ring's bandwidth term): at a global batch ``B`` over ``W`` ranks, ``step(B, W) = compute(B / W) +
all_reduce(W, n)``, where

- ``compute(b)`` is the measured time of a step at batch ``b`` on one device (a ``harness capacity``
  result, or step times given by hand), interpolated log-log, never extrapolated;
- ``all_reduce(W, n)`` of ``n`` gradient bytes over a link of bandwidth ``beta`` and per-message latency
  ``alpha`` is ``2 (W - 1) alpha + 2 (W - 1) / W * n / beta`` on a ring; a tree pays ``2 log2(W) alpha``
  with the ring's bandwidth term (an approximation of NCCL's pipelined double binary trees);
- nothing overlaps, as in DDP when the whole gradient fits one bucket; ``step_overlap_s`` is the bound
  ``max(compute, all_reduce)`` that overlap could reach.

W independent trials (one per device) train W x the one-device samples/s, so data parallelism's
throughput is ``efficiency`` (speedup / W) x theirs: below the floor (0.5) it "stops paying". The named
links' numbers are assumptions (``NAMED_LINKS`` says where each comes from); scaling_check.py checks the
model against real processes on this machine.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from harness.errors import InputError

EFFICIENCY_FLOOR = 0.5
GRADIENT_ELEMENT_BYTES = 4  # fp32 gradients: the parameters stay fp32 under bf16 autocast (core/precision.py)


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth_bytes_s: float  # beta: achieved bandwidth per direction
    latency_s: float  # alpha: per message (one ring step, one tree level)
    source: str


NAMED_LINKS = {
    "nvlink": Link("nvlink", 300e9, 5e-6,
                   "assumption: NVLink 4 (H100/H200) is 450 GB/s per direction per GPU; NCCL's all-reduce reaches "
                   "less, so 300 GB/s; ~10 us for a small 2-GPU all-reduce in nccl-tests (NVIDIA/nccl issues 583, "
                   "1259), i.e. ~5 us per ring step"),
    "ethernet-100g": Link("ethernet-100g", 12.5e9, 30e-6,
                          "assumption: 100 Gb/s line rate = 12.5 GB/s (TCP achieves a little less); 20-50 us per "
                          "message through the kernel's TCP stack, so 30 us (RDMA/RoCE would be ~2-5 us)"),
}


def parameter_count(layer_sizes: list[int] | tuple[int, ...]) -> int:
    """The MLP's parameters (core/model.py: a Linear with bias between consecutive sizes)."""
    return sum(n_in * n_out + n_out for n_in, n_out in zip(layer_sizes, layer_sizes[1:]))


def ring_bytes_sent_per_rank(world_size: int, gradient_bytes: float) -> float:
    """Reduce-scatter then all-gather: 2 (W - 1) steps, each sending one of W chunks of n / W bytes."""
    return 2 * (world_size - 1) * gradient_bytes / world_size


def all_reduce_s(world_size: int, gradient_bytes: float, link: Link, collective: str = "ring") -> float:
    """The alpha-beta time of one all-reduce of ``gradient_bytes`` over ``world_size`` ranks (module doc):
    2 (W - 1) message latencies on a ring, 2 log2 W down and up a tree."""
    latencies = 2 * (world_size - 1) if collective == "ring" else 2 * math.log2(world_size)
    return latencies * link.latency_s + ring_bytes_sent_per_rank(world_size, gradient_bytes) / link.bandwidth_bytes_s


def step_time_at(step_seconds: dict[int, float], batch: float) -> Optional[float]:
    """The step time at ``batch`` by log-log interpolation between measured batches; None outside them."""
    batches = sorted(step_seconds)
    if batch in step_seconds or not (batches and batches[0] < batch < batches[-1]):
        return step_seconds.get(batch)  # a measured batch, or None outside the measured range
    above = bisect.bisect(batches, batch)
    low, high = batches[above - 1], batches[above]
    fraction = math.log(batch / low) / math.log(high / low)
    return math.exp(math.log(step_seconds[low]) + fraction * math.log(step_seconds[high] / step_seconds[low]))


def predict(step_seconds: dict[int, float], gradient_bytes: float, world_sizes: list[int], links: list[Link],
            collective: str = "ring", global_batches: Optional[list[int]] = None) -> list[dict]:
    """One row per (link, global batch B, W) where B / W is a whole per-rank batch inside the measured range."""
    rows = []
    for link in links:
        for batch in global_batches or sorted(step_seconds):
            one_device_s = step_time_at(step_seconds, batch)
            for world_size in world_sizes:
                compute_s = None if batch % world_size else step_time_at(step_seconds, batch // world_size)
                if one_device_s is not None and compute_s is not None:
                        rows.append(_row(link, batch, world_size, compute_s, one_device_s,
                                     all_reduce_s(world_size, gradient_bytes, link, collective)))
    return rows


def _row(link: Link, batch: int, world_size: int, compute_s: float, one_device_s: float, comm_s: float) -> dict:
    step_s = compute_s + comm_s
    overlap_s = max(compute_s, comm_s)
    speedup = one_device_s / step_s
    return {"link": link.name, "global_batch_size": batch, "world_size": world_size,
            "per_rank_batch_size": batch // world_size, "compute_s": compute_s, "all_reduce_s": comm_s,
            "step_s": step_s, "samples_per_s": batch / step_s, "speedup": speedup,
            "efficiency": speedup / world_size, "step_overlap_s": overlap_s,
            "efficiency_overlap": one_device_s / overlap_s / world_size,
            "stacked_trials_samples_per_s": world_size * batch / one_device_s}


def stops_paying(rows: list[dict], floor: float = EFFICIENCY_FLOOR) -> list[dict]:
    """Per (link, W >= 2): the largest B such that every B' <= B has efficiency below ``floor``
    (None: it pays from the smallest B), and the efficiency at the next larger B."""
    verdicts = []
    for link in dict.fromkeys(r["link"] for r in rows):
        for world_size in sorted({r["world_size"] for r in rows if r["link"] == link and r["world_size"] > 1}):
            cells = sorted((r for r in rows if r["link"] == link and r["world_size"] == world_size),
                           key=lambda r: r["global_batch_size"])
            below = next((i for i, c in enumerate(cells) if c["efficiency"] >= floor), len(cells))
            paying = cells[below] if below < len(cells) else {}
            verdicts.append({"link": link, "world_size": world_size,
                             "stops_paying_up_to_batch": cells[below - 1]["global_batch_size"] if below else None,
                             "smallest_batch": cells[0]["global_batch_size"],
                             "largest_batch": cells[-1]["global_batch_size"],
                             "next_batch": paying.get("global_batch_size"),
                             "next_efficiency": paying.get("efficiency"),
                             "best_efficiency": max(c["efficiency"] for c in cells),
                             "later_below_floor": [c["global_batch_size"] for c in cells[below:]
                                                   if c["efficiency"] < floor]})
    return verdicts


def verdict_line(verdict: dict, floor: float) -> str:
    world = verdict["world_size"]
    where = f"over {verdict['link']}, W = {world}: "
    # Noisy step times can dip below the floor again at a larger B: named, not hidden.
    dips = verdict["later_below_floor"]
    also = f" (below {floor:.0%} again at B = {', '.join(map(str, dips))})" if dips else ""
    if verdict["stops_paying_up_to_batch"] is None:
        return where + (f"pays (efficiency >= {floor:.0%}) from the smallest batch computed, "
                        f"B = {verdict['smallest_batch']} ({verdict['next_efficiency']:.0%}){also}")
    line = where + (f"data parallelism stops paying (efficiency < {floor:.0%}) at "
                    f"B <= {verdict['stops_paying_up_to_batch']}")
    if verdict["next_batch"] is None:
        return line + (f", every batch computed (up to {verdict['largest_batch']}; best "
                       f"{verdict['best_efficiency']:.0%}): run {world} trials at once instead")
    return line + f"; at B = {verdict['next_batch']} it is {verdict['next_efficiency']:.0%}{also}"


def build_result(step_seconds: dict[int, float], parameters: int, world_sizes: list[int], links: list[Link],
                 collective: str, floor: float, source: dict, global_batches: Optional[list[int]] = None) -> dict:
    """The JSON-ready result: inputs, assumptions, every row and the verdicts."""
    gradient_bytes = parameters * GRADIENT_ELEMENT_BYTES
    rows = predict(step_seconds, gradient_bytes, world_sizes, links, collective, global_batches)
    return {"source": source, "parameters": parameters, "gradient_element_bytes": GRADIENT_ELEMENT_BYTES,
            "gradient_bytes": gradient_bytes, "collective": collective, "world_sizes": world_sizes,
            "efficiency_floor": floor, "overlap": "none (step_s); step_overlap_s = max(compute, all-reduce) bound",
            "links": [asdict(link) for link in links],
            "step_seconds": {str(b): s for b, s in sorted(step_seconds.items())},
            "rows": rows, "verdicts": stops_paying(rows, floor)}


def format_table(result: dict) -> str:
    """Per link: one line per global batch, one column per world size (ms/step, samples/s, speedup, efficiency)."""
    worlds = [w for w in result["world_sizes"] if w > 1]
    lines = [f"gradient: {result['parameters']:,} parameters x {result['gradient_element_bytes']} B = "
             f"{result['gradient_bytes'] / 1e6:.3g} MB; {result['collective']} all-reduce, no overlap with the "
             f"backward; step times from {result['source']['kind']}: {result['source']['description']}"]
    for link in result["links"]:
        rows = [r for r in result["rows"] if r["link"] == link["name"]]
        comm_ms = {w: all_reduce_s(w, result["gradient_bytes"], Link(**link), result["collective"]) * 1e3
                   for w in worlds}
        lines += ["", f"link {link['name']}: {link['bandwidth_bytes_s'] / 1e9:g} GB/s, "
                  f"{link['latency_s'] * 1e6:g} us per message ({link['source']})",
                  "all-reduce per step: " + ", ".join(f"W={w} {ms:.3g} ms" for w, ms in comm_ms.items()),
                  "| B | W=1: ms/step, samples/s | " + " | ".join(
                      f"W={w}: ms/step, samples/s, speedup, efficiency" for w in worlds) + " |",
                  "|---" * (len(worlds) + 2) + "|"]
        for batch in sorted({r["global_batch_size"] for r in rows}):
            cells = {r["world_size"]: r for r in rows if r["global_batch_size"] == batch}
            one = cells.get(1)
            first = f"{one['step_s'] * 1e3:.3g}, {one['samples_per_s']:.3g}" if one else "-"
            lines.append(f"| {batch} | {first} | " + " | ".join(
                f"{cells[w]['step_s'] * 1e3:.3g}, {cells[w]['samples_per_s']:.3g}, {cells[w]['speedup']:.2f}x, "
                f"{cells[w]['efficiency']:.0%}" if w in cells else "-" for w in worlds) + " |")
    floor = result["efficiency_floor"]
    lines += ["", f"W independent trials (one per device, no communication) train W x the W=1 samples/s; data "
              f"parallelism trains efficiency x that. Below {floor:.0%}, run more trials at once instead."]
    lines += [verdict_line(v, floor) for v in result["verdicts"]]
    return "\n".join(lines)


# --- inputs -----------------------------------------------------------------------


def check_arguments(world_sizes: list[int], link_names: list[str], link_gbps: Optional[float],
                    link_latency_us: Optional[float], floor: float, parameters: Optional[int]) -> None:
    """The command's own numbers, before any measurement."""
    if bad := [w for w in world_sizes if w < 1]:
        raise InputError(f"--world-sizes: {bad[0]}; expected world sizes of at least 1")
    if bad := [name for name in link_names if name not in NAMED_LINKS]:
        raise InputError(f"--link: {bad[0]!r}; expected one of {', '.join(NAMED_LINKS)}")
    if link_gbps is not None and not (math.isfinite(link_gbps) and link_gbps > 0):
        raise InputError(f"--link-gbps: {link_gbps:g}; expected a positive bandwidth in Gb/s")
    if link_latency_us is not None:
        if link_gbps is None:
            raise InputError("--link-latency-us: given without --link-gbps; expected both for a custom link")
        if not (math.isfinite(link_latency_us) and link_latency_us >= 0):
            raise InputError(f"--link-latency-us: {link_latency_us:g}; expected a latency of at least 0 us")
    if not 0 < floor <= 1:
        raise InputError(f"--efficiency-floor: {floor:g}; expected a fraction in (0, 1]")
    if parameters is not None and parameters < 1:
        raise InputError(f"--parameters: {parameters}; expected a positive parameter count")


def links_from_arguments(link_names: list[str], link_gbps: Optional[float],
                         link_latency_us: Optional[float]) -> list[Link]:
    """The named links asked for (both when none and no custom link), then the custom one (given in Gb/s,
    as network links are quoted, and us per message)."""
    custom = [Link(f"custom-{link_gbps:g}gbps", link_gbps * 1e9 / 8, (link_latency_us or 0.0) * 1e-6,
                   "given on the command line")] if link_gbps is not None else []
    names = link_names or ([] if custom else list(NAMED_LINKS))
    return [NAMED_LINKS[name] for name in dict.fromkeys(names)] + custom


def parse_step_times(pairs: list[str]) -> dict[int, float]:
    """``--step-times 128=0.00013 2048=0.00024``: batch size = seconds per step."""
    step_seconds = {}
    for pair in pairs:
        batch, _, seconds = pair.partition("=")
        try:
            batch_size, step_s = int(batch), float(seconds)
        except ValueError:
            raise InputError(f"--step-times: {pair!r}; expected BATCH=SECONDS, e.g. 128=0.00013") from None
        if batch_size < 1 or not (math.isfinite(step_s) and step_s > 0):
            raise InputError(f"--step-times: {pair!r}; expected a positive batch size and positive seconds")
        step_seconds[batch_size] = step_s
    return step_seconds


MAX_CAPACITY_JSON_BYTES = 10_000_000  # a capacity result of 30 batch sizes is a few kB


def _whole(value) -> int:
    """A JSON number that is a whole number (``64`` or ``64.0``), else ValueError; booleans are not numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(value)
    return int(value)


def load_capacity(path: str) -> tuple[dict[int, float], list[int], dict]:
    """Step times and layer sizes from a ``harness capacity`` JSON; InputError for anything else."""
    expected = "expected the JSON that `harness capacity --json` writes"
    try:
        size = Path(path).stat().st_size
        if size > MAX_CAPACITY_JSON_BYTES:  # read and parsed only once it is known to be small
            raise InputError(f"--from-json: {path}: {size} bytes, more than a capacity result's "
                             f"{MAX_CAPACITY_JSON_BYTES}; {expected}")
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"--from-json: {path}: no such file; {expected}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise InputError(f"--from-json: {path}: not JSON ({err.__class__.__name__}); {expected}") from None
    try:
        step_seconds = {_whole(p["batch_size"]): float(p["step_s"]) for p in data["points"]}
        layer_sizes = [_whole(n) for n in data["layer_sizes"]]
    except (KeyError, TypeError, ValueError, OverflowError):
        raise InputError(f"--from-json: {path}: not a capacity result (no points with batch_size and step_s, "
                         f"or no layer_sizes); {expected}") from None
    if not step_seconds or len(layer_sizes) < 2:
        raise InputError(f"--from-json: {path}: a capacity result without measured steps; {expected}")
    if bad := [b for b, s in step_seconds.items() if b < 1 or not (math.isfinite(s) and s > 0)]:
        raise InputError(f"--from-json: {path}: batch {bad[0]} with step time {step_seconds[bad[0]]!r}; expected "
                         "positive batch sizes with finite, positive step times")
    if any(n < 1 for n in layer_sizes):
        raise InputError(f"--from-json: {path}: layer sizes {layer_sizes}; expected positive layer sizes")
    description = (f"{path} ({data.get('device', '?')} {data.get('device_name', '?')}, "
                   f"{data.get('threads', '?')} threads, {data.get('date', '?')})")
    return step_seconds, layer_sizes, {"kind": "capacity JSON", "description": description}

"""From ``results.jsonl`` to a Markdown leaderboard and PNG plots.

Every score is reported next to ``full_score``: the full cache's score on exactly the same samples
(same task, length, sample index and setting).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """Mean score of one configuration at one length, with the full cache's on the same samples."""

    task: str
    question_aware: bool
    method: str
    ratio: float | None
    budget: int | None
    length: int
    samples: int
    score: float
    full_score: float
    kept_fraction: float
    seconds: float

    @property
    def label(self) -> str:
        if self.method == "none":
            return "none (full cache)"
        if self.budget is not None:
            return f"{self.method}#{self.budget}"
        return self.method if self.ratio is None else f"{self.method}@{self.ratio}"


def load_results(path: Path) -> list[dict]:
    """Every complete result line (a line cut short by an interrupted run is skipped)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def aggregate(rows: list[dict]) -> list[Cell]:
    """Mean score per (task, setting, method, ratio/budget, length), paired with the full cache."""
    full: dict[tuple, float] = {}
    for r in rows:
        if r["method"] == "none":
            full[(r["run"], r["task"], r["question_aware"], r["length"], r["index"])] = r["score"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["question_aware"], r["method"], r["ratio"], r["budget"], r["length"])].append(r)
    cells = []
    for (task, qa, method, ratio, budget, length), rs in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
        paired = [(r["score"], full[k]) for r in rs
                  if (k := (r["run"], task, qa, length, r["index"])) in full]
        if not paired:
            continue
        cells.append(Cell(
            task=task, question_aware=qa, method=method, ratio=ratio, budget=budget, length=length,
            samples=len(paired), score=mean(s for s, _ in paired), full_score=mean(f for _, f in paired),
            kept_fraction=mean(r["bytes_kept"] / r["bytes_full"] for r in rs if r["bytes_full"]),
            seconds=mean(r["seconds"] for r in rs),
        ))
    return cells


def _sort_key(k: tuple) -> tuple:
    task, qa, method, ratio, budget, length = k
    return (task, qa, method != "none", method, ratio or 0.0, budget or 0, length)


def leaderboard(cells: list[Cell]) -> str:
    """Markdown: one table per task and setting; rows are methods, columns lengths."""
    lines = ["# slimkv leaderboard", "",
             "Score = fraction of expected strings found in the answer (RULER string match), averaged over "
             "samples; `full` = the full cache on the same samples. KV = bytes held after compression "
             "as a share of the full cache's bytes (positions and free slots counted).", ""]
    by_table: dict[tuple, list[Cell]] = defaultdict(list)
    for c in cells:
        by_table[(c.task, c.question_aware)].append(c)
    for (task, qa), cs in sorted(by_table.items()):
        lengths = sorted({c.length for c in cs})
        setting = "question-aware" if qa else "question-agnostic"
        lines += [f"## {task}, {setting}", "",
                  "| method | " + " | ".join(f"{n} tok" for n in lengths) + " | mean | vs full | KV | s/sample |",
                  "|---|" + "---:|" * (len(lengths) + 4)]
        rows: dict[str, dict[int, Cell]] = defaultdict(dict)
        for c in cs:
            rows[c.label][c.length] = c
        most = max(c.samples for c in cs)

        def cell(c: Cell) -> str:  # cells of an unfinished run say how many samples they hold
            return f"{c.score:.2f}" if c.samples == most else f"{c.score:.2f} (n={c.samples})"

        for label, per_len in rows.items():
            present = list(per_len.values())
            score = mean(c.score for c in present)
            full = mean(c.full_score for c in present)
            rel = f"{score / full:.0%}" if full else "-"
            cols = " | ".join(cell(per_len[n]) if n in per_len else "-" for n in lengths)
            lines.append(f"| {label} | {cols} | {score:.3f} | {rel} | "
                         f"{mean(c.kept_fraction for c in present):.2f} | {mean(c.seconds for c in present):.1f} |")
        samples = sorted({c.samples for c in cs})
        lines += ["", f"Samples per cell: {', '.join(map(str, samples))}.", ""]
    return "\n".join(lines)


def plots(cells: list[Cell], rows: list[dict], out: Path) -> list[Path]:
    """Score vs ratio per method, a depth x length heatmap for needle tasks, KV bytes per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_table: dict[tuple, list[Cell]] = defaultdict(list)
    for c in cells:
        by_table[(c.task, c.question_aware)].append(c)
    for (task, qa), cs in sorted(by_table.items()):
        setting = "aware" if qa else "agnostic"
        path = out / f"score_vs_ratio_{task}_{setting}.png"
        written.append(_score_plot(plt, cs, path, f"{task}, question-{setting}"))
        if task in ("needle", "passkey"):
            written.append(_heatmap(plt, [r for r in rows if r["task"] == task and r["question_aware"] == qa],
                                    out / f"heatmap_{task}_{setting}.png", f"{task}, question-{setting}"))
    written.append(_bytes_bars(plt, cells, out / "kv_bytes.png"))
    return written


#: line styles cycled with the 20 colours of ``tab20``, so that no two methods look alike
_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def _score_plot(plt, cs: list[Cell], path: Path, title: str) -> Path:
    """One line per eviction method (score against ratio), stars for quantizing methods (at the share
    of bytes they remove: one per ratio when composed with eviction), the full cache as a dashed line; the legend lists methods best first, each
    with its mean score as a share of the full cache's."""
    full = [c.score for c in cs if c.method == "none"]
    full_mean = mean(full) if full else 0.0
    series = []
    for m in sorted({c.method for c in cs if c.method != "none" and c.budget is None}):
        mine = [c for c in cs if c.method == m and c.budget is None]
        # quantizing (a quantizer, or eviction composed with one): far fewer bytes than its ratio keeps
        quantizer = all(c.ratio is None or c.kept_fraction < 0.6 * (1.0 - c.ratio) for c in mine)
        pts: dict[float | None, list[Cell]] = defaultdict(list)
        for c in mine:
            pts[c.ratio].append(c)
        order = sorted(pts, key=lambda r: -1.0 if r is None else r)
        if quantizer:  # at the mean share of bytes removed, per ratio (one point for a plain quantizer)
            xs = [1.0 - mean(c.kept_fraction for c in pts[r]) for r in order]
        else:
            xs = list(order)
        ys = [mean(c.score for c in pts[r]) for r in order]
        series.append((mean(ys), m, quantizer, xs, ys))
    series.sort(key=lambda t: (-t[0], t[1]))
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(10, 5.2))
    for i, (avg, m, quantizer, xs, ys) in enumerate(series):
        share = f"{avg / full_mean:.0%}" if full_mean else f"{avg:.2f}"
        if quantizer:
            ax.plot(xs, ys, linestyle=":" if len(xs) > 1 else "none", marker="*", markersize=13,
                    color=cmap(i % 20), markeredgecolor="black", markeredgewidth=0.5,
                    label=f"{m} [quantized] ({share})")
        else:
            ax.plot(xs, ys, linestyle=_STYLES[(i // 20) % 4 if i >= 20 else i % 2],
                    marker=_MARKERS[i % len(_MARKERS)], color=cmap(i % 20), label=f"{m} ({share})")
    if full:
        ax.axhline(full_mean, color="black", linestyle="--", linewidth=1.5, label="full cache")
    ax.set(xlabel="share of the KV cache removed (eviction: the ratio; quantizing methods: bytes)",
           ylabel="score (mean over lengths)", title=f"{title} (legend: best first, % of the full cache)",
           ylim=(-0.02, max([1.02, *(y + 0.05 for *_, ys in series for y in ys)])), xlim=(0.45, 1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _heatmap(plt, rows: list[dict], path: Path, title: str) -> Path:
    """Depth x length score per configuration (the strongest compression of each method), in a grid."""
    labels = sorted({(r["method"], r["ratio"] or 0.0) for r in rows})
    strongest = {}
    for m, ratio in labels:
        strongest[m] = max(strongest.get(m, 0.0), ratio)
    panels = sorted(strongest.items(), key=lambda kv: (kv[0] != "none", kv[0]))
    lengths = sorted({r["length"] for r in rows})
    bins = 5
    cols = min(8, len(panels))
    grid_rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(1.6 * cols + 1.2, 1.9 * grid_rows + 0.8), squeeze=False)
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.axis("off")
            continue
        m, ratio = panels[k]
        grid = [[[] for _ in lengths] for _ in range(bins)]
        for r in rows:
            if r["method"] == m and (r["ratio"] or 0.0) == ratio and r["depth"] is not None:
                b = min(int(r["depth"] * bins), bins - 1)
                grid[b][lengths.index(r["length"])].append(r["score"])
        data = [[mean(v) if v else float("nan") for v in row] for row in grid]
        image = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n / 1000:g}k" for n in lengths], fontsize=7)
        ax.set_yticks(range(bins), [f"{(i + 0.5) / bins:.0%}" for i in range(bins)], fontsize=6)
        ax.set_title(m if m == "none" or not ratio else f"{m}@{ratio}", fontsize=8)
        if k % cols == 0:
            ax.set_ylabel("needle depth", fontsize=7)
        if k // cols == grid_rows - 1 or k + cols >= len(panels):
            ax.set_xlabel("context tokens", fontsize=7)
    fig.suptitle(f"{title}: score by needle depth and length (each method at its strongest ratio)", fontsize=9)
    fig.tight_layout()
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="score")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bytes_bars(plt, cells: list[Cell], path: Path) -> Path:
    groups: dict[str, list[float]] = defaultdict(list)
    for c in cells:
        groups[c.label].append(c.kept_fraction)
    labels = sorted(groups, key=lambda k: (-mean(groups[k]), k))
    fig, ax = plt.subplots(figsize=(6.4, 0.25 * len(labels) + 1.2))
    ax.barh(labels, [mean(groups[k]) for k in labels], color="tab:blue")
    ax.set(xlabel="KV bytes held / full-cache bytes", xlim=(0, 1.1), title="KV bytes per configuration")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: Path, out: Path, command: str | None = None) -> tuple[Path, list[Path]]:
    """Leaderboard and plots for a results file (``command``: recorded under the tables)."""
    rows = load_results(results)
    cells = aggregate(rows)
    out.mkdir(parents=True, exist_ok=True)
    board = out / "leaderboard.md"
    board.write_text(leaderboard(cells) + (f"\nCommand: `{command}`\n" if command else ""))
    return board, plots(cells, rows, out)

"""Render benchmark sections (see `peers.py` for their shape): rich tables, `results.json`, PNGs."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def table(sec: dict) -> Table:
    out = Table(title=sec["title"], title_justify="left")
    for c in sec["columns"]:
        out.add_column(c["header"], justify="right")
    for row in sec["rows"]:
        out.add_row(*[cell(row.get(c["key"]), c["fmt"]) for c in sec["columns"]])
    return out


def render(sec: dict, console: Console) -> None:
    if sec["status"] != "ok":
        style = "yellow" if sec["status"] == "skipped" else "bold red"
        console.print(f"[bold]{sec['title']}[/bold]: [{style}]{sec['status']}: {escape(str(sec['reason']))}[/{style}]",
                      highlight=False)
        return
    console.print(table(sec))
    for note in sec["notes"]:
        console.print(f"  [dim]{escape(note)}[/dim]", highlight=False)


SUMMARIES = {
    "peers": "Summary against peers (ratio > 1: expertmesh faster than the peer)",
    "ourselves": "Summary against ourselves (ratio > 1: the variant beats expertmesh's own baseline named "
                 "in 'where'; efficiency: fraction of plain matmul); no peer is compared here",
    "published": "Summary against published measurements",
}


def headline(sections: dict[str, dict]) -> list[Table]:
    """One table per kind of comparison (`SUMMARIES`), one row per section: the range of its ratio."""
    return [_summary(SUMMARIES[kind], [s for s in sections.values() if s["against"] == kind])
            for kind in SUMMARIES if any(s["against"] == kind for s in sections.values())]


def _summary(title: str, sections: list[dict]) -> Table:
    out = Table(title=title, title_justify="left")
    for name in ("comparison", "status", "ratio min", "ratio max", "where"):
        out.add_column(name, justify="left" if name in ("comparison", "where") else "right")
    for sec in sections:
        ratios = [r["ratio"] for r in sec["rows"] if isinstance(r.get("ratio"), (int, float))]
        if sec["status"] != "ok" or not ratios:
            out.add_row(sec["title"], sec["status"], "-", "-", sec["reason"] or "")
            continue
        where = sec.get("summary", "")
        out.add_row(sec["title"], "ok", f"x{min(ratios):.2f}", f"x{max(ratios):.2f}", where)
    return out


def write_json(results: dict, out_dir: Path) -> Path:
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def plot(key: str, sec: dict, out_dir: Path) -> Path | None:
    """A PNG of the section's `plot` spec: {"kind": "line"|"bar", "x", "y": [keys], "labels",
    "group" (one panel per value, optional), "ylabel", "logx"}; None without a spec or data."""
    spec = sec.get("plot")
    if sec["status"] != "ok" or not spec or not sec["rows"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r[spec["group"]] for r in sec["rows"]}) if spec.get("group") else [None]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        rows = [r for r in sec["rows"] if group is None or r[spec["group"]] == group]
        xs = [r[spec["x"]] for r in rows]
        labels = spec.get("labels", spec["y"])
        if spec["kind"] == "line":
            for y, label in zip(spec["y"], labels):
                points = [(x, r[y]) for x, r in zip(xs, rows) if r.get(y) is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", label=label)
            if spec.get("logx"):
                ax.set_xscale("log", base=2)
            ax.set_xlabel(spec["x"].replace("_", " "))
        else:
            width = 0.8 / len(spec["y"])
            for i, (y, label) in enumerate(zip(spec["y"], labels)):
                ax.bar([j + i * width for j in range(len(rows))], [r.get(y) or 0 for r in rows],
                       width, label=label)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [str(x) for x in xs],
                          rotation=20, ha="right")
        ax.set_ylabel(spec.get("ylabel", ""))
        ax.set_title(str(group) if group is not None else "")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(sec["title"], fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{key}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Results of `stepdistill fid`: a table on stdout, one JSON object, markdown rows, and FID-vs-steps plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..errors import StepdistillError

METRIC_NAMES = {"fid": "FID", "kid_mean": "KID", "kid_std": "KID std", "precision": "precision", "recall": "recall",
                "f_score": "F-score", "clip_score": "CLIP score"}
MARKDOWN_COLUMNS = ("A", "B", "steps", "samples", "extractor", "fid", "kid_mean", "precision", "recall", "clip_score")


def format_table(record: dict) -> str:
    """What was compared, then one line per metric."""
    head = [f"A: {record.get('a')}", f"B: {record.get('b')}" if record.get("b") else None,
            f"extractor: {record.get('extractor')}" if record.get("extractor") else None]
    lines = [h for h in head if h]
    lines.append(f"{'metric':<12}{'value':>14}")
    for key, name in METRIC_NAMES.items():
        if key in record:
            lines.append(f"{name:<12}{record[key]:>14.6g}")
    return "\n".join(lines)


def write_json(record: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def append_markdown(record: dict, path: str | Path) -> Path:
    """Append one row; a new (or empty) file gets the header first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or not path.read_text().strip()
    values = {"A": record.get("a"), "B": record.get("b"), "samples": record.get("num_samples"), **record}

    def cell(key):
        v = values.get(key)
        if v is None:
            return "–"
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")

    with open(path, "a") as f:
        if new:
            f.write("| " + " | ".join(METRIC_NAMES.get(c, c) for c in MARKDOWN_COLUMNS) + " |\n")
            f.write("|" + "---|" * len(MARKDOWN_COLUMNS) + "\n")
        f.write("| " + " | ".join(cell(c) for c in MARKDOWN_COLUMNS) + " |\n")
    return path


def read_runs(paths) -> dict[str, dict[int, float]]:
    """label -> {steps: fid} from quickstart results.json files (lists of records) and `--json` outputs (one
    record each). The label is model (sampler); a label measured differently in two files gets the file's folder."""
    points: dict[str, dict[int, float]] = defaultdict(dict)
    origin: dict[str, str] = {}
    for p in map(Path, paths):
        if not p.is_file():
            raise StepdistillError(f"run file {p} does not exist")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise StepdistillError(f"{p} is not JSON: {e}") from None
        records = data if isinstance(data, list) else [data]
        for r in records:
            if not isinstance(r, dict) or "fid" not in r or "steps" not in r:
                raise StepdistillError(f"{p}: every record needs 'steps' and 'fid' (quickstart results.json or "
                                       "`stepdistill fid --json` of a pipeline)")
            label = r.get("model") or p.stem
            if r.get("sampler"):
                label = f"{label} ({r['sampler']})"
            steps, fid = int(r["steps"]), float(r["fid"])
            if label in origin and origin[label] != str(p.parent) and points[label].get(steps, fid) != fid:
                label = f"{p.parent.name}/{label}"
            origin.setdefault(label, str(p.parent))
            points[label][steps] = fid
    if not points:
        raise StepdistillError("no runs to plot")
    return dict(points)


def plot_runs(paths, out: str | Path, title: str | None = None) -> Path:
    """FID against steps (log scale, as is FID when it spans decades) for every run, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = read_runs(paths)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    all_steps = set()
    for label, pts in sorted(runs.items()):
        steps = sorted(pts)
        all_steps.update(steps)
        ax.plot(steps, [pts[s] for s in steps], marker="o", label=label)
    ax.set_xscale("log")
    values = [v for pts in runs.values() for v in pts.values()]
    if min(values) > 0 and max(values) > 10 * min(values):  # FID spans decades between 1 and 50 steps
        ax.set_yscale("log")
    ax.set_xticks(sorted(all_steps))
    ax.set_xticklabels([str(s) for s in sorted(all_steps)])
    ax.minorticks_off()
    ax.set_xlabel("sampling steps (NFE)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title or "FID against sampling steps")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out

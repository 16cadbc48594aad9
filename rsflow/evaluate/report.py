"""What an evaluation writes besides predictions: metrics JSON, the Markdown table beside the papers'
numbers, and the confusion matrix as CSV and PNG. Every file is written to a temporary name in its
folder and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rsflow.evaluate.published import PUBLISHED, PUBLISHED_SPLITS, PublishedRow

logger = logging.getLogger(__name__)


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def metric_value(metrics: Mapping[str, Any], path: str) -> float | None:
    """The value at a dotted path of ``metrics`` (None when absent)."""
    node: Any = metrics
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) and not isinstance(node, bool) else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown_table(
    benchmark: str,
    title: str,
    metrics: Mapping[str, Any],
    *,
    run_label: str,
    context: Sequence[str] = (),
    recorded: Sequence[PublishedRow] | None = None,
    recorded_note: str = "",
    split: str | None = None,
) -> str:
    """The run's numbers beside the published ones, as Markdown.

    The published column is left out, with a note saying why, where ``split`` is not the split the
    published numbers were measured on (:data:`~rsflow.evaluate.published.PUBLISHED_SPLITS`: RSVQA-HR
    ``test`` is test set 1, GeoChat's HRBEN test set 2). A reported-types average the run could not
    compute (a reported type without a scored question) reads n/a, and a note names the missing types.

    Args:
        benchmark: benchmark name (the key of :data:`~rsflow.evaluate.published.PUBLISHED`).
        title: heading.
        metrics: the run's metrics (0-1 values; shown x100).
        run_label: column name of the run (the model id).
        context: lines printed above the table (split, samples, decoding, ...).
        recorded: rows to use instead of the published ones (e.g. a model card's recorded figures).
        recorded_note: the note under ``recorded`` rows.
        split: the split the run scored (None: the benchmark's default, or it has none).

    Returns:
        The Markdown text: heading, context, table, note.
    """
    rows, note = (list(recorded), recorded_note) if recorded is not None else PUBLISHED.get(benchmark, ([], ""))
    notes = [note] if note else []
    measured = PUBLISHED_SPLITS.get(benchmark)
    if rows and split is not None and measured is not None and split != measured:
        rows = [PublishedRow(r.label, r.metric) for r in rows]  # the run's numbers, nothing beside them
        notes.insert(0, f"The published numbers were measured on the `{measured}` split, and this run scored "
                        f"`{split}`: they are left out, as they would not be comparable.")
    missing = metrics.get("missing_reported_types") or []
    if missing and metrics.get("reported_types"):
        notes.append(f"The averages over {', '.join(metrics['reported_types'])} are n/a: no {', '.join(missing)} "
                     "question was scored (--question-types or a --limit sample left them out), and the "
                     "published figures average every one of those types.")
    if not rows:  # no published comparison: every top-level number of the run
        rows = [PublishedRow(k, k) for k, v in metrics.items() if isinstance(v, float)]
    sources = list(dict.fromkeys(src for r in rows for src in r.values))
    lines = [f"# {title}", ""]
    lines += [f"- {c}" for c in context]
    lines += ["", f"| metric | {run_label} (this run) | " + " | ".join(sources) + " |" if sources
              else f"| metric | {run_label} (this run) |"]
    lines.append("|---|---|" + "---|" * len(sources))
    for r in rows:
        ours = metric_value(metrics, r.metric)
        cells = [_fmt(None if ours is None else ours * 100.0)] + [_fmt(r.values.get(s)) for s in sources]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    lines += ["", "Values in percent (the run's 0-1 metrics x100; CIDEr x100 too)."]
    for n in notes:
        lines += ["", n]
    return "\n".join(lines) + "\n"


def write_confusion_matrix(matrix: Mapping[str, Any], out_dir: Path, *, title: str) -> list[str]:
    """``confusion_matrix.csv`` (rows: true class, columns: predicted) and ``confusion_matrix.png``.

    Returns:
        The file names written.
    """
    labels, predicted, counts = matrix["labels"], matrix["predicted"], matrix["counts"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["true \\ predicted", *predicted])
    for label, row in zip(labels, counts, strict=True):
        writer.writerow([label, *row])
    write_text_atomic(out_dir / "confusion_matrix.csv", buf.getvalue())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.asarray(counts, dtype=float)
    totals = data.sum(axis=1, keepdims=True)
    share = np.divide(data, totals, out=np.zeros_like(data), where=totals > 0)
    size = max(6.0, 0.32 * len(predicted) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(predicted)), predicted, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    for (i, j), n in np.ndenumerate(data):
        if n:
            ax.text(j, i, str(int(n)), ha="center", va="center", fontsize=6,
                    color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    write_atomic(out_dir / "confusion_matrix.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return ["confusion_matrix.csv", "confusion_matrix.png"]

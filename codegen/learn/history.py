"""A run's history on disk and on screen: CSV and strict JSON writing, reading back, plots.

A history is a list of dicts, one per evaluated point (docs/interface.md 3.4). `HistoryLog`
appends each entry to a JSON-lines file as it is recorded (the CLI's DIR/history.jsonl), so a
run that is killed, even with SIGKILL, keeps every completed step. The plots show
what the run certifies: F(theta) inside its certified interval f(x_eps) +- value_error (not the
bare inexact value), theta itself, and ||h|| with the bound on its error.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["HISTORY_KEYS", "HistoryLog", "write_csv", "write_json", "read_history",
           "plot_history"]

#: theta gets one CSV column per entry up to this size, else one JSON-encoded "theta" column.
CSV_THETA_COLUMNS_MAX = 50
INT_KEYS = ("step", "work")
HISTORY_KEYS = ("step", "value", "value_error", "grad_norm", "bound", "eps", "delta",
                "step_size", "work", "time")
#: theta entries drawn one line each; above this the plot shows ||theta||.
PLOT_THETA_LINES_MAX = 10


def json_float(v: Any) -> float | str | None:
    """A JSON-safe float: non-finite values as the strings "nan", "inf", "-inf"."""
    if v is None:
        return None
    f = float(v)
    if math.isfinite(f):
        return f
    return "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")


def _from_text(v: Any) -> float:
    if v is None or v == "":
        return math.nan
    return float(v)


def _entry_json(e: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in e.items():
        if key == "theta":
            out[key] = None if v is None else [json_float(t) for t in v]
        elif key in INT_KEYS:
            out[key] = int(v)
        else:
            out[key] = json_float(v)
    return out


def write_json(path: str | Path, history: list[dict[str, Any]], *, theta: np.ndarray,
               **fields: Any) -> Path:
    """Write {**fields, theta, history} as JSON; non-finite numbers become the strings "nan",
    "inf", "-inf" (read back by read_history), so the file is strict JSON."""
    path = Path(path)
    doc = dict(fields)
    doc["value"] = json_float(doc.get("value"))
    doc["theta"] = [json_float(v) for v in theta]
    doc["history"] = [_entry_json(e) for e in history]
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


class HistoryLog:
    """A callback for `optimize` that appends every history entry to a JSON-lines file at once.

    Each line is one entry (the strict JSON of write_json's entries), written and flushed to the
    operating system before the run goes on: a process killed after step k leaves steps 0..k on
    disk (a line cut by the kill is skipped by read_history). `finish` replaces the file with the
    run's whole history (entries recorded without the callback included), atomically. A write
    that fails (a full disk) does not end the run: it is said once and the log stops.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file: Any = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 -- kept open

    def __call__(self, entry: dict[str, Any]) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(_entry_json(entry)) + "\n")
            self._file.flush()
        except OSError as exc:
            warnings.warn(f"cannot append to {self.path} ({exc.strerror or exc}): the run goes on, "
                          "its history is written when it ends", RuntimeWarning, stacklevel=2)
            self.close()

    def finish(self, history: list[dict[str, Any]]) -> Path:
        """Close the log and rewrite it with the complete history; return its path."""
        self.close()
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text("".join(json.dumps(_entry_json(e)) + "\n" for e in history))
        os.replace(temporary, self.path)
        return self.path

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # what a full disk kept from the last flush
                self._file.close()
            self._file = None


def write_csv(path: str | Path, history: list[dict[str, Any]]) -> Path:
    """One row per entry: the HISTORY_KEYS columns, then theta[0], theta[1], ... (a single
    JSON-encoded "theta" column when theta has more than 50 entries; empty if not recorded)."""
    path = Path(path)
    sizes = [len(e["theta"]) for e in history if e.get("theta") is not None]
    p = max(sizes) if sizes else 0
    split = 0 < p <= CSV_THETA_COLUMNS_MAX
    theta_cols = [f"theta[{j}]" for j in range(p)] if split else ["theta"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(HISTORY_KEYS) + theta_cols)
        for e in history:
            row = [repr(int(e[key])) if key in INT_KEYS else repr(float(e[key]))
                   for key in HISTORY_KEYS]
            th = e.get("theta")
            if split:
                row += [repr(float(v)) for v in th] if th is not None else [""] * p
            else:
                row.append(json.dumps([float(v) for v in th]) if th is not None else "")
            w.writerow(row)
    return path


def _read_csv(path: Path) -> list[dict[str, Any]]:
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            e: dict[str, Any] = {key: int(row[key]) if key in INT_KEYS else _from_text(row[key])
                       for key in HISTORY_KEYS}
            cols = sorted((k for k in row if k.startswith("theta[")), key=lambda c: int(c[6:-1]))
            if cols:
                vals = [row[c] for c in cols]
                e["theta"] = None if all(v == "" for v in vals) else [float(v) for v in vals]
            else:
                e["theta"] = json.loads(row["theta"]) if row.get("theta") else None
            out.append(e)
    return out


def _read_lines(path: Path) -> list[Any]:
    """The entries of a JSON-lines log; a last line cut short by a killed writer is skipped."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            break
    return entries


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Read a history written by write_csv (".csv"), HistoryLog (".jsonl") or write_json (any
    other suffix) back into a list of dicts with float values (theta a list of floats, or None)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    if path.suffix.lower() == ".jsonl":
        hist = _read_lines(path)
    else:
        doc = json.loads(path.read_text())
        hist = doc["history"] if isinstance(doc, dict) else doc
    out = []
    for e in hist:
        d: dict[str, Any] = {}
        for key, v in e.items():
            if key == "theta":
                d[key] = None if v is None else [_from_text(t) for t in v]
            elif key in INT_KEYS:
                d[key] = int(v)
            else:
                d[key] = _from_text(v)
        out.append(d)
    return out


def _pyplot(path: Any) -> Any:
    try:
        import matplotlib
        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install hypergen[plot] "
                          "(or pip install matplotlib)") from None
    return plt


def _plot_value(ax: Any, history: list[dict[str, Any]]) -> None:
    work = np.array([e["work"] for e in history], dtype=float)
    value = np.array([e["value"] for e in history], dtype=float)
    err = np.array([e["value_error"] for e in history], dtype=float)
    known = np.isfinite(err)
    ax.plot(work, value, ".-", color="C0", label="f(x_eps), the inexact value")
    if known.any():
        ax.fill_between(work, np.where(known, value - err, np.nan),
                        np.where(known, value + err, np.nan), color="C0", alpha=0.25,
                        label="certified interval holding F(theta)")
    ax.set_xlabel("work (lower gradients + HVPs)")
    ax.set_ylabel("F(theta)")
    ax.set_title("upper objective")
    ax.legend(fontsize=8)


def _plot_theta(ax: Any, history: list[dict[str, Any]]) -> None:
    pts = [(e["work"], e["theta"]) for e in history if e.get("theta") is not None]
    ax.set_xlabel("work (lower gradients + HVPs)")
    if not pts:
        ax.set_title("theta (not recorded)")
        return
    work = [w for w, _ in pts]
    thetas = np.array([t for _, t in pts], dtype=float)
    if thetas.shape[1] <= PLOT_THETA_LINES_MAX:
        for j in range(thetas.shape[1]):
            ax.plot(work, thetas[:, j], ".-", label=f"theta[{j}]")
        ax.legend(fontsize=8)
        ax.set_title("theta")
    else:
        ax.plot(work, np.linalg.norm(thetas, axis=1), ".-")
        ax.set_title(f"||theta|| ({thetas.shape[1]} entries)")


def _plot_gradient(ax: Any, history: list[dict[str, Any]]) -> None:
    rows = [(e["work"], e["grad_norm"], e["bound"]) for e in history
            if math.isfinite(e["grad_norm"]) and e["grad_norm"] > 0]
    ax.set_xlabel("work (lower gradients + HVPs)")
    ax.set_title("hypergradient")
    if not rows:
        return
    work, h, b = (np.array(c, dtype=float) for c in zip(*rows))
    ax.semilogy(work, h, ".-", label="||h||")
    fin = np.isfinite(b) & (b > 0)
    if fin.any():
        ax.semilogy(work[fin], b[fin], ".--", label="bound on ||h - grad F||")
        ax.semilogy(work[fin], h[fin] + b[fin], ":", label="certified ||grad F|| <=")
    ax.legend(fontsize=8)


def plot_history(history: list[dict[str, Any]], path: str | Path | None = None,
                 title: str | None = None) -> Any:
    """Three panels against work: F(theta) in its certified interval, theta (or ||theta||),
    and ||h|| with its bound. Needs matplotlib (pip install hypergen[plot]). Saves to `path`
    if given (and closes the figure); returns the figure."""
    plt = _pyplot(path)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    _plot_value(axes[0], history)
    _plot_theta(axes[1], history)
    _plot_gradient(axes[2], history)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig

"""The evaluation report: markdown table, CSV, strict JSON and the heatmap, each checked for impossible values
(a win rate that is no probability) before it is written, and written atomically."""

import csv
import io
import math
import os

import numpy as np

from comal_openrlhf.errors import ImpossibleResultError
from comal_openrlhf.eval.winrate import new_counts
from comal_openrlhf.storage import guarded, write_atomic, write_json


def _fmt(cell):
    if cell["winrate"] != cell["winrate"]:
        return "n/a"
    if cell["ci_low"] != cell["ci_low"]:
        return f"{100 * cell['winrate']:.1f}"
    return f"{100 * cell['winrate']:.1f} [{100 * cell['ci_low']:.1f}, {100 * cell['ci_high']:.1f}]"


def markdown(report):
    m = report["matrix"]
    names = m["names"]
    lines = [
        f"Win rate (%) of row against column, judge {report['judge']}, {report['prompts']} prompts x "
        f"{report['samples_per_prompt']} samples, {int(100 * report['level'])}% bootstrap intervals",
        "",
        "| | " + " | ".join(names) + " | avg |",
        "|---" * (len(names) + 2) + "|",
    ]
    for r in names:
        lines.append(f"| {r} | " + " | ".join(_fmt(m["cells"][r][c]) for c in names) + f" | {_fmt(m['avg'][r])} |")
    t = report["totals"]
    lines += [
        "",
        f"Comparisons {t['comparisons']}: ties {t['ties']}, judge failures {t['judge_failures']}, empty responses "
        f"{t['empty_responses']} (generations: {report['work']['generated']} new, {report['work']['generated_cached']}"
        f" cached; judge: {report['work']['judged']} new, {report['work']['judged_cached']} cached)",
    ]
    if report.get("exploitability"):
        lines += ["", "| policy | best-of-m win rate (%) | gap estimate 2E-1 (lower bound) |", "|---|---|---|"]
        for name, e in report["exploitability"].items():
            gap = f"{e['gap_estimate']:.3f} [{e['gap_ci_low']:.3f}, {e['gap_ci_high']:.3f}]"
            lines.append(f"| {name} | {_fmt({'winrate': e['best_of_m_winrate'], **e})} | {gap} |")
    if report.get("exact"):
        ex = report["exact"]
        lines += [
            "",
            f"Exact (game over {ex['labels']}):",
            "",
            "| policy | distribution | invalid mass | duality gap | dtype |",
        ]
        lines.append("|---|---|---|---|---|")
        for name, e in ex["policies"].items():
            lines.append(
                f"| {name} | {np.round(e['policy'], 3).tolist()} | {e['invalid_mass']:.3f} | {e['duality_gap']:.4f} "
                f"(with invalid: {e['duality_gap_with_invalid']:.4f}) | {e.get('dtype', '?')} |"
            )
        lines += ["", "| exact | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for r in names:
            lines.append(f"| {r} | " + " | ".join(f"{100 * ex['matrix'][r][c]:.1f}" for c in names) + " |")
    return "\n".join(lines)


def strict_json(obj):
    """``obj`` with NaN / inf floats replaced by None, so the JSON is standard (no ``NaN`` tokens)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def check_report(report):
    """Every win rate and interval bound of the report is a probability and every gap estimate 2E - 1 is in
    [-1, 1]: an impossible figure is an ImpossibleResultError naming the cell, never a number in a table."""

    def prob(v, what):
        if v is not None and not (isinstance(v, float) and math.isnan(v)) and not -1e-9 <= v <= 1 + 1e-9:
            raise ImpossibleResultError(f"{what} = {v:.4f} is not a probability (a bug: please report it)")

    m = report["matrix"]
    for r in m["names"]:
        for c in list(m["names"]) + ["avg"]:
            cell = m["avg"][r] if c == "avg" else m["cells"][r][c]
            for k in ("winrate", "ci_low", "ci_high"):
                prob(cell.get(k), f"win rate of {r} against {c} ({k})")
    for name, e in (report.get("exploitability") or {}).items():
        prob(e.get("best_of_m_winrate"), f"best-of-m win rate against {name}")
        for k in ("gap_estimate", "gap_ci_low", "gap_ci_high"):
            v = e.get(k)
            if isinstance(v, float) and not math.isnan(v) and not -1 - 1e-9 <= v <= 1 + 1e-9:
                raise ImpossibleResultError(f"exploitability of {name} ({k}) = {v:.4f} is outside [-1, 1]")


def write_outputs(report, out):
    check_report(report)
    os.makedirs(out, exist_ok=True)
    m = report["matrix"]
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    keys = list(new_counts())
    w.writerow(["row", "column", "winrate", "ci_low", "ci_high", "prompts"] + keys)
    for r in m["names"]:
        for c in m["names"]:
            cell = m["cells"][r][c]
            counts = cell["counts"] or {}
            w.writerow(
                [r, c, cell["winrate"], cell["ci_low"], cell["ci_high"], cell["prompts"]]
                + [counts.get(k, "") for k in keys]
            )
        a = m["avg"][r]
        w.writerow([r, "avg", a["winrate"], a["ci_low"], a["ci_high"], ""] + [""] * len(keys))
    write_atomic(os.path.join(out, "matrix.csv"), buf.getvalue())
    write_json(os.path.join(out, "results.json"), strict_json(report), indent=1)
    write_atomic(os.path.join(out, "matrix.md"), markdown(report) + "\n")
    with guarded(os.path.join(out, "heatmap.png")):
        heatmap(report, os.path.join(out, "heatmap.png"))


def heatmap(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["matrix"]
    names = m["names"]
    cols = names + ["avg"]
    M = np.array([[m["cells"][r][c]["winrate"] for c in names] + [m["avg"][r]["winrate"]] for r in names]) * 100
    fig, ax = plt.subplots(figsize=(1.6 + 1.25 * len(cols), 1.0 + 0.8 * len(names)))
    im = ax.imshow(M, cmap="RdBu", vmin=0, vmax=100)
    for i, r in enumerate(names):
        for j, c in enumerate(cols):
            cell = m["avg"][r] if c == "avg" else m["cells"][r][c]
            text = (
                f"{M[i, j]:.0f}"
                if cell["ci_low"] != cell["ci_low"]
                else (f"{M[i, j]:.0f}\n[{100 * cell['ci_low']:.0f}, {100 * cell['ci_high']:.0f}]")
            )
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("column (opponent)")
    ax.set_ylabel("row")
    ax.set_title(f"win rate % (row beats column), {int(100 * report['level'])}% CI", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Turning the benchmark's raw rows into tables (Markdown) and a plot."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
PHASES = ["startup", "manifest", "verify", "prepare", "walk+transfer", "commit", "prune"]


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:,.1f}"


def progress_line(row: dict) -> str:
    r = row["run"]
    extra = ""
    if "phases" in row:
        p = row["phases"]
        extra = f"  [{p.get('builder')}] " + " ".join(f"{k}={p[k]:.2f}" for k in PHASES if p.get(k) is not None)
    return (f"  {row['scenario']:<14} {row['tool']:<19} wall {r['wall']:7.2f} s  cpu {r['cpu']:7.2f} s  "
            f"written {_mib(row['written']):>9} MiB  entries {row['entries'] or 0:>9,}{extra}")


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(v, digits=2) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (scenario, tool): medians, and ratios jwbackup / tool taken round by round."""
    out = []
    order = []
    for row in rows:
        key = (row["scenario"], row["tool"])
        if key not in order:
            order.append(key)
    jw = {(r["scenario"], r["round"]): r for r in rows if r["tool"] == "jwbackup"}
    for scenario, tool in order:
        mine = [r for r in rows if r["scenario"] == scenario and r["tool"] == tool]
        ratios_wall, ratios_cpu = [], []
        for r in mine:
            ref = jw.get((scenario, r["round"]))
            if ref and tool != "jwbackup" and r["run"]["wall"] > 0:
                ratios_wall.append(ref["run"]["wall"] / r["run"]["wall"])
                ratios_cpu.append(ref["run"]["cpu"] / r["run"]["cpu"] if r["run"]["cpu"] else None)
        out.append({
            "scenario": scenario, "tool": tool, "n": len(mine),
            "wall": _median([r["run"]["wall"] for r in mine]),
            "cpu": _median([r["run"]["cpu"] for r in mine]),
            "remote_cpu": _median([r.get("remote_cpu") for r in mine]),
            "rss_kib": _median([r.get("python_maxrss_kib") or r["run"]["maxrss_kib"] for r in mine]),
            "written": _median([r["written"] for r in mine]),
            "entries": _median([r["entries"] for r in mine]),
            "ratio_wall": _median(ratios_wall), "ratio_cpu": _median(ratios_cpu),
        })
    return out


def render(result: dict) -> str:
    m, s = result["machine"], result["system"]
    lines = [
        f"Machine: {m['cores']} cores, {m['memory_gib']} GiB, Debian {m['debian']}, kernel {m['kernel']}, "
        f"{m['rsync']}, {m['borg']}, Python {m['python']}; load average at start {' '.join(m['load_at_start'])}.",
        f"System: {s['entries']:,} entries ({s['regular_files']:,} files, {s['bytes'] / 2**20:,.0f} MiB), "
        f"{s['packages']} packages listing {s['owned_listed_paths']:,} files.",
        "",
        "| scenario | tool | n | wall s | CPU s | peak RSS MiB | written MiB | entries | jw/tool wall | jw/tool CPU |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in summarize(result["rows"]):
        cpu = _fmt(row["cpu"])
        if row["remote_cpu"] is not None:
            cpu += f" (+{_fmt(row['remote_cpu'])} remote)"
        lines.append(
            f"| {row['scenario']} | {row['tool']} | {row['n']} | {_fmt(row['wall'])} | {cpu} | "
            f"{_fmt(row['rss_kib'] and row['rss_kib'] / 1024, 0)} | {_mib(row['written'])} | "
            f"{_fmt(row['entries'], 0)} | {_fmt(row['ratio_wall'])} | {_fmt(row['ratio_cpu'])} |"
        )
    lines += ["", "jwbackup's own split (medians, seconds; the walk and the builder overlap):", "",
              "| scenario | tool | builder | " + " | ".join(PHASES) + " | Python CPU | children CPU | Python peak RSS MiB |",
              "|---|---|---|" + "--:|" * (len(PHASES) + 3)]
    keys = []
    for r in result["rows"]:
        if "phases" in r and (r["scenario"], r["tool"]) not in keys:
            keys.append((r["scenario"], r["tool"]))
    for scenario, tool in keys:
        mine = [r for r in result["rows"] if r["tool"] == tool and r["scenario"] == scenario]
        cells = [_fmt(_median([r["phases"].get(k) for r in mine])) for k in PHASES]
        cells += [_fmt(_median([r["python_cpu"] for r in mine])), _fmt(_median([r["children_cpu"] for r in mine])),
                  _fmt(_median([r["python_maxrss_kib"] / 1024 for r in mine]), 0)]
        lines.append(f"| {scenario} | {tool} | {mine[0]['phases'].get('builder')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_sweep(result: dict) -> str:
    lines = ["| entries | scenario | jwbackup wall s | rsync wall s | jw/rsync | jwbackup CPU s | rsync CPU s | "
             "jwbackup Python RSS MiB | jwbackup manifest s | jwbackup walk+transfer s |",
             "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    points = result["sweep"]
    for scale in sorted({p["scale"] for p in points}):
        for scenario in ("first", "unchanged"):
            jw = next((p for p in points if p["scale"] == scale and p["scenario"] == scenario and p["tool"] == "jwbackup"), None)
            rs = next((p for p in points if p["scale"] == scale and p["scenario"] == scenario and p["tool"] == "rsync"), None)
            if not jw or not rs:
                continue
            lines.append(
                f"| {jw['entries_total']:,} | {scenario} | {_fmt(jw['run']['wall'])} | {_fmt(rs['run']['wall'])} | "
                f"{_fmt(jw['run']['wall'] / rs['run']['wall'])} | {_fmt(jw['run']['cpu'])} | {_fmt(rs['run']['cpu'])} | "
                f"{_fmt(jw['python_maxrss_kib'] / 1024, 0)} | {_fmt(jw['phases']['manifest'])} | "
                f"{_fmt(jw['phases']['walk+transfer'])} |"
            )
    return "\n".join(lines) + "\n"


def plot(json_path: str, png: str, work: str) -> tuple[bool, str]:
    """Draw the sweep with matplotlib: this Python's, or a bench-only venv's (WORK/plot-venv)."""
    candidates = [sys.executable, os.path.join(work, "plot-venv", "bin", "python"), "/usr/bin/python3"]
    for python in candidates:
        if not os.path.exists(python):
            continue
        if subprocess.run([python, "-c", "import matplotlib"], capture_output=True).returncode != 0:
            continue
        done = subprocess.run([python, os.path.join(BENCH, "plot.py"), json_path, png], capture_output=True, text=True)
        if done.returncode == 0:
            return True, python
        return False, done.stderr.strip()[-500:]
    return False, f"matplotlib is not importable by any of {', '.join(candidates)}"

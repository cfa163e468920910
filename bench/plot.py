"""Plot a sweep (``run.py --sweep``): wall time and CPU against entries, jwbackup vs rsync.

    python plot.py SWEEP.json OUT.png     # any Python with matplotlib
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, png: str) -> None:
    with open(src) as f:
        points = json.load(f)["sweep"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "wall", "wall time (s)"), (axes[1], "cpu", "CPU user+sys (s)")):
        for scenario, style in (("first", "-"), ("unchanged", "--")):
            for tool, colour in (("jwbackup", "tab:blue"), ("rsync", "tab:orange")):
                mine = sorted((p["entries_total"], p["run"][metric]) for p in points
                              if p["scenario"] == scenario and p["tool"] == tool)
                if mine:
                    xs, ys = zip(*mine)
                    ax.plot(xs, ys, style, marker="o", color=colour, label=f"{tool}, {scenario}")
        ax.set_xlabel("entries in the system")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("jwbackup vs rsync --link-dest of the whole tree (60% of entries installed by dpkg)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""The ratio of training env steps/s to workers x the env's raw rate, per workload: benchmarks/ratios.png.

Reads benchmarks/ratios.csv (the table "Where the speed goals stand" of benchmarks/README.md): for each
workload and worker count, the older version it was measured against and 16bc280, side by side, with the
goal (a line; a band where the goal is a range). Run from anywhere: python benchmarks/plot_ratios.py
"""
import csv
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: headless, nothing to close
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

HERE = Path(__file__).resolve().parent
NOW = "16bc280"  # the commit that recorded the table; every other version is the one compared with


def main():
    with open(HERE / "ratios.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    groups = list(dict.fromkeys((row["workload"], row["workers"]) for row in rows))  # in file order
    fig = Figure(figsize=(9, 6.5), layout="constrained")
    ax = fig.add_subplot()
    for i, key in enumerate(groups):
        y = len(groups) - 1 - i  # the first workload on top
        for row in (r for r in rows if (r["workload"], r["workers"]) == key):
            now = row["version"] == NOW
            ratio, dy = float(row["ratio"]), -0.2 if now else 0.2
            ax.barh(y + dy, ratio, height=0.38, color="tab:blue" if now else "0.7")
            ax.text(ratio + 0.01, y + dy, f"{ratio:.3f} ({row['version']})", va="center", fontsize=7, zorder=4,
                    bbox=dict(fc="white", ec="none", pad=0.3, alpha=0.8))
            if row["goal"]:
                low, _, high = row["goal"].partition("-")
                if high:
                    ax.fill_betweenx([y - 0.45, y + 0.45], float(low), float(high), color="tab:red", alpha=0.25, lw=0)
                else:
                    ax.plot([float(low)] * 2, [y - 0.45, y + 0.45], color="tab:red", lw=2)
    ax.set_yticks(range(len(groups)), [f"{w}, {n} worker{'s' * (n != '1')}" for w, n in reversed(groups)],
                  fontsize=8)
    ax.set_ylim(-0.6, len(groups) - 0.4)
    ax.set_xlim(0, 2.3)
    ax.set_xlabel("training env steps/s / (workers x the env's raw single-core rate)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend([Line2D([], [], color="tab:red", lw=2), Patch(color="0.7"), Patch(color="tab:blue")],
               ["goal (shaded: a range)", "the version compared with (5278065; CarRacing: 981db65)",
                f"{NOW}, when the table was written"], fontsize=8, loc="outside lower center", ncols=3)
    ax.set_title("Where the speed goals stand: ratio to the raw env rate", fontsize=10)
    fig.savefig(HERE / "ratios.png", dpi=80)


if __name__ == "__main__":
    main()

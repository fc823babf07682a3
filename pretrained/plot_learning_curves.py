"""Every shipped run's evaluation curve, side by side: pretrained/learning_curves.png.

One column per env; the top row against env steps, the bottom row against core-hours (wall_time_s x
cores / 3600). Reads only the shipped pretrained/<name>.progress.csv files (eval_return_mean, env_steps,
wall_time_s, num_cpus). Run from anywhere: python pretrained/plot_learning_curves.py
"""
import csv
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: headless, nothing to close

HERE = Path(__file__).resolve().parent
# env (panel title), then the shipped files trained on it
PANELS = {
    "CartPole-v1": ["ga_cartpole"],
    "LunarLander-v3": ["openai_es_lunarlander", "ga_lunarlander"],
    "BipedalWalker-v3": ["openai_es_bipedalwalker", "ga_bipedalwalker"],
    "CarRacing-v3": ["cmaes_carracing_attention", "cmaes_carracing_rnn", "cmaes_carracing_qk",
                     "cmaes_carracing_scratch"],
}
# cores of the two csv files without a num_cpus column, from their provenance in pretrained/README.md:
# openai_es_lunarlander ran on 2 cores; ga_cartpole on 1 worker (--num-workers 1), counted as 1 core
# as the other GA runs' core-hours are; cmaes_carracing_scratch ran on 1 worker beside another run (its
# num_cpus column counts the machine's 2 cores)
CORES = {"openai_es_lunarlander": 2, "ga_cartpole": 1, "cmaes_carracing_scratch": 1}
STYLES = {"rnn": "--", "qk": ":", "scratch": "-."}  # the CarRacing runs of one color apart
COLORS = {"openai_es": "tab:blue", "ga": "tab:orange", "cmaes": "tab:green"}
LABELS = {"openai_es": "OpenAI-ES", "ga": "GA", "cmaes": "CMA-ES"}


def load(name):
    """(env steps in millions, core-hours, evaluation mean) of the rows that carry an evaluation."""
    with open(HERE / f"{name}.progress.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["eval_return_mean"]]
    steps = [int(row["env_steps"]) / 1e6 for row in rows]
    hours = [float(row["wall_time_s"]) * int(CORES.get(name) or row["num_cpus"]) / 3600 for row in rows]
    return steps, hours, [float(row["eval_return_mean"]) for row in rows]


def main():
    fig = Figure(figsize=(13, 5.6), layout="constrained")
    axes = fig.subplots(2, len(PANELS), squeeze=False)
    for col, (env_id, names) in enumerate(PANELS.items()):
        for name in names:
            algo = next(a for a in COLORS if name.startswith(a + "_"))
            label = LABELS[algo] + (f" ({name.split('_')[-1]})" if algo == "cmaes" else "")
            steps, hours, returns = load(name)
            for ax, x in zip(axes[:, col], (steps, hours)):
                ax.plot(x, returns, STYLES.get(name.split("_")[-1], "-"), marker=".", ms=4,
                        color=COLORS[algo], label=label)
        axes[0, col].set_title(env_id)
        axes[0, col].set_xlabel("env steps (millions)")
        axes[1, col].set_xlabel("core-hours")
        axes[0, col].legend(fontsize=8, loc="lower right")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("evaluation return (mean)")
    fig.suptitle("Shipped runs: evaluation of the current solution during training")
    fig.savefig(HERE / "learning_curves.png", dpi=80)


if __name__ == "__main__":
    main()

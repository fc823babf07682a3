"""Draw the from-scratch recipes of train_cmaes.py side by side: the population's mean training
fitness and the evaluation of the distribution mean against the core-hours each run had (its process's CPU time, not the wall clock: the runs
shared two cores with other work). Reads cmaes_scratch_<recipe>.progress.csv and
cmaes_scratch_cpu.csv (unix time, run name, CPU seconds, last generation, sampled once a minute)
in this folder; writes cmaes_scratch_recipes.png.

    python pretrained/partial/plot_scratch_recipes.py
"""
import csv
import os

from matplotlib.figure import Figure

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPES = {  # run name -> label (every run: --seed 1 --num-workers 1 --eval-every 10 --num-eval-rollouts 10)
    "scratch_full_64x2": "CMA-ES, population 64 x 2 rollouts (20addc5)",
    "scratch_sep_64x2": "sep-CMA-ES (--separable 2000), 64 x 2 (20addc5)",
    "scratch_sep_128x1": "sep-CMA-ES (--separable 2000), 128 x 1 (20addc5)",
    "scratch2_full_64x2": "CMA-ES, 64 x 2, again (d555609)",
    "scratch2_staged_ctrl_64x2": "staged: the controller on a fresh frozen attention, 64 x 2 (d555609)",
    "scratch2_sigma03_64x2": "CMA-ES, --init-sigma 0.3, 64 x 2 (d555609)",
}


def cpu_hours_at(samples, generation):
    """Core-hours of the first sample at which `generation` was done (samples: [(cpu_s, gen)]);
    None for generations done before sampling began."""
    if not samples or generation < samples[0][1]:
        return None
    for cpu_s, done in samples:
        if done >= generation:
            return cpu_s / 3600
    return None


def main():
    with open(os.path.join(HERE, "cmaes_scratch_cpu.csv"), newline="") as f:
        rows = list(csv.reader(f))
    fig = Figure(figsize=(12, 5))
    population, evaluation = fig.subplots(1, 2)
    for name, label in RECIPES.items():
        samples = [(int(cpu), int(gen)) for _, run, cpu, gen in rows if run == name and gen.isdigit()]
        with open(os.path.join(HERE, f"cmaes_{name}.progress.csv"), newline="") as f:
            progress = list(csv.DictReader(f))
        for ax, column in ((population, "return_mean"), (evaluation, "eval_return_mean")):
            points = [(cpu_hours_at(samples, int(row["iteration"])), float(row[column]))
                      for row in progress if row[column]]
            points = [(x, y) for x, y in points if x is not None]
            ax.plot([x for x, _ in points], [y for _, y in points], "o-", ms=3, label=label)
    population.set(ylabel="population mean of the training fitness", title="training")
    evaluation.set(ylabel="evaluation of the mean (10 episodes)", title="evaluation, no early stop")
    for ax in (population, evaluation):
        ax.set(xlabel="core-hours (CPU time of the run)")
        ax.grid(alpha=0.3)
    population.legend(loc="best", fontsize=8)
    fig.suptitle("train_cmaes.py from random weights, seed 1")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "cmaes_scratch_recipes.png"), dpi=90)


if __name__ == "__main__":
    main()

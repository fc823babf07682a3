"""The from-scratch AttentionAgent run of issue 37 across its segments: the population's mean training
fitness and the evaluation of the distribution mean against core-hours (the CPU time of the run's process,
not the wall clock) and against env steps, and the cost to each level. Segments:

1. generations 1-60, `86f3672` (../cmaes_carracing_scratch.progress.csv; its CPU time was sampled at
   generations 40, 50 and 60 only: 1,539, 2,355 and 3,540 s; before 40 it is taken as proportional to
   the env steps);
2. on, restarted from generation 60's mean (--restart-from ../cmaes_carracing_scratch.npz --init-sigma
   0.128299): cmaes_carracing_<run>.progress.csv for each run in RESTARTS, its CPU time from
   cmaes_scratch4_cpu.csv (unix time, run, CPU seconds, last generation; once a minute). Its env steps
   count from 0 (the file had no env_steps in its meta): segment 1's are added;
3. scratch5_128x4, restarted from scratch4_64x2's generation-291 mean.npz with a population of 128 (IPOP-style);
4. scratch6_128x8, restarted from scratch5_128x4's generation-335 mean.npz (its machine was lost): its
   core-hours go on from its parent's last CPU sample plus 120 s (the parent's last generation ended
   after that sample and at most a minute of two cores before the process did).

Writes cmaes_scratch_lineage.png and prints, per level, the first evaluation that reached it.

    python pretrained/partial/plot_scratch_lineage.py
"""
import csv
import os

from matplotlib.figure import Figure

HERE = os.path.dirname(os.path.abspath(__file__))
FIRST = os.path.join(HERE, "..", "cmaes_carracing_scratch.progress.csv")
FIRST_CPU_S = {40: 1539, 50: 2355, 60: 3540}  # generation -> CPU seconds of segment 1's process
# run -> (label, the run it restarted from: None for generation 60's file); a restart's env steps go on from
# its parent's (they count from 0 after generation 60), its core-hours from the parent's last sample
RESTARTS = {"scratch4_64x2": ("restarted at 60, 64 x 2 (c0614d4; from 74 fdaa173, direct frames)", None),
            "scratch4_64x4": ("restarted at 60, 64 x 4 (c0614d4)", None),
            "scratch5_128x4": ("restarted at 291, 128 x 4 (e2904c0)", "scratch4_64x2"),
            "scratch6_128x8": ("restarted at 335, 128 x 8 (b818864)", "scratch5_128x4")}
# A run resumed by a new process: its processes' names in the CPU samples, in order (each counts from 0).
PROCESSES = {"scratch4_64x2": ["scratch4_64x2", "scratch4_64x2_part2", "scratch4_64x2_part3", "scratch4_64x2_part4", "scratch4_64x2_part5", "scratch4_64x2_part6"],
             "scratch5_128x4": ["scratch5_128x4", "scratch5_128x4_part2"]}
LOST = ("scratch5_128x4",)  # runs whose machine was lost: the restart goes on from their last CPU sample
LEVELS = (500, 700, 800, 850, 900)


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def first_segment():
    """[(generation, env steps, core-hours, population mean, evaluation or None)] of generations 1-60."""
    rows = read(FIRST)
    steps = {int(row["iteration"]): int(row["env_steps"]) for row in rows}
    points = []
    for row in rows:
        generation = int(row["iteration"])
        cpu_s = FIRST_CPU_S.get(generation)
        if cpu_s is None and generation < 40:
            cpu_s = FIRST_CPU_S[40] * steps[generation] / steps[40]
        if cpu_s is None:  # between two samples: linear in env steps
            low = max(g for g in FIRST_CPU_S if g < generation)
            high = min(g for g in FIRST_CPU_S if g > generation)
            share = (steps[generation] - steps[low]) / (steps[high] - steps[low])
            cpu_s = FIRST_CPU_S[low] + share * (FIRST_CPU_S[high] - FIRST_CPU_S[low])
        evaluation = float(row["eval_return_mean"]) if row["eval_return_mean"] else None
        points.append((generation, steps[generation], cpu_s / 3600, float(row["return_mean"]), evaluation))
    return points


def restart_segment(run, offset_steps, offset_hours):
    """The same points for a restarted run: core-hours at the first CPU sample that saw each generation."""
    path = os.path.join(HERE, f"cmaes_carracing_{run}.progress.csv")
    if not os.path.exists(path):
        return []
    with open(os.path.join(HERE, "cmaes_scratch4_cpu.csv"), newline="") as f:
        rows = list(csv.reader(f))
    samples = []
    before = 0.0  # CPU seconds of the run's earlier processes
    for process in PROCESSES.get(run, [run]):
        mine = [(int(generation), before + float(cpu_s)) for _, name, cpu_s, generation in rows
                if name == process and generation.isdigit()]
        samples += mine
        if mine:
            before = mine[-1][1]
    points = []
    for row in read(path):
        generation = int(row["iteration"])
        seen = [cpu_s for done, cpu_s in samples if done >= generation]
        if not seen:
            continue
        evaluation = float(row["eval_return_mean"]) if row["eval_return_mean"] else None
        points.append((generation, offset_steps + int(row["env_steps"]), offset_hours + seen[0] / 3600,
                       float(row["return_mean"]), evaluation))
    return points


def last_sample_hours(run):
    """Core-hours of a run's processes at their last CPU sample plus 120 s (see 4. above): float."""
    with open(os.path.join(HERE, "cmaes_scratch4_cpu.csv"), newline="") as f:
        rows = list(csv.reader(f))
    total = 0.0
    for process in PROCESSES.get(run, [run]):
        mine = [float(cpu_s) for _, name, cpu_s, generation in rows if name == process and generation.isdigit()]
        total += mine[-1] if mine else 0.0
    return (total + 120) / 3600


def main():
    first = first_segment()
    segments = {"generations 1-60, 64 x 2 (86f3672)": first}
    ends = {}
    starts = {}  # run -> its first core-hour
    for run, (label, parent) in RESTARTS.items():
        hours = ends[parent][2] if parent else first[-1][2]
        if parent in LOST:  # its last generation has no CPU sample
            hours = starts[parent] + last_sample_hours(parent)
        starts[run] = hours
        segments[label] = restart_segment(run, first[-1][1], hours)
        ends[run] = segments[label][-1] if segments[label] else None
    fig = Figure(figsize=(12, 5))
    by_hours, by_steps = fig.subplots(1, 2)
    for label, points in segments.items():
        if not points:
            continue
        evaluated = [p for p in points if p[4] is not None]
        for ax, x in ((by_hours, 2), (by_steps, 1)):
            line = ax.plot([p[x] if x == 2 else p[x] / 1e6 for p in points], [p[3] for p in points], "-", lw=1,
                           label=f"{label}: population mean")[0]
            ax.plot([p[x] if x == 2 else p[x] / 1e6 for p in evaluated], [p[4] for p in evaluated], "o-", ms=4,
                    color=line.get_color(), label=f"{label}: evaluation (10 episodes; 30 from 200)")
        print(label)
        for level in LEVELS:
            reached = [p for p in evaluated if p[4] >= level]
            if reached:
                generation, steps, hours, _, evaluation = reached[0]
                print(f"  {level}: generation {generation}, {steps:,} env steps, {hours:.2f} core-hours "
                      f"(evaluation {evaluation:.1f})")
    by_hours.set(xlabel="core-hours (CPU time of the run)", ylabel="episode return")
    by_steps.set(xlabel="env steps (millions)")
    for ax in (by_hours, by_steps):
        ax.grid(alpha=0.3)
    by_hours.legend(loc="best", fontsize=7)
    fig.suptitle("train_cmaes.py from random weights (seed 1): the run and its restarts")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "cmaes_scratch_lineage.png"), dpi=90)


if __name__ == "__main__":
    main()

"""CMA-ES training the self-attention AttentionAgent on CarRacing-v3, in one file.

Tang, Nguyen, Ha (2020), "Neuroevolution of Self-Interpretable Agents", GECCO 2020 (arXiv:2003.08165): the agent
cuts each 96x96 frame into 529 patches, lets them vote for each other with a tiny self-attention (query and key
Linear(147, 4)), keeps only the positions of the 10 most voted-for patches, and drives with an LSTM(20, 16) on
those 20 numbers: 3667 parameters, 914 +/- 15 on CarRacing. The flat parameter vector uses the authors' layout,
so their published weights load as they are. The agent is trained without gradients by CMA-ES (Hansen 2016, "The
CMA Evolution Strategy: A Tutorial"), here pycma's `cma.CMAEvolutionStrategy`. Each generation:

    x_i = m + sigma * N(0, C), i = 1..lambda;  F(x_i) = mean return over --num-rollouts
    m <- sum_j w_j x_(j) (x_(j) the j-th best by F);  C, sigma adapt towards steps that paid

pycma minimizes, so it is told -F. The distribution mean m (`es.result.xfavorite`) is the solution.

Examples:
    # the authors' weights over 100 episodes (no early stop; 1000 steps)
    python train_cmaes.py --from-pretrained ../shared/weights/attentionagent_carracing.npz
    # train from scratch with a small budget (the paper: population 256, 16 rollouts)
    python train_cmaes.py --population-size 64 --num-rollouts 2 --eval-every 10 --num-eval-rollouts 10
    # retrain only the controller on the authors' frozen attention (2483 parameters searched)
    python train_cmaes.py --train controller --init-from ../shared/weights/attentionagent_carracing.npz
"""

import argparse
import collections
import dataclasses
import math
import os
import signal
import sys
import typing

SCRIPT = "train_cmaes.py"
FORMAT_VERSION = 1
CONTROLLERS = ("lstm", "rnn", "mlp")
# Randomness: derive_seed(seed, stream, generation, ...), one stream per use.
CMA_STREAM = 0
TRAIN_ENV_STREAM = 1
EVAL_ENV_STREAM = 2


class UserError(Exception):
    """Bad input (flags, files, environments): one line `<script>: error: ...`, exit code 2."""


# ---- 1. Configuration ----
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples as written; each default once (a switch: none; --x/--no-x: the one on)."""

    def _get_help_string(self, action):
        text = action.help.replace(" (default: %(default)s)", "")  # as BooleanOptionalAction adds it
        if "(default" in text or action.default in (None, [], argparse.SUPPRESS):
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            return text + f" (default: {action.option_strings[0 if action.default else 1]})"
        return text if isinstance(action.default, bool) else text + " (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """argparse raising UserError: main() reports it in one line, before anything is written."""

    def error(self, message):
        raise UserError(message)


def build_parser():
    """The argparse parser of every flag."""
    epilog = __doc__[__doc__.index("Examples:") :] + f'\nMore: README.md, section "{SCRIPT}"'
    description = "CMA-ES training the AttentionAgent (Tang et al. 2020)."
    p = OneLineParser(prog=SCRIPT, description=description, formatter_class=HelpFormatter, epilog=epilog)
    usable_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    g = p.add_argument_group("run")
    g.add_argument("--env-id", default="CarRacing-v3", help="a CarRacing-like pixel env")
    g.add_argument("--seed", type=int, default=1, help="seed of every random draw of the run")
    num_workers = "rollout processes, 1: in-process; Ray: the cluster's CPUs if not given (default: usable cores)"
    g.add_argument("--num-workers", type=int, default=usable_cores, help=num_workers)
    g.add_argument("--ray-address", metavar="ADDRESS", help="a Ray cluster's HOST:PORT or auto (default: $RAY_ADDRESS)")
    g.add_argument("--population-size", type=int, default=256, help="CMA-ES population (lambda)")
    g.add_argument("--max-iter", type=int, default=2000, help="generations, from the run's start")
    g.add_argument("--num-rollouts", type=int, default=16, help="episodes per fitness (their mean)")
    g.add_argument("--max-episode-steps", type=int, default=1000, help="episode length limit")
    early_stop = "training episodes end after this many negative rewards in a row (0: off)"
    g.add_argument("--max-negative-steps", type=int, default=20, help=early_stop)
    g.add_argument("--stock-env", action="store_true", help="gymnasium's own CarRacing, in training too")
    frames = "training's frames: drawn at 96x96 (faster) or gymnasium's (default: direct; old checkpoints: gymnasium)"
    g.add_argument("--training-frames", choices=["direct", "gymnasium"], help=frames)
    g.add_argument("--eval-every", type=int, default=10, help="generations between evaluations")
    g.add_argument("--num-eval-rollouts", type=int, default=100, help="episodes per evaluation")
    g.add_argument("--logs-dir", default="runs", help="parent folder of run folders")
    g.add_argument("--exp-name", default=SCRIPT[:-3], help="in the default run folder name")
    g.add_argument("--run-name", help="run folder name (default: <env-id>__<exp-name>__<seed>__<unix-time>)")
    g.add_argument("--resume", metavar="PATH", help="continue a run (checkpoint.pkl or run folder)")
    restart = "continue a lost run from its mean.npz: its mean, sigma and counts, a fresh covariance"
    g.add_argument("--restart-from", metavar="PATH.npz", help=restart)
    pretrained = "evaluate these weights (ours or the authors') over --num-eval-rollouts episodes"
    g.add_argument("--from-pretrained", metavar="PATH.npz", help=pretrained)
    init = "start from these weights (--train attention|controller: the rest frozen at them)"
    g.add_argument("--init-from", "--base-from-pretrained", metavar="PATH.npz", help=init)
    g.add_argument("--capture-video", action="store_true", help="an episode per evaluation, top-k outlined (GIF, mp4)")
    g.add_argument("--reward-goal", type=float, help="stop when the evaluation mean reaches this")
    g.add_argument("--consecutive-goal-stopping", type=int, default=1, help="... in this many evaluations in a row")
    g.add_argument("--quiet", action="store_true", help="no console line a generation, no bar")
    g.add_argument("--track", action="store_true", help="log the run to Weights & Biases (requirements-track.txt)")
    g.add_argument("--wandb-project-name", default="neuroevolution", help="W&B project of --track")
    g.add_argument("--wandb-entity", help="W&B team or user (default: your default entity)")
    g = p.add_argument_group("CMA-ES")
    g.add_argument("--init-sigma", type=float, default=0.1, help="initial step size sigma0")
    separable = "sep-CMA-ES (diagonal, Ros & Hansen 2008) for the first GENERATIONS, then full (0: never)"
    g.add_argument("--separable", type=int, default=0, metavar="GENERATIONS", help=separable)
    train = "the part CMA-ES searches; the rest is frozen at --init-from's weights (else fresh)"
    g.add_argument("--train", choices=["all", "attention", "controller"], default="all", help=train)
    g.add_argument("--fresh", action="store_true", help="with --train, --init-from: the searched part fresh (--seed)")
    g = p.add_argument_group("AttentionAgent")
    g.add_argument("--patch-size", type=int, default=7, help="side of a square patch, pixels")
    g.add_argument("--patch-stride", type=int, default=4, help="step between patches, pixels")
    g.add_argument("--query-dim", type=int, default=4, help="width of the query and key")
    g.add_argument("--top-k", type=int, default=10, help="patches whose centers it sees")
    g.add_argument("--hidden-size", type=int, default=16, help="controller width")
    g.add_argument("--no-bias", dest="bias", action="store_false", help="query and key: no bias")
    controller = "lstm (the paper), rnn (ReLU), mlp (over --num-frames stacked top-k features)"
    g.add_argument("--controller", choices=CONTROLLERS, default="lstm", help=controller)
    g.add_argument("--num-frames", type=int, default=4, help="mlp: stacked feature vectors")
    return p


def parse_args(argv=None):
    """(args, the set of flags given explicitly), checked before anything runs: UserError otherwise."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = flags_given(parser, argv, args)
    check_placement(args, given)
    check_numbers(vars(args), lambda key: "--" + key.replace("_", "-"))
    check_flags(args, given)
    return args, given


def interrupted(signum, frame):
    """Ctrl-C or SIGTERM before main() takes them over (during the imports): one line, exit 130."""
    print("\ninterrupted", file=sys.stderr)
    os._exit(130)


# Kernels picked by CPU set a run's last digits: on x86-64 with AVX2, the same AVX2 ones on every machine.
AVX2_KERNELS = {"OPENBLAS_CORETYPE": "Haswell", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
AVX2_KERNELS |= {"ATEN_CPU_CAPABILITY": "avx2", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}
if __name__ == "__main__":  # --help exits here, before the heavy imports (main() reports bad values)
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    with open("/proc/cpuinfo" if os.path.exists("/proc/cpuinfo") else os.devnull) as cpu:
        if {"avx2", "fma"} <= set(cpu.read().split()):  # Intel since 2013, AMD since 2015
            os.environ.update({**AVX2_KERNELS, **os.environ})  # a variable already set wins
    try:
        build_parser().parse_known_args()
    except UserError:
        pass

import cma
import gymnasium as gym
import numpy as np
import pygame
import torch
import torch.nn as nn
from gymnasium.envs.box2d import car_dynamics, car_racing


# ---- 2. CMA-ES: pycma's CMAEvolutionStrategy ----
def make_cma(x0, init_sigma=0.1, population_size=256, seed=1, run_dir=None, separable=0):
    """(cma.CMAEvolutionStrategy, its sampler's RandomState): CMA-ES around x0 (float (n,)), step size init_sigma.
    `es.ask()`: population_size float64 (n,) candidates; `es.tell(candidates, losses)`: lower is better; `es.sigma`;
    `es.result.xfavorite`: the mean. separable > 0: a diagonal covariance that many generations (sep-CMA-ES)."""
    rng = np.random.RandomState(derive_seed(seed, CMA_STREAM))
    options = {
        "popsize": population_size,  # lambda
        "seed": derive_seed(seed, CMA_STREAM, 1),
        "randn": rng.randn,  # the sampler's normal draws
        "verbose": -9,  # pycma prints nothing
        "verb_disp": 0,
        "verb_log": 0,  # and writes no files
        "verb_filenameprefix": os.path.join(run_dir or "", "outcmaes") + os.sep,
    }
    if separable:
        options["CMA_diagonal"] = separable
    x0 = np.asarray(x0, dtype=np.float64)
    return cma.CMAEvolutionStrategy(x0, init_sigma, options), rng


# ---- 3. Policy, environment, rollout ----
class AttentionAgent(nn.Module):
    """A frame at a time: uint8 (S, S, 3) -> n x n patches in [0, 1] (d = patch_size^2 * 3 values each) ->
    Q, K = fc_q, fc_k(patches) -> importance = column sums of softmax(Q K^T / sqrt(d)) -> centers (row, col) / S
    of the top_k patches (2 top_k,) -> controller -> fc -> tanh. Genotype: the authors' layout, keys sorted."""

    def __init__(
        self,
        image_size=96,
        action_dim=3,
        patch_size=7,
        patch_stride=4,
        query_dim=4,
        top_k=10,
        hidden_size=16,
        bias=True,
        controller="lstm",
        num_frames=4,
    ):
        super().__init__()
        n = (image_size - patch_size) // patch_stride + 1  # patches per row and per column
        self.image_size = image_size
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.top_k = top_k  # patches the controller sees
        self.patch_dim = patch_size * patch_size * 3  # d
        self.controller = controller
        self.num_frames = num_frames  # the mlp controller's stacked feature vectors
        self.fc_q = nn.Linear(self.patch_dim, query_dim, bias=bias)
        self.fc_k = nn.Linear(self.patch_dim, query_dim, bias=bias)
        features = 2 * top_k
        if controller == "lstm":
            self.lstm = nn.LSTM(features, hidden_size)
        elif controller == "rnn":
            self.rnn = nn.RNN(features, hidden_size, nonlinearity="relu")
        else:
            self.fc1 = nn.Linear(features * num_frames, hidden_size)
        self.fc = nn.Linear(hidden_size, action_dim)
        self.requires_grad_(False)  # evolved, never backpropagated
        grid = patch_size // 2 + patch_stride * torch.arange(n, dtype=torch.float32)
        rows, cols = torch.meshgrid(grid, grid, indexing="ij")
        # Patch centers (row, col) / image size, (n^2, 2), row-major like the patches.
        self.patch_positions = torch.stack([rows.flatten(), cols.flatten()], dim=1) / image_size
        self.attention_scale = 1.0 / math.sqrt(self.patch_dim)

    def part_modules(self):
        """{'attention': [...], 'controller': [...]}: each part's modules, in layout order."""
        core = {"lstm": ["lstm"], "rnn": ["rnn"], "mlp": ["fc1"]}[self.controller]
        return {"attention": ["fc_q", "fc_k"], "controller": core + ["fc"]}

    def flat_layout(self):
        """[(part, tensor)] in the authors' flat order."""
        layout = []
        for part, names in self.part_modules().items():
            for name in names:
                state = getattr(self, name).state_dict(keep_vars=True)
                layout.extend((part, state[key]) for key in sorted(state))
        return layout

    def get_flat(self):
        """The genotype: float32 (D,) in the authors' layout."""
        return torch.cat([t.detach().flatten() for _, t in self.flat_layout()]).numpy()

    def set_flat(self, vector):
        """Load a float32 (D,) genotype in the authors' layout. ValueError on a wrong size."""
        vector = torch.tensor(np.asarray(vector, dtype=np.float32))
        layout = self.flat_layout()
        size = sum(t.numel() for _, t in layout)
        if vector.numel() != size:
            raise ValueError(f"expected {size} values, got {vector.numel()}")
        start = 0
        for _, tensor in layout:
            tensor.copy_(vector[start : start + tensor.numel()].view_as(tensor))
            start += tensor.numel()

    def part_mask(self, part):
        """Boolean (D,): which genotype entries belong to `part` ('attention', 'controller' or 'all')."""
        return np.concatenate([np.full(t.numel(), part in (p, "all")) for p, t in self.flat_layout()])

    def patches(self, frame):
        """frame uint8 (S, S, 3) -> float32 (n^2, d) in [0, 1], each patch as (row, col, channel)."""
        p = self.patch_size
        s = self.patch_stride
        patches = torch.from_numpy(frame).float().div_(255.0).unfold(0, p, s).unfold(1, p, s)  # (n, n, 3, p, p)
        return patches.permute(0, 1, 3, 4, 2).reshape(-1, self.patch_dim)  # one copy

    def attend(self, frame):
        """int64 (k,): the top-k patches, most important first; importance_j = sum_i softmax(...)_ij
        as exp(L - rowmax)^T (1 / rowsums), without normalizing."""
        patches = self.patches(frame)
        logits = torch.mm(self.fc_q(patches), self.fc_k(patches).T).mul_(self.attention_scale)
        weights = logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
        importance = torch.mv(weights.T, weights.sum(dim=1).reciprocal_())
        return torch.topk(importance, self.top_k).indices

    def initial_state(self):
        if self.controller == "mlp":
            frames = [torch.zeros(2 * self.top_k)] * self.num_frames
            return collections.deque(frames, maxlen=self.num_frames)
        return None

    def forward(self, frame, state):
        """frame uint8 (S, S, 3), controller state -> (action float32 (action_dim,) in [-1, 1],
        state, top-k indices)."""
        top = self.attend(frame)
        features = self.patch_positions[top].flatten()
        if self.controller == "mlp":
            state.append(features)
            h = torch.relu(self.fc1(torch.cat(list(state))))
        else:
            h, state = getattr(self, self.controller)(features.unsqueeze(0), state)
        action = torch.tanh(self.fc(h.flatten()))
        return action.numpy(), state, top


def make_env(env_config, training):
    """`gymnasium.make` of a CarRacing-like env (uint8 (H, H, 3) frames, else UserError; CarRacing: FastCarRacing
    or DirectCarRacing), with the early stop in training, tanh's [-1, 1] rescaled to its bounds."""
    spec = gym.spec(env_config["env_id"])
    stock = spec.entry_point == "gymnasium.envs.box2d.car_racing:CarRacing"
    if stock and not env_config["stock_env"]:  # gym.make's wrappers, our class
        direct = env_config.get("training_frames" if training else "evaluation_frames") == "direct"  # None: older
        spec = dataclasses.replace(spec, entry_point=DirectCarRacing if direct else FastCarRacing)
    env = gym.make(spec, max_episode_steps=env_config["max_episode_steps"])
    check_spaces(env, env_config["env_id"])
    if training and env_config["max_negative_steps"] > 0:
        env = NegativeRewardEarlyStop(env, env_config["max_negative_steps"])
    bound = np.ones(env.action_space.shape, dtype=env.action_space.dtype)  # no precision warning
    return gym.wrappers.RescaleAction(env, -bound, bound)


def rollout(env, agent, seed, on_step=None, direct=False):
    """One episode from env.reset(seed=seed) -> (episode return, steps); on_step(frame, top-k) sees each frame."""
    obs, _ = env.reset(seed=seed)
    state = agent.initial_state()
    total = 0.0
    steps = 0
    with torch.inference_mode():
        forward = DirectForward(agent) if direct else agent
        while True:
            action, state, top = forward(obs, state)
            if on_step is not None:
                on_step(obs, top)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            steps += 1
            if terminated or truncated:
                return total, steps


# ---- 4. Training loop ----
class RolloutTask(typing.NamedTuple):
    """Row `member` of the batch's float32 (rows, D) matrix drives an episode per env seed (training: early stop)."""

    member: int
    env_seeds: list
    training: bool


class RolloutResult(typing.NamedTuple):
    """A task's episode returns (floats, one per env seed) and its env steps in all."""

    episode_returns: list
    steps: int


def train(args, given):
    """CMA-ES on the AttentionAgent, each generation: ask -> rollouts -> tell -> record -> evaluate
    the mean -> checkpoint. The exit code: 0; 1: workers lost; 130: Ctrl-C or SIGTERM (checkpoint kept)."""
    with Run(args, given) as run:  # from the flags or a checkpoint: folder, agent, pycma, workers
        es = run.es
        args = run.args  # the flags, or the checkpoint's
        evaluation = None
        while run.generation < args.max_iter:
            candidates = es.ask()  # population_size float64 vectors of the searched dimension
            population = np.stack([run.full(x) for x in candidates])  # float32 (lambda, D)
            # Every member of a generation drives the same --num-rollouts tracks (common seeds).
            seeds = [derive_seed(args.seed, TRAIN_ENV_STREAM, run.generation, r) for r in range(args.num_rollouts)]
            tasks = [RolloutTask(member, seeds, True) for member in range(len(candidates))]
            results = run.pool.map(tasks, [population])
            returns = np.array([np.mean(result.episode_returns) for result in results])
            sigma = float(es.sigma)  # the step size these candidates were drawn with
            es.tell(candidates, (-returns).tolist())  # pycma minimizes
            run.recorder.count_generation(returns, sum(result.steps for result in results))
            evaluation = None
            if run.generation % args.eval_every == 0:
                evaluation = evaluate_mean(run)  # best.npz, the goal streak, the video
            run.record(returns, evaluation, sigma)  # progress.csv, TensorBoard, W&B, console
            run.save_checkpoint()
            if run.recorder.goal_reached():
                break
        run.finish(evaluation)  # final.npz and the learning curve
    return run.recorder.exit_code


def evaluate_mean(run):
    """The mean's (xfavorite) evaluation without the early stop, recorded: {mean, std, episodes}."""
    center = run.full(run.es.result.xfavorite)
    returns, steps = evaluate(run.pool, center, run.args.seed, run.generation, run.args.num_eval_rollouts)
    run.recorder.count_steps(steps)
    evaluation = summary(returns)
    run.record_evaluation(center, evaluation)
    return evaluation


# == Machinery: a first-time reader may skip what follows (checks, the run, the fast CarRacing, workers, files, main) ==
import contextlib
import csv
import fcntl
import importlib
import io
import json
import logging
import multiprocessing as mp
import pickle
import platform
import shutil
import socket
import tempfile
import threading
import time
import types
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import cv2

# progress.csv's columns: every script's, then the CMA-ES scalars.
PROGRESS_COLUMNS = ["iteration", "evaluations", "env_steps", "wall_time_s"]
PROGRESS_COLUMNS += ["return_min", "return_mean", "return_max", "return_std", "eval_return_mean", "eval_return_std"]
PROGRESS_COLUMNS += ["sigma", "axis_ratio", "dim", "num_cpus"]
CURVES = [("return_mean", "population mean"), ("return_max", "population max")]  # in the plot
AUTHORS_NUM_PARAMS = 3667  # the authors' file: a bare `params` array
PLOT_INTERVAL_S = 30.0  # learning_curve.png redrawn at an evaluation at most this often
# Flags that --resume may set anew; the rest comes from the checkpoint.
RESUME_FLAGS = {
    "resume",
    "max_iter",
    "num_rollouts",
    "num_workers",
    "ray_address",
    "eval_every",
    "num_eval_rollouts",
    "capture_video",
    "quiet",
    "reward_goal",
    "consecutive_goal_stopping",
    "stock_env",
    "training_frames",
}
PLACEMENT_FLAGS = ("num_workers", "ray_address")  # never taken from a checkpoint
# The architecture's flags: a weights file's meta brings them.
AGENT_FLAGS = ("patch_size", "patch_stride", "query_dim", "top_k", "hidden_size", "bias", "controller", "num_frames")
COUNTERS = ("generation", "evaluations", "env_steps", "wall_time_s", "best_return", "best_eval", "goal_streak")
# A run folder's files, as the last console line names them.
RUN_FILES = ("args.json", "progress.csv", "learning_curve.png", "checkpoint.pkl", "mean.npz", "final.npz")
RUN_FILES += ("best.npz", "videos/")
CHECKPOINT_PARTS = {"cma": cma.CMAEvolutionStrategy, "cma_rng": np.random.RandomState}
CHECKPOINT_MODULES = ("cma",)  # a checkpoint holds pycma's objects, numpy's and builtins
INT_MAX = 2**31 - 1
SIZE_MAX = 4096
# The limits (check_numbers) of every number a flag or a weights file sets.
LIMITS = {
    "seed": (0, 2**32 - 1),
    "num_workers": (1, SIZE_MAX),
    "population_size": (2, INT_MAX),
    "max_iter": (1, INT_MAX),
    "num_rollouts": (1, INT_MAX),
    "max_episode_steps": (1, INT_MAX),
    "max_negative_steps": (0, INT_MAX),
    "eval_every": (1, INT_MAX),
    "num_eval_rollouts": (1, INT_MAX),
    "consecutive_goal_stopping": (1, INT_MAX),
    "reward_goal": (-math.inf, math.inf),
    "init_sigma": (0.0, math.inf, True),
    "sigma": (0.0, math.inf, True),
    "iteration": (0, INT_MAX),
    "env_steps": (0, 2**63 - 1),
    "separable": (0, INT_MAX),
    "image_size": (1, SIZE_MAX),
    "action_dim": (1, SIZE_MAX),
    "patch_size": (1, SIZE_MAX),
    "patch_stride": (1, SIZE_MAX),
    "query_dim": (1, SIZE_MAX),
    "top_k": (1, SIZE_MAX),
    "hidden_size": (1, SIZE_MAX),
    "num_frames": (1, SIZE_MAX),
}


def derive_seed(*keys):
    """A 32-bit seed of integer keys >= 0 (seed, stream, generation, ...): numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


class PoolLost(Exception):
    """Workers keep dying or the Ray cluster is gone: the run stops, its last checkpoint kept (exit 1)."""


# Checks: flags, settings, environments
def check_numbers(values, label):
    """UserError unless each `values` entry in LIMITS is None or finite number(s) of its kind in LIMITS[key]."""
    for key, value in values.items():
        if key not in LIMITS or value is None:
            continue
        low, high, *low_excluded = LIMITS[key]
        integer = isinstance(low, int)
        rules = []
        if math.isfinite(low):
            rules.append(f"> {low}" if low_excluded else f">= {low}")
        if math.isfinite(high):
            rules.append(f"<= {high}")
        kind = "an integer" if integer else "a finite number"
        message = " ".join([f"{label(key)} must be {kind}", " and ".join(rules)]).strip()
        for number in value if isinstance(value, list) else [value]:
            wrong_kind = isinstance(number, bool) or not isinstance(number, int if integer else (int, float))
            if wrong_kind or not (math.isfinite(number) and low <= number <= high) or (low_excluded and number == low):
                raise UserError(f"{message}, got {number!r}")


def flags_given(parser, argv, args):
    """The set of flags (dest names) typed in `argv`: those whose marker argparse replaced."""
    markers = argparse.Namespace(**{name: parser for name in vars(args)})
    typed = parser.parse_args(argv, namespace=markers)
    return {name for name, value in vars(typed).items() if value is not parser}


def check_placement(args, given):
    """Rollouts' place: --ray-address or $RAY_ADDRESS; on Ray all CPUs unless --num-workers; token auth. UserError."""
    if not args.ray_address:
        args.ray_address = os.environ.get("RAY_ADDRESS") or None
    if args.ray_address:
        token = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
        if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token)):
            os.environ["RAY_AUTH_MODE"] = "token"
        import_optional("ray", "--ray-address", "ray")
        host, _, port = args.ray_address.removeprefix("ray://").rpartition(":")
        if args.ray_address != "auto" and not (host and port.isdigit() and 1 <= int(port) <= 65535):
            raise UserError(f"--ray-address must be HOST:PORT (port 1-65535) or auto, got {args.ray_address!r}")
        if "num_workers" not in given:
            args.num_workers = None
    if args.track:
        import_optional("wandb", "--track", "track")


def check_flags(args, given):
    """UserError for flags that exclude each other, and for paths that do not fit."""
    starts = (args.resume, args.from_pretrained, args.init_from, args.restart_from)
    if sum(x is not None for x in starts) > 1:
        raise UserError("--resume, --from-pretrained, --init-from and --restart-from exclude each other")
    if args.fresh and (args.train == "all" or not args.init_from):
        raise UserError("--fresh needs --train attention or controller and --init-from FILE for the frozen part")
    fixed = set()
    if args.resume:
        fixed = given - RESUME_FLAGS
        why = "cannot be changed on resume: the run's settings come from its checkpoint"
    elif args.from_pretrained or args.restart_from:
        fixed = given & set(AGENT_FLAGS)
        why = "comes from the weights file; do not restate the architecture"
    if fixed:
        raise UserError(f"--{min(fixed).replace('_', '-')} {why}")
    for flag, value in vars(args).items():
        if isinstance(value, str) and "\0" in value:
            raise UserError(f"--{flag.replace('_', '-')} holds a NUL character")
    if not args.resume or "env_id" in given:
        check_env_id(args.env_id, "--env-id")
    resume = os.path.join(args.resume, "checkpoint.pkl") if args.resume and os.path.isdir(args.resume) else args.resume
    if resume is not None and not (os.path.isfile(resume) and os.access(resume, os.R_OK)):
        raise UserError(f"--resume {resume}: no such readable file (a checkpoint.pkl or a run folder)")
    for key in ("from_pretrained", "init_from", "restart_from"):
        path = getattr(args, key)
        if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise UserError(f"--{key.replace('_', '-')} {path}: no such readable file")
    check_paths(args)


def check_paths(args):
    """UserError unless --run-name and --exp-name are folder names (no '/', at most 255 bytes) and the run folder
    (--logs-dir/--run-name) is a folder this user can write in, or can be made in one."""
    for flag, name in (("--run-name", args.run_name), ("--exp-name", args.exp_name)):
        if name is None:
            continue
        if name in ("", ".", "..") or {"/", "\0", os.sep} & set(name) or len(os.fsencode(name)) > 255:
            raise UserError(f"{flag} must be a folder name (no '/', at most 255 bytes), got {name!r}")
    folder = os.path.abspath(os.path.join(args.logs_dir, args.run_name or ""))
    while not os.path.exists(folder):  # its nearest existing part
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--logs-dir {args.logs_dir}: {folder} is not a folder this user can write in")


def first_line(error):
    """The first line of an exception's message, or its class name: str."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_env_id(env_id, label):
    try:
        gym.spec(env_id)
    except gym.error.Error as e:
        raise UserError(f"{label}: unknown env {env_id!r}: {first_line(e)}") from None


def check_agent_config(config, label):
    """UserError unless `config` (flags, a weights meta) is an AttentionAgent's."""
    if not isinstance(config, dict) or set(config) != {"image_size", "action_dim", *AGENT_FLAGS}:
        raise UserError(f"{label('agent')} is not an AttentionAgent's settings")
    check_numbers(config, label)
    if not isinstance(config["bias"], bool) or config["controller"] not in CONTROLLERS:
        raise UserError(f"{label('bias')} must be true or false and {label('controller')} one of {CONTROLLERS}")
    size, patch, stride = config["image_size"], config["patch_size"], config["patch_stride"]
    n = (size - patch) // stride + 1
    if patch > size or stride > size or config["top_k"] > n * n:
        raise UserError(
            f"{label('top_k')} {config['top_k']}, {label('patch_size')} {patch} and "
            f"{label('patch_stride')} {stride} must give at least top-k patches in the {size}x{size} frame"
        )


def env_config_from_args(args):
    """The env settings of workers, evaluations and weights files."""
    return {
        "env_id": args.env_id,
        "max_episode_steps": args.max_episode_steps,
        "max_negative_steps": args.max_negative_steps,
        "stock_env": args.stock_env,
        "training_frames": args.training_frames,
        "evaluation_frames": "gymnasium",  # what every published score is measured on
    }


def check_spaces(env, env_id):
    """UserError unless the env gives square RGB uint8 frames and takes a bounded 1-D Box action."""
    obs_space = env.observation_space
    action_space = env.action_space
    shape = obs_space.shape if isinstance(obs_space, gym.spaces.Box) and obs_space.dtype == np.uint8 else ()
    if len(shape) != 3 or shape[0] != shape[1] or shape[2] != 3:
        message = "is not supported: the AttentionAgent takes square RGB uint8 frames"
        raise UserError(f"{env_id}'s observation space {obs_space} {message}")
    box = isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1
    if not (box and np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
        raise UserError(f"{env_id}'s action space {action_space} is not supported: bounded 1-D Box only")


# The run: the algorithm's part
class RunBase:
    """What each script's Run does alike: resume, workers and records, first lines, evaluations, closing."""

    resumed_from = None  # the checkpoint's path, on resume

    def resume(self, args, given):
        """(the checkpoint's args, with the flags RESUME_FLAGS lets be given anew; the checkpoint; its run folder).
        Sets self.resumed_from. UserError: a checkpoint that does not load or holds a number out of LIMITS."""
        checkpoint_path, checkpoint = load_checkpoint(args.resume)
        saved = dict(checkpoint["args"])
        saved.update({key: getattr(args, key) for key in (given & RESUME_FLAGS) | set(PLACEMENT_FLAGS)})
        check_numbers(saved, lambda key: f"{checkpoint_path}: its {key}")
        self.resumed_from = checkpoint_path
        run_dir = os.path.dirname(os.path.abspath(checkpoint_path))
        return argparse.Namespace(**saved), checkpoint, run_dir

    def start(self, worker_args, sizes, *records):
        """self.pool of RolloutWorker(*worker_args) sharing arrays of `sizes`, then self.recorder."""
        args = self.args
        self.pool = RolloutPool(args.num_workers, args.ray_address, RolloutWorker, worker_args, sizes, args.quiet)
        try:  # after the workers: a pool that fails writes no file
            self.recorder = Recorder(args, *records)
        except BaseException:
            self.pool.close()
            raise
        self.pool.on_lost = self.recorder.kept

    def announce(self, policy, parameters, *notes):
        """The first console lines: the policy, its size, population, workers, run folder, `notes`, the resume."""
        print(policy)
        population = f"population: {self.args.population_size}   workers: {self.pool.describe()}"
        print(f"parameters: {parameters}   {population}   run folder: {self.recorder.dir}")
        for note in notes:
            print(note)
        if self.resumed_from:
            print(f"resuming at generation {self.recorder.iteration} from {self.resumed_from}")

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        self.pool.close()
        return self.recorder.close(kind, error)

    def record_evaluation(self, params, evaluation):
        """Recorder's record of an evaluation of `params`, then with --capture-video a video of them."""
        note = self.evaluation_note(evaluation)
        self.recorder.record_evaluation(params, evaluation, self.meta(evaluation), note)
        if self.args.capture_video:
            generation = self.recorder.iteration
            seed = derive_seed(self.args.seed, EVAL_ENV_STREAM, generation, 0)
            stem = os.path.join(self.recorder.dir, "videos", f"iter-{generation:05d}")
            path, _ = record_video(*self.video_policy(params), stem, seed)
            self.recorder.log(f"video {path}")

    def evaluation_note(self, evaluation):
        """What an evaluation's console line adds to its numbers."""
        return ""


class Run(RunBase):
    """A CMA-ES run (a context manager) from the flags or a checkpoint: agent, searched part, pycma, workers."""

    def __init__(self, args, given):
        checkpoint = None
        if args.resume:
            args, checkpoint, run_dir = self.resume(args, given)
            attach_randn(checkpoint["cma"], checkpoint["cma_rng"].randn)
            if args.training_frames is None:  # a checkpoint older than --training-frames
                args.training_frames = "gymnasium"
            counters = checkpoint["counters"]
            self.provenance = checkpoint.get("provenance", []) + [segment("resume", args, counters["generation"])]
        else:
            restart = {"iteration": 0, "env_steps": 0, "provenance": []}
            if args.restart_from:  # the file's architecture, part and sigma
                restart = restart_point(args, given)
            start = "restart" if args.restart_from else "new"
            self.provenance = restart["provenance"] + [segment(start, args, restart["iteration"])]
            if args.training_frames is None:
                args.training_frames = "direct"
            run_dir = os.path.join(args.logs_dir, args.run_name or default_run_name(args))
            counters = {"generation": restart["iteration"], "env_steps": restart["env_steps"]}
        self.args = args
        self.env_config = env_config_from_args(args)
        self.agent, self.agent_config = build_agent(args, probe_env(self.env_config))
        self.base = self.agent.get_flat()  # the genotype, float32 (D,); CMA-ES searches base[mask]
        self.mask = self.agent.part_mask(args.train)
        self.dim = int(self.mask.sum())
        resumed = counters["generation"] if checkpoint else None
        if checkpoint:
            self.es = checkpoint["cma"]
            self.cma_rng = checkpoint["cma_rng"]
        else:
            self.es, self.cma_rng = make_cma(
                self.base[self.mask], args.init_sigma, args.population_size, args.seed, run_dir, args.separable
            )
        worker_args = (self.env_config, self.agent_config, self.base.size)
        title = f"CMA-ES AttentionAgent on {args.env_id} (seed {args.seed})"
        config = {"env_config": self.env_config, "agent_config": self.agent_config, "num_params": self.base.size}
        config["search_dim"] = self.dim
        records = (run_dir, title, PROGRESS_COLUMNS, config, counters, counters["generation"], resumed)
        self.start(worker_args, [args.population_size * self.base.size], *records)
        attention = int(self.agent.part_mask("attention").sum())
        parts = f"{self.base.size} (attention {attention}, controller {self.base.size - attention})"
        self.announce(self.agent, f"{parts}   CMA-ES searches: {self.dim} ({args.train})")
        if args.restart_from and not checkpoint:
            fresh = f"its mean, sigma {args.init_sigma:.6g}, a fresh covariance"
            print(f"restarting at generation {self.generation} from {args.restart_from}: {fresh}")

    @property
    def generation(self):
        """Generations finished."""
        return self.recorder.iteration

    def full(self, x):
        """The searched part x (float (dim,)) put into the genotype: float32 (D,)."""
        vector = self.base.copy()
        vector[self.mask] = x
        return vector

    def meta(self, evaluation=None):
        """A weights file's meta after this generation, with `evaluation` (a summary)."""
        args = self.args
        return {
            "format_version": FORMAT_VERSION,
            "script": SCRIPT,
            "env_id": args.env_id,
            "env": self.env_config,
            "agent": self.agent_config,
            "train": args.train,
            "evaluation": evaluation,
            "seed": args.seed,
            "iteration": self.generation,
            "num_params": int(self.base.size),
            "sigma": float(self.es.sigma),  # the step size after this generation
            "env_steps": self.recorder.counters["env_steps"],
            "provenance": self.provenance,  # the run's segments: new, resume, restart
        }

    def video_policy(self, center):
        """(env config, agent) of a video of the mean `center`."""
        self.agent.set_flat(center)
        return self.env_config, self.agent

    def record(self, returns, evaluation, sigma):
        """The generation's row with the CMA-ES scalars; sigma: the candidates' step size."""
        axis_ratio = float(self.es.D.max() / self.es.D.min())
        scalars = {"sigma": sigma, "axis_ratio": axis_ratio, "dim": self.dim, "num_cpus": self.pool.num_cpus}
        self.recorder.record(returns, evaluation, scalars, f"sigma {sigma:.4f}")

    def save_checkpoint(self):
        """mean.npz, then checkpoint.pkl with pycma's object and generator."""
        save_weights(self.recorder.paths["mean.npz"], self.full(self.es.result.xfavorite), self.meta())
        parts = {"cma": self.es, "cma_rng": self.cma_rng, "provenance": self.provenance}
        self.recorder.counters["generation"] = self.generation
        attach_randn(self.es, None)  # a RandomState's bound method pickles as a `getattr` call
        try:
            self.recorder.save_checkpoint(parts)
        finally:
            attach_randn(self.es, self.cma_rng.randn)

    def finish(self, evaluation=None):
        """final.npz of the mean; evaluation: the last generation's, else one outside the record."""
        center = self.full(self.es.result.xfavorite)
        if evaluation is None:
            returns, _ = evaluate(self.pool, center, self.args.seed, self.generation, self.args.num_eval_rollouts)
            evaluation = summary(returns)
        self.recorder.finish(center, evaluation, self.meta(evaluation))


# The run's records
class Recorder:
    """A run's records: folder, args.json, progress.csv, TensorBoard, W&B, console, checkpoint."""

    def __init__(self, args, folder, title, columns, config, counters, iteration, resumed, ylabel="episode return"):
        """Lock `folder`; open the records after generation `iteration`, resumed (None: a new run). UserError."""
        self.args = args
        self.dir = folder
        self.title = title  # the curve's
        self.ylabel = ylabel
        self.paths = {name: os.path.join(folder, name) for name in RUN_FILES}
        self.log = (lambda *a, **k: None) if args.quiet else print
        self.start = time.perf_counter()
        self.exit_code = 1
        start = {"wall_time_s": 0.0, "best_return": -math.inf, "best_eval": -math.inf}
        self.counters = dict.fromkeys(COUNTERS, 0) | start | counters
        self.iteration = iteration
        self.first_iteration = iteration
        self.checkpointed = resumed  # the generation checkpoint.pkl holds
        os.makedirs(folder, exist_ok=True)
        self.lock = open(os.path.join(folder, ".lock"), "a")  # flock: dropped at any exit
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.close()
            busy = f"{folder} is in use by another run: wait for it to end, or pick another --run-name"
            raise UserError(busy) from None
        try:
            for name in os.listdir(folder):  # atomic writes a kill cut short
                path = os.path.join(folder, name)
                if name.startswith(".tmp-") and os.path.isfile(path) and not os.path.islink(path):  # ours only
                    os.unlink(path)
            if resumed is None and os.path.exists(self.paths["checkpoint.pkl"]):
                raise UserError(
                    f"{self.dir} already holds a run: continue it with --resume {self.dir}, or pick another --run-name"
                )
            self.csv_file, self.writer = open_progress(self.paths["progress.csv"], columns, resumed)
            if args.capture_video:
                os.makedirs(self.paths["videos/"], exist_ok=True)
            self.wandb = None
            if args.track:  # before args.json, which keeps its id
                self.wandb = import_optional("wandb", "--track", "track")
                args.wandb_id = vars(args).get("wandb_id") or uuid.uuid4().hex[:16]
                try:
                    self.wandb.init(
                        project=args.wandb_project_name,
                        entity=args.wandb_entity,
                        config=vars(args),
                        name=os.path.basename(self.dir),
                        dir=self.dir,
                        id=args.wandb_id,
                        resume="allow",
                    )
                    self.wandb.define_metric("*", step_metric="env_steps")  # the scalars, logged
                except Exception as e:
                    reason = first_line(e)
                    raise UserError(f"--track: W&B did not start the run: {reason}") from None
            config = {**vars(args), **config, "versions": versions()}
            atomic_write(self.paths["args.json"], json.dumps(config, indent=2).encode())
            from torch.utils.tensorboard import SummaryWriter  # ~2 s of imports

            purge_step = None if resumed is None else self.counters["env_steps"] + 1  # hides later points
            self.tb = SummaryWriter(self.dir, purge_step=purge_step)
            table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
            self.tb.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)  # CleanRL's table
        except BaseException:
            self.lock.close()  # now, not by the garbage collector
            raise
        self.wall_offset = self.counters["wall_time_s"]
        self.last_plot = -math.inf
        self.last_row = time.perf_counter()
        self.steps = 0  # env steps of the generation under way

    def close(self, kind, error):
        """Close once the checkpoint is written (its error is the run's): True if handled (Ctrl-C, PoolLost)."""
        stopped = kind is not None and issubclass(kind, (KeyboardInterrupt, PoolLost))
        written = checkpoint_written()  # None, or the write's error
        if not os.path.exists(self.paths["progress.csv"]):  # rm -rf: say so
            written = OSError(f"the run folder {self.dir} was removed during the run (its progress.csv is gone)")
            kind, error = OSError, written
        elif written is not None and (kind is None or stopped):
            kind, error = type(written), written
        self.csv_file.close()
        if kind is None:
            self.exit_code = 0
        elif issubclass(kind, KeyboardInterrupt):
            print(f"\ninterrupted: {self.kept()}", file=sys.stderr)
            self.exit_code = 130
        elif issubclass(kind, PoolLost):  # its message ends with self.kept()
            print(f"{SCRIPT}: error: {error}", file=sys.stderr)
        with signals_held(), contextlib.suppress(OSError):  # raised at its last flush
            self.tb.close()
        if self.wandb:
            self.upload()
            self.wandb.finish(exit_code=self.exit_code)
        if kind is None:
            files = [name for name in RUN_FILES if os.path.exists(self.paths[name])]
            files.append("events.out.tfevents.* (TensorBoard)")
            print(
                f"done: {self.iteration} generations, {self.counters['env_steps']} env steps, "
                f"{self.counters['wall_time_s']:.1f} s. Files in {self.dir}: {' '.join(files)}"
            )
        self.lock.close()
        if written is not None and error is written:
            raise written
        return stopped

    def kept(self):
        """What to tell of the checkpoint when the run stops early."""
        if self.checkpointed is None:
            return "no generation had finished: there is no checkpoint to resume, start the run anew"
        return (
            f"the checkpoint of generation {self.checkpointed} is kept in "
            f"{self.paths['checkpoint.pkl']}\nresume with: python {SCRIPT} --resume {self.dir}"
            "   (on any Ray cluster with --ray-address, or locally)"
        )

    def count_steps(self, steps):
        """Env steps spent in this generation (rollouts, evaluations)."""
        self.steps += steps
        self.counters["env_steps"] += steps

    def count_generation(self, returns, steps):
        """A generation told: its members' fitness (float (N,)) and their env steps."""
        self.iteration += 1
        self.counters["evaluations"] += len(returns)
        self.counters["best_return"] = max(self.counters["best_return"], float(np.max(returns)))
        self.count_steps(steps)

    def reaches_goal(self, value):
        """Whether `value` reaches --reward-goal (never without one)."""
        return self.args.reward_goal is not None and value >= self.args.reward_goal

    def screened_out(self, evaluation):
        """An evaluation a screen stopped after its first episodes: the goal streak ends."""
        self.counters["goal_streak"] = 0
        self.log(
            f"eval {self.iteration:>5d} | screened out: return {evaluation['mean']:9.2f} over "
            f"the first {evaluation['episodes']} episodes, below the goal"
        )

    def record_evaluation(self, params, evaluation, meta, note=""):
        """An evaluation of `params`: best.npz (with `meta`) if best, the goal streak, its console line."""
        counters = self.counters
        if evaluation["mean"] > counters["best_eval"]:
            counters["best_eval"] = evaluation["mean"]
            save_weights(self.paths["best.npz"], params, meta)
        counters["goal_streak"] = counters["goal_streak"] + 1 if self.reaches_goal(evaluation["mean"]) else 0
        self.log(
            f"eval {self.iteration:>5d} | return {evaluation['mean']:9.2f} ± {evaluation['std']:8.2f} over "
            f"{evaluation['episodes']} episodes | best eval {counters['best_eval']:9.2f}{note}"
        )

    def record(self, returns, evaluation, scalars, note):
        """The generation's row (`scalars` last): progress.csv, TensorBoard, W&B, console, curve."""
        counters = self.counters
        evaluated = evaluation or {}
        now = time.perf_counter()
        counters["wall_time_s"] = self.wall_offset + (now - self.start)
        row = {
            "iteration": self.iteration,
            "evaluations": counters["evaluations"],
            "env_steps": counters["env_steps"],
            "wall_time_s": round(counters["wall_time_s"], 3),
            "return_min": float(np.min(returns)),
            "return_mean": float(np.mean(returns)),
            "return_max": float(np.max(returns)),
            "return_std": float(np.std(returns)),
            "eval_return_mean": evaluated.get("mean"),
            "eval_return_std": evaluated.get("std"),
            **scalars,
        }
        self.writer.writerow({column: csv_cell(column, value) for column, value in row.items()})
        self.csv_file.flush()
        points = {column: as_written(column, value) for column, value in row.items() if value is not None}
        del points["env_steps"]
        with signals_held():
            for column, value in points.items():
                self.tb.add_scalar(column, value, global_step=counters["env_steps"])
        if self.wandb:  # logged, not synced: W&B would copy the event files
            self.wandb.log({**points, "env_steps": counters["env_steps"]})
        if evaluation is not None and now - self.last_plot >= PLOT_INTERVAL_S:
            self.plot()
        eta = (now - self.start) / (self.iteration - self.first_iteration) * (self.args.max_iter - self.iteration)
        self.log(
            f"iter {self.iteration:>5d}/{self.args.max_iter} | evals {counters['evaluations']:>8d} | return min "
            f"{row['return_min']:8.2f} mean {row['return_mean']:8.2f} max {row['return_max']:8.2f} | best "
            f"{counters['best_return']:8.2f} | {note} | {self.steps / (now - self.last_row):8,.0f} steps/s | "
            f"cpus {row['num_cpus']} | {duration(counters['wall_time_s'])} elapsed | ETA {duration(eta)}"
        )
        self.steps = 0
        if evaluation is not None and self.wandb:
            self.upload()

    def save_checkpoint(self, parts):
        """checkpoint.pkl with the algorithm's `parts`, written on a thread; TensorBoard flushed."""
        state = {"format_version": FORMAT_VERSION, "script": SCRIPT, "args": vars(self.args), **parts}
        state["counters"] = dict(self.counters)
        save_checkpoint(self.paths["checkpoint.pkl"], state)
        self.checkpointed = self.iteration  # the generation the resume hint names
        if STOPPING.is_set():  # a Ctrl-C that Python dropped
            raise KeyboardInterrupt
        with signals_held():
            self.tb.flush()
        self.last_row = time.perf_counter()  # the next generation's speed: from here

    def goal_reached(self):
        """Whether --reward-goal was met in --consecutive-goal-stopping evaluations in a row."""
        goal = self.args.reward_goal
        streak = self.counters["goal_streak"]
        if goal is None or streak < self.args.consecutive_goal_stopping:
            return False
        print(
            f"reward goal {goal:g} reached in {streak} consecutive evaluation(s) at generation "
            f"{self.iteration} ({self.counters['wall_time_s']:.1f} s)"
        )
        return True

    def finish(self, params, evaluation, meta):
        """final.npz of `params` with `meta`, the console line, the last curve."""
        self.log(
            f"final evaluation | return {evaluation['mean']:9.2f} ± {evaluation['std']:8.2f} over "
            f"{evaluation['episodes']} episodes"
        )
        save_weights(self.paths["final.npz"], params, meta)
        self.plot()

    def plot(self):
        """learning_curve.png redrawn from progress.csv."""
        plot_learning_curve(
            self.paths["progress.csv"], self.paths["learning_curve.png"], self.title, CURVES, self.ylabel
        )
        self.last_plot = time.perf_counter()

    def upload(self):
        """With --track: the existing weights files and curve, to W&B now."""
        for name in ("best.npz", "final.npz", "learning_curve.png"):
            if os.path.exists(self.paths[name]):
                self.wandb.save(self.paths[name], base_path=self.dir, policy="now")


def summary(returns):
    """{mean, std, episodes} of evaluation returns."""
    return {"mean": float(returns.mean()), "std": float(returns.std()), "episodes": int(returns.size)}


def duration(seconds):
    """H:MM:SS."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def as_written(column, value):
    """A row's number as its csv cell holds it (TensorBoard, W&B): floats to 6 significant digits."""
    if column == "wall_time_s" or not isinstance(value, float) or value == 0 or not math.isfinite(value):
        return value
    return round(value, 5 - math.floor(math.log10(abs(value))))


def csv_cell(column, value):
    """A progress.csv cell: wall_time_s in ms, other floats to 6 significant digits, None empty."""
    if value is None:
        return ""
    if column == "wall_time_s":
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def evaluate(pool, params, seed, iteration, episodes):
    """(returns float64 (episodes,), env steps) of `params` (float (D,)) in evaluation episodes."""
    seeds = [derive_seed(seed, EVAL_ENV_STREAM, iteration, episode) for episode in range(episodes)]
    results = pool.map([RolloutTask(0, [env_seed], False) for env_seed in seeds], [params], "evaluation")
    returns = np.array([result.episode_returns[0] for result in results])
    return returns, sum(result.steps for result in results)


def build_agent(args, env_shape):
    """(AttentionAgent, its config) of the flags for env_shape (image size, action dim), seeded with --seed, then
    --init-from's modules of the same shapes. UserError: a frozen part that does not fit."""
    agent_config = {"image_size": env_shape[0], "action_dim": env_shape[1]}
    agent_config |= {key: getattr(args, key) for key in AGENT_FLAGS}
    check_agent_config(agent_config, lambda key: "--" + key.replace("_", "-"))
    torch.manual_seed(args.seed)
    agent = AttentionAgent(**agent_config)
    origin_file = args.init_from or args.restart_from
    if origin_file:  # on resume too: no checkpoint holds the frozen part
        source, _, _ = agent_from_file(origin_file, *env_shape)
        shapes = lambda module: {key: value.shape for key, value in module.state_dict().items()}
        for part, names in agent.part_modules().items():
            if args.fresh and part == args.train:
                continue
            for name in names:
                target, origin = getattr(agent, name), getattr(source, name, None)
                if origin is not None and shapes(target) == shapes(origin):
                    target.load_state_dict(origin.state_dict())
                elif args.train not in ("all", part):
                    raise UserError(
                        f"{origin_file} cannot provide the {part}: its {name} does not match this "
                        f"agent's ({source.controller} controller, query dim {source.fc_q.out_features}, "
                        f"hidden size {source.fc.in_features} in the file)"
                    )
    return agent, agent_config


def open_progress(path, columns, last_iteration):
    """(progress.csv open to append, its DictWriter); a resume keeps rows up to `last_iteration`, old
    ones get today's columns. UserError, the file kept: another header, or gaps."""
    kept = None
    if last_iteration is not None and os.path.exists(path):
        with open(path, newline="") as f:
            text = f.read()
        complete = text[: text.rfind("\n") + 1]  # without a last line cut short
        rows = list(csv.reader(io.StringIO(complete)))
        hint = f"restore it, or move it away to resume with a progress.csv starting at generation {last_iteration + 1}"
        header = rows[0] if rows else []
        if not header or header[0] != columns[0] or not set(header) <= set(columns):
            raise UserError(f"{path} has no header of this run's columns (emptied or cut?): {hint}")
        kept = [dict(zip(header, row)) for row in rows[1:] if len(row) == len(header) and row[0].isdigit()]
        kept = [[row.get(column, "") for column in columns] for row in kept if int(row[columns[0]]) <= last_iteration]
        iterations = [int(row[0]) for row in kept]
        if not iterations or iterations != list(range(iterations[0], last_iteration + 1)):
            raise UserError(f"{path} lacks rows up to the checkpoint's generation {last_iteration}: {hint}")
        if kept != rows[1:] or complete != text:
            table = io.StringIO()
            csv.writer(table).writerows([columns, *kept])
            atomic_write(path, table.getvalue().encode())
    csv_file = open(path, "a" if kept else "w", newline="")
    writer = csv.DictWriter(csv_file, columns)
    if not kept:
        writer.writeheader()
    return csv_file, writer


# The environment: the early stop, and CarRacing at twice the speed
class NegativeRewardEarlyStop(gym.Wrapper):
    """Truncate an episode after `patience` negative rewards in a row: CarRacing's training early stop (estool)."""

    def __init__(self, env, patience):
        super().__init__(env)
        self.patience = patience  # negative rewards in a row that end the episode
        self.negative_steps = 0  # negative rewards in a row so far

    def reset(self, **kwargs):
        self.negative_steps = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.negative_steps = self.negative_steps + 1 if reward < 0 else 0
        return obs, reward, terminated, truncated or self.negative_steps >= self.patience, info


GRASS_DIM = car_racing.GRASS_DIM
WINDOW_W = car_racing.WINDOW_W
WINDOW_H = car_racing.WINDOW_H


class FastCarRacing(car_racing.CarRacing):
    """gymnasium 1.4.0's CarRacing bit for bit, twice as fast: it skips the ~96% of the polygons a stock step
    rotates only to clip, and loads the score font once. requirements.txt pins gymnasium."""

    GRASS = [
        [(GRASS_DIM * x + GRASS_DIM * i, GRASS_DIM * y + GRASS_DIM * j) for i, j in ((1, 0), (0, 0), (0, 1), (1, 1))]
        for x in range(-20, 20, 2)
        for y in range(-20, 20, 2)
    ]  # the stock grass, in its order
    FIELD = np.array([(1, 1), (1, -1), (-1, -1), (-1, 1)], dtype=np.float64) * car_racing.PLAYFIELD
    FONT_CLASS = pygame.font.Font

    @staticmethod
    def _polygons(vertices):
        """(vertices (P, V, 2), centers (P, 2), radii (P,)): polygons and their circles."""
        centers = vertices.mean(axis=1)
        return vertices, centers, np.sqrt(np.square(vertices - centers[:, None]).sum(axis=2)).max(axis=1)

    GRASS_POLYGONS = _polygons(np.array(GRASS, dtype=np.float64))  # (400, 4, 2) vertices

    @staticmethod
    def _to_window(points, zoom, translation, angle):
        """gymnasium's transform: float64 (..., 2) world points -> x, y window pixels (...,)."""
        cos = math.cos(angle)
        sin = math.sin(angle)
        x = (points[..., 0] * cos - points[..., 1] * sin) * zoom + translation[0]
        y = (points[..., 0] * sin + points[..., 1] * cos) * zoom + translation[1]
        return x, y

    def _near(self, polygons, zoom, translation, angle):
        """Ascending indices of the `_polygons` whose circle comes within 3 pixels of the window."""
        _, centers, radii = polygons
        x, y = self._to_window(centers, zoom, translation, angle)
        reach = radii * zoom + 3.0
        return np.flatnonzero((x >= -reach) & (x <= WINDOW_W + reach) & (y >= -reach) & (y <= WINDOW_H + reach))

    def _maybe_visible(self, polygons, zoom, translation, angle):
        """Those `_near` passing `_draw_colored_polygon`'s screen check, their box meeting the window."""
        near = self._near(polygons, zoom, translation, angle)
        x, y = self._to_window(polygons[0][near], zoom, translation, angle)
        m = car_racing.MAX_SHAPE_DIM + 1.0
        passes_check = ((x >= -m) & (x <= WINDOW_W + m) & (y >= -m) & (y <= WINDOW_H + m)).any(axis=1)
        across = (x.max(axis=1) >= -2) & (x.min(axis=1) <= WINDOW_W + 2)
        touches = across & (y.max(axis=1) >= -2) & (y.min(axis=1) <= WINDOW_H + 2)
        return near[passes_check & touches]

    def reset(self, *, seed=None, options=None):
        self._road = None  # a new track: gathered at its first frame
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # not in Box2D's CreateBody
        try:
            return super().reset(seed=seed, options=options)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a Ctrl-C meanwhile arrives now

    def _road_polygons(self):
        """`_polygons` of `self.road_poly` ((R, 4, 2) float64 vertices), gathered once per track."""
        if self._road is None:
            road = np.array([poly for poly, _ in self.road_poly], dtype=np.float64)
            self._road = self._polygons(road.reshape(-1, 4, 2))
        return self._road

    def _render_road(self, zoom, translation, angle):
        self._draw_colored_polygon(self.surf, self.FIELD.tolist(), self.bg_color, zoom, translation, angle, clip=False)
        for i in self._maybe_visible(self.GRASS_POLYGONS, zoom, translation, angle):
            self._draw_colored_polygon(self.surf, self.GRASS[i], self.grass_color, zoom, translation, angle)
        for i in self._maybe_visible(self._road_polygons(), zoom, translation, angle):
            poly, color = self.road_poly[i]
            self._draw_colored_polygon(self.surf, poly, [int(c) for c in color], zoom, translation, angle)

    def _render(self, mode):
        # gymnasium's _render, the score font cached (it loads it every frame)
        font_class, pygame.font.Font = pygame.font.Font, self._score_font
        try:
            return super()._render(mode)
        finally:
            pygame.font.Font = font_class

    def _score_font(self, name, size):
        if getattr(self, "_font", None) is None:
            self._font = self.FONT_CLASS(name, size)
        return self._font


class DirectCarRacing(FastCarRacing):
    """FastCarRacing, the observation (--training-frames direct) filled by `cv2.fillPoly` into a 384 x 384 canvas
    and box-averaged 4 x 4: a few levels off gymnasium's on edges (benchmarks/README.md)."""

    SIDE = car_racing.STATE_W * 4  # the canvas: 4 x 4 pixels per observation pixel
    SHIFT = 4  # fixed-point fraction bits (1/16 canvas pixel)
    # smoothscale truncates twice: a uniform level v > 1 comes out as v - 2
    SMOOTHSCALE_LOSS = (2, 2, 2, 0)  # subtracted, saturating at 0
    # gymnasium's bars (place, scale, color, vertical): speed, the wheels' ABS, steering, gyro
    BARS = [(5, 0.02, (255, 255, 255), True), (7, 0.01, (0, 0, 255), True), (8, 0.01, (0, 0, 255), True)]
    BARS += [(9, 0.01, (51, 0, 255), True), (10, 0.01, (51, 0, 255), True), (20, -10.0, (0, 255, 0), False)]
    BARS += [(30, -0.8, (255, 0, 0), False)]

    def reset(self, *, seed=None, options=None):
        self._scene = None  # a new track and car: gathered at the first frame
        return super().reset(seed=seed, options=options)

    def _render(self, mode):
        if mode != "state_pixels" or "t" not in self.__dict__:
            return super()._render(mode)
        scene = self._scene = self._scene or self._gather_scene()
        canvas = np.zeros((self.SIDE, self.SIDE, 4), dtype=np.uint8)  # BGR + 1: OpenCV's faster resize
        angle = -self.car.hull.angle
        zoom = 0.1 * car_racing.SCALE * max(1 - self.t, 0) + car_racing.ZOOM * car_racing.SCALE * min(self.t, 1)
        position = self.car.hull.position
        scroll = pygame.math.Vector2((-position[0] * zoom, -position[1] * zoom)).rotate_rad(angle)
        translation = (WINDOW_W / 2 + scroll[0], WINDOW_H / 4 + scroll[1])
        near = self._near(scene.polygons, zoom, translation, angle)  # grass, then road
        car, car_calls = self._car(scene)
        points = np.concatenate([self.FIELD, scene.polygons[0][near].reshape(-1, 2), car.reshape(-1, 2)])
        x, y = self._to_window(points, zoom, translation, angle)
        fixed = self._fixed(x, WINDOW_H - y)  # the window's vertical flip
        first_car = 4 * (1 + len(near))  # after the field, grass and road: 4 vertices each
        quads = fixed[4:first_car].reshape(-1, 4, 2)
        # boxes within 2 pixels of the canvas: those gymnasium's screen check lets through
        low = -2 << self.SHIFT
        high = (self.SIDE + 2) << self.SHIFT
        inside = (quads.max(axis=1) >= low).all(axis=1) & (quads.min(axis=1) <= high).all(axis=1)
        visible = near[inside]
        grass = int(np.searchsorted(visible, len(self.GRASS)))
        quads = [fixed[:4], *quads[inside]]
        car_fixed = fixed[first_car:].reshape(car.shape)
        road_colors = [self.road_poly[i][1] for i in visible[grass:] - len(self.GRASS)]  # visited tiles change
        # ([polygons], color) in gymnasium's order; the grass squares (disjoint) in one call
        calls = [(quads[:1], scene.field_color), (quads[1 : 1 + grass], scene.grass_color)]
        calls += zip(([quad] for quad in quads[1 + grass :]), np.array(road_colors, dtype=np.int64).tolist())
        calls += [([car_fixed[b, start:end] for b, start, end in polygons], color) for polygons, color in car_calls]
        for polygons, color in calls:
            cv2.fillPoly(canvas, polygons, color, cv2.LINE_8, self.SHIFT)
        self._indicators(canvas)
        # a 4 x 4 box average as two halvings, 3x faster than one
        half = cv2.resize(canvas, (self.SIDE // 2, self.SIDE // 2), interpolation=cv2.INTER_AREA)
        frame = cv2.resize(half, (car_racing.STATE_W, car_racing.STATE_H), interpolation=cv2.INTER_AREA)
        return cv2.subtract(cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR), self.SMOOTHSCALE_LOSS)

    def _gather_scene(self):
        """A track's and car's arrays: `polygons` (grass, then road), `car` (float64 (B, V, 2): each body's fixtures,
        a wheel's stripe after it), `car_polygons` ([([(body, start, end)], color, are stripes)])."""
        fixtures = [[f.shape.vertices for f in body.fixtures] for body in self.car.drawlist]
        car = np.zeros((len(fixtures), max(sum(map(len, shapes)) + 4 for shapes in fixtures), 2))
        wheels = []
        stripes = []
        hull = []
        for b, (body, shapes) in enumerate(zip(self.car.drawlist, fixtures)):
            start = 0
            for vertices in shapes:
                end = start + len(vertices)
                car[b, start:end] = vertices
                if "phase" in body.__dict__:
                    wheels.append((b, start, end))
                    stripes.append((b, end, end + 4))
                    end += 4
                else:
                    hull.append(([(b, start, end)], [int(c * 255) for c in body.color], False))
                start = end
        wheel_color = [int(c * 255) for c in self.car.wheels[0].color]
        return types.SimpleNamespace(
            polygons=self._polygons(np.concatenate([self.GRASS_POLYGONS[0], self._road_polygons()[0]])),
            field_color=[int(c) for c in self.bg_color],
            grass_color=[int(c) for c in self.grass_color],
            car=car,
            car_polygons=[(wheels, wheel_color, False), (stripes, car_dynamics.WHEEL_WHITE, True), *hull],
        )

    def _car(self, scene):
        """(float64 (B, V, 2) world vertices, `scene.car_polygons` less hidden stripes)."""
        bodies = self.car.drawlist
        calls = []
        for polygons, color, are_stripes in scene.car_polygons:
            if are_stripes:
                shown = []
                for body, start, end in polygons:
                    stripe = self._wheel_stripe(bodies[body].phase)
                    if stripe is not None:
                        scene.car[body, start:end] = stripe
                        shown.append((body, start, end))
                polygons = shown
            calls.append((polygons, color))
        cos = [math.cos(body.angle) for body in bodies]
        sin = [math.sin(body.angle) for body in bodies]
        turns = np.array([((c, s), (-s, c)) for c, s in zip(cos, sin)])  # v @ turn + position
        positions = np.array([tuple(body.position) for body in bodies])
        return scene.car @ turns + positions[:, None], calls

    def _fixed(self, x, y):
        """Window pixels x, y float64 (N,) (pygame's) -> int32 (N, 2) OpenCV fixed point canvas pixels."""
        fixed = np.empty((len(x), 2))
        fixed[:, 0] = (x * (self.SIDE / WINDOW_W) - 0.5) * (1 << self.SHIFT)
        fixed[:, 1] = (y * (self.SIDE / WINDOW_H) - 0.5) * (1 << self.SHIFT)
        return np.rint(fixed, out=fixed).astype(np.int32)

    @staticmethod
    def _wheel_stripe(phase):
        """The wheel stripe car_dynamics.Car.draw paints at this phase, None when hidden."""
        s1 = math.sin(phase)
        s2 = math.sin(phase + 1.2)
        c1 = math.cos(phase)
        c2 = math.cos(phase + 1.2)
        if s1 > 0 and s2 > 0:
            return None
        if s1 > 0:
            c1 = np.sign(c1)
        if s2 > 0:
            c2 = np.sign(c2)
        w = car_dynamics.WHEEL_W * car_dynamics.SIZE
        r = car_dynamics.WHEEL_R * car_dynamics.SIZE
        return np.array([(-w, r * c1), (w, r * c1), (w, r * c2), (-w, r * c2)])

    def _indicators(self, canvas):
        """gymnasium's `_render_indicators` (black bar, BARS) and the score, after the flip."""
        s = WINDOW_W / 40.0
        h = WINDOW_H / 40.0
        canvas[round(self.SIDE * (1 - 5 / 40)) :] = 0  # the black bar, whole rows
        velocity = self.car.hull.linearVelocity
        wheels = self.car.wheels
        speed = math.sqrt(velocity[0] ** 2 + velocity[1] ** 2)
        values = [speed, *(wheel.omega for wheel in wheels), wheels[0].joint.angle, self.car.hull.angularVelocity]
        x = []  # the bars' opposite corners, window pixels
        y = []
        colors = []
        for value, (place, scale, color, vertical) in zip(values, self.BARS):
            if abs(value) > 1e-4:  # gymnasium draws no bar for a smaller value
                val = scale * value
                if vertical:
                    x += [place * s, place * s + s]
                    y += [WINDOW_H - (h + h * val), WINDOW_H - h]
                else:
                    x += [place * s, (place + val) * s]
                    y += [WINDOW_H - 4 * h, WINDOW_H - 2 * h]
                colors.append(color)
        corners = ((self._fixed(np.array(x), np.array(y)) + (1 << self.SHIFT - 1)) >> self.SHIFT).tolist()
        for corner, opposite, color in zip(corners[::2], corners[1::2], colors):
            # fillPoly's pixels of an upright rectangle: its rounded corners' and all between
            cv2.rectangle(canvas, corner, opposite, color, cv2.FILLED)
        text, (x, y) = self._score_text(f"{self.reward:04.0f}")
        patch = canvas[y : y + text.shape[0], x : x + text.shape[1], :3]
        np.maximum(patch, text[: patch.shape[0], : patch.shape[1]], out=patch)

    def _score_text(self, string):
        """(uint8 (h, w, 3) score text at canvas scale, its top-left (x, y) on the canvas), cached."""
        cache = self.__dict__.setdefault("_texts", {})
        if string not in cache:
            pygame.font.init()
            font = self._score_font(pygame.font.get_default_font(), 42)
            surface = font.render(string, True, (255, 255, 255), (0, 0, 0))
            rect = surface.get_rect()
            rect.center = (60, WINDOW_H - WINDOW_H * 2.5 / 40.0)
            image = np.transpose(pygame.surfarray.array3d(surface), (1, 0, 2))
            sx = self.SIDE / WINDOW_W
            sy = self.SIDE / WINDOW_H
            x0 = max(rect.left, 0) * sx
            y0 = rect.top * sy
            size = (max(round(rect.right * sx - x0), 1), max(round(rect.bottom * sy - y0), 1))
            text = cv2.resize(image[:, max(-rect.left, 0) :], size, interpolation=cv2.INTER_AREA)
            cache[string] = (text, (round(x0), round(y0)))
        return cache[string]


LOG2E = 1.4426950408889634  # exp(x) = exp2(x log2(e))
EXP2_SAFE = 100.0  # |logits| <= 100: exp2 and its row sums fit float32


class DirectForward:
    """AttentionAgent.forward, cheaper (--training-frames direct; near-tied top-k may swap): fc_q, fc_k one Linear,
    softmax by exp2, the row max only past EXP2_SAFE, the cell one addmv."""

    def __init__(self, agent):
        self.agent = agent
        scale = agent.attention_scale * LOG2E
        self.query_dim = agent.fc_q.out_features
        self.weight = torch.cat([agent.fc_q.weight * scale, agent.fc_k.weight])
        self.bias = None
        if agent.fc_q.bias is not None:
            self.bias = torch.cat([agent.fc_q.bias * scale, agent.fc_k.bias])
        if agent.controller != "mlp":
            cell = getattr(agent, agent.controller)
            self.cell_weight = torch.cat([cell.weight_ih_l0, cell.weight_hh_l0], dim=1)
            self.cell_bias = cell.bias_ih_l0 + cell.bias_hh_l0

    def importance(self, frame):
        """frame uint8 (S, S, 3) -> float32 (n^2,): the column sums of softmax(Q K^T / sqrt(d))."""
        q = self.query_dim
        qk = nn.functional.linear(self.agent.patches(frame), self.weight, self.bias)  # (n^2, 2 q)
        logits = torch.mm(qk[:, :q], qk[:, q:].T)
        largest = qk.abs().amax(dim=0)
        if torch.dot(largest[:q], largest[q:]) > EXP2_SAFE:
            logits.sub_(logits.amax(dim=1, keepdim=True))
        weights = logits.exp2_()
        return torch.mv(weights.T, weights.sum(dim=1).reciprocal_())

    def __call__(self, frame, state):
        agent = self.agent
        top = torch.topk(self.importance(frame), agent.top_k).indices
        x = agent.patch_positions[top].flatten()
        if agent.controller == "mlp":
            state.append(x)
            h = torch.relu(agent.fc1(torch.cat(list(state))))
        elif agent.controller == "rnn":
            h = torch.zeros(agent.fc.in_features) if state is None else state
            h = torch.relu(torch.addmv(self.cell_bias, self.cell_weight, torch.cat([x, h])))
            state = h
        else:
            h, c = (torch.zeros(agent.fc.in_features),) * 2 if state is None else state
            gates = torch.addmv(self.cell_bias, self.cell_weight, torch.cat([x, h]))
            i, f, _, o = torch.sigmoid(gates).chunk(4)  # PyTorch's gate order: i, f, g, o
            g = torch.tanh(gates[2 * len(h) : 3 * len(h)])
            c = torch.addcmul(f * c, i, g)
            h = o * torch.tanh(c)
            state = (h, c)
        action = torch.tanh(agent.fc(h))
        return action.numpy(), state, top


# Workers: the agent's rollouts, on a pool of this process, local processes or a Ray cluster
LOCKSTEP_MAX = 1  # tasks in a chunk: the AttentionAgent plays one episode at a time


class RolloutWorker:
    """One process's envs and agent; `run(tasks)` on rows of `use(population)`, float32 (rows x D)."""

    def __init__(self, env_config, agent_config, dim):
        torch.set_num_threads(1)
        cv2.setNumThreads(1)  # DirectCarRacing's drawing
        self.envs = {training: make_env(env_config, training) for training in (True, False)}
        self.agent = AttentionAgent(**agent_config)
        self.dim = dim

    def use(self, population):
        self.population = population.reshape(-1, self.dim)

    def run(self, tasks):
        results = []
        for task in tasks:
            self.agent.set_flat(self.population[task.member])
            env = self.envs[task.training]
            direct = isinstance(env.unwrapped, DirectCarRacing)
            returns, steps = zip(*[rollout(env, self.agent, env_seed, direct=direct) for env_seed in task.env_seeds])
            results.append((list(returns), sum(steps)))
        return results


# The rollout pool: this process, local worker processes or a Ray cluster, behind one interface
WORKER_TRIES = 3  # tries of a batch whose worker dies (on Ray: of each task)
RAY_POLL_S = 1.0  # the Ray watchdog probes the cluster's head this often ...
RAY_LOST_AFTER_S = 10.0  # ... and gives the cluster up after this much silence
WORKERS = {}  # this process's worker of each pool, by the pool's key


def live_bar(label, total, unit="episode"):
    """A tqdm bar on a terminal (none if `label` is None); bar.done(episodes, steps) counts a task."""
    from tqdm import tqdm

    columns, lines = shutil.get_terminal_size()  # unknown size (0 x 0): 80 x 24, not no bar
    disable = label is None or not sys.stderr.isatty()
    bar = tqdm(total=total, desc=label, unit=unit, leave=False, ncols=columns, nrows=lines, disable=disable)
    start = time.perf_counter()
    steps = 0

    def done(episodes, task_steps):
        nonlocal steps
        steps += task_steps
        bar.set_postfix_str(f"{steps / (time.perf_counter() - start):,.0f} env steps/s", refresh=False)
        bar.update(episodes)

    bar.done = done
    return bar


def exit_with_parent(parent):
    """A worker's thread: exit within 0.5 s of its parent's death (pid `parent`)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def start_worker(key, worker, worker_args, buffers):
    """Initializer of a worker process: signals to the driver, exit with it, the worker on `buffers`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    WORKERS.clear()  # a forked process's copies of its parent's
    use_worker(key, (worker, worker_args, [np.frombuffer(buffer, dtype=np.float32) for buffer in buffers]))


def use_worker(key, batch):
    """Point this process's worker of pool `key` (built once) at batch = (class, args, arrays)."""
    worker, worker_args, arrays = batch
    if key not in WORKERS:
        WORKERS[key] = worker(*worker_args)
    WORKERS[key].use(*arrays)


def run_chunk(key, batch, tasks):
    """Tasks on this process's worker of pool `key`, given batch (None: shared buffers) -> plain tuples."""
    if batch is not None:
        use_worker(key, batch)
    return WORKERS[key].run(tasks)


class InProcess:
    """--num-workers 1's executor: a call runs here when submitted, its future done."""

    def submit(self, fn, *args):
        future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, cancel_futures=False):
        pass


class RolloutPool:
    """Rollouts here (num_workers 1), in worker processes or on Ray: map(tasks, shared, label) -> RolloutResults in
    task order; worker(*worker_args) built once a process. A dying worker's batch: WORKER_TRIES tries, PoolLost."""

    def __init__(self, num_workers, ray_address, worker, worker_args, shared_sizes, quiet=False, on_lost=None):
        self.num_workers = num_workers
        self.address = ray_address
        self.worker = worker
        self.worker_args = worker_args
        self.quiet = quiet
        self.on_lost = on_lost
        self.key = uuid.uuid4().hex  # names this pool's worker in every process
        self.executor = InProcess()
        if ray_address:
            self.start_ray()
            return
        self.buffers = [mp.RawArray("f", size) for size in shared_sizes]
        self.start_workers()

    def start_workers(self):
        """This process's worker (num_workers 1), else new worker processes."""
        if self.num_workers == 1:
            arrays = [np.frombuffer(buffer, dtype=np.float32) for buffer in self.buffers]
            use_worker(self.key, (self.worker, self.worker_args, arrays))
            return
        initargs = (self.key, self.worker, self.worker_args, self.buffers)
        self.executor = ProcessPoolExecutor(self.num_workers, initializer=start_worker, initargs=initargs)

    def lost(self):
        """What the run keeps when it stops here, for a message."""
        return f": {self.on_lost()}" if self.on_lost else ""

    def map(self, tasks, shared, label="rollouts"):
        """RolloutResults of the tasks on float32 arrays `shared`, in order; label: the bar's. UserError, PoolLost."""
        # ~4 chunks a worker, chunk i: tasks i, i + C, ... (neighbours such as elites spread out)
        per_chunk = min(LOCKSTEP_MAX, math.ceil(len(tasks) / (4 * self.num_cpus)))
        count = math.ceil(len(tasks) / max(1, per_chunk))
        chunks = [tasks[i::count] for i in range(count)]
        arrays = [np.asarray(array, dtype=np.float32).ravel() for array in shared]
        batch = None  # locally the workers read the arrays from the shared buffers
        if self.address:
            batch = self.ray.put((self.worker, self.worker_args, arrays))  # once, not per task
        else:
            for buffer, array in zip(self.buffers, arrays):
                np.frombuffer(buffer, dtype=np.float32)[: array.size] = array
        cap = self.num_workers if self.address or self.num_workers == 1 else None  # chunks at once (None: all)
        with live_bar(None if self.quiet else label, sum(len(task.env_seeds) for task in tasks)) as bar:
            for attempt in range(1, WORKER_TRIES + 1):
                try:
                    futures = []
                    running = set()
                    for chunk in [*chunks, None]:  # None: the end, wait for every chunk
                        while running and (chunk is None or cap and len(running) >= cap):
                            finished, running = wait(running, return_when=FIRST_COMPLETED)
                            for future in finished:
                                for result in future.result():
                                    bar.done(len(result[0]), result[1])
                        if chunk is not None:
                            futures.append(self.submit(batch, chunk))
                            running.add(futures[-1])
                    break
                except BrokenProcessPool as e:
                    self.close()
                    if attempt == WORKER_TRIES:
                        raise PoolLost(
                            f"worker processes keep dying ({e}); stopped after {attempt} tries{self.lost()}"
                        ) from None
                    print(f"warning: a worker process died ({e}); restarting the workers and re-running this batch")
                    self.start_workers()
                except (UserError, PoolLost):
                    raise
                except Exception as e:
                    raise self.failure(e) from None
        ordered = [None] * len(tasks)
        for i, future in enumerate(futures):
            ordered[i::count] = [RolloutResult(*result) for result in future.result()]
        return ordered

    def submit(self, batch, chunk):
        """A Future of run_chunk(key, batch, chunk): a Ray task, else on the executor."""
        if self.address:
            return self.remote.remote(self.key, batch, chunk).future()
        return self.executor.submit(run_chunk, self.key, batch, chunk)

    def failure(self, e):
        """A batch's exception in one line: UserError (our code's), else PoolLost (Ray lost)."""
        if not self.address or not isinstance(e, (self.ray.exceptions.RayError, ConnectionError)):
            return UserError(f"rollout failed in a worker: {type(e).__name__}: {e}")
        if isinstance(e, self.ray.exceptions.RayTaskError):  # raised by our code in a Ray worker
            return UserError(f"rollout failed in a Ray worker: {type(e.cause).__name__}: {e.cause}")
        reason = first_line(e)
        what = f"rollouts keep failing on the Ray cluster at {self.address} (each task tried {WORKER_TRIES} times)"
        if self.silent():
            what = f"lost the Ray cluster at {self.address}: its head ({self.head}) does not answer"
        elif isinstance(e, self.ray.exceptions.LocalRayletDiedError):
            what = f"lost the Ray cluster at {self.address}: this machine's Ray node does not answer"
        return PoolLost(f"{what} ({reason}){self.lost()}")

    def close(self):
        """Stop the workers now (kill a busy one), drop this process's worker, stop the watchdog."""
        for process in list((getattr(self.executor, "_processes", None) or {}).values()):
            process.kill()
        self.executor.shutdown(cancel_futures=True)
        WORKERS.pop(self.key, None)
        if self.address:
            self.closed.set()

    @property
    def num_cpus(self):
        """CPUs running rollouts: the worker processes, or the cluster's CPUs capped by num_workers."""
        if not self.address:
            return self.num_workers
        cluster = int(self.ray.cluster_resources().get("CPU", 0))
        return min(cluster, self.num_workers or cluster)

    def describe(self):
        """The workers, for the console."""
        if not self.address:
            return f"{self.num_workers} worker process{'es' if self.num_workers > 1 else ''}"
        nodes = sum(node["Alive"] for node in self.ray.nodes())
        cap = f", at most {self.num_workers} rollouts at once" if self.num_workers else ""
        return f"Ray cluster at {self.address} ({self.num_cpus} CPUs on {nodes} node{'s' if nodes > 1 else ''}{cap})"

    def start_ray(self):
        """Join the cluster (connect_ray), declare the task ray::ray_rollout, start the watchdog. UserError."""
        self.ray = connect_ray(self.address)
        self.remote = self.ray.remote(num_cpus=1, max_retries=WORKER_TRIES - 1)(run_chunk).options(name="ray_rollout")
        try:
            self.head = self.ray.get_runtime_context().gcs_address  # HOST:PORT
        except Exception:  # not in every connection mode: then Ray's own timeouts apply
            self.head = None
        self.closed = threading.Event()
        threading.Thread(target=self.watch, name="ray-watchdog", daemon=True).start()

    def silent(self):
        """Whether the cluster's head (where known) refuses a TCP connection."""
        if self.head is None:
            return False
        host, _, port = self.head.rpartition(":")
        with contextlib.suppress(OSError):
            socket.create_connection((host, int(port)), timeout=2).close()
            return False
        return True

    def watch(self):
        """Thread: without its head Ray blocks (and exits mute 60 s later): after RAY_LOST_AFTER_S, exit 1."""
        answered = time.monotonic()
        while not self.closed.wait(RAY_POLL_S):
            if not self.silent():
                answered = time.monotonic()
            elif time.monotonic() - answered >= RAY_LOST_AFTER_S:
                sys.stdout.flush()
                lost = f"lost the Ray cluster at {self.address}: its head ({self.head}) has not answered"
                print(f"{SCRIPT}: error: {lost} for {RAY_LOST_AFTER_S:.0f} s{self.lost()}", file=sys.stderr)
                os._exit(1)


def import_optional(name, flag, extra):
    """The optional module `name` (ray, wandb) for `flag`; UserError naming requirements-<extra>.txt."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{flag} needs {name}: pip install -r requirements-{extra}.txt") from None


def connect_ray(address):
    """Join the Ray cluster at `address` (auto, HOST:PORT) once, probed first: the ray module, or UserError."""
    ray = import_optional("ray", "--ray-address", "ray")
    if ray.is_initialized():
        return ray
    target = address
    where = ""
    if address == "auto":  # as Ray: $RAY_ADDRESS, else the cluster its temp folder names
        temp_dir = os.environ.get("RAY_TMPDIR") or "/tmp"
        if "RAY_TMPDIR" not in os.environ and sys.platform.startswith("linux"):
            temp_dir = os.environ.get("TMPDIR") or temp_dir
        target = os.environ.get("RAY_ADDRESS") or "auto"
        if target == "auto":
            with contextlib.suppress(OSError), open(os.path.join(temp_dir, "ray", "ray_current_cluster")) as f:
                target = f.read().strip() or "auto"
        if target == "auto":
            message = "no Ray cluster runs on this machine (--ray-address auto)"
            raise UserError(f"{message}: start one with `ray start --head`, or give its HOST:PORT")
        where = f" ({target}, named by Ray's temp folder: a cluster that may be gone)"
    host, _, port = target.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError, OverflowError):
        hint = "start one with `ray start --head` or check the address (HOST:PORT, or auto)"
        raise UserError(f"no Ray cluster answers at {address}{where}: {hint}") from None
    error = None
    stderr = os.dup(2)
    with tempfile.TemporaryFile() as said:
        os.dup2(said.fileno(), 2)  # the C++ client prints a warning per failed try
        try:
            kernels = {name: os.environ[name] for name in AVX2_KERNELS if name in os.environ}
            runtime_env = {"env_vars": kernels}  # the workers compute with the driver's kernels
            ray.init(address=address, logging_level=logging.ERROR, ignore_reinit_error=True, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError, ImportError) as e:
            error = e
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)
        said.seek(0)
        said = said.read().decode(errors="replace")
    if error is not None and ("AuthToken" in said or "uthentication" in str(error)):
        raise UserError(
            f"the Ray cluster at {address} uses token authentication and refused this machine's "
            "token (or its lack of one): set RAY_AUTH_TOKEN to the cluster's token (`ray "
            "get-auth-token` on its head) or put it in ~/.ray/auth_token"
        )
    if error is not None:
        raise UserError(f"cannot join the Ray cluster at {address}: {first_line(error)}")
    if __name__ != "__main__":  # imported (tests): ship this module by value, as a script
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray


# Files: weights and checkpoints
def atomic_write(path, data):
    """Write `data` (bytes, or a function of a binary file) to `path` atomically: temp, fsync, replace."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=name)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_weights(path, params, meta):
    """Weights file (.npz), atomically: `params` float32 (D,), `meta` a dict as a 0-d unicode array of JSON."""
    params = np.asarray(params, dtype=np.float32)
    atomic_write(path, lambda f: np.savez(f, params=params, meta=np.array(json.dumps(meta))))


def load_weights(path):
    """(params float32 (D,), agent settings, meta) of this script's file, or (params, None, None) of the authors'.
    UserError: unreadable, another script's, another size, a meta not real."""
    try:
        with np.load(path, allow_pickle=False) as data:
            params = data["params"].astype(np.float32).ravel()
            meta = json.loads(str(data["meta"])) if "meta" in data else None
    except Exception as e:
        raise UserError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
    if meta is None:
        if params.size != AUTHORS_NUM_PARAMS:
            raise UserError(
                f"{path} has no meta and {params.size} values: neither a {SCRIPT} file nor the "
                f"authors' AttentionAgent file ({AUTHORS_NUM_PARAMS} values)"
            )
        return params, None, None
    if not isinstance(meta, dict) or meta.get("script") != SCRIPT:
        raise UserError(
            f"{path} was written by {meta.get('script') if isinstance(meta, dict) else None}, not "
            f"{SCRIPT}: it holds no AttentionAgent"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has weights format {meta.get('format_version')}, this script reads {FORMAT_VERSION}")
    if not isinstance(meta.get("env_id"), str):
        raise UserError(f"{path}'s meta names no env id")
    check_env_id(meta["env_id"], f"{path}'s meta")
    check_agent_config(meta.get("agent"), lambda key: f"{path}'s meta field agent.{key}")
    return params, meta["agent"], meta


def agent_from_file(path, image_size, action_dim, weights=None):
    """(agent holding the file's weights (`load_weights(path)` if not given), its config, its meta)."""
    params, agent_config, meta = weights or load_weights(path)
    if agent_config is None:  # the authors' file: the paper's architecture, the defaults
        defaults = build_parser().parse_args([])
        agent_config = {"image_size": image_size, "action_dim": action_dim}
        agent_config |= {key: getattr(defaults, key) for key in AGENT_FLAGS}
    if (agent_config["image_size"], agent_config["action_dim"]) != (image_size, action_dim):
        raise UserError(
            f"{path} expects {agent_config['image_size']}-pixel frames and {agent_config['action_dim']} "
            f"actions; the env gives {image_size} and {action_dim}"
        )
    agent = AttentionAgent(**agent_config)
    try:
        agent.set_flat(params)
    except ValueError as e:
        raise UserError(f"{path} does not fit its own architecture: {e}") from None
    return agent, agent_config, meta


def restart_point(args, given):
    """{"iteration", "env_steps", "provenance"} of --restart-from's file; into `args` its architecture, and
    its part, env id and sigma unless given."""
    path = args.restart_from
    _, agent_config, meta = load_weights(path)
    if meta is None or not isinstance(meta.get("iteration"), int):
        raise UserError(
            f"--restart-from {path}: not a weights file of a {SCRIPT} run (its meta names no generation); "
            "start from its weights with --init-from"
        )
    check_numbers(meta, lambda key: f"{path}'s meta field {key}")
    if meta.get("sigma") is None and "init_sigma" not in given:
        raise UserError(f"--restart-from {path}: its meta holds no step size sigma: give it with --init-sigma")
    provenance = meta.get("provenance") or []
    if not isinstance(provenance, list) or meta.get("train", "all") not in ("all", "attention", "controller"):
        raise UserError(f"{path}'s meta fields provenance and train are not a run's")
    for key in AGENT_FLAGS:
        setattr(args, key, agent_config[key])
    from_file = {"train": meta.get("train", "all"), "env_id": meta["env_id"], "init_sigma": meta.get("sigma")}
    for key, value in from_file.items():
        if key not in given:
            setattr(args, key, value)
    return {"iteration": meta["iteration"], "env_steps": meta.get("env_steps") or 0, "provenance": provenance}


def default_run_name(args, kind=""):
    """<env-id>__<exp-name>[kind]__<seed>__<unix-time> (CleanRL's run names)."""
    return f"{args.env_id.replace('/', '-')}__{args.exp_name}{kind}__{args.seed}__{int(time.time())}"


def segment(start, args, generation):
    """A provenance entry: how ("new", "resume", "restart") and when a stretch of the run began."""
    entry = {"start": start, "iteration": generation, "unix_time": int(time.time()), "seed": args.seed}
    entry |= {"population_size": args.population_size, "num_rollouts": args.num_rollouts}
    if start != "resume":
        origin = args.init_from or args.restart_from
        entry["sigma"] = args.init_sigma
        entry["from"] = os.path.basename(origin) if origin else None  # None: random weights drawn from --seed
    return entry


class CheckpointUnpickler(pickle._Unpickler):
    """Unpickler of numpy's, CHECKPOINT_MODULES' (rebuilt from state), some builtins' names; else UnpicklingError."""

    CALLS = {  # (module, name) that REDUCE may call
        ("numpy", "dtype"),
        ("numpy.random._pickle", "__randomstate_ctor"),
        ("numpy.random._pickle", "__bit_generator_ctor"),
        ("numpy.random._pickle", "__generator_ctor"),
        *(
            (f"numpy.{core}.{module}", name)
            for core in ("core", "_core")
            for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
        ),
        *(("builtins", name) for name in ("range", "slice", "set", "frozenset", "complex", "bytearray")),
    }
    NAMES = CALLS | {  # only referred to: classes rebuilt by NEWOBJ, functions kept as values
        ("numpy", "ndarray"),
        ("numpy.linalg", "eigh"),
        ("numpy.random._mt19937", "MT19937"),
        ("numpy.random._pcg64", "PCG64"),
        ("numpy.random._generator", "Generator"),
    }

    def __init__(self, file):
        super().__init__(file)
        self.callables = []

    def find_class(self, module, name):
        dtype_class = module == "numpy.dtypes" and name.endswith("DType")
        if (module, name) not in self.NAMES and module.partition(".")[0] not in CHECKPOINT_MODULES and not dtype_class:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which no checkpoint holds")
        found = super().find_class(module, name)
        if (module, name) in self.CALLS:
            self.callables.append(found)
        return found

    def load_reduce(self):
        func = self.stack[-2]
        if not any(func is allowed for allowed in self.callables):
            raise pickle.UnpicklingError(f"it calls {getattr(func, '__qualname__', func)!s}, which no checkpoint does")
        super().load_reduce()

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.REDUCE[0]] = load_reduce


def attach_randn(es, randn):
    """Point pycma's references to the sampler at `randn` (None: to pickle)."""
    for option in (es.opts, es.inputargs["inopts"]):
        option["randn"] = randn
    if hasattr(es.sm, "randn"):
        es.sm.randn = randn


CHECKPOINT_WRITES = []  # the last checkpoint's write: (thread, [its error])


def save_checkpoint(path, state):
    """Pickle `state`, write it to `path` atomically on a thread; raises the last write's error (OSError)."""
    error = checkpoint_written()
    if error is not None:
        raise error
    data = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    errors = []

    def write():
        try:
            atomic_write(path, data)
        except Exception as e:  # raised in the main thread by the next save_checkpoint or by Run
            errors.append(e)

    thread = threading.Thread(target=write, name="checkpoint")
    thread.start()
    CHECKPOINT_WRITES.append((thread, errors))


def checkpoint_written():
    """Wait for the last checkpoint's write (a Ctrl-C meanwhile stops the run after it): None, or its error."""
    HOLDING.set()
    try:
        for thread, _ in CHECKPOINT_WRITES:
            thread.join()
    finally:
        HOLDING.clear()
    errors = [error for _, errors in CHECKPOINT_WRITES for error in errors]
    CHECKPOINT_WRITES.clear()
    return errors[0] if errors else None


def load_checkpoint(path):
    """(path, checkpoint dict) of a checkpoint.pkl or run folder (new flags: defaults); UserError if unfit."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pkl")
    try:
        with open(path, "rb") as f:
            state = CheckpointUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing checkpoint {path}: {e}") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    owner = state.get("script") if isinstance(state, dict) else None
    if owner != SCRIPT:
        raise UserError(f"{path} is not a {SCRIPT} checkpoint" + (f" (it is {owner}'s)" if owner else ""))
    if state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {state.get('format_version')}, expected {FORMAT_VERSION}")
    parts = {"args": dict, "counters": dict, **CHECKPOINT_PARTS}
    missing = [name for name, kind in parts.items() if not isinstance(state.get(name), kind)]
    if missing or not set(COUNTERS) <= set(state["counters"]):
        raise UserError(f"{path} is not a complete {SCRIPT} checkpoint")
    state["args"] = vars(build_parser().parse_args([])) | state["args"]
    return path, state


# Plots, video, evaluation of a weights file, main
def plot_learning_curve(progress_path, image_path, title, curves, ylabel="episode return"):
    """learning_curve.png from progress.csv: `curves` [(column, label)], first boldest, evaluations ± std."""
    from matplotlib.figure import Figure  # no pyplot: ~0.4 s less, no display

    with open(progress_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    iterations = [float(row["iteration"]) for row in rows]
    for i, (column, label) in enumerate(curves):
        values = [float(row[column]) for row in rows]
        ax.plot(iterations, values, label=label, lw=1 if i == 0 else 0.8, alpha=1 if i == 0 else 0.6)
    evaluated = [row for row in rows if row["eval_return_mean"]]
    if evaluated:
        columns = ("iteration", "eval_return_mean", "eval_return_std")
        x, mean, std = ([float(row[column]) for row in evaluated] for column in columns)
        ax.errorbar(x, mean, yerr=std, fmt="o-", ms=3, capsize=2, label="evaluation mean ± std")
    ax.set(xlabel="generation", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(image_path, dpi=100)


def attention_frame(frame, top, agent, scale=4):
    """The paper's picture, frame uint8 (S, S, 3) and top int64 (k,) -> uint8 (S scale, 2 S scale + scale, 3):
    the frame beside it dimmed but the top-k patches, outlined red (most important) to yellow."""
    n = (agent.image_size - agent.patch_size) // agent.patch_stride + 1
    p, big = agent.patch_size, lambda image: image.repeat(scale, axis=0).repeat(scale, axis=1)
    corners = [(r * agent.patch_stride, c * agent.patch_stride) for r, c in (divmod(i, n) for i in top.tolist())]
    highlighted = (frame.astype(np.float32) * 0.35).astype(np.uint8)
    for r, c in corners:
        highlighted[r : r + p, c : c + p] = frame[r : r + p, c : c + p]
    right = big(highlighted)
    for rank, (r, c) in enumerate(corners):
        corner = (c * scale, r * scale)
        opposite = (corner[0] + p * scale - 1, corner[1] + p * scale - 1)
        cv2.rectangle(right, corner, opposite, (255, int(255 * rank / max(1, len(corners) - 1)), 0))
    gap = np.full((right.shape[0], scale, 3), 255, dtype=np.uint8)
    return np.concatenate([big(frame), gap, right], axis=1)


def write_video(frames, fps, path_stem, gif_step=1):
    """frames (uint8 (H, W, 3)) into path_stem.mp4 (moviepy), else .gif of every gif_step-th: its path."""
    try:
        from moviepy import ImageSequenceClip
    except ImportError:
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames[::gif_step]]
        duration = int(1000 * gif_step / fps)  # milliseconds a frame
        images[0].save(path_stem + ".gif", save_all=True, append_images=images[1:], duration=duration, loop=0)
        return path_stem + ".gif"
    ImageSequenceClip(frames, fps=fps).write_videofile(path_stem + ".mp4", logger=None)
    return path_stem + ".mp4"


def record_video(env_config, agent, path_stem, seed):
    """An evaluation episode, attention outlined, in path_stem.mp4 (moviepy) or .gif: (path, return)."""
    env, frames = make_env(env_config, training=False), []
    episode_return, _ = rollout(env, agent, seed, lambda obs, top: frames.append(attention_frame(obs, top, agent)))
    env.close()
    return write_video(frames, 50, path_stem, gif_step=2), episode_return


# Families of environment variables that pick kernels, caches or threads (OPENBLAS_CORETYPE, MKL_CBWR, ...)
DIGIT_SETTINGS = ("NPY_", "OPENBLAS_", "GOTO", "OMP_", "MKL_", "ATEN_", "DNNL_", "ONEDNN_")


def versions():
    """args.json's library versions (None: not installed) and what sets a run's last digits (cpu, blas, env)."""
    import importlib.metadata

    from threadpoolctl import threadpool_info

    found = {"python": platform.python_version()}
    for name in ("torch", "gymnasium", "numpy", "cma"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["cpu"] = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        found["cpu"] = f"{models[0]} ({len(models)} logical CPUs)" if models else found["cpu"]
    found["libc"] = " ".join(platform.libc_ver())
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy 1.x
        from numpy.core import _multiarray_umath as umath
    targets = [*umath.__cpu_baseline__, *umath.__cpu_dispatch__]
    found["numpy_simd"] = [target for target in targets if umath.__cpu_features__.get(target)]
    found["blas"] = [
        f"{i['internal_api']} {i['version']} {i.get('architecture')}, {i['num_threads']} threads"
        for i in threadpool_info()
        if i["user_api"] == "blas"
    ]
    found["torch_cpu"] = torch.backends.cpu.get_cpu_capability()
    found["environment"] = {
        name: value for name, value in sorted(os.environ.items()) if name.startswith(DIGIT_SETTINGS)
    }
    return found


def probe_env(env_config):
    """(image size, action dim) of the env; UserError when the AttentionAgent cannot use it."""
    env = make_env(env_config, training=False)
    env.close()
    return int(env.observation_space.shape[0]), int(env.action_space.shape[0])


def summary_line(returns):
    """The project's one-line evaluation summary of returns (float (E,))."""
    return (
        f"episode_return mean={returns.mean():.4f} std={returns.std():.4f} "
        f"min={returns.min():.4f} max={returns.max():.4f} episodes={returns.size}"
    )


def evaluation_pool(args, sizes, *worker_args):
    """A pool of RolloutWorker(*worker_args) sharing arrays of `sizes`, closed as its `with` block ends."""
    return contextlib.closing(
        RolloutPool(args.num_workers, args.ray_address, RolloutWorker, worker_args, sizes, args.quiet)
    )


def pretrained_video(args, run_dir, env_config, policy):
    """--capture-video of --from-pretrained: an evaluation episode in run_dir/videos/pretrained.mp4 or .gif."""
    folder = os.path.join(run_dir, "videos")
    os.makedirs(folder, exist_ok=True)
    seed = derive_seed(args.seed, EVAL_ENV_STREAM, 0, 0)
    path, video_return = record_video(env_config, policy, os.path.join(folder, "pretrained"), seed)
    print(f"video: {path} (episode return {video_return:.2f})")


def print_evaluation(steps, elapsed, returns):
    """--from-pretrained's last lines: the speed, then summary_line(returns)."""
    print(f"{steps} env steps in {elapsed:.1f} s ({steps / elapsed:,.0f} steps/s)")
    print(summary_line(returns))


def run_from_pretrained(args, given):
    """Evaluate a weights file; the last line: the `episode_return mean=...` summary."""
    env_config = env_config_from_args(args)
    if "training_frames" in given:  # to compare the frames: play on the training renderer
        env_config["evaluation_frames"] = args.training_frames
    weights = load_weights(args.from_pretrained)
    params, _, meta = weights
    if meta is not None and "env_id" not in given:
        env_config["env_id"] = meta["env_id"]
    agent, agent_config, _ = agent_from_file(args.from_pretrained, *probe_env(env_config), weights)
    with evaluation_pool(args, [params.size], env_config, agent_config, params.size) as pool:
        print(agent)
        print(
            f"parameters: {params.size}   env: {env_config['env_id']}   episodes: {args.num_eval_rollouts}   "
            f"workers: {pool.describe()}   source: {'authors' if meta is None else meta['script']}   "
            f"frames: {env_config['evaluation_frames']}"
        )
        start = time.perf_counter()
        returns, steps = evaluate(pool, params, args.seed, 0, args.num_eval_rollouts)
    elapsed = time.perf_counter() - start
    if args.capture_video:
        name = args.run_name or f"{env_config['env_id']}__{args.exp_name}__eval__{args.seed}__{int(time.time())}"
        pretrained_video(args, os.path.join(args.logs_dir, name), env_config, agent)
    print_evaluation(steps, elapsed, returns)
    return 0


def main(argv=None):
    """Entry point; exit code 0; 2 bad input; 1 workers lost or a path refused (full disk); 130 Ctrl-C, SIGTERM."""
    sys.stdout.reconfigure(line_buffering=True)  # lines show at once in `nohup ... > log`
    streams = (sys.stdout, sys.stderr, threading.excepthook)
    sys.stdout = Console(sys.stdout)
    sys.stderr = Console(sys.stderr)
    STOPPING.clear()

    def stop(signum, frame):
        STOPPING.set()  # checked at each checkpoint, should Python drop the KeyboardInterrupt
        if not HOLDING.is_set():
            raise KeyboardInterrupt

    def thread_failed(hook):  # TensorBoard's OSError: main reports it
        if not issubclass(hook.exc_type, OSError):
            streams[2](hook)

    threading.excepthook = thread_failed
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell may start us with it ignored
        signal.signal(signum, stop)
    torch.set_num_threads(1)
    try:
        args, given = parse_args(argv)
        if args.from_pretrained:
            return run_from_pretrained(args, given)
        return train(args, given)
    except (UserError, PoolLost, gym.error.Error, MemoryError) as e:  # gymnasium's messages are clear
        message = first_line(e)
        if isinstance(e, MemoryError):
            message += " (a size too large for this machine)"
        print(f"{SCRIPT}: error: {message}", file=sys.stderr)
        return 1 if isinstance(e, PoolLost) else 2
    except OSError as e:  # a path the system refuses: read-only, special, a full disk
        message = f"{os.fsdecode(e.filename)}: {e.strerror}" if e.filename else e
        print(f"{SCRIPT}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout, sys.stderr, threading.excepthook = streams


# Ctrl-C and SIGTERM: main() raises KeyboardInterrupt, the Recorder prints the resume hint. Python drops it inside a
# fork handler, __del__ or atexit callback: STOPPING remembers it, save_checkpoint raises it again.
STOPPING = threading.Event()
HOLDING = threading.Event()  # inside signals_held(): a Ctrl-C stops the run as the block ends


@contextlib.contextmanager
def signals_held():
    """A Ctrl-C or SIGTERM in the block raises KeyboardInterrupt as it ends (inside TensorBoard: a hang)."""
    already = STOPPING.is_set()
    HOLDING.set()
    try:
        yield
    finally:
        HOLDING.clear()
    if STOPPING.is_set() and not already:
        raise KeyboardInterrupt


class Console:
    """sys.stdout/stderr in main(): if its reader goes away (`... | head`), os.devnull takes its place."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.lose_reader()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.lose_reader()

    def lose_reader(self):
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name):
        return getattr(self.stream, name)


if __name__ == "__main__":
    code = main()
    for signum in (signal.SIGINT, signal.SIGTERM):  # over: a late Ctrl-C changes no file, no exit code
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)

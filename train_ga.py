"""A simple genetic algorithm (GA) over a policy's flat weight vector, on any gymnasium environment.

The genetic algorithm of the ga-openai-gym project rebuilt in one file. The genotype is the
policy's flat parameter vector. Each generation selects parents (linear ranking, roulette or
tournament selection), recombines pairs of them (BLX-alpha, Eshelman & Schaffer 1993; one-point;
uniform crossover), mutates each gene with a small probability, runs every child for an episode
and forms the next generation: either the original project's rule (a pair of children replaces its
parents only if their summed fitness beats the parents') or generational replacement with the best
members carried over as elites, re-evaluated on fresh episodes every generation so that one lucky
episode does not make a champion (Such et al. 2017, "Deep Neuroevolution", arXiv:1712.06567).
No backpropagation: rollouts are the only work, and they spread over every core. The members'
parameters live in shared memory; a task sent to a worker is a member index and env seeds.

Two experiments of the original project are included: knowledge distillation of a trained policy
into a much smaller one (`--distill-from`), and multitask learning of one network with hard
parameter sharing on several environments at once (`--multitask`), with a noise study.

Examples:
    # CartPole-v1 to 500 over 100 evaluation episodes
    python train_ga.py --env-id CartPole-v1 --hidden-sizes 16 --population-size 64 --reward-goal 500
    # BipedalWalker-v3 with the original's 24-20-12-12-4 network (the default --hidden-sizes)
    python train_ga.py --env-id BipedalWalker-v3 --population-size 128 --num-rollouts 2
    # distill a walker into a 24-6-4 student and compare both over the same 100 episodes
    python train_ga.py --distill-from pretrained/ga_bipedalwalker.npz --hidden-sizes 6
    # one network for two tasks (shared trunk), then the noise study
    python train_ga.py --multitask CartPole-v1 BipedalWalker-v3 --population-size 64 --max-iter 100
"""

import argparse
import ctypes
import csv
import json
import logging
import math
import multiprocessing as mp
import os
import pickle
import platform
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from multiprocessing.connection import wait

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

SCRIPT = "train_ga.py"
FORMAT_VERSION = 1
# The columns every script of the project writes first, in this order; the GA's own follow
# (and, with --multitask, the population's mean raw return on each task).
PROGRESS_COLUMNS = [
    "iteration", "evaluations", "env_steps", "wall_time_s",
    "return_min", "return_mean", "return_max", "return_std",
    "eval_return_mean", "eval_return_std",
    "best_fitness", "children_accepted", "mutation_rate", "mutation_scale", "param_norm", "num_cpus",
]
# Streams of randomness, each derived from (seed, stream, generation, member, rollout).
INIT_STREAM, GA_STREAM, TRAIN_ENV_STREAM, EVAL_ENV_STREAM = 0, 1, 2, 3
# Tasks queued per worker: 2 hides the round trip between tasks.
TASKS_IN_FLIGHT = 2
# learning_curve.png is redrawn at an evaluation at most this often (and always at the end).
PLOT_INTERVAL_S = 30.0
# Ray (--ray-address): a task whose worker process or node died is re-run up to RAY_TASK_RETRIES
# times. A watchdog thread checks every RAY_POLL_S that the cluster's head and this machine's Ray
# node still answer, and gives the cluster up after RAY_LOST_AFTER_S of silence.
RAY_TASK_RETRIES = 3
RAY_POLL_S = 1.0
RAY_LOST_AFTER_S = 10.0
# Flags that --resume may set anew; everything else comes from the checkpoint.
RESUME_FLAGS = {"resume", "max_iter", "num_workers", "ray_address", "eval_every", "num_eval_rollouts",
                "capture_video", "quiet", "reward_goal", "consecutive_goal_stopping"}
# Where a run executes is never taken from its checkpoint: a run resumes on any cluster or locally.
PLACEMENT_FLAGS = ("num_workers", "ray_address")
# Settings that --init-from / --from-pretrained / --distill-from take from the weights file's meta.
META_ENV_FLAGS = ("env_kwargs", "frame_size", "frame_stack", "grayscale", "slime_fitness")
META_POLICY_FLAGS = ("hidden_sizes", "activation")
# SlimeVolley (optional slimevolleygym package, old gym API) is adapted by this script.
SLIME_ID = "SlimeVolley-v0"
# Multitask noise study: which task inputs are replaced by uniform noise, per condition.
NOISE_CONDITIONS = ("both real", "noise into {0}", "noise into {1}", "noise into both")


class UserError(Exception):
    """Bad input (flags, files, environments): reported as one line, exit code 2."""


# ------------------------------------------------------------------------------------------------
# 1. Command line
# ------------------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_env_kwargs(items):
    """--env-kwargs KEY=VALUE items -> dict; VALUE is JSON when it parses (true, 3, 0.5), else a string.

    Raises ValueError for an item without '='.
    """
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env-kwargs expects KEY=VALUE items, got {item!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def build_parser():
    """The argparse parser of every flag (kebab-case, defaults shown in --help)."""
    p = OneLineParser(prog=SCRIPT, description="A simple genetic algorithm over network weights, on gymnasium.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--env-id", default="CartPole-v1", help=f"gymnasium environment id, or {SLIME_ID}")
    g.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="keyword arguments for gymnasium.make, e.g. continuous=true")
    g.add_argument("--seed", type=int, default=1, help="seed of every random draw of the run")
    g.add_argument("--num-workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="rollout worker processes (default: usable cores); 1 runs in-process. With "
                        "--ray-address: the most rollouts running at once (default: every CPU of the cluster)")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="run the rollouts on the Ray cluster at ADDRESS: HOST:PORT of its head, or auto "
                        "for the cluster started on this machine (default: $RAY_ADDRESS if set, else "
                        "local worker processes)")
    g.add_argument("--population-size", type=int, default=64, help="members per generation")
    g.add_argument("--max-iter", type=int, default=1000, help="generations, counted from the run's start")
    g.add_argument("--num-rollouts", type=int, default=1,
                   help="episodes per fitness evaluation; fitness = mean episode return")
    g.add_argument("--max-episode-steps", type=int, default=None,
                   help="episode length limit (default: the env's own TimeLimit)")
    g.add_argument("--max-negative-steps", type=int, default=None,
                   help="training episodes end after this many consecutive negative rewards "
                        "(default: 20 on CarRacing, off elsewhere; 0 = off); never in evaluation")
    g.add_argument("--eval-every", type=int, default=10,
                   help="evaluate the best member every this many generations")
    g.add_argument("--num-eval-rollouts", type=int, default=100, help="episodes per evaluation")
    g.add_argument("--logs-dir", default="runs", help="parent folder of run folders")
    g.add_argument("--run-name", default=None,
                   help="run folder name (default: <env-id>__train_ga__<seed>__<unix-time>)")
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="continue a run from its checkpoint.pkl or its run folder")
    g.add_argument("--from-pretrained", default=None, metavar="PATH.npz",
                   help="evaluate these weights over --num-eval-rollouts episodes; no training")
    g.add_argument("--init-from", default=None, metavar="PATH.npz",
                   help="start training from these weights (member 0 as is, the others mutated copies)")
    g.add_argument("--capture-video", action="store_true",
                   help="record an episode at each evaluation (GIF; mp4 when moviepy is installed)")
    g.add_argument("--reward-goal", type=float, default=None,
                   help="stop when the evaluation mean reaches this return; a generation whose best "
                        "member reaches it in training is evaluated at once")
    g.add_argument("--consecutive-goal-stopping", type=int, default=1,
                   help="... in this many consecutive evaluations")
    g.add_argument("--quiet", action="store_true", help="no per-generation console lines")
    g = p.add_argument_group("genetic algorithm")
    g.add_argument("--selection", choices=["ranking", "roulette", "tournament"], default="ranking",
                   help="parent selection: linear ranking, fitness-proportional, or tournament")
    g.add_argument("--selection-pressure", type=float, default=2.0,
                   help="linear ranking: expected offspring of the best member, in [1, 2] (1 = uniform)")
    g.add_argument("--tournament-size", type=int, default=3, help="tournament selection: contestants per draw")
    g.add_argument("--crossover", choices=["blx-alpha", "one-point", "uniform"], default="blx-alpha",
                   help="recombination of a pair of parents into two children")
    g.add_argument("--crossover-rate", type=float, default=0.9,
                   help="probability that a pair recombines (else the children are copies of the parents)")
    g.add_argument("--blx-alpha", type=float, default=0.5,
                   help="BLX-alpha: each child gene uniform on [min - alpha d, max + alpha d], d = |x - y|")
    g.add_argument("--mutation", choices=["gaussian", "uniform"], default="gaussian",
                   help="noise added to a mutated gene: N(0, scale^2) or U(-scale, scale)")
    g.add_argument("--mutation-rate", type=float, default=0.1, help="probability that a gene mutates")
    g.add_argument("--mutation-scale", type=float, default=0.5,
                   help="standard deviation (gaussian) or half-width (uniform) of a mutation")
    g.add_argument("--replacement", choices=["parents-vs-children", "generational"], default="generational",
                   help="parents-vs-children: a pair of children replaces its parents only if their summed "
                        "fitness is higher; generational: children replace all but --elite-size elites")
    g.add_argument("--elite-size", type=int, default=2,
                   help="generational: best members carried over unchanged and re-evaluated on fresh episodes")
    g = p.add_argument_group("policy")
    g.add_argument("--hidden-sizes", type=int, nargs="*", default=[20, 12, 12],
                   help="fully connected layer widths (after the conv net for pixels); the default is "
                        "the original's 24-20-12-12-4 BipedalWalker net; with --multitask the first is "
                        "each task's input layer and the rest the shared trunk")
    g.add_argument("--activation", choices=["tanh", "relu", "selu"], default="tanh", help="hidden activation")
    g.add_argument("--frame-size", type=int, default=64, help="pixels: frames resized to this square size")
    g.add_argument("--frame-stack", type=int, default=4, help="pixels: number of stacked frames")
    g.add_argument("--grayscale", action=argparse.BooleanOptionalAction, default=True,
                   help="pixels: convert frames to grayscale")
    g.add_argument("--slime-fitness", choices=["score", "shaped"], default="score",
                   help=f"{SLIME_ID} training reward: the game score, or the original project's shaped "
                        "fitness (+0.01 per step survived, +1 per opponent life taken); evaluation uses the score")
    g = p.add_argument_group("experiments")
    g.add_argument("--distill-from", default=None, metavar="TEACHER.npz",
                   help="knowledge distillation: fit a student of --hidden-sizes to this policy's actions")
    g.add_argument("--distill-episodes", type=int, default=20, help="teacher episodes collected per round")
    g.add_argument("--distill-rounds", type=int, default=1,
                   help="1: plain behaviour cloning; more: DAgger rounds (the student drives, the teacher labels)")
    g.add_argument("--distill-epochs", type=int, default=100, help="passes over the collected pairs per round")
    g.add_argument("--learning-rate", type=float, default=3e-3, help="distillation: Adam step size")
    g.add_argument("--batch-size", type=int, default=256, help="distillation: minibatch size")
    g.add_argument("--multitask", nargs="+", default=None, metavar="ENV_ID",
                   help="evolve one network on these envs at once (hard parameter sharing); "
                        "fitness = sum of each task's return / its env's reward threshold")
    return p


def parse_args(argv=None):
    """Parse and check the command line; returns (args, the set of flags given explicitly)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Which flags did the user type? argparse leaves alone what a namespace already holds,
    # so parse again into a namespace of markers: the flags given are those that changed.
    marker = object()
    typed = parser.parse_args(argv, namespace=argparse.Namespace(**{name: marker for name in vars(args)}))
    given = {name for name, value in vars(typed).items() if value is not marker}

    def check(ok, message):
        if not ok:
            parser.error(message)

    check(args.population_size >= 2, "--population-size must be at least 2")
    check(not (args.replacement == "parents-vs-children" and args.population_size % 2),
          "--population-size must be even with --replacement parents-vs-children (members come in pairs)")
    check(0 <= args.elite_size < args.population_size, "--elite-size must be in [0, population size)")
    for name in ("mutation_rate", "crossover_rate"):
        check(0 <= getattr(args, name) <= 1, f"--{name.replace('_', '-')} must be in [0, 1]")
    check(args.mutation_scale > 0, "--mutation-scale must be > 0")
    check(args.blx_alpha >= 0, "--blx-alpha must be >= 0")
    check(1 <= args.selection_pressure <= 2, "--selection-pressure must be in [1, 2]")
    check(1 <= args.tournament_size <= args.population_size, "--tournament-size must be in [1, population size]")
    check(args.num_workers >= 1, "--num-workers must be at least 1")
    check(args.max_iter >= 1, "--max-iter must be at least 1")
    check(args.num_rollouts >= 1 and args.num_eval_rollouts >= 1,
          "--num-rollouts and --num-eval-rollouts must be at least 1")
    check(args.eval_every >= 1, "--eval-every must be at least 1")
    check(args.consecutive_goal_stopping >= 1, "--consecutive-goal-stopping must be at least 1")
    check(args.max_episode_steps is None or args.max_episode_steps >= 1, "--max-episode-steps must be at least 1")
    check(args.max_negative_steps is None or args.max_negative_steps >= 0, "--max-negative-steps must be >= 0")
    check(all(h >= 1 for h in args.hidden_sizes), "--hidden-sizes must be positive")
    check(args.frame_size >= 36, "--frame-size must be at least 36 (the conv net's receptive field)")
    check(args.frame_stack >= 1, "--frame-stack must be at least 1")
    check(args.distill_episodes >= 1 and args.distill_rounds >= 1 and args.distill_epochs >= 1,
          "--distill-episodes, --distill-rounds and --distill-epochs must be at least 1")
    check(args.learning_rate > 0 and args.batch_size >= 1, "--learning-rate must be > 0 and --batch-size >= 1")
    check(sum(x is not None for x in (args.resume, args.from_pretrained, args.init_from, args.distill_from)) <= 1,
          "--resume, --from-pretrained, --init-from and --distill-from exclude each other")
    if args.multitask is not None:
        check(len(args.multitask) >= 2 and len(set(args.multitask)) == len(args.multitask),
              "--multitask needs at least two different env ids")
        check("env_id" not in given, "--multitask names the envs: leave out --env-id")
        check(len(args.hidden_sizes) >= 2,
              "--multitask needs at least two --hidden-sizes (task input layer, then the shared trunk)")
        check(not args.capture_video, "--capture-video is not supported with --multitask")
        check(not args.distill_from, "--distill-from and --multitask exclude each other")
        args.env_id = "+".join(args.multitask)
    if args.resume:
        extra = sorted(given - RESUME_FLAGS)
        check(not extra, f"--{extra[0].replace('_', '-') if extra else ''} cannot be changed on resume: "
                         "the run's settings come from its checkpoint")
    if args.init_from or args.from_pretrained:
        clash = sorted(given & set(META_ENV_FLAGS + META_POLICY_FLAGS + ("multitask",)))
        check(not clash, f"--{clash[0].replace('_', '-') if clash else ''} comes from the weights file's meta; "
                         "do not restate the architecture")
    if args.distill_from:
        clash = sorted(given & set(META_ENV_FLAGS))
        check(not clash, f"--{clash[0].replace('_', '-') if clash else ''} comes from the teacher's meta")
    try:
        args.env_kwargs = parse_env_kwargs(args.env_kwargs)
    except ValueError as e:
        parser.error(str(e))
    args.ray_address = args.ray_address or os.environ.get("RAY_ADDRESS") or None  # as Ray itself reads it
    if args.ray_address:
        try:
            import_ray()
        except UserError as e:
            parser.error(str(e))
        if "num_workers" not in given:
            args.num_workers = None  # every CPU of the cluster
    return args, given


# ------------------------------------------------------------------------------------------------
# 2. Environment
# ------------------------------------------------------------------------------------------------
class NegativeRewardEarlyStop(gym.Wrapper):
    """Truncate an episode after `patience` consecutive steps with a negative reward.

    CarRacing's training-time early stop (estool; Tang et al. 2020): a car that has left the
    track only collects -0.1 per frame. gymnasium has no such wrapper. Training rollouts only.
    """

    def __init__(self, env, patience):
        super().__init__(env)
        self.patience = patience
        self.negative_steps = 0

    def reset(self, **kwargs):
        self.negative_steps = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.negative_steps = self.negative_steps + 1 if reward < 0 else 0
        return obs, reward, terminated, truncated or self.negative_steps >= self.patience, info


class SlimeVolleyAdapter(gym.Env):
    """`slimevolleygym.SlimeVolleyEnv` (old gym API) as a gymnasium env; the opponent is its baseline.

    Observations: float32 (12,). Actions: Discrete(6), the rows of the env's own `action_table`
    (forward, backward, jump combinations). Reward: +1 when the opponent loses a life, -1 when the
    agent does; an episode ends when either side has lost its 5 lives or after 3000 steps.
    shaped=True gives the original project's fitness instead: +0.01 per step survived and +1 per
    opponent life taken (own lost lives cost nothing but end the episode sooner).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(self, shaped=False, render_mode=None):
        import slimevolleygym
        self.env = slimevolleygym.SlimeVolleyEnv()
        self.shaped = shaped
        self.render_mode = render_mode
        self.action_table = [np.array(a) for a in self.env.action_table]
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (12,), np.float32)
        self.action_space = gym.spaces.Discrete(len(self.action_table))

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.env.seed(int(seed))
        return np.asarray(self.env.reset(), dtype=np.float32), {}

    def step(self, action):
        obs, reward, done, info = self.env.step(self.action_table[int(action)])
        if self.shaped:
            reward = 0.01 + max(float(reward), 0.0)
        return np.asarray(obs, dtype=np.float32), float(reward), bool(done), False, info

    def render(self):
        return self.env.render(mode="rgb_array")

    def close(self):
        self.env.close()


def is_image_space(space):
    """True for a uint8 Box of shape (H, W) or (H, W, 3): frames this script feeds to its conv net."""
    return (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8
            and (len(space.shape) == 2 or (len(space.shape) == 3 and space.shape[-1] == 3)))


def make_env(env_config, training, render_mode=None):
    """Build one environment: `gymnasium.make` (or the SlimeVolley adapter) plus gymnasium's wrappers.

    env_config: dict with env_id, env_kwargs, max_episode_steps, max_negative_steps, frame_size,
    frame_stack, grayscale, slime_fitness (see `env_config_from_args`). Image observations become
    uint8 arrays (frame_stack, frame_size, frame_size[, 3]); Box actions are rescaled to [-1, 1]
    for the policy's tanh output. Raises UserError for an unknown id, a missing optional dependency
    or a space the policies cannot handle.
    """
    env_id = env_config["env_id"]
    kwargs = dict(env_config["env_kwargs"])
    if env_id == SLIME_ID:
        try:
            import slimevolleygym  # noqa: F401
        except ImportError:
            raise UserError(f"{SLIME_ID} needs the optional slimevolleygym package: pip install slimevolleygym") from None
        env = SlimeVolleyAdapter(shaped=training and env_config["slime_fitness"] == "shaped", render_mode=render_mode)
        if env_config["max_episode_steps"] is not None:
            env = gym.wrappers.TimeLimit(env, env_config["max_episode_steps"])
    else:
        if env_id.startswith("ALE/"):
            try:
                import ale_py
            except ImportError:
                raise UserError(f"{env_id} needs the Atari extra: pip install ale-py") from None
            gym.register_envs(ale_py)
        if env_config["max_episode_steps"] is not None:
            kwargs["max_episode_steps"] = env_config["max_episode_steps"]
        try:
            env = gym.make(env_id, render_mode=render_mode, **kwargs)
        except gym.error.DependencyNotInstalled as e:
            raise UserError(f"{env_id} needs an optional dependency: {str(e).splitlines()[0]}") from None
        except gym.error.Error as e:
            raise UserError(f"cannot make env {env_id!r}: {str(e).splitlines()[0]}") from None
        except TypeError as e:
            raise UserError(f"cannot make env {env_id!r} with {kwargs}: {e}") from None
    if render_mode is not None:
        env = gym.wrappers.RenderCollection(env)
    if training and env_config["max_negative_steps"] > 0:
        env = NegativeRewardEarlyStop(env, env_config["max_negative_steps"])
    action_space = env.action_space
    if isinstance(action_space, gym.spaces.Box):
        if len(action_space.shape) != 1:
            raise UserError(f"action space {action_space} is not supported: Box actions must be 1-D")
        if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
            raise UserError(f"action space {action_space} has infinite bounds: the policy's tanh cannot map onto it")
        if not (np.all(action_space.low == -1) and np.all(action_space.high == 1)):
            env = gym.wrappers.RescaleAction(env, -1.0, 1.0)
    elif not isinstance(action_space, gym.spaces.Discrete):
        raise UserError(f"action space {action_space} is not supported: only Discrete and 1-D Box")
    obs_space = env.observation_space
    if is_image_space(obs_space):
        if env_config["grayscale"] and len(obs_space.shape) == 3:
            env = gym.wrappers.GrayscaleObservation(env)
        size = env_config["frame_size"]
        try:
            env = gym.wrappers.ResizeObservation(env, (size, size))
        except gym.error.DependencyNotInstalled:
            raise UserError("resizing frames needs OpenCV: pip install opencv-python-headless") from None
        env = gym.wrappers.FrameStackObservation(env, env_config["frame_stack"])
    elif not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1):
        raise UserError(f"observation space {obs_space} is not supported: only 1-D Box vectors and uint8 images")
    return env


def env_configs_from_args(args):
    """One env config per task (one, or one per --multitask id): what workers, evaluations and meta need."""
    configs = []
    for env_id in (args.multitask or [args.env_id]):
        max_negative_steps = args.max_negative_steps
        if max_negative_steps is None:  # CarRacing's training-time early stop is on by default
            max_negative_steps = 20 if env_id.startswith("CarRacing") else 0
        configs.append({"env_id": env_id, "env_kwargs": args.env_kwargs, "max_episode_steps": args.max_episode_steps,
                        "max_negative_steps": max_negative_steps, "frame_size": args.frame_size,
                        "frame_stack": args.frame_stack, "grayscale": args.grayscale,
                        "slime_fitness": args.slime_fitness})
    return configs


def return_scale(env_config):
    """Multitask normalization of a task's return: its env's reward threshold (1 when it has none)."""
    if env_config["env_id"] == SLIME_ID:
        return 5.0
    try:
        threshold = gym.spec(env_config["env_id"]).reward_threshold
    except gym.error.Error:
        threshold = None
    return float(threshold) if threshold else 1.0


# ------------------------------------------------------------------------------------------------
# 3. Policy
# ------------------------------------------------------------------------------------------------
ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "selu": torch.selu}
# The same activations on float32 numpy arrays, for the MLP's numpy forward (selu: torch's constants).
NUMPY_ACTIVATIONS = {"tanh": np.tanh, "relu": lambda h: np.maximum(h, np.float32(0)),
                     "selu": lambda h: np.float32(1.0507009873554805) * np.where(
                         h > 0, h, np.float32(1.6732632423543772) * np.expm1(h))}


def linear(weight, bias, h):
    """bias + h @ weight.T for one vector h (D,) (torch.addmv: half of nn.Linear's cost) or a batch (B, D)."""
    return torch.addmv(bias, weight, h) if h.dim() == 1 else torch.addmm(bias, h, weight.t())


class Policy(nn.Module):
    """Deterministic policy for one environment: an MLP on vectors, a small conv net first on pixels.

    Vector observations: float32 (D,) (or a batch (B, D) when distilling). Image observations
    (uint8 (frames, H, W) or (frames, H, W, 3)) are scaled to [0, 1] and go through Conv 8x8/4 -> 16,
    Conv 4x4/2 -> 32 (Mnih et al. 2013), then the MLP layers. Discrete actions: argmax of the
    logits; Box actions: tanh (the env is rescaled to [-1, 1]). No observation normalization.
    `act` evaluates the MLP of a vector observation with numpy (one observation through torch costs
    about twice as much, more than a CartPole step); `forward` (torch) serves pixels and distillation.

    The flat genotype is `parameters_to_vector(policy.parameters())`, float32: weights then biases,
    layer by layer.
    """

    def __init__(self, obs_shape, num_actions, discrete, hidden_sizes=(20, 12, 12), activation="tanh"):
        super().__init__()
        self.obs_shape = tuple(obs_shape)
        self.discrete = discrete
        self.pixels = len(self.obs_shape) > 1
        self.activation = ACTIVATIONS[activation]
        if self.pixels:
            channels = self.obs_shape[0] * (self.obs_shape[3] if len(self.obs_shape) == 4 else 1)
            self.conv = nn.Sequential(nn.Conv2d(channels, 16, 8, stride=4), nn.ReLU(),
                                      nn.Conv2d(16, 32, 4, stride=2), nn.ReLU(), nn.Flatten(0))
            with torch.no_grad():
                features = self.conv(torch.zeros(channels, *self.obs_shape[1:3])).numel()
        else:
            self.conv = None
            features = self.obs_shape[0]
        self.layers = nn.ModuleList()
        for width in hidden_sizes:
            self.layers.append(nn.Linear(features, width))
            features = width
        self.head = nn.Linear(features, num_actions)
        self.requires_grad_(False)  # evolved; only a distillation student turns gradients on
        # The hot path reads parameters through plain lists (nn.Module attribute lookup costs ~0.3 us);
        # vector_to_parameters rebinds each Parameter's .data, so these stay valid.
        self.linear_params = [(layer.weight, layer.bias) for layer in self.layers] + [(self.head.weight, self.head.bias)]
        self.numpy_activation = NUMPY_ACTIVATIONS[activation]
        self.load(parameters_to_vector(self.parameters()).numpy())

    def load(self, params):
        """Set the weights from a flat genotype (D,) (copied as float32). Returns the policy."""
        vector_to_parameters(torch.from_numpy(np.array(params, dtype=np.float32)), self.parameters())
        # numpy views of the weights (weight (out, in), bias (out,)) for the numpy forward; they see
        # in-place updates (distillation's Adam), and `load` renews them when the weights are rebound.
        self.numpy_params = [(w.detach().numpy(), b.detach().numpy()) for w, b in self.linear_params]
        return self

    def forward(self, x):
        """x: preprocessed observation(s), float32 (D,), (B, D) or (C, H, W). Returns the output (A,) or (B, A):
        logits (discrete) or tanh actions in [-1, 1] (Box)."""
        h = self.conv(x) if self.pixels else x
        for weight, bias in self.linear_params[:-1]:
            h = self.activation(linear(weight, bias, h))
        out = linear(*self.linear_params[-1], h)
        return out if self.discrete else torch.tanh(out)

    def preprocess(self, obs):
        """One env observation (numpy) -> float32 tensor for `forward`."""
        x = torch.from_numpy(np.asarray(obs))
        if not self.pixels:
            return x.float()
        x = x.float().div_(255.0)
        return x.permute(0, 3, 1, 2).flatten(0, 1) if x.dim() == 4 else x  # (frames, H, W, 3) -> (frames*3, H, W)

    def act(self, obs):
        """obs: one env observation (numpy). Returns the action: int, or float32 (A,) in [-1, 1]."""
        if self.pixels:
            out = self(self.preprocess(obs)).numpy()
        else:
            h = np.asarray(obs, dtype=np.float32)
            for weight, bias in self.numpy_params[:-1]:
                h = self.numpy_activation(weight @ h + bias)
            weight, bias = self.numpy_params[-1]
            out = weight @ h + bias
        return int(out.argmax()) if self.discrete else np.tanh(out)


class MultitaskPolicy(nn.Module):
    """One network for several vector tasks at once: hard parameter sharing.

    tasks: list of {obs_shape: [O_t], discrete, num_actions: A_t}. Each task's observation goes
    through its own input layer (O_t -> hidden_sizes[0]); the T results are concatenated
    (T * hidden_sizes[0]) and go through the shared trunk (hidden_sizes[1:]); one head per task
    gives that task's action (argmax or tanh). All tasks are stepped together, so each head sees
    every task's input: the noise study replaces one task's input by noise and watches the others.
    """

    def __init__(self, tasks, hidden_sizes=(20, 12, 12), activation="tanh"):
        super().__init__()
        self.tasks = tasks
        self.activation = ACTIVATIONS[activation]
        self.inputs = nn.ModuleList(nn.Linear(t["obs_shape"][0], hidden_sizes[0]) for t in tasks)
        features = hidden_sizes[0] * len(tasks)
        self.trunk = nn.ModuleList()
        for width in hidden_sizes[1:]:
            self.trunk.append(nn.Linear(features, width))
            features = width
        self.heads = nn.ModuleList(nn.Linear(features, t["num_actions"]) for t in tasks)
        self.requires_grad_(False)

    def load(self, params):
        """Set the weights from a flat genotype (D,) (copied as float32). Returns the policy."""
        vector_to_parameters(torch.from_numpy(np.array(params, dtype=np.float32)), self.parameters())
        return self

    def forward(self, xs):
        """xs: one float32 (O_t,) tensor per task. Returns one output (A_t,) per task."""
        h = torch.cat([self.activation(layer(x)) for layer, x in zip(self.inputs, xs)])
        for layer in self.trunk:
            h = self.activation(layer(h))
        return [head(h) if t["discrete"] else torch.tanh(head(h)) for head, t in zip(self.heads, self.tasks)]

    def act(self, observations):
        """observations: one numpy vector per task. Returns one action per task (int or float32 (A_t,))."""
        outs = self([torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in observations])
        return [int(o.argmax()) if t["discrete"] else o.numpy() for o, t in zip(outs, self.tasks)]


def task_config_from_env(env):
    """{obs_shape, discrete, num_actions} read off a (wrapped) env's spaces."""
    discrete = isinstance(env.action_space, gym.spaces.Discrete)
    return {"obs_shape": list(env.observation_space.shape), "discrete": discrete,
            "num_actions": int(env.action_space.n) if discrete else int(env.action_space.shape[0])}


def policy_config_from_envs(env_configs, hidden_sizes, activation):
    """Everything `build_policy` needs: a single-task config, or {"multitask": [...tasks]}.

    Raises UserError when a multitask env has image observations.
    """
    tasks = []
    for config in env_configs:
        env = make_env(config, training=False)
        tasks.append(task_config_from_env(env))
        env.close()
    base = {"hidden_sizes": list(hidden_sizes), "activation": activation}
    if len(tasks) == 1:
        return dict(tasks[0], **base)
    for config, task in zip(env_configs, tasks):
        if len(task["obs_shape"]) != 1:
            raise UserError(f"--multitask takes vector observations only; {config['env_id']} gives images")
    return dict(base, multitask=tasks)


def build_policy(policy_config):
    """Policy or MultitaskPolicy from a config dict (flags or a weights file's meta); float32."""
    torch.set_num_threads(1)
    if "multitask" in policy_config:
        return MultitaskPolicy(policy_config["multitask"], policy_config["hidden_sizes"], policy_config["activation"])
    return Policy(**policy_config)


def make_policy(policy_config, params):
    """A policy holding `params` (float32 (D,))."""
    return build_policy(policy_config).load(params)


def num_params(policy):
    """Length of the policy's flat genotype: int."""
    return sum(p.numel() for p in policy.parameters())


# ------------------------------------------------------------------------------------------------
# 4. Rollout
# ------------------------------------------------------------------------------------------------
def rollout(env, policy, seed, record=None):
    """Run one episode with `env.reset(seed=seed)`. Returns (episode return: float, steps: int).

    record: a list to which every observation the policy sees is appended (distillation), or None.
    """
    obs, _ = env.reset(seed=seed)
    total, steps = 0.0, 0
    with torch.inference_mode():
        while True:
            action = policy.act(obs)
            if record is not None:
                record.append(obs)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            steps += 1
            if terminated or truncated:
                return total, steps


def multitask_rollout(envs, policy, seed, noisy=()):
    """One episode of every task, stepped together. Returns (returns: list of T floats, steps: int).

    Each env is reset with `seed`. A task whose episode has ended keeps feeding its last
    observation until all have ended. noisy: task indices whose input is replaced, at every step,
    by uniform noise on [-1, 1] (drawn from a generator seeded by `seed`).
    """
    rng = np.random.default_rng(seed)
    observations = [env.reset(seed=seed)[0] for env in envs]
    running = [True] * len(envs)
    totals, steps = [0.0] * len(envs), 0
    with torch.inference_mode():
        while any(running):
            inputs = [rng.uniform(-1, 1, np.shape(o)).astype(np.float32) if t in noisy else o
                      for t, o in enumerate(observations)]
            actions = policy.act(inputs)
            for t, env in enumerate(envs):
                if running[t]:
                    observations[t], reward, terminated, truncated, _ = env.step(actions[t])
                    totals[t] += float(reward)
                    steps += 1
                    running[t] = not (terminated or truncated)
    return totals, steps


# ------------------------------------------------------------------------------------------------
# 5. The genetic algorithm as an ask/tell object
# ------------------------------------------------------------------------------------------------
def derive_seed(*keys):
    """A 32-bit seed from non-negative integer keys, e.g. (seed, stream, generation, member, rollout)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def selection_probabilities(fitness, method, pressure=2.0):
    """Probability of each member to be drawn as a parent: float64 (N,), summing to one.

    'ranking': linear ranking (Baker 1985; Goldberg & Deb 1991): the member of rank r (0 = worst)
    gets (2 - s) / N + 2 r (s - 1) / (N (N - 1)), s = `pressure` in [1, 2]; tied fitness share
    their mean. 'roulette': proportional to fitness - min(fitness), so negative returns work
    (the worst member gets 0; all equal gives uniform).
    """
    fitness = np.asarray(fitness, dtype=np.float64)
    n = fitness.size
    if method == "ranking":
        values, inverse, counts = np.unique(fitness, return_inverse=True, return_counts=True)
        ranks = (np.cumsum(counts) - counts + (counts - 1) / 2.0)[inverse]
        return (2 - pressure) / n + 2 * ranks * (pressure - 1) / (n * (n - 1))
    if method == "roulette":
        shifted = fitness - fitness.min()
        total = shifted.sum()
        return shifted / total if total > 0 else np.full(n, 1.0 / n)
    raise ValueError(f"no selection probabilities for {method!r}")


def select_parents(fitness, count, rng, method="ranking", pressure=2.0, tournament_size=3):
    """Indices of `count` parents drawn with replacement: int64 (count,).

    'ranking' and 'roulette' sample from `selection_probabilities`; 'tournament' takes the
    fittest of `tournament_size` members drawn uniformly (with replacement) per parent.
    """
    fitness = np.asarray(fitness, dtype=np.float64)
    if method == "tournament":
        contestants = rng.integers(0, fitness.size, size=(count, tournament_size))
        return contestants[np.arange(count), np.argmax(fitness[contestants], axis=1)]
    return rng.choice(fitness.size, size=count, p=selection_probabilities(fitness, method, pressure))


def crossover(x, y, rng, method="blx-alpha", alpha=0.5):
    """Two children of parents x, y (float32 (D,) each): a tuple of two float32 (D,).

    'blx-alpha' (Eshelman & Schaffer 1993): each gene of each child uniform on
    [min - alpha d, max + alpha d] with d = |x - y|. 'one-point': the genes after a cut point
    in [1, D - 1] are swapped. 'uniform': each gene is swapped with probability 1/2.
    """
    if method == "blx-alpha":
        low, high = np.minimum(x, y), np.maximum(x, y)
        d = high - low
        low, high = low - alpha * d, high + alpha * d
        return tuple((low + rng.random(x.size) * (high - low)).astype(np.float32) for _ in range(2))
    if method == "one-point":
        cut = int(rng.integers(1, x.size)) if x.size > 1 else 0
        return np.concatenate([x[:cut], y[cut:]]), np.concatenate([y[:cut], x[cut:]])
    if method == "uniform":
        swap = rng.random(x.size) < 0.5
        return np.where(swap, y, x), np.where(swap, x, y)
    raise ValueError(f"unknown crossover {method!r}")


def mutate(x, rng, rate=0.1, scale=0.5, method="gaussian"):
    """x with each gene mutated with probability `rate`: float32 (D,) (a new array).

    A mutated gene gets N(0, scale^2) ('gaussian') or U(-scale, scale) ('uniform') added.
    """
    mask = rng.random(x.size) < rate
    noise = rng.standard_normal(x.size) * scale if method == "gaussian" else rng.uniform(-scale, scale, x.size)
    return (x + np.where(mask, noise, 0.0)).astype(np.float32)


class GeneticAlgorithm:
    """The GA as ask/tell. `ask()` -> candidates float32 (N, D) to evaluate; `tell(fitness)` with their
    N fitness values (float, higher is better, in `ask()`'s order) forms the next population.

    Generation 0 evaluates the initial population. Later generations draw N parents (selection),
    recombine consecutive pairs (crossover with probability crossover_rate, else copies) and mutate
    every child. Replacement:
    - 'parents-vs-children' (ga-openai-gym): the pair of children k replaces its two parents in the
      next population only if f(c1) + f(c2) > f(p1) + f(p2), the parents' fitness being the one
      they were last evaluated with. Needs an even population.
    - 'generational': the next population is the `elite_size` best members, unchanged, then
      N - elite_size children. The elites are among the candidates, so they are evaluated again on
      fresh episodes every generation and keep only that new fitness (Such et al. 2017).
    Every draw of generation g comes from a generator seeded by (seed, GA_STREAM, g), so the run
    depends on the seed alone. The state is numpy and plain numbers (`state_dict`).
    """

    def __init__(self, population, selection="ranking", selection_pressure=2.0, tournament_size=3,
                 crossover="blx-alpha", crossover_rate=0.9, blx_alpha=0.5, mutation="gaussian",
                 mutation_rate=0.1, mutation_scale=0.5, replacement="generational", elite_size=2, seed=0):
        population = np.asarray(population, dtype=np.float32)
        n = population.shape[0]
        if n < 2 or (replacement == "parents-vs-children" and n % 2) or not 0 <= elite_size < n:
            raise ValueError("population must have >= 2 members (even for parents-vs-children), 0 <= elite_size < N")
        self.population = population.copy()  # (N, D) the current members
        self.fitness = None                   # (N,) their fitness; None before the first tell
        self.selection = selection            # "ranking", "roulette" or "tournament"
        self.selection_pressure = selection_pressure
        self.tournament_size = tournament_size
        self.crossover = crossover            # "blx-alpha", "one-point" or "uniform"
        self.crossover_rate = crossover_rate
        self.blx_alpha = blx_alpha
        self.mutation = mutation              # "gaussian" or "uniform"
        self.mutation_rate = mutation_rate    # per-gene probability
        self.mutation_scale = mutation_scale
        self.replacement = replacement        # "parents-vs-children" or "generational"
        self.elite_size = elite_size
        self.seed = seed
        self.generation = 0
        self.pending = None                   # (candidates, parent indices) between ask and tell
        self.children_accepted = 0            # new members of the last population (diagnostic)

    def breed(self, count, rng):
        """`count` children (float32 (count, D)) and their parents' indices (int64 (pairs, 2))."""
        pairs = (count + 1) // 2
        parents = select_parents(self.fitness, 2 * pairs, rng, self.selection, self.selection_pressure,
                                 self.tournament_size).reshape(pairs, 2)
        children = []
        for a, b in parents:
            x, y = self.population[a], self.population[b]
            if rng.random() < self.crossover_rate:
                x, y = crossover(x, y, rng, self.crossover, self.blx_alpha)
            children += [mutate(x, rng, self.mutation_rate, self.mutation_scale, self.mutation),
                         mutate(y, rng, self.mutation_rate, self.mutation_scale, self.mutation)]
        return np.stack(children[:count]), parents

    def ask(self):
        """The candidates of this generation: float32 (N, D). Generational: the elites come first."""
        if self.fitness is None:
            self.pending = (self.population, None)
            return self.population.copy()
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, GA_STREAM, self.generation]))
        if self.replacement == "generational":
            elites = self.population[np.argsort(-self.fitness, kind="stable")[:self.elite_size]]
            children, parents = self.breed(len(self.population) - self.elite_size, rng)
            candidates = np.concatenate([elites, children])
        else:
            candidates, parents = self.breed(len(self.population), rng)
        self.pending = (candidates, parents)
        return candidates.copy()

    def tell(self, fitness):
        """Form the next population from the fitness (N,) of `ask()`'s candidates, in its order."""
        fitness = np.asarray(fitness, dtype=np.float64)
        candidates, parents = self.pending
        if fitness.shape != (len(candidates),):
            raise ValueError(f"expected {len(candidates)} fitness values, got shape {fitness.shape}")
        if parents is None or self.replacement == "generational":
            self.population, self.fitness = candidates.copy(), fitness
            self.children_accepted = len(candidates) - (0 if parents is None else self.elite_size)
        else:
            population, new_fitness = self.population[parents.ravel()], self.fitness[parents.ravel()]
            accepted = fitness[0::2] + fitness[1::2] > new_fitness[0::2] + new_fitness[1::2]
            keep = np.repeat(accepted, 2)
            self.population = np.where(keep[:, None], candidates, population).astype(np.float32)
            self.fitness = np.where(keep, fitness, new_fitness)
            self.children_accepted = int(keep.sum())
        self.pending = None
        self.generation += 1

    def best(self):
        """(parameters float32 (D,), fitness) of the current population's fittest member."""
        i = int(np.argmax(self.fitness))
        return self.population[i].copy(), float(self.fitness[i])

    def state_dict(self):
        """Everything the GA holds (numpy arrays and plain values): a copy for the checkpoint."""
        return {key: (value.copy() if isinstance(value, np.ndarray) else value) for key, value in vars(self).items()}

    @classmethod
    def from_state_dict(cls, state):
        """The GA exactly as `state_dict()` saw it."""
        ga = cls.__new__(cls)
        vars(ga).update(state)
        return ga


def initial_population(policy_config, size, seed, init=None, rng_args=None):
    """The first population: float32 (size, D).

    Without `init`, member i is the policy's own PyTorch initialization under the torch seed
    (seed, INIT_STREAM, i). With `init` (float32 (D,)), member 0 is `init` and the others are
    `mutate(init, ...)` with rng_args = (rate, scale, method).
    """
    members = []
    for i in range(size):
        if init is None:
            torch.manual_seed(derive_seed(seed, INIT_STREAM, i))
            members.append(parameters_to_vector(build_policy(policy_config).parameters()).numpy())
        else:
            rng = np.random.default_rng(derive_seed(seed, INIT_STREAM, i))
            members.append(np.asarray(init, np.float32) if i == 0 else mutate(np.asarray(init, np.float32), rng, *rng_args))
    return np.stack(members).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# 6. Workers
# ------------------------------------------------------------------------------------------------
class RolloutWorker:
    """One worker's envs (one per task) and policy, built once, and the rollout tasks it runs.

    A task is (member, env_seeds, training, noisy): the row of the shared (rows, D) float32 array
    `members` holding the parameters, one env seed per episode, training (early stops, shaped
    fitness) or evaluation, and the multitask noise-study condition (task indices whose input is
    noise). Result: (returns: a list per episode of T per-task returns, env steps).
    """

    def __init__(self, env_configs, policy_config, members, dim):
        torch.set_num_threads(1)
        self.env_configs = env_configs
        self.envs = {(t, training): make_env(config, training)
                     for t, config in enumerate(env_configs) for training in (True, False)}
        # A Box2D world keeps state across resets (BipedalWalker-v3 returns drift on a reused env with
        # the same seed), which would make results depend on scheduling. A fresh Box2D env costs
        # ~0.4 ms, so those get one per episode; every other env is built once.
        self.fresh = [type(self.envs[t, True].unwrapped).__module__.startswith("gymnasium.envs.box2d")
                      for t in range(len(env_configs))]
        self.policy = build_policy(policy_config)
        self.multitask = "multitask" in policy_config
        self.members = np.frombuffer(members, dtype=np.float32).reshape(-1, dim)

    def env(self, t, training):
        """Task t's env, rebuilt first when it is a Box2D env."""
        if self.fresh[t]:
            self.envs[t, training].close()
            self.envs[t, training] = make_env(self.env_configs[t], training)
        return self.envs[t, training]

    def run(self, task):
        """Run one task (member, env_seeds, training, noisy) -> (returns [[T floats] per episode], steps)."""
        member, env_seeds, training, noisy = task
        self.policy.load(self.members[member])
        returns, steps = [], 0
        for env_seed in env_seeds:
            if self.multitask:
                envs = [self.env(t, training) for t in range(len(self.env_configs))]
                episode_returns, episode_steps = multitask_rollout(envs, self.policy, env_seed, noisy)
            else:
                episode_return, episode_steps = rollout(self.env(0, training), self.policy, env_seed)
                episode_returns = [episode_return]
            returns.append(episode_returns)
            steps += episode_steps
        return returns, steps


def worker_main(conn, worker_args):
    """Loop of a worker process: receive (index, task), send ('ok'|'error', index, result)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C and SIGTERM, then stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        worker = RolloutWorker(*worker_args)
    except Exception as e:  # report, e.g. a missing dependency in a spawned interpreter
        conn.send(("error", -1, f"{type(e).__name__}: {e}"))
        return
    while True:
        message = conn.recv()
        if message is None:
            return
        index, task = message
        try:
            conn.send(("ok", index, worker.run(task)))
        except Exception as e:
            conn.send(("error", index, f"{type(e).__name__}: {e}"))


class WorkerDied(Exception):
    """A worker process exited while the driver waited for its results."""


class RolloutPool:
    """Persistent rollout worker processes, or the rollouts in-process when num_workers == 1.

    The members' parameters live in one shared (rows, D) float32 RawArray, written by the driver
    with `set_members` before a batch; a task names its row. `map(tasks)` returns the results in
    task order whatever the scheduling (each worker keeps two tasks in flight). A dead worker raises
    WorkerDied in `map_with_restarts`, which restarts the pool and re-runs the batch, up to
    `max_restarts` times.
    """

    def __init__(self, num_workers, env_configs, policy_config, rows, dim, max_restarts=3):
        self.num_workers = num_workers
        self.max_restarts = max_restarts
        self.rows, self.dim = rows, dim
        self.members = mp.RawArray("f", rows * dim)
        self.worker_args = (env_configs, policy_config, self.members, dim)
        self.processes, self.conns, self.local = [], [], None
        self.on_lost = None  # RayRolloutPool: () -> what to tell about the checkpoint if the cluster is lost
        self.start()

    @property
    def num_cpus(self):
        """CPUs running rollouts: one per worker process."""
        return self.num_workers

    def describe(self):
        """The workers, for the console."""
        return f"{self.num_workers} worker process{'es' if self.num_workers > 1 else ''}"

    def start(self):
        """Build the in-process worker (num_workers == 1) or start the worker processes (fork where
        available: no re-import of torch per worker)."""
        if self.num_workers == 1:
            self.local = self.local or RolloutWorker(*self.worker_args)
            return
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        ctx = mp.get_context(method)
        for _ in range(self.num_workers):
            parent_conn, child_conn = ctx.Pipe()
            process = ctx.Process(target=worker_main, args=(child_conn, self.worker_args), daemon=True)
            process.start()
            child_conn.close()
            self.processes.append(process)
            self.conns.append(parent_conn)

    def close(self):
        """Stop the workers: ask each to exit, kill those still busy after a second."""
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout=1)
            if process.is_alive():
                process.kill()
                process.join()
        self.processes, self.conns = [], []

    def set_members(self, members):
        """Publish members (float32 (k, D), k <= rows) to rows 0..k-1 of the shared array."""
        members = np.asarray(members, dtype=np.float32)
        np.frombuffer(self.members, dtype=np.float32).reshape(self.rows, self.dim)[:len(members)] = members

    def map(self, tasks):
        """Run the tasks; a list of results in task order. Raises WorkerDied or UserError."""
        if self.local is not None:
            return [self.local.run(task) for task in tasks]
        results, next_index, done = [None] * len(tasks), 0, 0
        sentinels = {p.sentinel: p for p in self.processes}

        def send_next(conn):
            nonlocal next_index
            if next_index < len(tasks):
                conn.send((next_index, tasks[next_index]))
                next_index += 1

        for _ in range(TASKS_IN_FLIGHT):
            for conn in self.conns:
                send_next(conn)
        while done < len(tasks):
            for ready in wait(self.conns + list(sentinels)):
                if ready in sentinels:
                    process = sentinels[ready]
                    raise WorkerDied(f"worker pid {process.pid} exited with code {process.exitcode}")
                try:
                    status, index, result = ready.recv()
                except (EOFError, OSError):
                    raise WorkerDied("a worker's connection closed") from None
                if status == "error":
                    raise UserError(f"rollout failed in a worker: {result}")
                results[index] = result
                done += 1
                send_next(ready)
        return results

    def map_with_restarts(self, tasks, warn):
        """`map`, restarting the pool after a dead worker; UserError after max_restarts failures."""
        for attempt in range(self.max_restarts + 1):
            try:
                return self.map(tasks)
            except WorkerDied as e:
                self.close()
                if attempt == self.max_restarts:
                    raise UserError(f"workers keep dying ({e}); stopped after {attempt} restarts") from None
                warn(f"warning: {e}; restarting the workers and re-running this batch")
                self.start()


def evaluate(pool, params, seed, iteration, episodes, noisy=()):
    """Per-task returns of `params` over `episodes` evaluation episodes (no early stop, real score).

    Returns (float64 (E, T), env steps). Episode e uses the env seed (seed, EVAL_ENV_STREAM,
    iteration, e), so two policies evaluated with the same arguments meet the same episodes.
    """
    pool.set_members(np.asarray(params, np.float32)[None])
    tasks = [(0, [derive_seed(seed, EVAL_ENV_STREAM, iteration, e)], False, tuple(noisy)) for e in range(episodes)]
    results = pool.map_with_restarts(tasks, warn=print)
    return np.array([r[0][0] for r in results], dtype=np.float64), sum(r[1] for r in results)


def import_ray():
    """The `ray` module. Raises UserError when Ray is not installed (optional: requirements-ray.txt)."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray-address needs Ray, which is not installed: pip install -r requirements-ray.txt") from None
    return ray


def connect_ray(address):
    """Join the Ray cluster at `address` ('auto' or HOST:PORT of its head), once per process.

    Returns the ray module. Raises UserError when Ray is missing or no cluster answers there (an
    address nobody listens on is probed first: ray.init would wait on it for minutes).
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError):
            raise UserError(f"no Ray cluster answers at {address}: start one with `ray start --head` "
                            "or check the address (HOST:PORT, or auto)") from None
    try:
        ray.init(address=address, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    if __name__ != "__main__":  # imported (tests): ship this module's code by value, as for a script
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray


# A Ray worker process runs many tasks: it keeps the RolloutWorker of each pool it served, with the
# buffers its shared arrays live in and the version of the arrays they hold.
RAY_WORKERS = {}


def ray_rollout(pool_key, version, worker_args, task):
    """A Ray task: `RolloutWorker.run(task)` in this Ray worker process.

    worker_args: the pool's worker arguments with each shared array as a float32 numpy array (from
    the object store). The RolloutWorker (env and policy) is built at the process's first task of
    the pool and reused; the arrays are copied into its buffers once per version (generation).
    """
    if pool_key not in RAY_WORKERS:
        buffers = [mp.RawArray("f", a.size) if isinstance(a, np.ndarray) else a for a in worker_args]
        RAY_WORKERS[pool_key] = [RolloutWorker(*buffers), buffers, None]
    cached = RAY_WORKERS[pool_key]
    worker, buffers, seen = cached
    if seen != version:
        for buffer, value in zip(buffers, worker_args):
            if isinstance(value, np.ndarray):
                np.frombuffer(buffer, dtype=np.float32)[:] = value
        cached[2] = version
    return worker.run(task)


class RayClusterError(Exception):
    """The Ray cluster is gone or keeps failing: the run stops with its last checkpoint intact."""


class RayRolloutPool(RolloutPool):
    """The rollouts as Ray tasks on a cluster (--ray-address): same tasks, same results, same order.

    Each batch's shared arrays go once into Ray's object store (`ray.put`); a task carries the same
    small tuple as on the local pool (member row, env seeds, training, noise condition). A Ray worker process builds
    its env and policy at its first task and keeps them (`ray_rollout`). Ray re-runs a task whose
    worker process or node died (RAY_TASK_RETRIES times), on any node, so losing a node costs only
    its rollouts. num_workers, when set, caps the tasks running at once; None uses every CPU of the
    cluster, including nodes that join later. A lost cluster ends the process through `watch`.
    """

    def __init__(self, address, *args, **kwargs):
        self.address = address
        super().__init__(*args, **kwargs)

    def start(self):
        """Join the cluster, declare the Ray task and start the watchdog."""
        self.ray = connect_ray(self.address)
        self.remote = self.ray.remote(num_cpus=1, max_retries=RAY_TASK_RETRIES)(ray_rollout)
        self.key, self.version = uuid.uuid4().hex, 0
        self.probes = []  # (what, host, port) that must keep accepting TCP connections
        try:
            context = self.ray.get_runtime_context()
            host, _, port = context.gcs_address.rpartition(":")
            self.probes.append((f"its head ({context.gcs_address})", host, int(port)))
            node = next(n for n in self.ray.nodes() if n["NodeID"] == context.get_node_id())
            self.probes.append((f"this machine's Ray node ({node['NodeManagerAddress']}:{node['NodeManagerPort']})",
                                node["NodeManagerAddress"], int(node["NodeManagerPort"])))
        except Exception:  # not every connection mode exposes them: then Ray's own timeouts apply
            pass
        self.closed = threading.Event()
        threading.Thread(target=self.watch, name="ray-watchdog", daemon=True).start()

    def close(self):
        """Stop the watchdog; the cluster's worker processes end with this driver's Ray job."""
        self.closed.set()

    @property
    def num_cpus(self):
        """CPUs running rollouts: the cluster's CPUs, capped by num_workers."""
        cluster = int(self.ray.cluster_resources().get("CPU", 0))
        return min(cluster, self.num_workers) if self.num_workers else cluster

    def describe(self):
        """The cluster, for the console."""
        nodes = sum(node["Alive"] for node in self.ray.nodes())
        cap = f", at most {self.num_workers} rollouts at once" if self.num_workers else ""
        return f"Ray cluster at {self.address} ({self.num_cpus} CPUs on {nodes} node{'s' * (nodes > 1)}{cap})"

    def silent(self):
        """The first of the cluster's head and this machine's Ray node that refuses a TCP connection
        (a description), or None when both answer."""
        for what, host, port in self.probes:
            try:
                socket.create_connection((host, port), timeout=2).close()
            except OSError:
                return what
        return None

    def watch(self):
        """Watchdog thread. Once the cluster is gone, Ray's calls in the main thread may block until
        Ray ends the process without a word, so after RAY_LOST_AFTER_S of silence from the head or
        this machine's node, this thread says so (and what `on_lost` tells about the checkpoint,
        which is the last finished generation's: it is written atomically) and exits with code 1."""
        silent_since = None
        while not self.closed.wait(RAY_POLL_S):
            silent = self.silent()
            if silent is None:
                silent_since = None
            elif time.monotonic() - (silent_since := silent_since or time.monotonic()) >= RAY_LOST_AFTER_S:
                sys.stdout.flush()
                print(f"{SCRIPT}: error: lost the Ray cluster at {self.address}: {silent} has not answered for "
                      f"{RAY_LOST_AFTER_S:.0f} s" + (f": {self.on_lost()}" if self.on_lost else ""),
                      file=sys.stderr, flush=True)
                os._exit(1)

    def map(self, tasks):
        """Run the tasks on the cluster; a list of results in task order."""
        self.version += 1
        shared = tuple(np.frombuffer(a, dtype=np.float32) if isinstance(a, ctypes.Array) else a
                       for a in self.worker_args)
        shared_ref = self.ray.put(shared)  # once per batch, not once per task
        refs, running = [], []
        for task in tasks:
            if self.num_workers and len(running) >= self.num_workers:  # wait for a free slot
                _, running = self.ray.wait(running, num_returns=len(running) - self.num_workers + 1)
            refs.append(self.remote.remote(self.key, self.version, shared_ref, task))
            running.append(refs[-1])
        return self.ray.get(refs)

    def map_with_restarts(self, tasks, warn):
        """`map`; Ray already re-ran the tasks of dead workers. Raises UserError for an error in the
        rollout code, RayClusterError when the cluster is gone or the retries ran out."""
        try:
            return self.map(tasks)
        except self.ray.exceptions.RayTaskError as e:  # an exception raised by our code in a worker
            raise UserError(f"rollout failed in a Ray worker: {type(e.cause).__name__}: {e.cause}") from None
        except (self.ray.exceptions.RayError, ConnectionError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            silent = self.silent()
            if isinstance(e, self.ray.exceptions.LocalRayletDiedError):
                silent = silent or "this machine's Ray node"
            if silent:
                raise RayClusterError(f"lost the Ray cluster at {self.address}: {silent} does not answer "
                                      f"({reason})") from None
            raise RayClusterError(f"rollouts keep failing on the Ray cluster at {self.address} (each task is "
                                  f"tried {RAY_TASK_RETRIES + 1} times): {reason}") from None


def open_pool(args, *pool_args):
    """The rollout pool the command line asks for: RayRolloutPool with --ray-address, else RolloutPool."""
    if args.ray_address:
        return RayRolloutPool(args.ray_address, args.num_workers, *pool_args)
    return RolloutPool(args.num_workers, *pool_args)


# ------------------------------------------------------------------------------------------------
# 7. Weights and checkpoints
# ------------------------------------------------------------------------------------------------
def atomic_write(path, write):
    """Write a file through `write(file)` into a temp file beside it, fsync, then os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_weights(path, params, meta):
    """Weights file: `params` float32 (D,) and `meta`, a 0-d unicode array holding JSON."""
    def write(f):
        np.savez(f, params=np.asarray(params, dtype=np.float32), meta=np.array(json.dumps(meta)))
    atomic_write(path, write)


def load_weights(path):
    """(params float32 (D,), meta dict) of a weights file written by this script.

    Raises UserError for a missing or corrupt file, a file without meta or one written by another script.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            if "params" not in data or "meta" not in data:
                raise UserError(f"{path} is not a {SCRIPT} weights file (it needs 'params' and 'meta' arrays)")
            params, meta = data["params"].astype(np.float32).ravel(), json.loads(str(data["meta"]))
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"weights file {path} does not exist") from None
    except Exception as e:
        raise UserError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("script") != SCRIPT:
        owner = meta.get("script", "an unknown script") if isinstance(meta, dict) else "an unknown script"
        raise UserError(f"{path} was written by {owner}, not {SCRIPT}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has weights format {meta.get('format_version')}, this script reads {FORMAT_VERSION}")
    return params, meta


def weights_meta(args, env_configs, policy_config, dim, evaluation=None, iteration=None, **extra):
    """The `meta` of a weights file: everything needed to rebuild the policy and its envs."""
    return dict({"format_version": FORMAT_VERSION, "script": SCRIPT, "env_id": args.env_id,
                 "env_ids": [c["env_id"] for c in env_configs], "env": env_configs[0], "envs": env_configs,
                 "policy": policy_config, "obs_norm": None, "evaluation": evaluation, "seed": args.seed,
                 "iteration": iteration, "num_params": dim}, **extra)


def check_weights_fit(path, params, meta, policy_config, dim):
    """UserError unless the file's policy matches the envs' spaces and its size matches the policy."""
    def spaces(config):
        tasks = config.get("multitask", [config])
        return [(t["obs_shape"], t["discrete"], t["num_actions"]) for t in tasks]
    if spaces(meta["policy"]) != spaces(policy_config):
        raise UserError(f"{path} does not fit {meta['env_id']}: its policy takes (observations, discrete, actions) "
                        f"{spaces(meta['policy'])}, the env gives {spaces(policy_config)}")
    if params.size != dim:
        raise UserError(f"{path} holds {params.size} parameters but its architecture needs {dim}")


class CheckpointUnpickler(pickle.Unpickler):
    """Unpickler that admits only what a checkpoint holds: numpy arrays and dtypes, builtins."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED or (module.startswith("numpy") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which no checkpoint holds")


def save_checkpoint(path, state):
    """Pickle the checkpoint dict atomically (a kill leaves the previous checkpoint intact)."""
    atomic_write(path, lambda f: pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL))


def load_checkpoint(path):
    """The checkpoint dict at `path` (a checkpoint.pkl or a run folder); UserError if unusable."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pkl")
    try:
        with open(path, "rb") as f:
            state = CheckpointUnpickler(f).load()
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing checkpoint {path}: {e}") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("script") != SCRIPT:
        owner = state.get("script") if isinstance(state, dict) else None
        raise UserError(f"{path} is not a {SCRIPT} checkpoint" + (f" (it is {owner}'s)" if owner else ""))
    if state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {state.get('format_version')}, expected {FORMAT_VERSION}")
    return path, state


# ------------------------------------------------------------------------------------------------
# 8. Logging: console, CSV, plots, video
# ------------------------------------------------------------------------------------------------
def format_duration(seconds):
    """Seconds as H:MM:SS."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def truncate_progress(path, last_iteration):
    """Keep the rows of progress.csv up to `last_iteration` (rows written after the checkpoint go)."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = [rows[0]] + [row for row in rows[1:] if int(row[0]) <= last_iteration]
    if len(kept) != len(rows):
        atomic_write(path, lambda f: f.write("".join(",".join(r) + "\r\n" for r in kept).encode()))


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_learning_curve(progress_path, image_path, title):
    """learning_curve.png from progress.csv: population mean/max, the best member, evaluations +/- std."""
    plt = pyplot()
    with open(progress_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    it = np.array([float(r["iteration"]) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(it, [float(r["return_mean"]) for r in rows], label="candidates mean", lw=1)
    ax.plot(it, [float(r["return_max"]) for r in rows], label="candidates max", lw=0.8, alpha=0.6)
    ax.plot(it, [float(r["best_fitness"]) for r in rows], label="best member's fitness", lw=0.8, alpha=0.6)
    ev = [(float(r["iteration"]), float(r["eval_return_mean"]), float(r["eval_return_std"]))
          for r in rows if r["eval_return_mean"]]
    if ev:
        e = np.array(ev)
        ax.errorbar(e[:, 0], e[:, 1], yerr=e[:, 2], fmt="o-", ms=3, capsize=2, label="evaluation mean ± std")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (sum of normalized returns)" if "+" in title else "episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(image_path, dpi=100)
    plt.close(fig)


def record_video(env_config, policy, path_stem, seed):
    """Record one evaluation episode; writes path_stem.mp4 (moviepy installed) or .gif. Returns (path, return)."""
    env = make_env(env_config, training=False, render_mode="rgb_array")
    episode_return, _ = rollout(env, policy, seed)
    frames = env.render()
    fps = env.metadata.get("render_fps", 30)
    env.close()
    try:
        from moviepy import ImageSequenceClip
    except ImportError:
        from PIL import Image
        images = [Image.fromarray(frame) for frame in frames]
        path = path_stem + ".gif"
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path, episode_return
    path = path_stem + ".mp4"
    ImageSequenceClip(frames, fps=fps).write_videofile(path, logger=None)
    return path, episode_return


def versions():
    """Versions of python and of the libraries a run depends on, for args.json."""
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for name in ("torch", "gymnasium", "numpy", "cma"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def write_table(path, header, rows):
    """A small CSV table (header + rows of plain values), written atomically."""
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def noise_study(pool, params, env_ids, seed, episodes):
    """The multitask noise study: per-task returns of `params` under each input-noise condition.

    Conditions (2 tasks: both real, noise into task 0, into task 1, into both; with more tasks,
    noise into each task in turn and into all). Every condition meets the same episodes.
    Returns a list of (condition name, returns float64 (E, T)).
    """
    tasks = list(range(len(env_ids)))
    conditions = [("both real" if len(tasks) == 2 else "all real", ())]
    conditions += [(f"noise into {env_ids[t]}", (t,)) for t in tasks]
    conditions += [("noise into both" if len(tasks) == 2 else "noise into all", tuple(tasks))]
    return [(name, evaluate(pool, params, seed, 0, episodes, noisy)[0]) for name, noisy in conditions]


def report_noise_study(study, env_ids, run_dir):
    """Print the noise-study table; write noise_study.csv and the bar plot noise_study.png into run_dir."""
    header = ["condition"] + [f"{env_id} mean" for env_id in env_ids] + [f"{env_id} std" for env_id in env_ids]
    rows = [[name] + [f"{m:.2f}" for m in returns.mean(0)] + [f"{s:.2f}" for s in returns.std(0)]
            for name, returns in study]
    width = max(len(name) for name, _ in study)
    print(f"{'condition':<{width}} | " + " | ".join(f"{env_id:>24}" for env_id in env_ids))
    for name, returns in study:
        print(f"{name:<{width}} | " + " | ".join(f"{m:11.2f} ± {s:10.2f}" for m, s in zip(returns.mean(0), returns.std(0))))
    write_table(os.path.join(run_dir, "noise_study.csv"), header, rows)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(env_ids), figsize=(4 * len(env_ids), 4))
    for t, (ax, env_id) in enumerate(zip(axes, env_ids)):
        ax.bar(range(len(study)), [r[:, t].mean() for _, r in study], yerr=[r[:, t].std() for _, r in study],
               capsize=3, color=["tab:green", "tab:orange", "tab:blue", "tab:red", "tab:purple"][:len(study)])
        ax.set_xticks(range(len(study)), [name for name, _ in study], rotation=30, ha="right", fontsize=8)
        ax.set_title(env_id)
        ax.set_ylabel("episode return")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "noise_study.png"), dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# 9. Main
# ------------------------------------------------------------------------------------------------
def read_weights_into_args(path, args, given):
    """Load a weights file and take the env(s) and architecture from its meta into args.

    Returns (params float32 (D,), meta). Raises UserError when --env-id names another env.
    """
    params, meta = load_weights(path)
    if "env_id" in given and args.env_id != meta["env_id"]:
        raise UserError(f"{path} was trained on {meta['env_id']}, not {args.env_id}")
    args.env_id = meta["env_id"]
    args.multitask = meta["env_ids"] if len(meta["env_ids"]) > 1 else None
    for key in META_ENV_FLAGS:
        setattr(args, key, meta["env"][key])
    for key in META_POLICY_FLAGS:
        setattr(args, key, meta["policy"][key])
    return params, meta


def summary_line(returns):
    """The project's one-line evaluation summary of returns (float (E,))."""
    return (f"episode_return mean={returns.mean():.4f} std={returns.std():.4f} min={returns.min():.4f} "
            f"max={returns.max():.4f} episodes={returns.size}")


def default_run_name(args, kind=""):
    """<env-id>__train_ga[kind]__<seed>__<unix-time>."""
    return f"{args.env_id.replace('/', '-')}__{SCRIPT[:-3]}{kind}__{args.seed}__{int(time.time())}"


def run_from_pretrained(args, given):
    """Evaluate a weights file; the last line printed is the `episode_return mean=...` summary.

    A multitask file prints its noise study first; its episode return is the fitness
    (sum of the tasks' returns, each divided by its scale).
    """
    params, meta = read_weights_into_args(args.from_pretrained, args, given)
    env_configs = env_configs_from_args(args)
    policy_config = policy_config_from_envs(env_configs, args.hidden_sizes, args.activation)
    policy = build_policy(policy_config)
    dim = num_params(policy)
    check_weights_fit(args.from_pretrained, params, meta, policy_config, dim)
    print(policy)
    pool = open_pool(args, env_configs, policy_config, 1, dim)
    print(f"parameters: {dim}   env: {args.env_id}   episodes: {args.num_eval_rollouts}   workers: {pool.describe()}")
    start = time.perf_counter()
    try:
        returns, steps = evaluate(pool, params, args.seed, 0, args.num_eval_rollouts)
        elapsed = time.perf_counter() - start
        if args.multitask:
            name = args.run_name or default_run_name(args, "__eval")
            os.makedirs(os.path.join(args.logs_dir, name), exist_ok=True)
            study = noise_study(pool, params, args.multitask, args.seed, args.num_eval_rollouts)
            report_noise_study(study, args.multitask, os.path.join(args.logs_dir, name))
    finally:
        pool.close()
    if args.capture_video and not args.multitask:
        name = args.run_name or default_run_name(args, "__eval")
        os.makedirs(os.path.join(args.logs_dir, name, "videos"), exist_ok=True)
        path, video_return = record_video(env_configs[0], make_policy(policy_config, params),
                                          os.path.join(args.logs_dir, name, "videos", "pretrained"),
                                          derive_seed(args.seed, EVAL_ENV_STREAM, 0, 0))
        print(f"video: {path} (episode return {video_return:.2f})")
    print(f"{steps} env steps in {elapsed:.1f} s ({steps / elapsed:,.0f} steps/s)")
    scales = np.array([return_scale(c) for c in env_configs])
    print(summary_line((returns / scales).sum(1) if args.multitask else returns[:, 0]))
    return 0


def collect_pairs(env_config, driver, teacher, episodes, seed, round_index):
    """Observations met while `driver` acts, labelled with `teacher`'s output (logits or tanh actions).

    Returns (observations float32 (S, O), teacher outputs float32 (S, A), driver's returns (episodes,)).
    """
    observations, returns = [], []
    for e in range(episodes):
        env = make_env(env_config, training=False)
        returns.append(rollout(env, driver, derive_seed(seed, TRAIN_ENV_STREAM, round_index, e), observations)[0])
        env.close()
    x = torch.stack([teacher.preprocess(o) for o in observations])
    with torch.inference_mode():
        y = teacher(x)
    return x.numpy(), y.numpy(), np.array(returns)


def fit_student(student, x, y, discrete, epochs, learning_rate, batch_size, seed):
    """Fit the student to (x, teacher outputs y) with Adam: cross-entropy on the teacher's argmax
    (discrete) or mean squared error on the tanh actions (Box). Returns the last epoch's mean loss."""
    torch.manual_seed(seed)
    student.requires_grad_(True)
    optimizer = torch.optim.Adam(student.parameters(), lr=learning_rate)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    labels = y.argmax(1) if discrete else y
    loss_fn = nn.functional.cross_entropy if discrete else nn.functional.mse_loss
    for _ in range(epochs):
        order, total = torch.randperm(len(x)), 0.0
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            loss = loss_fn(student(x[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
    student.requires_grad_(False)
    return total / len(x)


def run_distillation(args, given):
    """Knowledge distillation: teacher pairs -> a smaller student (Adam) -> both evaluated on the same episodes.

    Writes student.npz, distillation.csv and args.json into the run folder and prints the table.
    """
    if "hidden_sizes" not in given:
        raise UserError("--distill-from needs --hidden-sizes: the student's layer widths")
    student_hidden, student_activation = list(args.hidden_sizes), args.activation
    teacher_params, teacher_meta = read_weights_into_args(args.distill_from, args, given)
    if args.multitask:
        raise UserError(f"{args.distill_from} is a multitask policy: distillation takes single-task teachers")
    args.hidden_sizes = student_hidden
    args.activation = student_activation if "activation" in given else teacher_meta["policy"]["activation"]
    env_configs = env_configs_from_args(args)
    env_config = env_configs[0]
    teacher_config = policy_config_from_envs(env_configs, teacher_meta["policy"]["hidden_sizes"],
                                             teacher_meta["policy"]["activation"])
    teacher = build_policy(teacher_config)
    check_weights_fit(args.distill_from, teacher_params, teacher_meta, teacher_config, num_params(teacher))
    teacher = make_policy(teacher_config, teacher_params)
    if teacher.pixels:
        raise UserError("distillation takes vector-observation teachers only")
    student_config = dict(teacher_config, hidden_sizes=list(args.hidden_sizes), activation=args.activation)
    torch.manual_seed(derive_seed(args.seed, INIT_STREAM, 0))
    student = build_policy(student_config)
    run_dir = os.path.join(args.logs_dir, args.run_name or default_run_name(args, "_distill"))
    if os.path.exists(os.path.join(run_dir, "student.npz")):
        raise UserError(f"{run_dir} already holds a distillation: pick another --run-name")
    os.makedirs(run_dir, exist_ok=True)
    config = dict(vars(args), env_config=env_config, versions=versions())
    atomic_write(os.path.join(run_dir, "args.json"), lambda f: f.write(json.dumps(config, indent=2).encode()))
    print(f"teacher: {args.distill_from} ({num_params(teacher)} parameters)\nstudent: {student}")
    start = time.perf_counter()
    xs, ys = [], []
    for round_index in range(args.distill_rounds):
        driver = teacher if round_index == 0 else student  # DAgger: later rounds visit the student's states
        x, y, driver_returns = collect_pairs(env_config, driver, teacher, args.distill_episodes, args.seed, round_index)
        xs.append(x)
        ys.append(y)
        loss = fit_student(student, np.concatenate(xs), np.concatenate(ys), teacher.discrete, args.distill_epochs,
                           args.learning_rate, args.batch_size, derive_seed(args.seed, GA_STREAM, round_index))
        print(f"round {round_index + 1}/{args.distill_rounds}: {'teacher' if round_index == 0 else 'student'} drove "
              f"{args.distill_episodes} episodes (mean return {driver_returns.mean():.2f}); "
              f"{sum(len(x) for x in xs)} pairs; loss {loss:.3g}")
    rows, evaluations = [], {}
    for name, config, policy in (("teacher", teacher_config, teacher), ("student", student_config, student)):
        params = parameters_to_vector(policy.parameters()).numpy()
        pool = open_pool(args, env_configs, config, 1, params.size)
        try:
            returns = evaluate(pool, params, args.seed, 0, args.num_eval_rollouts)[0][:, 0]
        finally:
            pool.close()
        evaluations[name] = returns
        architecture = "-".join(str(v) for v in [config["obs_shape"][0], *config["hidden_sizes"], config["num_actions"]])
        rows.append([name, architecture, params.size, f"{returns.mean():.2f}", f"{returns.std():.2f}"])
    student_params = parameters_to_vector(student.parameters()).numpy()
    returns = evaluations["student"]
    save_weights(os.path.join(run_dir, "student.npz"), student_params,
                 weights_meta(args, env_configs, student_config, student_params.size,
                              {"mean": float(returns.mean()), "std": float(returns.std()), "episodes": int(returns.size)},
                              distilled_from=os.path.basename(args.distill_from)))
    write_table(os.path.join(run_dir, "distillation.csv"), ["model", "architecture", "parameters", "mean", "std"], rows)
    print(f"\ndistillation of {args.env_id} over the same {args.num_eval_rollouts} episodes "
          f"({time.perf_counter() - start:.1f} s)")
    print(f"{'model':<8} | {'architecture':<16} | {'parameters':>10} | return mean ± std")
    for name, architecture, size, mean, std in rows:
        print(f"{name:<8} | {architecture:<16} | {size:>10} | {mean} ± {std}")
    print(f"files in {run_dir}: args.json distillation.csv student.npz")
    print(summary_line(returns))
    return 0


def train(args, given):
    """The GA loop: ask -> evaluate the candidates -> tell -> log -> evaluate the best member -> checkpoint."""
    start_time = time.perf_counter()
    checkpoint = init = None
    if args.resume:
        checkpoint_path, checkpoint = load_checkpoint(args.resume)
        saved = dict(checkpoint["args"])
        saved.update({key: getattr(args, key) for key in given & RESUME_FLAGS})
        saved.update({key: getattr(args, key) for key in PLACEMENT_FLAGS})
        args = argparse.Namespace(**saved)
        run_dir = os.path.dirname(os.path.abspath(checkpoint_path))
    else:
        if args.init_from:
            init = read_weights_into_args(args.init_from, args, given)
        run_dir = os.path.join(args.logs_dir, args.run_name or default_run_name(args))
        if os.path.exists(os.path.join(run_dir, "checkpoint.pkl")):
            raise UserError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                            "or pick another --run-name")
    env_configs = env_configs_from_args(args)
    env_ids = [c["env_id"] for c in env_configs]
    # Multitask fitness sums each task's return over its scale; a single task's fitness is its return.
    scales = np.array([return_scale(c) for c in env_configs]) if args.multitask else np.ones(1)
    policy_config = policy_config_from_envs(env_configs, args.hidden_sizes, args.activation)
    policy = build_policy(policy_config)
    dim = num_params(policy)
    if checkpoint:
        ga = GeneticAlgorithm.from_state_dict(checkpoint["ga"])
        counters = checkpoint["counters"]
    else:
        mutation = (args.mutation_rate, args.mutation_scale, args.mutation)
        if init:
            check_weights_fit(args.init_from, init[0], init[1], policy_config, dim)
        population = initial_population(policy_config, args.population_size, args.seed,
                                        init[0] if init else None, mutation)
        ga = GeneticAlgorithm(population, selection=args.selection, selection_pressure=args.selection_pressure,
                              tournament_size=args.tournament_size, crossover=args.crossover,
                              crossover_rate=args.crossover_rate, blx_alpha=args.blx_alpha, mutation=args.mutation,
                              mutation_rate=args.mutation_rate, mutation_scale=args.mutation_scale,
                              replacement=args.replacement, elite_size=args.elite_size, seed=args.seed)
        counters = {"evaluations": 0, "env_steps": 0, "wall_time_s": 0.0, "best_return": -math.inf,
                    "best_eval": -math.inf, "goal_streak": 0}

    pool = open_pool(args, env_configs, policy_config, args.population_size, dim)  # before any file is touched
    os.makedirs(os.path.join(run_dir, "videos") if args.capture_video else run_dir, exist_ok=True)
    paths = {name: os.path.join(run_dir, name) for name in
             ("args.json", "progress.csv", "learning_curve.png", "checkpoint.pkl", "best.npz", "final.npz")}
    config = dict(vars(args), env_configs=env_configs, num_params=dim, versions=versions())
    atomic_write(paths["args.json"], lambda f: f.write(json.dumps(config, indent=2).encode()))
    if checkpoint:
        truncate_progress(paths["progress.csv"], ga.generation)
    elif os.path.exists(paths["progress.csv"]):
        os.unlink(paths["progress.csv"])
    log = (lambda *a, **k: None) if args.quiet else print
    title = f"GA on {args.env_id} (seed {args.seed})"
    print(policy)
    print(f"parameters: {dim}   population: {args.population_size}   workers: {pool.describe()}   "
          f"run folder: {run_dir}")
    if args.multitask:
        print("multitask fitness = " + " + ".join(f"{e} / {s:g}" for e, s in zip(env_ids, scales)))
    if checkpoint:
        print(f"resuming at generation {ga.generation} from {checkpoint_path}")

    def meta(params, iteration, evaluation=None):
        return weights_meta(args, env_configs, policy_config, dim, evaluation, iteration)

    def kept():
        return (f"the checkpoint of generation {ga.generation} is kept in {paths['checkpoint.pkl']}\n"
                f"resume with: python {SCRIPT} --resume {run_dir}   (on any Ray cluster with --ray-address, or locally)")
    pool.on_lost = kept

    session_start, first_generation, wall_offset = time.perf_counter(), ga.generation, counters["wall_time_s"]
    last_plot = -math.inf
    csv_file = open(paths["progress.csv"], "a", newline="")
    writer = csv.writer(csv_file)
    if csv_file.tell() == 0:
        writer.writerow(PROGRESS_COLUMNS + ([f"return_mean[{e}]" for e in env_ids] if args.multitask else []))
    try:
        while ga.generation < args.max_iter:
            t0 = time.perf_counter()
            generation, candidates = ga.generation, ga.ask()
            # Every candidate, elites included, meets fresh episodes: env seeds from (seed, generation, member).
            pool.set_members(candidates)
            tasks = [(i, [derive_seed(args.seed, TRAIN_ENV_STREAM, generation, i, r) for r in range(args.num_rollouts)],
                      True, ()) for i in range(len(candidates))]
            results = pool.map_with_restarts(tasks, warn=print)
            task_returns = np.array([r[0] for r in results], dtype=np.float64)  # (N, rollouts, tasks)
            returns = (task_returns / scales).sum(2).mean(1)                       # fitness (N,)
            steps = sum(r[1] for r in results)
            ga.tell(returns)
            iteration = ga.generation
            best_params, best_fitness = ga.best()
            counters["evaluations"] += len(candidates)
            counters["best_return"] = max(counters["best_return"], float(returns.max()))

            eval_returns = None
            # Evaluate on schedule, and at once when the best member's training fitness reaches the goal.
            at_goal = args.reward_goal is not None and best_fitness >= args.reward_goal
            if iteration % args.eval_every == 0 or iteration == args.max_iter or at_goal:
                per_task, eval_steps = evaluate(pool, best_params, args.seed, iteration, args.num_eval_rollouts)
                eval_returns = (per_task / scales).sum(1)
                steps += eval_steps
                evaluation = {"mean": float(eval_returns.mean()), "std": float(eval_returns.std()),
                              "episodes": int(eval_returns.size)}
                if args.multitask:
                    evaluation["tasks"] = {e: float(m) for e, m in zip(env_ids, per_task.mean(0))}
                if evaluation["mean"] > counters["best_eval"]:
                    counters["best_eval"] = evaluation["mean"]
                    save_weights(paths["best.npz"], best_params, meta(best_params, iteration, evaluation))
                reached = args.reward_goal is not None and evaluation["mean"] >= args.reward_goal
                counters["goal_streak"] = counters["goal_streak"] + 1 if reached else 0
                tasks_text = ("  (" + ", ".join(f"{e} {m:.2f}" for e, m in zip(env_ids, per_task.mean(0))) + ")"
                              if args.multitask else "")
                log(f"eval {iteration:>5d} | return {evaluation['mean']:9.2f} ± {evaluation['std']:8.2f} over "
                    f"{eval_returns.size} episodes | best eval {counters['best_eval']:9.2f}{tasks_text}")
                if args.capture_video:
                    path, _ = record_video(env_configs[0], make_policy(policy_config, best_params),
                                           os.path.join(run_dir, "videos", f"iter-{iteration:05d}"),
                                           derive_seed(args.seed, EVAL_ENV_STREAM, iteration, 0))
                    log(f"video {path}")
            counters["env_steps"] += steps
            num_cpus = pool.num_cpus
            now = time.perf_counter()
            counters["wall_time_s"] = wall_offset + (now - start_time)
            evaluated = eval_returns is not None
            writer.writerow([iteration, counters["evaluations"], counters["env_steps"], f"{counters['wall_time_s']:.3f}",
                             f"{returns.min():.6g}", f"{returns.mean():.6g}", f"{returns.max():.6g}",
                             f"{returns.std():.6g}", f"{eval_returns.mean():.6g}" if evaluated else "",
                             f"{eval_returns.std():.6g}" if evaluated else "", f"{best_fitness:.6g}",
                             ga.children_accepted, f"{ga.mutation_rate:.6g}", f"{ga.mutation_scale:.6g}",
                             f"{float(np.linalg.norm(best_params)):.6g}", num_cpus]
                            + ([f"{m:.6g}" for m in task_returns.mean((0, 1))] if args.multitask else []))
            csv_file.flush()
            eta = (now - session_start) / (iteration - first_generation) * (args.max_iter - iteration)
            log(f"iter {iteration:>5d}/{args.max_iter} | evals {counters['evaluations']:>8d} | return min "
                f"{returns.min():8.2f} mean {returns.mean():8.2f} max {returns.max():8.2f} | best "
                f"{counters['best_return']:8.2f} | best member {best_fitness:8.2f} | children in "
                f"{ga.children_accepted:>4d} | {steps / (now - t0):8,.0f} steps/s | cpus {num_cpus} | "
                f"{format_duration(counters['wall_time_s'])} elapsed | ETA {format_duration(eta)}")
            if evaluated and now - last_plot >= PLOT_INTERVAL_S:  # a redraw costs ~0.1 s of the driver
                plot_learning_curve(paths["progress.csv"], paths["learning_curve.png"], title)
                last_plot = now
            save_checkpoint(paths["checkpoint.pkl"], {
                "format_version": FORMAT_VERSION, "script": SCRIPT, "args": vars(args), "ga": ga.state_dict(),
                "counters": dict(counters)})
            if args.reward_goal is not None and counters["goal_streak"] >= args.consecutive_goal_stopping:
                print(f"reward goal {args.reward_goal:g} reached in {counters['goal_streak']} consecutive "
                      f"evaluation(s) at generation {iteration} ({counters['wall_time_s']:.1f} s)")
                break
        final_params, _ = ga.best()
        if args.multitask:  # the original's noise study, on the final best member
            print(f"noise study over {args.num_eval_rollouts} episodes per condition:")
            study = noise_study(pool, final_params, env_ids, args.seed, args.num_eval_rollouts)
            report_noise_study(study, env_ids, run_dir)
    except (KeyboardInterrupt, RayClusterError) as e:
        reason = "\ninterrupted" if isinstance(e, KeyboardInterrupt) else f"{SCRIPT}: error: {e}"
        print(f"{reason}: {kept()}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    finally:
        csv_file.close()
        pool.close()
    save_weights(paths["final.npz"], final_params, meta(final_params, ga.generation))
    plot_learning_curve(paths["progress.csv"], paths["learning_curve.png"], title)
    print(f"done: {ga.generation} generations, {counters['env_steps']} env steps, {counters['wall_time_s']:.1f} s. "
          f"Files in {run_dir}: args.json progress.csv learning_curve.png checkpoint.pkl final.npz"
          + (" best.npz" if os.path.exists(paths["best.npz"]) else "") + (" videos/" if args.capture_video else "")
          + (" noise_study.csv noise_study.png" if args.multitask else ""))
    return 0


def main(argv=None):
    """Entry point: returns the exit code (0; 2 for bad input; 1 when the Ray cluster is lost; 130 when
    interrupted)."""
    args, given = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # console lines show up at once in `nohup ... > log`

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    torch.set_num_threads(1)
    # gymnasium's image wrappers build float64-bounded Boxes and warn about it; harmless, and it would
    # bury the one-line errors.
    warnings.filterwarnings("ignore", message=".*precision lowered by casting.*")
    try:
        if args.from_pretrained:
            return run_from_pretrained(args, given)
        return run_distillation(args, given) if args.distill_from else train(args, given)
    except UserError as e:
        print(f"{SCRIPT}: error: {e}", file=sys.stderr)
        return 2
    except RayClusterError as e:
        print(f"{SCRIPT}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

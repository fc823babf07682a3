"""OpenAI Evolution Strategies (OpenAI-ES) on any gymnasium environment, in one file.

Salimans, Ho, Chen, Sidor, Sutskever (2017), "Evolution Strategies as a Scalable Alternative to
Reinforcement Learning", arXiv:1703.03864. Each generation samples a population of Gaussian
perturbations eps_i of the policy's flat parameter vector theta (mirrored pairs +eps, -eps by
default), runs one episode per member (more with --num-rollouts), shapes the episode returns F_i
into centered ranks and moves theta along the gradient estimate

    g = 1 / (N sigma) * sum_i F_i eps_i

with Adam (or SGD with momentum) and an L2 weight decay. No backpropagation: rollouts are the only
work, and they spread over every core. Workers receive integers (noise seed, sign, env seeds) and
regenerate the noise themselves; the parameters they perturb live in shared memory.

Examples:
    # CartPole-v1 to 500 over 100 evaluation episodes, in seconds
    python train_openai_es.py --env-id CartPole-v1 --hidden-sizes 16 --population-size 32 \
        --sigma 0.1 --learning-rate 0.2 --reward-goal 500
    # LunarLander-v3 to 200 (add --env-kwargs continuous=true for continuous actions)
    python train_openai_es.py --env-id LunarLander-v3 --hidden-sizes 32 32 --population-size 64 \
        --sigma 0.1 --learning-rate 0.03 --eval-every 25 --reward-goal 200
    # CarRacing-v3 from pixels (grayscale, 64x64, 4 stacked frames, small conv net)
    python train_openai_es.py --env-id CarRacing-v3 --population-size 64 --max-episode-steps 1000
    # evaluate weights over 100 episodes and record one
    python train_openai_es.py --from-pretrained pretrained/openai_es_lunarlander.npz --capture-video
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
from multiprocessing.connection import wait

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

SCRIPT = "train_openai_es.py"
FORMAT_VERSION = 1
# The columns every script of the project writes first, in this order; the ES scalars follow.
PROGRESS_COLUMNS = [
    "iteration", "evaluations", "env_steps", "wall_time_s",
    "return_min", "return_mean", "return_max", "return_std",
    "eval_return_mean", "eval_return_std",
    "center_return", "center_rank", "sigma", "learning_rate", "grad_norm", "param_norm", "num_cpus",
]
# Streams of randomness, each derived from (seed, stream, generation, index, rollout).
NOISE_STREAM, TRAIN_ENV_STREAM, CENTER_ENV_STREAM, EVAL_ENV_STREAM = 0, 1, 2, 3
# Tasks queued per worker: 2 hides the round trip between tasks, but a batch's last tasks may then
# wait behind a long episode while another worker idles.
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
# Settings that --init-from / --from-pretrained take from the weights file's meta.
META_ENV_FLAGS = ("env_kwargs", "frame_size", "frame_stack", "grayscale")
META_POLICY_FLAGS = ("hidden_sizes", "activation", "recurrent", "action_bounding", "obs_norm")


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
    p = OneLineParser(prog=SCRIPT, description="OpenAI-ES (Salimans et al. 2017) on gymnasium.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--env-id", default="CartPole-v1", help="gymnasium environment id")
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
    g.add_argument("--population-size", type=int, default=256,
                   help="perturbations per generation (even with mirrored sampling)")
    g.add_argument("--max-iter", type=int, default=1000, help="generations, counted from the run's start")
    g.add_argument("--num-rollouts", type=int, default=1,
                   help="episodes per fitness evaluation; fitness = mean episode return")
    g.add_argument("--max-episode-steps", type=int, default=None,
                   help="episode length limit (default: the env's own TimeLimit)")
    g.add_argument("--max-negative-steps", type=int, default=None,
                   help="training episodes end after this many consecutive negative rewards "
                        "(default: 20 on CarRacing, off elsewhere; 0 = off); never in evaluation")
    g.add_argument("--eval-every", type=int, default=10,
                   help="evaluate the unperturbed parameters every this many generations")
    g.add_argument("--num-eval-rollouts", type=int, default=100, help="episodes per evaluation")
    g.add_argument("--logs-dir", default="runs", help="parent folder of run folders")
    g.add_argument("--run-name", default=None,
                   help="run folder name (default: <env-id>__train_openai_es__<seed>__<unix-time>)")
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="continue a run from its checkpoint.pkl or its run folder")
    g.add_argument("--from-pretrained", default=None, metavar="PATH.npz",
                   help="evaluate these weights over --num-eval-rollouts episodes; no training")
    g.add_argument("--init-from", default=None, metavar="PATH.npz", help="start training from these weights")
    g.add_argument("--capture-video", action="store_true",
                   help="record an episode at each evaluation (GIF; mp4 when moviepy is installed)")
    g.add_argument("--reward-goal", type=float, default=None,
                   help="stop when the evaluation mean reaches this return; a generation whose "
                        "unperturbed center reaches it in training is evaluated at once")
    g.add_argument("--consecutive-goal-stopping", type=int, default=1,
                   help="... in this many consecutive evaluations")
    g.add_argument("--quiet", action="store_true", help="no per-generation console lines")
    g = p.add_argument_group("OpenAI-ES")
    g.add_argument("--sigma", type=float, default=0.02, help="noise standard deviation")
    g.add_argument("--learning-rate", type=float, default=0.01, help="step size of the optimizer")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="update rule on the ES gradient")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=0.005, help="L2 coefficient on the parameters")
    g.add_argument("--lr-decay", type=float, default=1.0, help="learning rate factor per generation")
    g.add_argument("--lr-min", type=float, default=0.0, help="floor of the decayed learning rate")
    g.add_argument("--sigma-decay", type=float, default=1.0, help="sigma factor per generation")
    g.add_argument("--sigma-min", type=float, default=0.0, help="floor of the decayed sigma")
    g.add_argument("--antithetic", action=argparse.BooleanOptionalAction, default=True,
                   help="mirrored sampling: members come in pairs theta +/- sigma eps sharing env seeds")
    g.add_argument("--fitness-shaping", choices=["centered-rank", "z-score", "none"], default="centered-rank",
                   help="transform of the returns before the gradient estimate")
    g.add_argument("--obs-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="normalize vector observations by running mean and std of rollout observations")
    g = p.add_argument_group("policy")
    g.add_argument("--hidden-sizes", type=int, nargs="*", default=[64, 64],
                   help="fully connected layer widths (after the conv net for pixels)")
    g.add_argument("--activation", choices=["tanh", "relu", "selu"], default="tanh", help="hidden activation")
    g.add_argument("--recurrent", action="store_true", help="add an LSTM core after the hidden layers")
    g.add_argument("--action-bounding", choices=["scale", "clip"], default="scale",
                   help="Box actions: tanh mapped onto the bounds, or raw outputs clipped to them")
    g.add_argument("--frame-size", type=int, default=64, help="pixels: frames resized to this square size")
    g.add_argument("--frame-stack", type=int, default=4, help="pixels: number of stacked frames")
    g.add_argument("--grayscale", action=argparse.BooleanOptionalAction, default=True,
                   help="pixels: convert frames to grayscale")
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
    check(not (args.antithetic and args.population_size % 2),
          "--population-size must be even with mirrored sampling (or pass --no-antithetic)")
    check(args.sigma > 0, "--sigma must be > 0")
    check(args.learning_rate > 0, "--learning-rate must be > 0")
    check(0 <= args.momentum < 1, "--momentum must be in [0, 1)")
    check(args.weight_decay >= 0, "--weight-decay must be >= 0")
    check(0 < args.lr_decay <= 1 and 0 < args.sigma_decay <= 1, "--lr-decay and --sigma-decay must be in (0, 1]")
    check(args.lr_min >= 0 and args.sigma_min >= 0, "--lr-min and --sigma-min must be >= 0")
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
    check(not (args.recurrent and not args.hidden_sizes), "--recurrent needs at least one hidden layer")
    check(sum(x is not None for x in (args.resume, args.from_pretrained, args.init_from)) <= 1,
          "--resume, --from-pretrained and --init-from exclude each other")
    if args.resume:
        extra = sorted(given - RESUME_FLAGS)
        check(not extra, f"--{extra[0].replace('_', '-') if extra else ''} cannot be changed on resume: "
                         "the run's settings come from its checkpoint")
    if args.init_from or args.from_pretrained:
        clash = sorted(given & set(META_ENV_FLAGS + META_POLICY_FLAGS))
        check(not clash, f"--{clash[0].replace('_', '-') if clash else ''} comes from the weights file's meta; "
                         "do not restate the architecture")
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
    track only collects -0.1 per frame, so its remaining frames teach nothing. gymnasium has no
    such wrapper. Used in training rollouts only; evaluation episodes run to the end.
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


def is_image_space(space):
    """True for a uint8 Box of shape (H, W) or (H, W, 3): frames this script feeds to its conv net."""
    return (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8
            and (len(space.shape) == 2 or (len(space.shape) == 3 and space.shape[-1] == 3)))


def make_env(env_config, training, render_mode=None):
    """Build one environment: `gymnasium.make` plus gymnasium's wrappers.

    env_config: dict with env_id, env_kwargs, max_episode_steps, max_negative_steps,
    action_bounding, frame_size, frame_stack, grayscale (see `env_config_from_args`).
    Image observations become uint8 arrays (frame_stack, frame_size, frame_size[, 3]); Box actions
    are rescaled to [-1, 1] (tanh policies) or clipped. Raises UserError for an unknown id, a
    missing optional dependency or a space the policies cannot handle.
    """
    env_id = env_config["env_id"]
    if env_id.startswith("ALE/"):
        try:
            import ale_py
        except ImportError:
            raise UserError(f"{env_id} needs the Atari extra: pip install ale-py") from None
        gym.register_envs(ale_py)
    kwargs = dict(env_config["env_kwargs"])
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
        if env_config["action_bounding"] == "clip":
            env = gym.wrappers.ClipAction(env)
        elif not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
            raise UserError(f"action space {action_space} has infinite bounds: use --action-bounding clip")
        elif not (np.all(action_space.low == -1) and np.all(action_space.high == 1)):
            bound = np.ones(action_space.shape, dtype=action_space.dtype)  # in the space's dtype: no precision warning
            env = gym.wrappers.RescaleAction(env, -bound, bound)
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
        raise UserError(f"observation space {obs_space} is not supported: "
                        "only 1-D Box vectors and uint8 images")
    return env


def env_config_from_args(args):
    """The env settings that a worker, an evaluation and a weights file's meta all need."""
    max_negative_steps = args.max_negative_steps
    if max_negative_steps is None:  # CarRacing's training-time early stop is on by default
        max_negative_steps = 20 if args.env_id.startswith("CarRacing") else 0
    return {"env_id": args.env_id, "env_kwargs": args.env_kwargs, "max_episode_steps": args.max_episode_steps,
            "max_negative_steps": max_negative_steps, "action_bounding": args.action_bounding,
            "frame_size": args.frame_size, "frame_stack": args.frame_stack, "grayscale": args.grayscale}


# ------------------------------------------------------------------------------------------------
# 3. Policy
# ------------------------------------------------------------------------------------------------
ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "selu": torch.selu}
# The same activations on float32 numpy arrays, for the MLP's numpy forward (selu: torch's constants).
NUMPY_ACTIVATIONS = {"tanh": np.tanh, "relu": lambda h: np.maximum(h, np.float32(0)),
                     "selu": lambda h: np.float32(1.0507009873554805) * np.where(
                         h > 0, h, np.float32(1.6732632423543772) * np.expm1(h))}


class Policy(nn.Module):
    """Deterministic policy for one environment, one observation at a time (no batch axis).

    Vector observations (obs_shape (D,), float) are normalized by obs_mean/obs_std (float32 numpy
    (D,)), clipped to [-5, 5] (Salimans et al. 2017) and fed to an MLP, evaluated with numpy: one
    observation through torch costs about twice as much, more than a CartPole step. Image observations (uint8,
    (frames, H, W) or (frames, H, W, 3)) are scaled to [0, 1] and fed to a small conv net
    (Conv 8x8/4 -> 16, Conv 4x4/2 -> 32, as in Mnih et al. 2013) and then the MLP layers.
    `recurrent` adds an LSTMCell (the conv-LSTM of pytorch-es). Discrete actions: argmax of the
    logits; Box actions: tanh (env rescaled to [-1, 1]) or raw output (env clips).

    The flat genotype is `parameters_to_vector(policy.parameters())`, float32; the normalization
    statistics are buffers, outside it.
    """

    def __init__(self, obs_shape, num_actions, discrete, hidden_sizes=(64, 64), activation="tanh",
                 recurrent=False, action_bounding="scale", obs_norm=True):
        super().__init__()
        self.obs_shape = tuple(obs_shape)
        self.discrete = discrete
        self.pixels = len(self.obs_shape) > 1
        self.recurrent = recurrent
        self.squash = not discrete and action_bounding == "scale"
        self.activation = ACTIVATIONS[activation]
        self.normalize = obs_norm and not self.pixels
        if self.pixels:
            channels = self.obs_shape[0] * (self.obs_shape[3] if len(self.obs_shape) == 4 else 1)
            self.conv = nn.Sequential(nn.Conv2d(channels, 16, 8, stride=4), nn.ReLU(),
                                      nn.Conv2d(16, 32, 4, stride=2), nn.ReLU(), nn.Flatten(0))
            with torch.no_grad():
                features = self.conv(torch.zeros(channels, *self.obs_shape[1:3])).numel()
        else:
            self.conv = None
            features = self.obs_shape[0]
        # Normalization statistics: numpy arrays outside the genotype, set by the worker or a weights file.
        self.obs_mean = np.zeros(features if self.normalize else 0, np.float32)
        self.obs_std = np.ones(features if self.normalize else 0, np.float32)
        self.layers = nn.ModuleList()
        for width in hidden_sizes:
            self.layers.append(nn.Linear(features, width))
            features = width
        self.lstm = nn.LSTMCell(features, features) if recurrent else None
        self.head = nn.Linear(features, num_actions)
        self.requires_grad_(False)  # evolved, never backpropagated
        # The hot path reads parameters through plain lists: nn.Module attribute lookup costs ~0.3 us
        # per access. vector_to_parameters rebinds each Parameter's .data, so these stay valid.
        self.linear_params = [(layer.weight, layer.bias) for layer in self.layers]
        self.head_params = (self.head.weight, self.head.bias)
        self.numpy_activation = NUMPY_ACTIVATIONS[activation]
        self.load(parameters_to_vector(self.parameters()).numpy())

    def load(self, params):
        """Set the weights from a flat genotype (D,) (copied as float32). Returns the policy."""
        vector_to_parameters(torch.from_numpy(np.array(params, dtype=np.float32)), self.parameters())
        # numpy views of the new weights (weight (out, in), bias (out,)) for the MLP's numpy forward
        self.numpy_params = [(w.numpy(), b.numpy()) for w, b in self.linear_params + [self.head_params]]
        return self

    def forward(self, x, state=None):
        """x: one preprocessed observation, float32 (D,) or (C, H, W). Returns (output (A,), state)."""
        h = self.conv(x) if self.pixels else x
        for weight, bias in self.linear_params:  # torch.addmv: half of nn.Linear's per-call cost on one vector
            h = self.activation(torch.addmv(bias, weight, h))
        if self.recurrent:
            state = self.lstm(h, state)
            h = state[0]
        out = torch.addmv(self.head_params[1], self.head_params[0], h)
        return (torch.tanh(out) if self.squash else out), state

    def numpy_forward(self, x):
        """The MLP of `forward` in numpy for one float32 observation (D,): output float32 (A,)."""
        for weight, bias in self.numpy_params[:-1]:
            x = self.numpy_activation(weight @ x + bias)
        weight, bias = self.numpy_params[-1]
        out = weight @ x + bias
        return np.tanh(out) if self.squash else out

    def act(self, obs, state=None):
        """obs: one env observation (numpy). Returns (action: int or float32 (A,), recurrent state)."""
        if self.pixels:
            x = torch.from_numpy(np.asarray(obs)).float().div_(255.0)
            if x.dim() == 4:  # (frames, H, W, 3) -> (frames * 3, H, W)
                x = x.permute(0, 3, 1, 2).flatten(0, 1)
            out, state = self(x, state)
            out = out.numpy()
        else:
            x = np.asarray(obs, dtype=np.float32)
            if self.normalize:
                x = np.clip((x - self.obs_mean) / self.obs_std, np.float32(-5.0), np.float32(5.0))
            if self.recurrent:
                out, state = self(torch.from_numpy(x), state)
                out = out.numpy()
            else:
                out = self.numpy_forward(x)
        return (int(out.argmax()) if self.discrete else out), state


def policy_config_from_env(env, args):
    """Everything `build_policy` needs, read off the (wrapped) env's spaces and the flags."""
    discrete = isinstance(env.action_space, gym.spaces.Discrete)
    return {"obs_shape": list(env.observation_space.shape), "discrete": discrete,
            "num_actions": int(env.action_space.n) if discrete else int(env.action_space.shape[0]),
            "hidden_sizes": list(args.hidden_sizes), "activation": args.activation,
            "recurrent": args.recurrent, "action_bounding": args.action_bounding, "obs_norm": args.obs_norm}


def build_policy(policy_config):
    """Policy from a config dict (flags or a weights file's meta); float32, inference only."""
    torch.set_num_threads(1)
    return Policy(**policy_config)


# ------------------------------------------------------------------------------------------------
# 4. Rollout
# ------------------------------------------------------------------------------------------------
def rollout(env, policy, seed, observations=None):
    """Run one episode with `env.reset(seed=seed)`. Returns (episode return: float, steps: int).

    observations: a list to which every observation the policy sees is appended (for the
    observation-normalization statistics), or None.
    """
    obs, _ = env.reset(seed=seed)
    state, total, steps = None, 0.0, 0
    with torch.inference_mode():
        while True:
            if observations is not None:
                observations.append(obs)
            action, state = policy.act(obs, state)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            steps += 1
            if terminated or truncated:
                return total, steps


class ObsStats:
    """Running sum, sum of squares and count of vector observations (float64), as in the paper.

    Starts at mean 0, variance 1 (a pseudo-count of 1e-2); std is floored at 0.1.
    """

    def __init__(self, dim):
        self.count = 1e-2
        self.sum = np.zeros(dim)
        self.sumsq = np.full(dim, 1e-2)

    def update(self, count, total, total_sq):
        self.count += count
        self.sum += total
        self.sumsq += total_sq

    def mean_std(self):
        """(mean, std): float32 (D,) each."""
        mean = self.sum / self.count
        std = np.sqrt(np.maximum(self.sumsq / self.count - mean ** 2, 1e-2))
        return mean.astype(np.float32), std.astype(np.float32)

    def state_dict(self):
        """{count: float, sum: float64 (D,), sumsq: float64 (D,)}, for the checkpoint."""
        return {"count": self.count, "sum": self.sum, "sumsq": self.sumsq}

    def load_state_dict(self, state):
        """Restore from `state_dict()`'s output."""
        self.count, self.sum, self.sumsq = float(state["count"]), state["sum"].copy(), state["sumsq"].copy()


# ------------------------------------------------------------------------------------------------
# 5. OpenAI-ES as an ask/tell object
# ------------------------------------------------------------------------------------------------
def derive_seed(*keys):
    """A 32-bit seed from non-negative integer keys, e.g. (seed, stream, generation, member, rollout)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def sample_noise(noise_seed, dim):
    """The perturbation direction eps ~ N(0, I) of one member: float32 (dim,), from its seed alone."""
    return np.random.default_rng(noise_seed).standard_normal(dim, dtype=np.float32)


def perturb(theta, sigma, noise_seed, sign):
    """Member parameters theta + sign * sigma * eps(noise_seed): float32 (D,). sign in {+1, -1}."""
    return theta + np.float32(sign * sigma) * sample_noise(noise_seed, theta.size)


def centered_ranks(x):
    """Ranks of x mapped linearly onto [-0.5, 0.5], ties sharing their mean rank: float64 (N,), zero sum.

    Salimans et al. 2017 (fitness shaping, Wierstra et al. 2014). Equal returns get equal values,
    so all-equal returns give all zeros (no gradient), never NaN.
    """
    x = np.asarray(x, dtype=np.float64)
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # rank of the first member of each group of equal values
    ranks = (first + (counts - 1) / 2.0)[inverse]
    return ranks / (x.size - 1) - 0.5


def shape_fitness(returns, method):
    """Fitness shaping: 'centered-rank', 'z-score' (zeros when all returns are equal) or 'none'."""
    returns = np.asarray(returns, dtype=np.float64)
    if method == "centered-rank":
        return centered_ranks(returns)
    if method == "z-score":
        std = returns.std()
        return (returns - returns.mean()) / std if std > 0 else np.zeros_like(returns)
    return returns


class OpenAIES:
    """OpenAI-ES (Salimans et al. 2017, Algorithm 2 with mirrored sampling) as ask/tell.

    The population is integers: `ask()` returns (N, 2) int64 rows (noise seed, sign); member i's
    parameters are `perturb(theta, sigma, *row_i)`. `tell(returns)` with the N episode returns
    (higher is better) forms g = 1/(N sigma) sum_i F_i eps_i on shaped fitness F, adds the weight
    decay -weight_decay * theta, and takes an Adam (Kingma & Ba 2015) or momentum-SGD ascent step.
    All state is numpy and plain numbers (`state_dict`), so it pickles for exact resume.
    """

    def __init__(self, theta, population_size, sigma=0.02, learning_rate=0.01, optimizer="adam",
                 momentum=0.9, weight_decay=0.005, antithetic=True, fitness_shaping="centered-rank",
                 lr_decay=1.0, lr_min=0.0, sigma_decay=1.0, sigma_min=0.0, seed=0):
        if population_size < 2 or (antithetic and population_size % 2):
            raise ValueError("population_size must be >= 2, and even with antithetic sampling")
        if sigma <= 0 or learning_rate <= 0:
            raise ValueError("sigma and learning_rate must be > 0")
        self.theta = np.asarray(theta, dtype=np.float32).copy()  # the distribution mean (D,)
        self.population_size = population_size
        self.sigma = sigma                      # noise standard deviation
        self.learning_rate = learning_rate
        self.optimizer = optimizer              # "adam" or "sgd"
        self.momentum = momentum                # SGD only
        self.weight_decay = weight_decay        # L2 coefficient
        self.antithetic = antithetic            # mirrored pairs (+eps, -eps)
        self.fitness_shaping = fitness_shaping
        self.lr_decay, self.lr_min = lr_decay, lr_min
        self.sigma_decay, self.sigma_min = sigma_decay, sigma_min
        self.seed = seed
        self.generation = 0
        self.m = np.zeros_like(self.theta)      # Adam first moment / SGD velocity
        self.v = np.zeros_like(self.theta)      # Adam second moment
        self.grad_norm = 0.0                    # norm of the last ascent direction (diagnostic)

    def noise_seeds(self):
        """Noise seed of each independent direction this generation: N/2 with mirrored sampling, else N."""
        count = self.population_size // 2 if self.antithetic else self.population_size
        return [derive_seed(self.seed, NOISE_STREAM, self.generation, k) for k in range(count)]

    def ask(self):
        """The population: (N, 2) int64 of (noise seed, sign); mirrored pairs are rows 2k, 2k+1."""
        seeds = np.array(self.noise_seeds(), dtype=np.int64)
        if self.antithetic:
            return np.stack([np.repeat(seeds, 2), np.tile([1, -1], seeds.size)], axis=1)
        return np.stack([seeds, np.ones_like(seeds)], axis=1)

    def gradient(self, returns):
        """The ES gradient estimate g = 1/(N sigma) sum_i F_i eps_i: float32 (D,)."""
        fitness = shape_fitness(returns, self.fitness_shaping)
        if self.antithetic:  # +eps and -eps share eps: weight (F+ - F-)
            fitness = fitness[0::2] - fitness[1::2]
        g = np.zeros_like(self.theta)
        for weight, noise_seed in zip(fitness, self.noise_seeds()):
            if weight != 0:
                g += np.float32(weight) * sample_noise(noise_seed, self.theta.size)
        return g / np.float32(self.population_size * self.sigma)

    def tell(self, returns):
        """Update theta from the N returns of the members of `ask()`, in its order (higher is better)."""
        returns = np.asarray(returns, dtype=np.float64)
        if returns.shape != (self.population_size,):
            raise ValueError(f"expected {self.population_size} returns, got shape {returns.shape}")
        step = self.gradient(returns) - np.float32(self.weight_decay) * self.theta
        self.grad_norm = float(np.linalg.norm(step))
        if self.optimizer == "adam":
            beta1, beta2, eps = 0.9, 0.999, 1e-8
            t = self.generation + 1
            self.m = beta1 * self.m + (1 - beta1) * step
            self.v = beta2 * self.v + (1 - beta2) * step * step
            a = self.learning_rate * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
            self.theta = self.theta + np.float32(a) * self.m / (np.sqrt(self.v) + np.float32(eps))
        else:
            self.m = self.momentum * self.m + (1 - self.momentum) * step
            self.theta = self.theta + np.float32(self.learning_rate) * self.m
        self.theta = self.theta.astype(np.float32)
        self.generation += 1
        self.learning_rate = max(self.learning_rate * self.lr_decay, self.lr_min)
        self.sigma = max(self.sigma * self.sigma_decay, self.sigma_min)

    def state_dict(self):
        """Everything the optimizer holds (numpy arrays and plain numbers): a copy for the checkpoint."""
        return {key: (value.copy() if isinstance(value, np.ndarray) else value) for key, value in vars(self).items()}

    @classmethod
    def from_state_dict(cls, state):
        """The optimizer exactly as `state_dict()` saw it."""
        es = cls.__new__(cls)
        vars(es).update(state)
        return es


# ------------------------------------------------------------------------------------------------
# 6. Workers
# ------------------------------------------------------------------------------------------------
class RolloutWorker:
    """One worker's env and policy, built once, and the rollout tasks it runs.

    A task is a tuple of integers and one float: (noise_seed, sign, sigma, env_seeds, training).
    sign 0 means the unperturbed parameters. The parameters and observation statistics are
    read from shared memory (`center`, `obs_mean`, `obs_std`: float32 RawArrays) that the
    driver fills before each batch. Result: (episode returns list, steps, obs sums or None).
    """

    def __init__(self, env_config, policy_config, center, obs_mean, obs_std):
        torch.set_num_threads(1)
        self.env_config = env_config
        self.envs = {True: make_env(env_config, training=True), False: make_env(env_config, training=False)}
        # A Box2D world keeps state across resets (BipedalWalker-v3 returns drift on a reused env with
        # the same seed), which would make results depend on scheduling. Making a fresh Box2D env
        # costs ~0.4 ms, so those get one per episode; every other env is built once.
        self.fresh_env_per_episode = type(self.envs[True].unwrapped).__module__.startswith("gymnasium.envs.box2d")
        self.policy = build_policy(policy_config)
        self.center = np.frombuffer(center, dtype=np.float32)
        if self.policy.normalize:  # views of the shared arrays: no copy per task
            self.policy.obs_mean = np.frombuffer(obs_mean, dtype=np.float32)
            self.policy.obs_std = np.frombuffer(obs_std, dtype=np.float32)

    def run(self, task):
        """Run one task: (noise_seed, sign, sigma, env_seeds, training) -> (returns, steps, obs sums).

        obs sums: (count, sum float64 (D,), sum of squares float64 (D,)) of the observations of a
        training task with observation normalization, else None.
        """
        noise_seed, sign, sigma, env_seeds, training = task
        params = perturb(self.center, sigma, noise_seed, sign) if sign else self.center.copy()
        self.policy.load(params)
        collect = training and self.policy.normalize
        observations = [] if collect else None
        returns, steps = [], 0
        for env_seed in env_seeds:
            if self.fresh_env_per_episode:
                self.envs[training].close()
                self.envs[training] = make_env(self.env_config, training)
            episode_return, episode_steps = rollout(self.envs[training], self.policy, env_seed, observations)
            returns.append(episode_return)
            steps += episode_steps
        stats = None
        if collect:
            obs = np.asarray(observations, dtype=np.float64)
            stats = (len(obs), obs.sum(axis=0), np.square(obs).sum(axis=0))
        return returns, steps, stats


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

    `map(tasks)` returns the results in task order whatever the scheduling (each worker keeps two
    tasks in flight). A dead worker raises WorkerDied in `map_with_restarts`, which restarts the
    pool and re-runs the batch, up to `max_restarts` times. Shared float32 arrays hold the
    parameters and observation statistics: `set_center` writes them before a batch.
    """

    def __init__(self, num_workers, env_config, policy_config, dim, obs_dim, max_restarts=3):
        self.num_workers = num_workers
        self.max_restarts = max_restarts
        self.center = mp.RawArray("f", dim)
        self.obs_mean, self.obs_std = mp.RawArray("f", obs_dim), mp.RawArray("f", obs_dim)
        self.worker_args = (env_config, policy_config, self.center, self.obs_mean, self.obs_std)
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

    def set_center(self, theta, obs_mean=None, obs_std=None):
        """Publish theta (float32 (D,)) and the observation mean/std (float32 (O,)) to the workers."""
        np.frombuffer(self.center, dtype=np.float32)[:] = theta
        if obs_mean is not None:
            np.frombuffer(self.obs_mean, dtype=np.float32)[:] = obs_mean
            np.frombuffer(self.obs_std, dtype=np.float32)[:] = obs_std

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
    small tuple as on the local pool (noise seed, sign, sigma, env seeds). A Ray worker process builds
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

    Raises UserError for a missing or corrupt file, a file without meta (such as the
    AttentionAgent authors' weights) or one written by another script.
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
    if meta.get("script") != SCRIPT:
        raise UserError(f"{path} was written by {meta.get('script', 'an unknown script')}, not {SCRIPT}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has weights format {meta.get('format_version')}, this script reads {FORMAT_VERSION}")
    return params, meta


class CheckpointUnpickler(pickle.Unpickler):
    """Unpickler that admits only what a checkpoint holds: numpy arrays and dtypes, builtins."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
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
# 8. Logging: console, CSV, plot, video
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


def plot_learning_curve(progress_path, image_path, title):
    """learning_curve.png from progress.csv: population mean/max, the center, evaluations +/- std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(progress_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    it = np.array([float(r["iteration"]) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(it, [float(r["return_mean"]) for r in rows], label="population mean", lw=1)
    ax.plot(it, [float(r["return_max"]) for r in rows], label="population max", lw=0.8, alpha=0.6)
    ax.plot(it, [float(r["center_return"]) for r in rows], label="center (unperturbed)", lw=0.8, alpha=0.6)
    ev = [(float(r["iteration"]), float(r["eval_return_mean"]), float(r["eval_return_std"]))
          for r in rows if r["eval_return_mean"]]
    if ev:
        e = np.array(ev)
        ax.errorbar(e[:, 0], e[:, 1], yerr=e[:, 2], fmt="o-", ms=3, capsize=2, label="evaluation mean ± std")
    ax.set_xlabel("generation")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(image_path, dpi=100)
    plt.close(fig)


def record_video(env_config, policy, path_stem, seed):
    """Record one evaluation episode; writes path_stem.mp4 (moviepy installed) or .gif. Returns the path."""
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


# ------------------------------------------------------------------------------------------------
# 9. Main
# ------------------------------------------------------------------------------------------------
def read_weights_into_args(args, given):
    """Load --init-from / --from-pretrained weights and take the env and architecture from their meta.

    Returns (params float32 (D,), meta). Raises UserError when --env-id names another env.
    """
    path = args.init_from or args.from_pretrained
    params, meta = load_weights(path)
    if "env_id" in given and args.env_id != meta["env_id"]:
        raise UserError(f"{path} was trained on {meta['env_id']}, not {args.env_id}")
    args.env_id = meta["env_id"]
    for key in META_ENV_FLAGS:
        setattr(args, key, meta["env"][key])
    for key in META_POLICY_FLAGS:
        setattr(args, key, meta["policy"][key])
    return params, meta


def check_weights_fit(path, params, meta, policy_config, dim):
    """UserError unless the file's policy matches the env's spaces and its size matches the policy."""
    want, have = meta["policy"], policy_config
    if (want["obs_shape"], want["discrete"], want["num_actions"]) != \
            (have["obs_shape"], have["discrete"], have["num_actions"]):
        raise UserError(f"{path} does not fit {meta['env_id']}: its policy takes observations {want['obs_shape']} "
                        f"and {want['num_actions']} actions, the env gives {have['obs_shape']} and {have['num_actions']}")
    if params.size != dim:
        raise UserError(f"{path} holds {params.size} parameters but its architecture needs {dim}")


def make_policy(policy_config, params, obs_mean_std=None):
    """A policy holding `params` (float32 (D,)) and, for vector observations, the normalization (mean, std)."""
    policy = build_policy(policy_config).load(params)
    if policy.normalize and obs_mean_std is not None:
        policy.obs_mean, policy.obs_std = (np.asarray(a, np.float32) for a in obs_mean_std)
    return policy


def evaluate(pool, theta, obs_mean_std, seed, iteration, episodes):
    """Returns of theta over `episodes` evaluation episodes (no early stop): (float64 (E,), env steps)."""
    pool.set_center(theta, *obs_mean_std)
    tasks = [(0, 0, 0.0, [derive_seed(seed, EVAL_ENV_STREAM, iteration, e)], False) for e in range(episodes)]
    results = pool.map_with_restarts(tasks, warn=print)
    return np.array([r[0][0] for r in results]), sum(r[1] for r in results)


def run_from_pretrained(args, given):
    """Evaluate a weights file; the last line printed is the `episode_return mean=...` summary."""
    params, meta = read_weights_into_args(args, given)
    env_config = env_config_from_args(args)
    probe = make_env(env_config, training=False)
    policy_config = policy_config_from_env(probe, args)
    probe.close()
    policy = build_policy(policy_config)
    dim = sum(p.numel() for p in policy.parameters())
    check_weights_fit(args.from_pretrained, params, meta, policy_config, dim)
    norm = meta["obs_norm"]
    obs_mean_std = (np.array(norm["mean"], np.float32), np.array(norm["std"], np.float32)) if norm else (None, None)
    pool = open_pool(args, env_config, policy_config, dim, policy.obs_mean.size)
    print(policy)
    print(f"parameters: {dim}   env: {args.env_id}   episodes: {args.num_eval_rollouts}   workers: {pool.describe()}")
    start = time.perf_counter()
    try:
        returns, steps = evaluate(pool, params, obs_mean_std, args.seed, 0, args.num_eval_rollouts)
    finally:
        pool.close()
    elapsed = time.perf_counter() - start
    if args.capture_video:
        name = args.run_name or f"{args.env_id.replace('/', '-')}__{SCRIPT[:-3]}__eval__{args.seed}__{int(time.time())}"
        os.makedirs(os.path.join(args.logs_dir, name, "videos"), exist_ok=True)
        path, video_return = record_video(env_config, make_policy(policy_config, params, norm and obs_mean_std),
                                          os.path.join(args.logs_dir, name, "videos", "pretrained"),
                                          derive_seed(args.seed, EVAL_ENV_STREAM, 0, 0))
        print(f"video: {path} (episode return {video_return:.2f})")
    print(f"{steps} env steps in {elapsed:.1f} s ({steps / elapsed:,.0f} steps/s)")
    print(f"episode_return mean={returns.mean():.4f} std={returns.std():.4f} min={returns.min():.4f} "
          f"max={returns.max():.4f} episodes={returns.size}")
    return 0


def train(args, given):
    """The OpenAI-ES loop: ask -> evaluate population and center -> tell -> log -> evaluate -> checkpoint."""
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
            init = read_weights_into_args(args, given)
        run_name = args.run_name or f"{args.env_id.replace('/', '-')}__{SCRIPT[:-3]}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join(args.logs_dir, run_name)
        if os.path.exists(os.path.join(run_dir, "checkpoint.pkl")):
            raise UserError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                            "or pick another --run-name")
    env_config = env_config_from_args(args)
    probe = make_env(env_config, training=False)
    policy_config = policy_config_from_env(probe, args)
    probe.close()

    torch.manual_seed(args.seed)
    policy = build_policy(policy_config)
    dim = sum(p.numel() for p in policy.parameters())
    obs_stats = ObsStats(policy.obs_mean.size) if policy.normalize else None
    if checkpoint:
        es = OpenAIES.from_state_dict(checkpoint["es"])
        if obs_stats:
            obs_stats.load_state_dict(checkpoint["obs_stats"])
        counters = checkpoint["counters"]
    else:
        theta = parameters_to_vector(policy.parameters()).numpy()
        if init:
            params, meta = init
            check_weights_fit(args.init_from, params, meta, policy_config, dim)
            theta = params
            if obs_stats and meta["obs_norm"]:  # continue the file's running statistics
                norm = meta["obs_norm"]
                mean, std = np.array(norm["mean"]), np.array(norm["std"])
                obs_stats.count = norm["count"]
                obs_stats.sum, obs_stats.sumsq = mean * norm["count"], (std ** 2 + mean ** 2) * norm["count"]
        es = OpenAIES(theta, args.population_size, sigma=args.sigma, learning_rate=args.learning_rate,
                      optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
                      antithetic=args.antithetic, fitness_shaping=args.fitness_shaping,
                      lr_decay=args.lr_decay, lr_min=args.lr_min, sigma_decay=args.sigma_decay,
                      sigma_min=args.sigma_min, seed=args.seed)
        counters = {"evaluations": 0, "env_steps": 0, "wall_time_s": 0.0, "best_return": -math.inf,
                    "best_eval": -math.inf, "goal_streak": 0}

    pool = open_pool(args, env_config, policy_config, dim, policy.obs_mean.size)  # before any file is touched
    os.makedirs(os.path.join(run_dir, "videos") if args.capture_video else run_dir, exist_ok=True)
    paths = {name: os.path.join(run_dir, name) for name in
             ("args.json", "progress.csv", "learning_curve.png", "checkpoint.pkl", "best.npz", "final.npz")}
    config = dict(vars(args), env_config=env_config, num_params=dim, versions=versions())
    atomic_write(paths["args.json"], lambda f: f.write(json.dumps(config, indent=2).encode()))
    if checkpoint:
        truncate_progress(paths["progress.csv"], es.generation)
    elif os.path.exists(paths["progress.csv"]):
        os.unlink(paths["progress.csv"])
    log = (lambda *a, **k: None) if args.quiet else print
    title = f"OpenAI-ES on {args.env_id} (seed {args.seed})"
    print(policy)
    print(f"parameters: {dim}   population: {args.population_size}   workers: {pool.describe()}   "
          f"run folder: {run_dir}")
    if checkpoint:
        print(f"resuming at generation {es.generation} from {checkpoint_path}")

    def obs_mean_std():
        return obs_stats.mean_std() if obs_stats else (None, None)

    def meta(iteration, evaluation=None):
        norm = None
        if obs_stats:
            mean, std = obs_stats.mean_std()
            norm = {"mean": mean.tolist(), "std": std.tolist(), "count": obs_stats.count}
        return {"format_version": FORMAT_VERSION, "script": SCRIPT, "env_id": args.env_id, "env": env_config,
                "policy": policy_config, "obs_norm": norm, "evaluation": evaluation, "seed": args.seed,
                "iteration": iteration, "num_params": dim}

    def kept():
        return (f"the checkpoint of generation {es.generation} is kept in {paths['checkpoint.pkl']}\n"
                f"resume with: python {SCRIPT} --resume {run_dir}   (on any Ray cluster with --ray-address, or locally)")
    pool.on_lost = kept

    session_start, first_generation, wall_offset = time.perf_counter(), es.generation, counters["wall_time_s"]
    last_plot = -math.inf
    csv_file = open(paths["progress.csv"], "a", newline="")
    writer = csv.writer(csv_file)
    if csv_file.tell() == 0:
        writer.writerow(PROGRESS_COLUMNS)
    try:
        while es.generation < args.max_iter:
            t0 = time.perf_counter()
            generation, population = es.generation, es.ask()
            # The population and the unperturbed center in one batch; a mirrored pair shares env seeds.
            pool.set_center(es.theta, *obs_mean_std())
            tasks = []
            for i, (noise_seed, sign) in enumerate(population):
                pair = i // 2 if args.antithetic else i
                seeds = [derive_seed(args.seed, TRAIN_ENV_STREAM, generation, pair, r) for r in range(args.num_rollouts)]
                tasks.append((int(noise_seed), int(sign), es.sigma, seeds, True))
            tasks.append((0, 0, 0.0, [derive_seed(args.seed, CENTER_ENV_STREAM, generation, r)
                                      for r in range(args.num_rollouts)], True))
            results = pool.map_with_restarts(tasks, warn=print)
            returns = np.array([np.mean(r[0]) for r in results[:-1]])
            center_return = float(np.mean(results[-1][0]))
            center_rank = int(np.sum(returns > center_return)) + 1  # 1: no member beat the center
            steps = sum(r[1] for r in results)
            sigma, learning_rate = es.sigma, es.learning_rate
            es.tell(returns)
            if obs_stats:  # in task order: the statistics do not depend on scheduling
                for _, _, stats in results:
                    obs_stats.update(*stats)
            iteration = es.generation
            counters["evaluations"] += args.population_size
            counters["best_return"] = max(counters["best_return"], float(returns.max()))

            eval_returns = None
            # Evaluate on schedule, and at once when the center's own rollouts reach the reward goal.
            center_at_goal = args.reward_goal is not None and center_return >= args.reward_goal
            if iteration % args.eval_every == 0 or iteration == args.max_iter or center_at_goal:
                eval_returns, eval_steps = evaluate(pool, es.theta, obs_mean_std(), args.seed, iteration,
                                                    args.num_eval_rollouts)
                steps += eval_steps
                evaluation = {"mean": float(eval_returns.mean()), "std": float(eval_returns.std()),
                              "episodes": int(eval_returns.size)}
                if evaluation["mean"] > counters["best_eval"]:
                    counters["best_eval"] = evaluation["mean"]
                    save_weights(paths["best.npz"], es.theta, meta(iteration, evaluation))
                reached = args.reward_goal is not None and evaluation["mean"] >= args.reward_goal
                counters["goal_streak"] = counters["goal_streak"] + 1 if reached else 0
                log(f"eval {iteration:>5d} | return {evaluation['mean']:9.2f} ± {evaluation['std']:8.2f} over "
                    f"{eval_returns.size} episodes | best eval {counters['best_eval']:9.2f}")
                if args.capture_video:
                    path, _ = record_video(env_config, make_policy(policy_config, es.theta, obs_mean_std()),
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
                             f"{eval_returns.std():.6g}" if evaluated else "", f"{center_return:.6g}", center_rank,
                             f"{sigma:.6g}", f"{learning_rate:.6g}", f"{es.grad_norm:.6g}",
                             f"{float(np.linalg.norm(es.theta)):.6g}", num_cpus])
            csv_file.flush()
            eta = (now - session_start) / (iteration - first_generation) * (args.max_iter - iteration)
            log(f"iter {iteration:>5d}/{args.max_iter} | evals {counters['evaluations']:>8d} | return min "
                f"{returns.min():8.2f} mean {returns.mean():8.2f} max {returns.max():8.2f} | best "
                f"{counters['best_return']:8.2f} | center {center_return:8.2f} rank {center_rank:>4d} | "
                f"sigma {sigma:.4f} lr {learning_rate:.4f} | {steps / (now - t0):8,.0f} steps/s | cpus {num_cpus} | "
                f"{format_duration(counters['wall_time_s'])} elapsed | ETA {format_duration(eta)}")
            if evaluated and now - last_plot >= PLOT_INTERVAL_S:  # a redraw costs ~0.1 s of the driver
                plot_learning_curve(paths["progress.csv"], paths["learning_curve.png"], title)
                last_plot = now
            save_checkpoint(paths["checkpoint.pkl"], {
                "format_version": FORMAT_VERSION, "script": SCRIPT, "args": vars(args), "es": es.state_dict(),
                "obs_stats": obs_stats.state_dict() if obs_stats else None, "counters": dict(counters)})
            if args.reward_goal is not None and counters["goal_streak"] >= args.consecutive_goal_stopping:
                print(f"reward goal {args.reward_goal:g} reached in {counters['goal_streak']} consecutive "
                      f"evaluation(s) at generation {iteration} ({counters['wall_time_s']:.1f} s)")
                break
    except (KeyboardInterrupt, RayClusterError) as e:
        reason = "\ninterrupted" if isinstance(e, KeyboardInterrupt) else f"{SCRIPT}: error: {e}"
        print(f"{reason}: {kept()}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    finally:
        csv_file.close()
        pool.close()
    save_weights(paths["final.npz"], es.theta, meta(es.generation))
    plot_learning_curve(paths["progress.csv"], paths["learning_curve.png"], title)
    print(f"done: {es.generation} generations, {counters['env_steps']} env steps, {counters['wall_time_s']:.1f} s. "
          f"Files in {run_dir}: args.json progress.csv learning_curve.png checkpoint.pkl final.npz"
          + (" best.npz" if os.path.exists(paths["best.npz"]) else "") + (" videos/" if args.capture_video else ""))
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
    try:
        return run_from_pretrained(args, given) if args.from_pretrained else train(args, given)
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

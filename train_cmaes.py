"""CMA-ES training the self-attention AttentionAgent on CarRacing-v3, in one file.

Tang, Nguyen, Ha (2020), "Neuroevolution of Self-Interpretable Agents", GECCO 2020
(arXiv:2003.08165): the agent cuts each 96x96 frame into 529 patches, lets them vote for each
other with a tiny self-attention (query and key Linear(147, 4)), keeps only the positions of the
10 most voted-for patches, and drives with an LSTM(20, 16) on those 20 numbers: 3667 parameters,
914 +/- 15 on CarRacing. It is trained without gradients by CMA-ES (Hansen 2016), here pycma's
`cma.CMAEvolutionStrategy`: each generation it samples a population of parameter vectors, every
member drives --num-rollouts episodes, and the mean returns (negated: pycma minimizes) update the
search distribution. The flat parameter vector uses the authors' layout, so the authors' published
weights load as they are.

Examples:
    # the authors' weights over 100 episodes (no early stop; 1000 steps)
    python train_cmaes.py --from-pretrained ../shared/weights/attentionagent_carracing.npz
    # ... and a video of what the agent attends to
    python train_cmaes.py --from-pretrained ../shared/weights/attentionagent_carracing.npz \
        --num-eval-rollouts 1 --capture-video
    # train from scratch with a small budget (the paper: population 256, 16 rollouts)
    python train_cmaes.py --population-size 64 --num-rollouts 2 --eval-every 10 --num-eval-rollouts 10
    # retrain only the controller on the authors' frozen attention (2483 parameters searched)
    python train_cmaes.py --train controller --init-from ../shared/weights/attentionagent_carracing.npz
"""

import argparse
import ctypes
import collections
import csv
import dataclasses
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

import cma
import gymnasium as gym
import numpy as np
import pygame
import torch
import torch.nn as nn
from gymnasium.envs.box2d import car_racing

SCRIPT = "train_cmaes.py"
FORMAT_VERSION = 1
# The columns every script of the project writes first, in this order; the CMA-ES scalars follow.
PROGRESS_COLUMNS = [
    "iteration", "evaluations", "env_steps", "wall_time_s",
    "return_min", "return_mean", "return_max", "return_std",
    "eval_return_mean", "eval_return_std",
    "sigma", "axis_ratio", "dim", "num_cpus",
]
# Streams of randomness, each derived from (seed, stream, generation, rollout).
CMA_STREAM, TRAIN_ENV_STREAM, EVAL_ENV_STREAM = 0, 1, 2
# The authors' published file: a bare `params` array of this size, in the paper's architecture.
AUTHORS_NUM_PARAMS = 3667
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
                "capture_video", "quiet", "reward_goal", "consecutive_goal_stopping", "stock_env"}
# Where a run executes is never taken from its checkpoint: a run resumes on any cluster or locally.
PLACEMENT_FLAGS = ("num_workers", "ray_address")
# The agent's architecture flags: a weights file's meta brings them along.
AGENT_FLAGS = ("patch_size", "patch_stride", "query_dim", "top_k", "hidden_size", "bias", "controller",
               "num_frames")


class UserError(Exception):
    """Bad input (flags, files, environments): reported as one line, exit code 2."""


# ------------------------------------------------------------------------------------------------
# 1. Command line
# ------------------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    """The argparse parser of every flag (kebab-case, defaults shown in --help)."""
    p = OneLineParser(prog=SCRIPT, description="CMA-ES training the AttentionAgent (Tang et al. 2020).",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--env-id", default="CarRacing-v3", help="gymnasium id of a CarRacing-like pixel env")
    g.add_argument("--seed", type=int, default=1, help="seed of every random draw of the run")
    g.add_argument("--num-workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="rollout worker processes (default: usable cores); 1 runs in-process. With "
                        "--ray-address: the most rollouts running at once (default: every CPU of the cluster)")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="run the rollouts on the Ray cluster at ADDRESS: HOST:PORT of its head, or auto "
                        "for the cluster started on this machine (default: $RAY_ADDRESS if set, else "
                        "local worker processes)")
    g.add_argument("--population-size", type=int, default=256, help="CMA-ES population (lambda)")
    g.add_argument("--max-iter", type=int, default=2000, help="generations, counted from the run's start")
    g.add_argument("--num-rollouts", type=int, default=16,
                   help="episodes per fitness evaluation; fitness = mean episode return")
    g.add_argument("--max-episode-steps", type=int, default=1000, help="episode length limit")
    g.add_argument("--max-negative-steps", type=int, default=20,
                   help="training episodes end after this many consecutive negative rewards (0 = off); "
                        "never in evaluation")
    g.add_argument("--stock-env", action="store_true",
                   help="use gymnasium's CarRacing as is, not the faster subclass with identical frames")
    g.add_argument("--eval-every", type=int, default=10,
                   help="evaluate the distribution mean (xfavorite) every this many generations")
    g.add_argument("--num-eval-rollouts", type=int, default=100, help="episodes per evaluation")
    g.add_argument("--logs-dir", default="runs", help="parent folder of run folders")
    g.add_argument("--run-name", default=None,
                   help="run folder name (default: <env-id>__train_cmaes__<seed>__<unix-time>)")
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="continue a run from its checkpoint.pkl or its run folder")
    g.add_argument("--from-pretrained", default=None, metavar="PATH.npz",
                   help="evaluate these weights (this script's or the authors' file) over --num-eval-rollouts "
                        "episodes; no training")
    g.add_argument("--init-from", "--base-from-pretrained", default=None, metavar="PATH.npz",
                   help="start from these weights; with --train attention|controller the other part stays "
                        "frozen at the file's values")
    g.add_argument("--capture-video", action="store_true",
                   help="record an episode at each evaluation with the top-k patches highlighted "
                        "(GIF; mp4 when moviepy is installed)")
    g.add_argument("--reward-goal", type=float, default=None,
                   help="stop when the evaluation mean reaches this return")
    g.add_argument("--consecutive-goal-stopping", type=int, default=1,
                   help="... in this many consecutive evaluations")
    g.add_argument("--quiet", action="store_true", help="no per-generation console lines")
    g = p.add_argument_group("CMA-ES")
    g.add_argument("--init-sigma", type=float, default=0.1, help="initial step size sigma0")
    g.add_argument("--train", choices=["all", "attention", "controller"], default="all",
                   help="which part CMA-ES searches; the rest is frozen (needs --init-from)")
    g = p.add_argument_group("AttentionAgent")
    g.add_argument("--patch-size", type=int, default=7, help="side of a square patch, pixels")
    g.add_argument("--patch-stride", type=int, default=4, help="step between patches, pixels")
    g.add_argument("--query-dim", type=int, default=4, help="width of the query and key projections")
    g.add_argument("--top-k", type=int, default=10, help="patches whose centers feed the controller")
    g.add_argument("--hidden-size", type=int, default=16, help="controller width")
    g.add_argument("--no-bias", dest="bias", action="store_false", help="query and key projections without bias")
    g.add_argument("--controller", choices=["lstm", "rnn", "mlp"], default="lstm",
                   help="lstm: LSTM + Linear (the paper); rnn: ReLU RNN + Linear; mlp: over --num-frames "
                        "stacked top-k features")
    g.add_argument("--num-frames", type=int, default=4, help="mlp controller: stacked feature vectors")
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
    check(args.init_sigma > 0, "--init-sigma must be > 0")
    check(args.num_workers >= 1, "--num-workers must be at least 1")
    check(args.max_iter >= 1, "--max-iter must be at least 1")
    check(args.num_rollouts >= 1 and args.num_eval_rollouts >= 1,
          "--num-rollouts and --num-eval-rollouts must be at least 1")
    check(args.eval_every >= 1, "--eval-every must be at least 1")
    check(args.consecutive_goal_stopping >= 1, "--consecutive-goal-stopping must be at least 1")
    check(args.max_episode_steps >= 1, "--max-episode-steps must be at least 1")
    check(args.max_negative_steps >= 0, "--max-negative-steps must be >= 0")
    check(args.patch_size >= 1 and args.patch_stride >= 1, "--patch-size and --patch-stride must be positive")
    check(args.query_dim >= 1 and args.hidden_size >= 1 and args.num_frames >= 1,
          "--query-dim, --hidden-size and --num-frames must be positive")
    check(args.top_k >= 1, "--top-k must be at least 1")
    check(sum(x is not None for x in (args.resume, args.from_pretrained, args.init_from)) <= 1,
          "--resume, --from-pretrained and --init-from exclude each other")
    check(args.train == "all" or args.init_from, f"--train {args.train} needs --init-from FILE for the frozen part")
    if args.resume:
        extra = sorted(given - RESUME_FLAGS)
        check(not extra, f"--{extra[0].replace('_', '-') if extra else ''} cannot be changed on resume: "
                         "the run's settings come from its checkpoint")
    if args.from_pretrained:
        clash = sorted(given & set(AGENT_FLAGS))
        check(not clash, f"--{clash[0].replace('_', '-') if clash else ''} comes from the weights file; "
                         "do not restate the architecture")
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

    CarRacing's training-time early stop (Tang et al. 2020; estool): a car that has left the track
    only collects -0.1 per frame, so its remaining frames teach nothing. gymnasium has no such
    wrapper. Used in training rollouts only; evaluation episodes run to the end, as in the paper.
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


class FastCarRacing(car_racing.CarRacing):
    """gymnasium 1.4.0's CarRacing with the same observations, rewards and terminations, bit for bit,
    at about twice the speed.

    Three quarters of a stock step is `_render_road` drawing the frame: every frame it rotates and
    bounds-checks all ~400 grass and ~300-600 road polygons in Python, one vertex at a time, and
    draws only ~4% of them. Here the vertices of each track are kept in one array, a vectorized test
    with a one-pixel margin drops the polygons that cannot pass the screen check, and the survivors go
    through gymnasium's unchanged `_draw_colored_polygon` (its own check, its own arithmetic, the same
    draw calls in the same order). Tile colors are read live (a visited tile changes color). `_render`
    is gymnasium's with the score font loaded once and the score text rendered once per value.
    Relies on gymnasium's internals: requirements.txt pins gymnasium exactly, and a test compares
    every frame with the stock env's.
    """

    GRASS = [[(car_racing.GRASS_DIM * x + dx, car_racing.GRASS_DIM * y + dy)
              for dx, dy in ((car_racing.GRASS_DIM, 0), (0, 0), (0, car_racing.GRASS_DIM),
                             (car_racing.GRASS_DIM, car_racing.GRASS_DIM))]
             for x in range(-20, 20, 2) for y in range(-20, 20, 2)]  # the stock grass, in its order
    GRASS_VERTICES = np.array(GRASS, dtype=np.float64)  # (400, 4, 2)

    def _maybe_visible(self, vertices, zoom, translation, angle):
        """Boolean (P,): polygons (P, V, 2) that may change a pixel of the frame.

        Same rotation and transform as gymnasium's, vectorized. A polygon is dropped when it cannot
        pass `_draw_colored_polygon`'s own screen check, or when its bounding box misses the surface:
        then no draw call can touch a pixel. Both tests are widened by a margin (1 and 2 pixels), so
        float differences can only keep a polygon, never drop one that draws.
        """
        cos, sin = math.cos(angle), math.sin(angle)
        x = (vertices[..., 0] * cos - vertices[..., 1] * sin) * zoom + translation[0]
        y = (vertices[..., 0] * sin + vertices[..., 1] * cos) * zoom + translation[1]
        width, height, margin = car_racing.WINDOW_W, car_racing.WINDOW_H, car_racing.MAX_SHAPE_DIM + 1.0
        passes_check = ((x >= -margin) & (x <= width + margin) & (y >= -margin) & (y <= height + margin)).any(axis=1)
        touches = (x.max(axis=1) >= -2) & (x.min(axis=1) <= width + 2) & (y.max(axis=1) >= -2) & (y.min(axis=1) <= height + 2)
        return passes_check & touches

    def reset(self, *, seed=None, options=None):
        self._road_array = None  # a new track: its vertices are gathered at its first frame
        return super().reset(seed=seed, options=options)

    def _road_vertices(self):
        """(R, 4, 2) float64 vertices of `self.road_poly`, gathered once per track."""
        if getattr(self, "_road_array", None) is None:
            self._road_array = np.array([poly for poly, _ in self.road_poly], dtype=np.float64).reshape(-1, 4, 2)
        return self._road_array

    def _render_road(self, zoom, translation, angle):
        bounds = car_racing.PLAYFIELD
        field = [(bounds, bounds), (bounds, -bounds), (-bounds, -bounds), (-bounds, bounds)]
        self._draw_colored_polygon(self.surf, field, self.bg_color, zoom, translation, angle, clip=False)
        for i in np.flatnonzero(self._maybe_visible(self.GRASS_VERTICES, zoom, translation, angle)):
            self._draw_colored_polygon(self.surf, self.GRASS[i], self.grass_color, zoom, translation, angle)
        for i in np.flatnonzero(self._maybe_visible(self._road_vertices(), zoom, translation, angle)):
            poly, color = self.road_poly[i]
            self._draw_colored_polygon(self.surf, [(p[0], p[1]) for p in poly], [int(c) for c in color],
                                       zoom, translation, angle)

    def _score_text(self):
        """The score as gymnasium renders it, from a font loaded once, rendered once per value."""
        text = f"{self.reward:04.0f}"
        if getattr(self, "_score", (None, None))[0] != text:
            if getattr(self, "_font", None) is None:
                self._font = pygame.font.Font(pygame.font.get_default_font(), 42)
            self._score = (text, self._font.render(text, True, (255, 255, 255), (0, 0, 0)))
        return self._score[1]

    def _render(self, mode):
        # gymnasium 1.4.0's CarRacing._render, but for the cached score text.
        assert mode in self.metadata["render_modes"]
        pygame.font.init()
        if self.screen is None and mode == "human":
            pygame.display.init()
            self.screen = pygame.display.set_mode((car_racing.WINDOW_W, car_racing.WINDOW_H))
        if self.clock is None:
            self.clock = pygame.time.Clock()
        if "t" not in self.__dict__:
            return  # reset() not called yet
        self.surf = pygame.Surface((car_racing.WINDOW_W, car_racing.WINDOW_H))
        angle = -self.car.hull.angle
        zoom = 0.1 * car_racing.SCALE * max(1 - self.t, 0) + car_racing.ZOOM * car_racing.SCALE * min(self.t, 1)
        scroll_x = -(self.car.hull.position[0]) * zoom
        scroll_y = -(self.car.hull.position[1]) * zoom
        trans = pygame.math.Vector2((scroll_x, scroll_y)).rotate_rad(angle)
        trans = (car_racing.WINDOW_W / 2 + trans[0], car_racing.WINDOW_H / 4 + trans[1])
        self._render_road(zoom, trans, angle)
        self.car.draw(self.surf, zoom, trans, angle, mode not in ["state_pixels_list", "state_pixels"])
        self.surf = pygame.transform.flip(self.surf, False, True)
        self._render_indicators(car_racing.WINDOW_W, car_racing.WINDOW_H)
        text = self._score_text()
        text_rect = text.get_rect()
        text_rect.center = (60, car_racing.WINDOW_H - car_racing.WINDOW_H * 2.5 / 40.0)
        self.surf.blit(text, text_rect)
        if mode == "human":
            pygame.event.pump()
            self.clock.tick(self.metadata["render_fps"])
            self.screen.fill(0)
            self.screen.blit(self.surf, (0, 0))
            pygame.display.flip()
        elif mode == "rgb_array":
            return self._create_image_array(self.surf, (car_racing.VIDEO_W, car_racing.VIDEO_H))
        elif mode == "state_pixels":
            return self._create_image_array(self.surf, (car_racing.STATE_W, car_racing.STATE_H))
        else:
            return self.isopen


def make_env(env_config, training, render_mode=None):
    """CarRacing-v3 (or a like env): `gymnasium.make` with the episode limit, the training-time
    early stop, and `RescaleAction` so that the agent's tanh output in [-1, 1] maps linearly onto the
    action bounds (steer [-1, 1], gas [0, 1], brake [0, 1]).

    Observations: uint8 (H, W, 3) frames, H == W. Raises UserError for an unknown id, a missing
    dependency, or spaces the AttentionAgent cannot use.
    """
    env_id = env_config["env_id"]
    try:
        spec = gym.spec(env_id)
        if not env_config["stock_env"] and spec.entry_point == "gymnasium.envs.box2d.car_racing:CarRacing":
            spec = dataclasses.replace(spec, entry_point=FastCarRacing)  # gym.make's wrappers, our class
        env = gym.make(spec, max_episode_steps=env_config["max_episode_steps"], render_mode=render_mode)
    except gym.error.DependencyNotInstalled as e:
        raise UserError(f"{env_id} needs an optional dependency: {str(e).splitlines()[0]}") from None
    except gym.error.Error as e:
        raise UserError(f"cannot make env {env_id!r}: {str(e).splitlines()[0]}") from None
    obs_space, action_space = env.observation_space, env.action_space
    if not (isinstance(obs_space, gym.spaces.Box) and obs_space.dtype == np.uint8 and len(obs_space.shape) == 3
            and obs_space.shape[0] == obs_space.shape[1] and obs_space.shape[2] == 3):
        raise UserError(f"{env_id}'s observation space {obs_space} is not supported: the AttentionAgent "
                        "takes square RGB uint8 frames")
    if not (isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1
            and np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
        raise UserError(f"{env_id}'s action space {action_space} is not supported: bounded 1-D Box only")
    if training and env_config["max_negative_steps"] > 0:
        env = NegativeRewardEarlyStop(env, env_config["max_negative_steps"])
    bound = np.ones(action_space.shape, dtype=action_space.dtype)  # bounds in the space's dtype: no precision warning
    return gym.wrappers.RescaleAction(env, -bound, bound)


def env_config_from_args(args):
    """The env settings that a worker, an evaluation and a weights file's meta all need."""
    return {"env_id": args.env_id, "max_episode_steps": args.max_episode_steps,
            "max_negative_steps": args.max_negative_steps, "stock_env": args.stock_env}


# ------------------------------------------------------------------------------------------------
# 3. The AttentionAgent
# ------------------------------------------------------------------------------------------------
class AttentionAgent(nn.Module):
    """The self-attention agent of Tang, Nguyen, Ha (2020), one frame at a time.

    frame uint8 (S, S, 3) -> [0, 1] -> patches of `patch_size` x `patch_size` at `patch_stride`
    (n x n of them, row-major, each flattened as (row, col, channel): d = patch_size^2 * 3 values)
    -> Q = fc_q(patches), K = fc_k(patches) (n^2, query_dim) -> A = softmax(Q K^T / sqrt(d)) over
    the last axis (n^2, n^2) -> importance = column sums of A -> the `top_k` most important patches'
    centers (row, col) / S, flattened (2 top_k,) -> controller -> fc -> tanh (action_dim,).

    Controllers: 'lstm' LSTM(2k, hidden) reset at each episode (the paper); 'rnn' ReLU RNN(2k,
    hidden); 'mlp' Linear(2k F, hidden) + ReLU over the last F feature vectors (zeros before the
    episode's first frames). Then fc: Linear(hidden, action_dim) + tanh.

    The flat genotype follows the authors' file: module by module (fc_q, fc_k, the controller,
    fc), inside each module its state-dict keys in sorted order (`flat_layout`).
    """

    def __init__(self, image_size=96, action_dim=3, patch_size=7, patch_stride=4, query_dim=4, top_k=10,
                 hidden_size=16, bias=True, controller="lstm", num_frames=4):
        super().__init__()
        n = (image_size - patch_size) // patch_stride + 1
        if n < 1 or top_k > n * n:
            raise UserError(f"{n * n} patches of {patch_size}x{patch_size} at stride {patch_stride} in a "
                            f"{image_size}x{image_size} frame: cannot pick the top {top_k}")
        self.image_size, self.patch_size, self.patch_stride, self.top_k = image_size, patch_size, patch_stride, top_k
        self.patch_dim = patch_size * patch_size * 3
        self.controller = controller
        self.num_frames = num_frames
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
        offset = patch_size // 2
        grid = offset + patch_stride * torch.arange(n, dtype=torch.float32)
        rows, cols = torch.meshgrid(grid, grid, indexing="ij")
        # Patch centers (row, col) / image size, (n^2, 2), row-major like the patches: the controller's inputs.
        self.patch_positions = torch.stack([rows.flatten(), cols.flatten()], dim=1) / image_size
        self.attention_scale = 1.0 / math.sqrt(self.patch_dim)

    def part_modules(self):
        """{'attention': [...], 'controller': [...]}: the modules of each part, in layout order."""
        core = {"lstm": ["lstm"], "rnn": ["rnn"], "mlp": ["fc1"]}[self.controller]
        return {"attention": ["fc_q", "fc_k"], "controller": core + ["fc"]}

    def flat_layout(self):
        """[(part, 'module.key', tensor)] in the authors' flat order."""
        layout = []
        for part, names in self.part_modules().items():
            for name in names:
                state = getattr(self, name).state_dict(keep_vars=True)
                layout.extend((part, f"{name}.{key}", state[key]) for key in sorted(state))
        return layout

    def get_flat(self):
        """The genotype: float32 (D,) in the authors' layout."""
        return torch.cat([t.detach().flatten() for _, _, t in self.flat_layout()]).numpy()

    def set_flat(self, vector):
        """Load a float32 (D,) genotype in the authors' layout. Raises ValueError on a wrong size."""
        vector = torch.as_tensor(np.asarray(vector, dtype=np.float32))
        layout = self.flat_layout()
        if vector.numel() != sum(t.numel() for _, _, t in layout):
            raise ValueError(f"expected {sum(t.numel() for _, _, t in layout)} values, got {vector.numel()}")
        start = 0
        for _, _, tensor in layout:
            tensor.copy_(vector[start:start + tensor.numel()].view_as(tensor))
            start += tensor.numel()

    def part_mask(self, part):
        """Boolean (D,): which genotype entries belong to `part` ('attention' or 'controller')."""
        return np.concatenate([np.full(t.numel(), p == part) for p, _, t in self.flat_layout()])

    def patches(self, frame):
        """frame uint8 (S, S, 3) -> float32 (n^2, patch_dim) in [0, 1], each patch as (row, col, channel)."""
        p, s = self.patch_size, self.patch_stride
        patches = torch.from_numpy(frame).unfold(0, p, s).unfold(1, p, s)  # uint8 view (n, n, 3, p, p)
        return patches.permute(0, 1, 3, 4, 2).reshape(-1, self.patch_dim).float().div_(255.0)

    def attend(self, frame):
        """Indices of the top-k patches, most important first: int64 (k,).

        importance_j = sum_i softmax(Q K^T / sqrt(d))_ij, computed as exp(L - rowmax)^T (1 / rowsums):
        one pass over the n^2 x n^2 matrix fewer than normalizing it, and no copy of it.
        """
        patches = self.patches(frame)
        logits = torch.mm(self.fc_q(patches), self.fc_k(patches).T).mul_(self.attention_scale)
        weights = logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
        importance = torch.mv(weights.T, weights.sum(dim=1).reciprocal_())
        return torch.topk(importance, self.top_k).indices

    def initial_state(self):
        """The controller's state at an episode's start."""
        if self.controller == "mlp":
            return collections.deque([torch.zeros(2 * self.top_k)] * self.num_frames, maxlen=self.num_frames)
        return None

    def forward(self, frame, state):
        """frame uint8 (S, S, 3), controller state -> (action float32 (action_dim,) in [-1, 1], state, top-k)."""
        top = self.attend(frame)
        features = self.patch_positions[top].flatten()
        if self.controller == "lstm":
            h, state = self.lstm(features.unsqueeze(0), state)
        elif self.controller == "rnn":
            h, state = self.rnn(features.unsqueeze(0), state)
        else:
            state.append(features)
            h = torch.relu(self.fc1(torch.cat(list(state))))
        action = torch.tanh(self.fc(h.flatten()))
        return action.numpy(), state, top


def build_agent(agent_config):
    """An AttentionAgent from a config dict (flags or a weights file's meta)."""
    torch.set_num_threads(1)
    return AttentionAgent(**agent_config)


# ------------------------------------------------------------------------------------------------
# 4. Rollout
# ------------------------------------------------------------------------------------------------
def rollout(env, agent, seed, on_step=None):
    """Run one episode with `env.reset(seed=seed)`. Returns (episode return: float, steps: int).

    on_step(frame, top_k_indices): called for every frame the agent sees (videos), or None.
    """
    obs, _ = env.reset(seed=seed)
    state, total, steps = agent.initial_state(), 0.0, 0
    with torch.inference_mode():
        while True:
            action, state, top = agent(obs, state)
            if on_step is not None:
                on_step(obs, top)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            steps += 1
            if terminated or truncated:
                return total, steps


# ------------------------------------------------------------------------------------------------
# 5. CMA-ES: pycma's CMAEvolutionStrategy, with its own random stream
# ------------------------------------------------------------------------------------------------
def derive_seed(*keys):
    """A 32-bit seed from non-negative integer keys, e.g. (seed, stream, generation, rollout)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def make_cma(x0, init_sigma, population_size, seed, run_dir):
    """(cma.CMAEvolutionStrategy, its numpy RandomState). pycma minimizes: tell it negated returns.

    The sampler draws from a RandomState of its own (option 'randn'), so the run depends on --seed
    alone and the checkpoint can hold that state; pycma writes no files (verb_log 0), and its file
    prefix points into the run folder anyway.
    """
    rng = np.random.RandomState(derive_seed(seed, CMA_STREAM))
    options = {"popsize": population_size, "seed": derive_seed(seed, CMA_STREAM, 1), "randn": rng.randn,
               "verbose": -9, "verb_disp": 0, "verb_log": 0,
               "verb_filenameprefix": os.path.join(run_dir, "outcmaes") + os.sep}
    return cma.CMAEvolutionStrategy(np.asarray(x0, dtype=np.float64), init_sigma, options), rng


# ------------------------------------------------------------------------------------------------
# 6. Workers
# ------------------------------------------------------------------------------------------------
class RolloutWorker:
    """One worker's envs and agent, built once, and the rollout tasks it runs.

    A task is (row, env_seeds, training): the agent takes row `row` of the shared float32 (R, D)
    parameter matrix that the driver fills before each batch. Result: (episode returns, steps).
    """

    def __init__(self, env_config, agent_config, params, rows):
        torch.set_num_threads(1)
        self.envs = {True: make_env(env_config, training=True), False: make_env(env_config, training=False)}
        self.agent = build_agent(agent_config)
        self.params = np.frombuffer(params, dtype=np.float32).reshape(rows, -1)

    def run(self, task):
        """Run one task: (row, env_seeds, training) -> (returns list of float, steps int)."""
        row, env_seeds, training = task
        self.agent.set_flat(self.params[row])
        returns, steps = [], 0
        for env_seed in env_seeds:
            episode_return, episode_steps = rollout(self.envs[training], self.agent, env_seed)
            returns.append(episode_return)
            steps += episode_steps
        return returns, steps


def worker_main(conn, worker_args):
    """Loop of a worker process: receive (index, task), send ('ok'|'error', index, result)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C and SIGTERM, then stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        worker = RolloutWorker(*worker_args)
    except Exception as e:
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
    pool and re-runs the batch, up to `max_restarts` times. The candidates travel through a shared
    float32 (rows, D) matrix that `set_params` fills before a batch; tasks carry only a row index.
    """

    def __init__(self, num_workers, env_config, agent_config, dim, rows, max_restarts=3):
        self.num_workers = num_workers
        self.max_restarts = max_restarts
        self.params = mp.RawArray("f", rows * dim)
        self.worker_args = (env_config, agent_config, self.params, rows)
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

    def set_params(self, matrix):
        """Publish the candidates, float (r, D) with r <= rows, as rows 0..r-1 of the shared matrix."""
        matrix = np.asarray(matrix, dtype=np.float32)
        np.frombuffer(self.params, dtype=np.float32)[:matrix.size] = matrix.ravel()

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
    small tuple as on the local pool (row index, env seeds). A Ray worker process builds
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
    """Weights file: `params` float32 (D,) in the authors' layout and `meta`, a 0-d unicode array of JSON."""
    def write(f):
        np.savez(f, params=np.asarray(params, dtype=np.float32), meta=np.array(json.dumps(meta)))
    atomic_write(path, write)


def load_weights(path):
    """(params float32 (D,), agent settings dict or None for the authors' file, meta dict or None).

    Accepts this script's files and the authors' published file (a bare `params` array of 3667
    values, read as the paper's architecture). Raises UserError for a missing or corrupt file, a
    file of another script, or a bare array of another size.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            if "params" not in data:
                raise UserError(f"{path} holds no 'params' array: not a weights file")
            params = data["params"].astype(np.float32).ravel()
            meta = json.loads(str(data["meta"])) if "meta" in data else None
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"weights file {path} does not exist") from None
    except Exception as e:
        raise UserError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
    if meta is None:
        if params.size != AUTHORS_NUM_PARAMS:
            raise UserError(f"{path} has no meta and {params.size} values: neither a {SCRIPT} file nor the "
                            f"authors' AttentionAgent file ({AUTHORS_NUM_PARAMS} values)")
        return params, None, None
    if meta.get("script") != SCRIPT:
        raise UserError(f"{path} was written by {meta.get('script', 'an unknown script')}, not {SCRIPT}: "
                        "it holds no AttentionAgent")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has weights format {meta.get('format_version')}, this script reads {FORMAT_VERSION}")
    return params, meta["agent"], meta


class CheckpointUnpickler(pickle._Unpickler):
    """Unpickler for checkpoints: it admits only numpy's and pycma's own names and a few builtins, and
    calls nothing but numpy's array and RNG constructors and plain builtin types.

    Objects of pycma's classes are rebuilt from their saved state (pickle's NEWOBJ + BUILD), never
    by calling the class: pycma evaluates option strings in its constructors, so a crafted pickle
    that called one could run code. Built on the pure-Python unpickler, whose REDUCE this class
    checks; anything else raises pickle.UnpicklingError before it runs.
    """

    # (module, name) that REDUCE may call.
    CALLS = {("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
             ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
             ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
             ("numpy.random._pickle", "__randomstate_ctor"), ("numpy.random._pickle", "__bit_generator_ctor"),
             ("builtins", "range"), ("builtins", "slice"), ("builtins", "set"), ("builtins", "frozenset"),
             ("builtins", "complex"), ("builtins", "bytearray")}
    # (module, name) that may only be referred to (classes rebuilt by NEWOBJ, functions kept as values).
    NAMES = CALLS | {("numpy", "ndarray"), ("numpy.linalg", "eigh"), ("numpy.random._mt19937", "MT19937")}

    def __init__(self, file):
        super().__init__(file)
        self.callables = []

    def find_class(self, module, name):
        if (module, name) not in self.NAMES and module != "cma" and not module.startswith("cma."):
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


def detach_randn(es):
    """Set pycma's references to the sampler `randn` to None; returns `attach(randn)`, which puts them back.

    pycma keeps the 'randn' option (a bound method of the run's RandomState, which would pickle as a
    `getattr` call) in its options, its input options and its sampler.
    """
    options = [es.opts, es.inputargs["inopts"]]
    sampler = es.sm if hasattr(es.sm, "randn") else None
    for option in options:
        option["randn"] = None
    if sampler is not None:
        sampler.randn = None

    def attach(randn):
        for option in options:
            option["randn"] = randn
        if sampler is not None:
            sampler.randn = randn
    return attach


def save_checkpoint(path, state):
    """Pickle the checkpoint dict atomically (a kill leaves the previous checkpoint intact).

    The RandomState behind pycma's sampler is saved on its own (state["cma_rng"]) and re-bound on load.
    """
    attach = detach_randn(state["cma"])
    try:
        data = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        attach(state["cma_rng"].randn)
    atomic_write(path, lambda f: f.write(data))


def load_checkpoint(path):
    """(path, the checkpoint dict) from a checkpoint.pkl or a run folder; UserError if unusable."""
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
    detach_randn(state["cma"])(state["cma_rng"].randn)
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
    """learning_curve.png from progress.csv: population mean and max, evaluations +/- std."""
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
    ev = [(float(r["iteration"]), float(r["eval_return_mean"]), float(r["eval_return_std"]))
          for r in rows if r["eval_return_mean"]]
    if ev:
        e = np.array(ev)
        ax.errorbar(e[:, 0], e[:, 1], yerr=e[:, 2], fmt="o-", ms=3, capsize=2, label="evaluation of the mean ± std")
    ax.set_xlabel("generation")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(image_path, dpi=100)
    plt.close(fig)


def attention_frame(frame, top, agent, scale=4):
    """The paper's picture: the raw frame beside the same frame with the top-k patches highlighted.

    frame uint8 (S, S, 3), top int64 (k,) -> uint8 (S scale, 2 S scale + scale, 3): left raw; right
    dimmed except the attended patches, each outlined from red (most important) to yellow.
    """
    n = (agent.image_size - agent.patch_size) // agent.patch_stride + 1
    p, big = agent.patch_size, lambda image: image.repeat(scale, axis=0).repeat(scale, axis=1)
    corners = [(r * agent.patch_stride, c * agent.patch_stride) for r, c in (divmod(i, n) for i in top.tolist())]
    highlighted = (frame.astype(np.float32) * 0.35).astype(np.uint8)
    for r, c in corners:
        highlighted[r:r + p, c:c + p] = frame[r:r + p, c:c + p]
    right, side = big(highlighted), p * scale
    for rank, (r, c) in enumerate(corners):
        r, c, last = r * scale, c * scale, side - 1
        color = np.array([255, int(255 * rank / max(1, len(corners) - 1)), 0], dtype=np.uint8)
        right[r, c:c + side] = right[r + last, c:c + side] = color
        right[r:r + side, c] = right[r:r + side, c + last] = color
    gap = np.full((right.shape[0], scale, 3), 255, dtype=np.uint8)
    return np.concatenate([big(frame), gap, right], axis=1)


def record_video(env_config, agent, path_stem, seed):
    """Record one evaluation episode with the attention overlay; writes path_stem.mp4 (moviepy) or
    .gif. Returns (path, episode return)."""
    env = make_env(env_config, training=False)
    frames = []
    episode_return, _ = rollout(env, agent, seed, on_step=lambda obs, top: frames.append(attention_frame(obs, top, agent)))
    env.close()
    fps = 50
    try:
        from moviepy import ImageSequenceClip
    except ImportError:
        from PIL import Image
        images = [Image.fromarray(frame) for frame in frames[::2]]  # 25 fps keeps GIFs small
        path = path_stem + ".gif"
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(2000 / fps), loop=0)
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
def paper_agent_config(image_size, action_dim):
    """The paper's architecture (this script's defaults), for the authors' bare weights file."""
    defaults = build_parser().parse_args([])
    return {"image_size": image_size, "action_dim": action_dim, **{key: getattr(defaults, key) for key in AGENT_FLAGS}}


def agent_from_file(path, image_size, action_dim):
    """(agent holding the file's weights, its config, its meta or None). UserError when they do not fit."""
    params, agent_config, meta = load_weights(path)
    agent_config = agent_config or paper_agent_config(image_size, action_dim)
    if (agent_config["image_size"], agent_config["action_dim"]) != (image_size, action_dim):
        raise UserError(f"{path} expects {agent_config['image_size']}-pixel frames and {agent_config['action_dim']} "
                        f"actions; the env gives {image_size} and {action_dim}")
    agent = build_agent(agent_config)
    try:
        agent.set_flat(params)
    except ValueError as e:
        raise UserError(f"{path} does not fit its own architecture: {e}") from None
    return agent, agent_config, meta


def evaluate(pool, params, seed, iteration, episodes):
    """Returns of `params` (float (D,)) over `episodes` evaluation episodes, no early stop:
    (float64 (E,), env steps). Uses row 0 of the shared matrix."""
    pool.set_params(np.asarray(params)[None, :])
    tasks = [(0, [derive_seed(seed, EVAL_ENV_STREAM, iteration, e)], False) for e in range(episodes)]
    results = pool.map_with_restarts(tasks, warn=print)
    return np.array([r[0][0] for r in results]), sum(r[1] for r in results)


def probe_env(env_config):
    """(image size, action dim) of the env."""
    env = make_env(env_config, training=False)
    shape = (int(env.observation_space.shape[0]), int(env.action_space.shape[0]))
    env.close()
    return shape


def run_from_pretrained(args, given):
    """Evaluate a weights file; the last line printed is the `episode_return mean=...` summary."""
    env_config = env_config_from_args(args)
    agent, agent_config, meta = agent_from_file(args.from_pretrained, *probe_env(env_config))
    if meta is not None and "env_id" not in given:
        env_config["env_id"] = meta["env_id"]
    params = agent.get_flat()
    pool = open_pool(args, env_config, agent_config, params.size, 1)
    print(agent)
    print(f"parameters: {params.size}   env: {env_config['env_id']}   episodes: {args.num_eval_rollouts}   "
          f"workers: {pool.describe()}   source: {'authors' if meta is None else meta['script']}")
    start = time.perf_counter()
    try:
        returns, steps = evaluate(pool, params, args.seed, 0, args.num_eval_rollouts)
    finally:
        pool.close()
    elapsed = time.perf_counter() - start
    if args.capture_video:
        name = args.run_name or f"{env_config['env_id']}__{SCRIPT[:-3]}__eval__{args.seed}__{int(time.time())}"
        os.makedirs(os.path.join(args.logs_dir, name, "videos"), exist_ok=True)
        path, video_return = record_video(env_config, agent, os.path.join(args.logs_dir, name, "videos", "pretrained"),
                                          derive_seed(args.seed, EVAL_ENV_STREAM, 0, 0))
        print(f"video: {path} (episode return {video_return:.2f})")
    print(f"{steps} env steps in {elapsed:.1f} s ({steps / elapsed:,.0f} steps/s)")
    print(f"episode_return mean={returns.mean():.4f} std={returns.std():.4f} min={returns.min():.4f} "
          f"max={returns.max():.4f} episodes={returns.size}")
    return 0


def train(args, given):
    """The CMA-ES loop: ask -> evaluate the population -> tell -> log -> evaluate xfavorite -> checkpoint."""
    start_time = time.perf_counter()
    checkpoint = None
    if args.resume:
        checkpoint_path, checkpoint = load_checkpoint(args.resume)
        saved = dict(checkpoint["args"])
        saved.update({key: getattr(args, key) for key in given & RESUME_FLAGS})
        saved.update({key: getattr(args, key) for key in PLACEMENT_FLAGS})
        args = argparse.Namespace(**saved)
        run_dir = os.path.dirname(os.path.abspath(checkpoint_path))
    else:
        run_name = args.run_name or f"{args.env_id}__{SCRIPT[:-3]}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join(args.logs_dir, run_name)
        if os.path.exists(os.path.join(run_dir, "checkpoint.pkl")):
            raise UserError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                            "or pick another --run-name")
    env_config = env_config_from_args(args)
    image_size, action_dim = probe_env(env_config)
    agent_config = {"image_size": image_size, "action_dim": action_dim, **{key: getattr(args, key) for key in AGENT_FLAGS}}
    torch.manual_seed(args.seed)
    agent = build_agent(agent_config)
    if args.init_from and not checkpoint:
        # Take the file's weights wherever its modules have this agent's shapes. The searched part may
        # differ (e.g. --train attention --query-dim 2 --no-bias) and then starts fresh; a frozen part must fit.
        source, _, _ = agent_from_file(args.init_from, image_size, action_dim)
        shapes = lambda module: {key: value.shape for key, value in module.state_dict().items()}
        for part, names in agent.part_modules().items():
            for name in names:
                target, origin = getattr(agent, name), getattr(source, name, None)
                if origin is not None and shapes(target) == shapes(origin):
                    target.load_state_dict(origin.state_dict())
                elif part != args.train:
                    raise UserError(f"{args.init_from} cannot provide the {part}: its {name} does not match this "
                                    f"agent's ({source.controller} controller, query dim {source.fc_q.out_features}, "
                                    f"hidden size {source.fc.in_features} in the file)")
    base = agent.get_flat()  # the full genotype; CMA-ES searches base[mask]
    mask = np.ones(base.size, dtype=bool) if args.train == "all" else agent.part_mask(args.train)
    dim = int(mask.sum())

    def full(x):
        vector = base.copy()
        vector[mask] = x
        return vector

    if checkpoint:
        es, cma_rng, counters = checkpoint["cma"], checkpoint["cma_rng"], checkpoint["counters"]
    else:
        es, cma_rng = make_cma(base[mask], args.init_sigma, args.population_size, args.seed, run_dir)
        counters = {"generation": 0, "evaluations": 0, "env_steps": 0, "wall_time_s": 0.0, "best_return": -math.inf,
                    "best_eval": -math.inf, "goal_streak": 0}

    pool = open_pool(args, env_config, agent_config, int(base.size), args.population_size)  # before any file is touched
    os.makedirs(os.path.join(run_dir, "videos") if args.capture_video else run_dir, exist_ok=True)
    paths = {name: os.path.join(run_dir, name) for name in
             ("args.json", "progress.csv", "learning_curve.png", "checkpoint.pkl", "best.npz", "final.npz")}
    config = dict(vars(args), env_config=env_config, agent_config=agent_config, num_params=int(base.size),
                  search_dim=dim, versions=versions())
    atomic_write(paths["args.json"], lambda f: f.write(json.dumps(config, indent=2).encode()))
    if checkpoint:
        truncate_progress(paths["progress.csv"], counters["generation"])
    elif os.path.exists(paths["progress.csv"]):
        os.unlink(paths["progress.csv"])
    log = (lambda *a, **k: None) if args.quiet else print
    title = f"CMA-ES AttentionAgent on {args.env_id} (seed {args.seed})"
    print(agent)
    parts = {part: int(agent.part_mask(part).sum()) for part in ("attention", "controller")}
    print(f"parameters: {base.size} (attention {parts['attention']}, controller {parts['controller']})   "
          f"CMA-ES searches: {dim} ({args.train})   population: {args.population_size}   "
          f"workers: {pool.describe()}   run folder: {run_dir}")
    if checkpoint:
        print(f"resuming at generation {counters['generation']} from {checkpoint_path}")

    def meta(iteration, evaluation=None):
        return {"format_version": FORMAT_VERSION, "script": SCRIPT, "env_id": args.env_id, "env": env_config,
                "agent": agent_config, "train": args.train, "evaluation": evaluation, "seed": args.seed,
                "iteration": iteration, "num_params": int(base.size)}

    def kept():
        return (f"the checkpoint of generation {counters['generation']} is kept in {paths['checkpoint.pkl']}\n"
                f"resume with: python {SCRIPT} --resume {run_dir}   (on any Ray cluster with --ray-address, or locally)")
    pool.on_lost = kept

    session_start, first_generation, wall_offset = time.perf_counter(), counters["generation"], counters["wall_time_s"]
    last_plot = -math.inf
    csv_file = open(paths["progress.csv"], "a", newline="")
    writer = csv.writer(csv_file)
    if csv_file.tell() == 0:
        writer.writerow(PROGRESS_COLUMNS)
    try:
        while counters["generation"] < args.max_iter:
            t0 = time.perf_counter()
            generation = counters["generation"]
            candidates = es.ask()
            # Every member of a generation drives the same --num-rollouts tracks (common env seeds).
            seeds = [derive_seed(args.seed, TRAIN_ENV_STREAM, generation, r) for r in range(args.num_rollouts)]
            pool.set_params(np.stack([full(x) for x in candidates]))
            results = pool.map_with_restarts([(i, seeds, True) for i in range(len(candidates))], warn=print)
            returns = np.array([np.mean(r[0]) for r in results])
            steps = sum(r[1] for r in results)
            sigma = float(es.sigma)
            es.tell(candidates, (-returns).tolist())  # pycma minimizes
            iteration = counters["generation"] = generation + 1
            counters["evaluations"] += len(candidates)
            counters["best_return"] = max(counters["best_return"], float(returns.max()))

            eval_returns = None
            if iteration % args.eval_every == 0 or iteration == args.max_iter:
                center = full(es.result.xfavorite)  # the distribution mean
                eval_returns, eval_steps = evaluate(pool, center, args.seed, iteration, args.num_eval_rollouts)
                steps += eval_steps
                evaluation = {"mean": float(eval_returns.mean()), "std": float(eval_returns.std()),
                              "episodes": int(eval_returns.size)}
                if evaluation["mean"] > counters["best_eval"]:
                    counters["best_eval"] = evaluation["mean"]
                    save_weights(paths["best.npz"], center, meta(iteration, evaluation))
                reached = args.reward_goal is not None and evaluation["mean"] >= args.reward_goal
                counters["goal_streak"] = counters["goal_streak"] + 1 if reached else 0
                log(f"eval {iteration:>5d} | return {evaluation['mean']:9.2f} ± {evaluation['std']:8.2f} over "
                    f"{eval_returns.size} episodes | best eval {counters['best_eval']:9.2f}")
                if args.capture_video:
                    video_agent = build_agent(agent_config)
                    video_agent.set_flat(center)
                    path, _ = record_video(env_config, video_agent, os.path.join(run_dir, "videos", f"iter-{iteration:05d}"),
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
                             f"{eval_returns.std():.6g}" if evaluated else "", f"{sigma:.6g}",
                             f"{float(es.D.max() / es.D.min()):.6g}", dim, num_cpus])
            csv_file.flush()
            eta = (now - session_start) / (iteration - first_generation) * (args.max_iter - iteration)
            log(f"iter {iteration:>5d}/{args.max_iter} | evals {counters['evaluations']:>8d} | return min "
                f"{returns.min():8.2f} mean {returns.mean():8.2f} max {returns.max():8.2f} | best "
                f"{counters['best_return']:8.2f} | sigma {sigma:.4f} | {steps / (now - t0):7,.0f} steps/s | cpus {num_cpus} | "
                f"{format_duration(counters['wall_time_s'])} elapsed | ETA {format_duration(eta)}")
            if evaluated and now - last_plot >= PLOT_INTERVAL_S:  # a redraw costs ~0.1 s of the driver
                plot_learning_curve(paths["progress.csv"], paths["learning_curve.png"], title)
                last_plot = now
            save_checkpoint(paths["checkpoint.pkl"], {
                "format_version": FORMAT_VERSION, "script": SCRIPT, "args": vars(args), "cma": es,
                "cma_rng": cma_rng, "counters": dict(counters)})
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
    save_weights(paths["final.npz"], full(es.result.xfavorite), meta(counters["generation"]))
    plot_learning_curve(paths["progress.csv"], paths["learning_curve.png"], title)
    print(f"done: {counters['generation']} generations, {counters['env_steps']} env steps, "
          f"{counters['wall_time_s']:.1f} s. Files in {run_dir}: args.json progress.csv learning_curve.png "
          "checkpoint.pkl final.npz" + (" best.npz" if os.path.exists(paths["best.npz"]) else "")
          + (" videos/" if args.capture_video else ""))
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

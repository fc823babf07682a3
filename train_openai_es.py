r"""OpenAI Evolution Strategies (OpenAI-ES) on any gymnasium environment, in one file.

Salimans, Ho, Chen, Sidor, Sutskever (2017), "Evolution Strategies as a Scalable Alternative to Reinforcement
Learning", arXiv:1703.03864. Each generation perturbs the policy's flat parameters theta with N Gaussian
directions eps_i (mirrored pairs +eps, -eps by default), runs an episode per member, shapes the returns F_i into
centered ranks and ascends the gradient estimate

    g = 1 / (N sigma) * sum_i F_i eps_i        (with Adam or momentum SGD, and L2 weight decay)

Rollouts are the only work: they spread over local processes or a Ray cluster, which receive integers (noise
seed, sign, env seeds) and regenerate the noise themselves.

Examples:
    python train_openai_es.py --env-id CartPole-v1 --hidden-sizes 16 --population-size 32 \
        --sigma 0.1 --learning-rate 0.2 --reward-goal 500
    python train_openai_es.py --env-id LunarLander-v3 --hidden-sizes 32 32 --population-size 32 \
        --sigma 0.1 --learning-rate 0.04 --eval-every 1000 --reward-goal 200
    python train_openai_es.py --from-pretrained pretrained/openai_es_lunarlander.npz --capture-video
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import typing

SCRIPT = "train_openai_es.py"
FORMAT_VERSION = 1  # of checkpoints and weights files
# Randomness: derive_seed(seed, stream, generation, ...), one stream per use.
NOISE_STREAM = 0
TRAIN_ENV_STREAM = 1
CENTER_ENV_STREAM = 2
EVAL_ENV_STREAM = 3


class UserError(Exception):
    """Bad input (flags, files, environments): one line `<script>: error: ...`, exit code 2."""


# -- 1. Configuration ----------------------------------------------------------------------------
def build_parser():
    """Every flag; parse_args checks the numbers against LIMITS."""
    epilog = __doc__[__doc__.index("Examples:") :] + f'\nMore: README.md, section "{SCRIPT}"'
    description = "OpenAI-ES (Salimans et al. 2017) on gymnasium."
    p = OneLineParser(prog=SCRIPT, description=description, formatter_class=HelpFormatter, epilog=epilog)
    switch = argparse.BooleanOptionalAction
    g = p.add_argument_group("run")
    g.add_argument("--env-id", default="CartPole-v1", help="gymnasium environment id")
    g.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="keywords for gymnasium.make")
    g.add_argument("--seed", type=int, default=1, help="seed of every random draw")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    num_workers = "rollout processes, 1: in-process (default: usable cores; Ray: the cluster's CPUs)"
    g.add_argument("--num-workers", type=int, default=cores, help=num_workers)
    g.add_argument("--ray-address", metavar="ADDRESS", help="a Ray cluster's HOST:PORT or auto (default: $RAY_ADDRESS)")
    g.add_argument("--population-size", type=int, default=256, help="members, even if mirrored")
    g.add_argument("--max-iter", type=int, default=1000, help="generations, counted from the run's start")
    g.add_argument("--num-rollouts", type=int, default=1, help="episodes per fitness evaluation (their mean)")
    g.add_argument("--max-episode-steps", type=int, help="episode length limit (default: the env's TimeLimit)")
    early_stop = "training episodes end after this many negative rewards in a row (default: 20 on CarRacing, else off)"
    g.add_argument("--max-negative-steps", type=int, help=early_stop)
    g.add_argument("--eval-every", type=int, default=10, help="evaluate the center every this many generations")
    g.add_argument("--num-eval-rollouts", type=int, default=100, help="episodes per evaluation")
    g.add_argument("--logs-dir", default="runs", help="parent folder of run folders")
    g.add_argument("--exp-name", default=SCRIPT[:-3], help="experiment name, part of the default run folder name")
    g.add_argument("--run-name", help="run folder name (default: <env-id>__<exp-name>__<seed>__<unix-time>)")
    g.add_argument("--resume", metavar="PATH", help="continue a run: its checkpoint.pkl or its folder")
    g.add_argument("--from-pretrained", metavar="PATH.npz", help="evaluate these weights; no training")
    g.add_argument("--init-from", metavar="PATH.npz", help="start training from these weights")
    g.add_argument("--capture-video", action="store_true", help="record an episode per evaluation (GIF or mp4)")
    goal = "stop when the evaluation mean reaches this; a center at it in training is evaluated at once"
    g.add_argument("--reward-goal", type=float, help=goal)
    g.add_argument("--consecutive-goal-stopping", type=int, default=1, help="... in this many evaluations in a row")
    g.add_argument("--quiet", action="store_true", help="no per-generation console lines, no progress bars")
    g.add_argument("--track", action="store_true", help="log the run to Weights & Biases (curves, weights, plot)")
    g.add_argument("--wandb-project-name", default="neuroevolution", help="W&B project of --track")
    g.add_argument("--wandb-entity", help="W&B entity (team or user) of --track (default: your default entity)")
    g = p.add_argument_group("OpenAI-ES")
    g.add_argument("--sigma", type=float, default=0.02, help="noise standard deviation")
    g.add_argument("--learning-rate", type=float, default=0.01, help="step size of the optimizer")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="update rule on the ES gradient")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, in [0, 1)")
    g.add_argument("--weight-decay", type=float, default=0.005, help="L2 coefficient on the parameters")
    g.add_argument("--lr-decay", type=float, default=1.0, help="learning rate factor per generation")
    g.add_argument("--lr-min", type=float, default=0.0, help="floor of the decayed learning rate")
    g.add_argument("--sigma-decay", type=float, default=1.0, help="sigma factor per generation")
    g.add_argument("--sigma-min", type=float, default=0.0, help="floor of the decayed sigma")
    g.add_argument("--antithetic", action=switch, default=True, help="mirrored pairs theta +/- sigma eps")
    g.add_argument("--fitness-shaping", choices=["centered-rank", "z-score", "none"], default="centered-rank")
    g.add_argument("--obs-norm", action=switch, default=True, help="normalize vector observations (running mean, std)")
    g = p.add_argument_group("policy")
    g.add_argument("--hidden-sizes", type=int, nargs="*", default=[64, 64], help="layer widths (after a conv net)")
    g.add_argument("--activation", choices=["tanh", "relu", "selu"], default="tanh", help="hidden activation")
    g.add_argument("--recurrent", action=switch, default=False, help="an LSTM core after the hidden layers")
    g.add_argument("--action-bounding", choices=["scale", "clip"], default="scale", help="Box: tanh to bounds, or clip")
    g.add_argument("--frame-size", type=int, default=64, help="pixels: square frame size (36 at least)")
    g.add_argument("--frame-stack", type=int, default=4, help="pixels: number of stacked frames")
    g.add_argument("--grayscale", action=switch, default=True, help="pixels: convert frames to grayscale")
    return p


class OneLineParser(argparse.ArgumentParser):
    """argparse raising UserError: main() reports it in one line, before anything is written."""

    def error(self, message):
        raise UserError(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples as written; each default once (a switch: none; --x/--no-x: the one on)."""

    def _get_help_string(self, action):
        text = action.help.replace(" (default: %(default)s)", "")  # as BooleanOptionalAction adds it
        if "(default" in text or action.default in (None, [], argparse.SUPPRESS):
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            return text + f" (default: {action.option_strings[0 if action.default else 1]})"
        return text if isinstance(action.default, bool) else text + " (default: %(default)s)"


def parse_args(argv=None):
    """(args, the set of flags given) of a checked command line; UserError for any bad value or combination."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = flags_given(parser, argv, args)
    args.env_kwargs = parse_env_kwargs(args.env_kwargs)
    check_numbers(vars(args), lambda key: "--" + key.replace("_", "-"))
    check_flags(args, given)  # and the settings, the paths
    check_placement(args, given)
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

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters


# -- 2. OpenAI-ES: the operators and the ask/tell object -----------------------------------------
def sample_noise(noise_seed, dim):
    """The perturbation direction eps ~ N(0, I) of one member: float32 (dim,), from its seed alone."""
    return np.random.default_rng(noise_seed).standard_normal(dim, dtype=np.float32)


def perturb(theta, sigma, noise_seed, sign):
    """Member parameters theta + sign * sigma * eps(noise_seed): float32 (D,). sign in {+1, -1}."""
    return theta + np.float32(sign * sigma) * sample_noise(noise_seed, theta.size)


def centered_ranks(x):
    """Ranks of x onto [-0.5, 0.5], ties sharing their mean rank, all equal: zeros (Salimans et al. 2017)."""
    x = np.asarray(x, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # rank of the first of each group of equal values
    return (first + (counts - 1) / 2.0)[inverse] / (x.size - 1) - 0.5


def shape_fitness(returns, method):
    """Fitness shaping: 'centered-rank', 'z-score' (zeros when all returns are equal) or 'none'."""
    returns = np.asarray(returns, dtype=np.float64)
    if method == "centered-rank":
        return centered_ranks(returns)
    if method == "z-score":
        std = returns.std()
        return (returns - returns.mean()) / std if std > 0 else np.zeros_like(returns)
    return returns


@dataclasses.dataclass(eq=False)
class OpenAIES:
    """OpenAI-ES as ask/tell (Salimans et al. 2017, Algorithm 2, mirrored sampling). `ask()`: (N, 2) int64 rows
    (noise seed, sign), member i = `perturb(theta, sigma, *row_i)`. `tell(returns)`: N returns in that order
    (higher is better) -> g on shaped fitness, weight decay, an Adam (Kingma & Ba 2015) or momentum-SGD step.
    `state_dict()` pickles for an exact resume; ValueError for impossible sizes, sigma, rate. Maximizing:

        es = OpenAIES(np.zeros(10), population_size=50, sigma=0.1, learning_rate=0.1)
        for generation in range(200):
            es.tell([-np.sum((x - 3) ** 2) for x in es.candidates()])  # es.theta -> 3
    """

    theta: np.ndarray  # the distribution mean, float32 (D,)
    population_size: int  # N members a generation
    sigma: float = 0.02  # noise standard deviation
    learning_rate: float = 0.01  # the optimizer's step size
    optimizer: str = "adam"  # "adam" or "sgd" (with momentum)
    momentum: float = 0.9  # SGD's momentum
    weight_decay: float = 0.005  # L2 coefficient on theta
    antithetic: bool = True  # mirrored pairs theta +/- sigma eps
    fitness_shaping: str = "centered-rank"  # returns -> fitness (`shape_fitness`)
    lr_decay: float = 1.0  # the learning rate's factor per generation
    lr_min: float = 0.0  # ... and its floor
    sigma_decay: float = 1.0  # sigma's factor per generation
    sigma_min: float = 0.0  # ... and its floor
    seed: int = 0  # of every noise draw
    generation: int = dataclasses.field(default=0, init=False)  # generations told
    grad_norm: float = dataclasses.field(default=0.0, init=False)  # of the last ascent step

    def __post_init__(self):
        if self.population_size < 2 or (self.antithetic and self.population_size % 2):
            raise ValueError("population_size must be >= 2, and even with antithetic sampling")
        if self.sigma <= 0 or self.learning_rate <= 0:
            raise ValueError("sigma and learning_rate must be > 0")
        self.theta = np.asarray(self.theta, dtype=np.float32).copy()
        self.m = np.zeros_like(self.theta)  # Adam first moment / SGD velocity
        self.v = np.zeros_like(self.theta)  # Adam second moment

    def ask(self):
        """The population: (N, 2) int64 of (noise seed, sign); mirrored pairs are rows 2k, 2k + 1."""
        seeds = np.array(self.noise_seeds(), dtype=np.int64)
        if self.antithetic:
            return np.stack([np.repeat(seeds, 2), np.tile([1, -1], seeds.size)], axis=1)
        return np.stack([seeds, np.ones_like(seeds)], axis=1)

    def tell(self, returns):
        """Update theta from the N returns of the members of `ask()`, in its order."""
        returns = np.asarray(returns, dtype=np.float64)
        if returns.shape != (self.population_size,):
            raise ValueError(f"expected {self.population_size} returns, got shape {returns.shape}")
        step = self.gradient(returns) - np.float32(self.weight_decay) * self.theta  # main bit: the ascent direction
        self.grad_norm = float(np.linalg.norm(step))
        if self.optimizer == "adam":
            beta1, beta2, eps = 0.9, 0.999, 1e-8  # Kingma & Ba's defaults
            t = self.generation + 1
            self.m = beta1 * self.m + (1 - beta1) * step
            self.v = beta2 * self.v + (1 - beta2) * step * step
            a = self.learning_rate * math.sqrt(1 - beta2**t) / (1 - beta1**t)
            self.theta = self.theta + np.float32(a) * self.m / (np.sqrt(self.v) + np.float32(eps))
        else:
            self.m = self.momentum * self.m + (1 - self.momentum) * step
            self.theta = self.theta + np.float32(self.learning_rate) * self.m
        self.theta = self.theta.astype(np.float32)
        self.generation += 1
        self.learning_rate = max(self.learning_rate * self.lr_decay, self.lr_min)
        self.sigma = max(self.sigma * self.sigma_decay, self.sigma_min)

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

    def noise_seeds(self):
        """The noise seeds of this generation's N/2 (mirrored) or N directions."""
        count = self.population_size // 2 if self.antithetic else self.population_size
        return [derive_seed(self.seed, NOISE_STREAM, self.generation, k) for k in range(count)]

    def candidates(self):
        """The members of `ask()` as vectors theta + sign * sigma * eps, in its order: float32 (N, D)."""
        return np.stack([perturb(self.theta, self.sigma, *member) for member in self.ask()])

    def state_dict(self):
        """A copy of everything the optimizer holds (numpy arrays and numbers), for the checkpoint."""
        return {key: (value.copy() if isinstance(value, np.ndarray) else value) for key, value in vars(self).items()}

    @classmethod
    def from_state_dict(cls, state):
        """The optimizer exactly as `state_dict()` saw it."""
        es = cls.__new__(cls)
        vars(es).update(state)
        return es


# -- 3. Policy, environment, rollout -------------------------------------------------------------
class Policy(nn.Module):
    """Deterministic policy. Vectors (obs_shape (O,)) are normalized by obs_mean, obs_std (float32 (O,)), clipped
    to [-5, 5] (Salimans et al. 2017), fed to an MLP in numpy; images (uint8 (frames, H, W[, 3])) in [0, 1] to a
    conv net (8x8/4 -> 16, 4x4/2 -> 32; Mnih et al. 2013), then the MLP in torch; `recurrent` adds an LSTMCell.
    Discrete: argmax; Box: tanh (env rescaled to [-1, 1]) or raw (env clips). Genotype: parameters_to_vector."""

    def __init__(
        self, obs_shape, num_actions, discrete, hidden_sizes, activation, recurrent, action_bounding, obs_norm
    ):
        super().__init__()
        self.obs_shape = tuple(obs_shape)
        self.discrete = discrete
        self.recurrent = recurrent
        self.pixels = len(self.obs_shape) > 1
        self.squash = not discrete and action_bounding == "scale"  # tanh onto [-1, 1]
        self.activation = ACTIVATIONS[activation]
        self.numpy_activation = NUMPY_ACTIVATIONS[activation]  # for the batched forward
        self.normalize = obs_norm and not self.pixels
        self.conv = None
        features = self.obs_shape[0]
        if self.pixels:
            channels = self.obs_shape[0] * (self.obs_shape[3] if len(self.obs_shape) == 4 else 1)  # RGB: x 3
            conv = [nn.Conv2d(channels, 16, 8, stride=4), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2), nn.ReLU()]
            self.conv = nn.Sequential(*conv, nn.Flatten(0))
            with torch.no_grad():
                features = self.conv(torch.zeros(channels, *self.obs_shape[1:3])).numel()
        obs_dim = features if self.normalize else 0  # normalized inputs
        self.obs_mean = np.zeros(obs_dim, np.float32)
        self.obs_std = np.ones(obs_dim, np.float32)
        self.layers = nn.ModuleList()
        for width in hidden_sizes:
            self.layers.append(nn.Linear(features, width))
            features = width
        self.lstm = nn.LSTMCell(features, features) if recurrent else None
        self.head = nn.Linear(features, num_actions)
        self.requires_grad_(False)  # evolved, never backpropagated
        # The hot path reads plain lists (a Module attribute costs ~0.3 us); vector_to_parameters keeps them valid.
        self.linear_params = [(layer.weight, layer.bias) for layer in [*self.layers, self.head]]
        self.load(parameters_to_vector(self.parameters()).numpy())

    def load(self, params):
        """Set the weights from a flat genotype (D,), copied as float32. Returns the policy."""
        vector_to_parameters(torch.from_numpy(np.array(params, dtype=np.float32)), self.parameters())
        self.numpy_layers = [(w.numpy()[None], b.numpy()[None]) for w, b in self.linear_params]  # stacked_layers' B=1
        return self

    def forward(self, x, state=None):
        """x: one preprocessed observation, float32 (O,) or (C, H, W). Returns (output (A,), state)."""
        h = self.conv(x) if self.pixels else x
        for weight, bias in self.linear_params[:-1]:  # addmv: half of nn.Linear's cost on one vector
            h = self.activation(torch.addmv(bias, weight, h))
        if self.recurrent:
            state = self.lstm(h, state)
            h = state[0]
        out = torch.addmv(self.linear_params[-1][1], self.linear_params[-1][0], h)
        return (torch.tanh(out) if self.squash else out), state

    def normalized(self, obs):
        """Vector observation(s) (..., O) as float32, normalized and clipped to [-5, 5] with obs_norm."""
        x = np.asarray(obs, dtype=np.float32)
        return np.clip((x - self.obs_mean) / self.obs_std, np.float32(-5.0), np.float32(5.0)) if self.normalize else x

    def act(self, obs, state=None):
        """obs: one env observation (numpy). Returns (action: int or float32 (A,), recurrent state)."""
        if not (self.pixels or self.recurrent):
            return act_batch(self, np.asarray(obs)[None], self.numpy_layers)[0], state
        if self.pixels:
            x = torch.from_numpy(np.asarray(obs)).float().div_(255.0)
            if x.dim() == 4:  # (frames, H, W, 3) -> (frames * 3, H, W)
                x = x.permute(0, 3, 1, 2).flatten(0, 1)
        else:
            x = torch.from_numpy(self.normalized(obs))
        out, state = self(x, state)
        return (int(out.argmax()) if self.discrete else out.numpy()), state


def make_env(env_config, training, render_mode=None):
    """`gymnasium.make` and gymnasium's wrappers: frames as uint8 (frame_stack, frame_size, frame_size[, 3]), Box
    actions rescaled to [-1, 1] (tanh) or clipped. UserError for an env that fails or a space not handled."""
    kwargs = dict(env_config["env_kwargs"])
    if env_config["max_episode_steps"] is not None:
        kwargs["max_episode_steps"] = env_config["max_episode_steps"]
    env = gym_make(env_config["env_id"], render_mode, kwargs)  # gymnasium.make; UserError if it fails
    env = gym.wrappers.RenderCollection(env) if render_mode is not None else env
    if training and env_config["max_negative_steps"] > 0:
        env = NegativeRewardEarlyStop(env, env_config["max_negative_steps"])
    check_spaces(env, env_config)  # UserError for the spaces the policy cannot handle
    space = env.action_space
    if isinstance(space, gym.spaces.Box):  # 1-D
        if env_config["action_bounding"] == "clip":
            env = gym.wrappers.ClipAction(env)
        elif not (np.all(space.low == -1) and np.all(space.high == 1)):
            bound = np.ones(space.shape, dtype=space.dtype)  # in the space's dtype: no precision warning
            env = gym.wrappers.RescaleAction(env, -bound, bound)
    if is_frames(env.observation_space):  # uint8 (H, W) or (H, W, 3)
        if env_config["grayscale"] and len(env.observation_space.shape) == 3:
            env = gym.wrappers.GrayscaleObservation(env)
        env = resize_frames(env, env_config["frame_size"])  # gymnasium's ResizeObservation
        env = gym.wrappers.FrameStackObservation(env, env_config["frame_stack"])
    return env


def rollout(policy, genotypes, env_for, env_seeds, observations=None):
    """The episode loop of training, evaluation and video: member b of genotypes float32 (B, D) plays an
    episode per seed of env_seeds[b] on env_for(b), the B members stepped together (lockstep), each
    episode exactly what it is alone (B = 1: the plain loop). observations: None or B lists that get
    what each member sees (--obs-norm). Returns (B lists of episode returns, B env step counts)."""
    members = Members(policy, genotypes)  # acts for the members still playing
    seeds = [list(member_seeds) for member_seeds in env_seeds]
    returns = [[] for _ in seeds]
    steps = [0 for _ in seeds]
    totals = [0.0 for _ in seeds]
    envs = [env_for(b) for b in range(len(seeds))]
    obs = [envs[b].reset(seed=seeds[b].pop(0))[0] for b in range(len(seeds))]
    playing = list(range(len(seeds)))
    with torch.inference_mode():
        while playing:
            if observations is not None:
                for b in playing:
                    observations[b].append(obs[b])
            actions = members.act([obs[b] for b in playing], playing)
            finished = []
            for b, action in zip(playing, actions):
                obs[b], reward, terminated, truncated, _ = envs[b].step(action)
                totals[b] += float(reward)
                steps[b] += 1
                if terminated or truncated:
                    returns[b].append(totals[b])
                    totals[b] = 0.0
                    members.end_episode(b)
                    if seeds[b]:
                        envs[b] = env_for(b)
                        obs[b], _ = envs[b].reset(seed=seeds[b].pop(0))
                    else:
                        finished.append(b)
            playing = [b for b in playing if b not in finished]
    return returns, steps


# -- 4. Training loop ----------------------------------------------------------------------------
class RolloutTask(typing.NamedTuple):
    """A worker's job: theta + sign * sigma * eps(noise_seed) (sign 0: theta) drives an episode per env seed."""

    noise_seed: int
    sign: int
    sigma: float
    env_seeds: list
    training: bool


class RolloutResult(typing.NamedTuple):
    """Its episodes' returns, env steps, and with --obs-norm its observations' (count, sum, sum of squares)."""

    episode_returns: list
    steps: int
    obs_sums: tuple


def train(args, given):
    """OpenAI-ES, each generation: ask -> rollouts of the members and the center -> tell -> record -> evaluate
    the center -> checkpoint. The exit code: 0; 1: workers lost; 130: Ctrl-C or SIGTERM (checkpoint kept)."""
    with Run(args, given) as run:  # from the flags or a checkpoint: folder, policy, optimizer, workers
        es = run.es
        evaluation = None
        while es.generation < run.args.max_iter:
            tasks = generation_tasks(es, run.args)  # the members of es.ask(), then the center
            results = run.rollouts(tasks)  # (noting the sigma and learning rate they are drawn with)
            returns = np.array([np.mean(result.episode_returns) for result in results[:-1]])
            center_return = float(np.mean(results[-1].episode_returns))
            es.tell(returns)
            run.obs_stats.add(results)  # in task order: independent of scheduling
            run.recorder.count_generation(returns, sum(result.steps for result in results))
            evaluation = None
            scheduled = es.generation % run.args.eval_every == 0
            if scheduled or run.recorder.reaches_goal(center_return):  # off schedule: screened first
                evaluation = evaluate_center(run, screen=not scheduled)
            run.record(returns, center_return, evaluation)  # progress.csv, TensorBoard, W&B, console
            run.save_checkpoint()
            if run.recorder.goal_reached():
                break
        run.finish(evaluation)  # final.npz and the learning curve
    return run.recorder.exit_code


def generation_tasks(es, args):
    """A generation's RolloutTasks: the members of `es.ask()`, then the unperturbed center."""
    tasks = []
    for i, (noise_seed, sign) in enumerate(es.ask()):
        pair = i // 2 if args.antithetic else i  # a mirrored pair shares its env seeds
        seeds = [derive_seed(args.seed, TRAIN_ENV_STREAM, es.generation, pair, r) for r in range(args.num_rollouts)]
        tasks.append(RolloutTask(int(noise_seed), int(sign), es.sigma, seeds, True))
    seeds = [derive_seed(args.seed, CENTER_ENV_STREAM, es.generation, r) for r in range(args.num_rollouts)]
    tasks.append(RolloutTask(0, 0, 0.0, seeds, True))
    return tasks


def evaluate_center(run, screen=False):
    """Evaluate theta after this generation: {mean, std, episodes}; None when `screen` stopped it early."""
    mean_std = run.obs_stats.mean_std()  # theta's observation normalization
    returns, steps, evaluation = evaluate(run.pool, run.es.theta, mean_std, run.args, run.es.generation, screen)
    run.recorder.count_steps(steps)
    if returns.size < run.args.num_eval_rollouts:
        run.recorder.screened_out(evaluation)
        return None
    run.record_evaluation(run.es.theta, evaluation)  # best.npz, the goal streak, the console line, the video
    return evaluation


# == Machinery: a first-time reader may skip what follows (checks, the run, workers, files, main) ==
import contextlib
import csv
import fcntl
import functools
import importlib
import io
import logging
import multiprocessing as mp
import pickle
import platform
import shutil
import socket
import tempfile
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

PROGRESS_COLUMNS = [
    "iteration",
    "evaluations",
    "env_steps",
    "wall_time_s",
    "return_min",
    "return_mean",
    "return_max",
    "return_std",
    "eval_return_mean",
    "eval_return_std",
    "center_return",
    "center_rank",
    "sigma",
    "learning_rate",
    "grad_norm",
    "param_norm",
    "num_cpus",
]
# learning_curve.png's curves of progress.csv's columns (the first drawn boldest), with the evaluations.
CURVES = [
    ("return_mean", "population mean"),
    ("return_max", "population max"),
    ("center_return", "center (unperturbed)"),
]
# Flags --resume may set anew (the rest comes from the checkpoint); where a run executes is never restored.
PLACEMENT_FLAGS = {"num_workers", "ray_address"}
RESUME_FLAGS = {
    "resume",
    "max_iter",
    "eval_every",
    "num_eval_rollouts",
    "capture_video",
    "quiet",
    "reward_goal",
    "consecutive_goal_stopping",
    "track",
    "wandb_project_name",
    "wandb_entity",
    *PLACEMENT_FLAGS,
}
# Settings that --init-from / --from-pretrained take from the weights file's meta ("env" and "policy").
META_FLAGS = {
    "env": ("env_kwargs", "frame_size", "frame_stack", "grayscale"),
    "policy": ("hidden_sizes", "activation", "recurrent", "action_bounding", "obs_norm"),
}
# A run's totals, kept in its checkpoint.
COUNTERS = ("evaluations", "env_steps", "wall_time_s", "best_return", "best_eval", "goal_streak")
# A run folder's files, as the last console line names them.
RUN_FILES = ("args.json", "progress.csv", "learning_curve.png", "checkpoint.pkl", "final.npz", "best.npz", "videos/")
# A checkpoint's parts beyond args and counters (obs_stats: None without --obs-norm); no other package's objects.
CHECKPOINT_PARTS = {"es": dict, "obs_stats": (dict, type(None))}
CHECKPOINT_MODULES = ()
INT_MAX = 2**31 - 1  # counts and sizes stop here
# (smallest, largest[, True: smallest excluded]) of every number a flag or a weights file's meta sets.
LIMITS = {
    "seed": (0, 2**64 - 1),
    "num_workers": (1, INT_MAX),
    "population_size": (2, INT_MAX),
    "max_iter": (1, INT_MAX),
    "num_rollouts": (1, INT_MAX),
    "max_episode_steps": (1, INT_MAX),
    "max_negative_steps": (0, INT_MAX),
    "eval_every": (1, INT_MAX),
    "num_eval_rollouts": (1, INT_MAX),
    "consecutive_goal_stopping": (1, INT_MAX),
    "reward_goal": (-math.inf, math.inf),
    "sigma": (0.0, math.inf, True),
    "learning_rate": (0.0, math.inf, True),
    "momentum": (0.0, math.nextafter(1.0, 0.0)),  # [0, 1): up to the largest float below 1
    "weight_decay": (0.0, math.inf),
    "lr_decay": (0.0, 1.0, True),
    "lr_min": (0.0, math.inf),
    "sigma_decay": (0.0, 1.0, True),
    "sigma_min": (0.0, math.inf),
    "hidden_sizes": (1, INT_MAX),
    "frame_size": (36, INT_MAX),
    "frame_stack": (1, INT_MAX),
}


# Checks: flags, settings, environments
def flags_given(parser, argv, args):
    """The set of flags (dest names) typed in `argv`: those whose marker argparse replaced."""
    markers = argparse.Namespace(**{name: parser for name in vars(args)})
    typed = parser.parse_args(argv, namespace=markers)
    return {name for name, value in vars(typed).items() if value is not parser}


def check_flags(args, given):
    """UserError for flags that exclude each other or that the checkpoint or weights file sets, settings that do
    not fit (check_settings), paths that are not readable files (--resume: or a run folder holding one), folder
    names with separators, a --logs-dir this user cannot write to."""
    if sum(x is not None for x in (args.resume, args.from_pretrained, args.init_from)) > 1:
        raise UserError("--resume, --from-pretrained and --init-from exclude each other")
    fixed = given - RESUME_FLAGS
    if args.resume and fixed:
        flag = "--" + min(fixed).replace("_", "-")
        raise UserError(f"{flag} cannot be changed on resume: the run's settings come from its checkpoint")
    fixed = given & {*META_FLAGS["env"], *META_FLAGS["policy"]}
    if (args.init_from or args.from_pretrained) and fixed:
        flag = "--" + min(fixed).replace("_", "-")
        raise UserError(f"{flag} comes from the weights file's meta; do not restate the architecture")
    check_settings(args)
    for flag in ("resume", "from_pretrained", "init_from"):
        path = getattr(args, flag)
        path = os.path.join(path, "checkpoint.pkl") if flag == "resume" and path and os.path.isdir(path) else path
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            problem = "is not a readable file" if os.path.exists(path) else "does not exist"
            raise UserError(f"--{flag.replace('_', '-')} {path} {problem}" + (": no checkpoint" * (flag == "resume")))
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


def parse_env_kwargs(items):
    """--env-kwargs KEY=VALUE items as a dict, VALUE as JSON where it parses, else a string. UserError."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--env-kwargs expects KEY=VALUE items with a name as KEY, got {item!r}")
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
        kwargs[key] = value
    return kwargs


def all_finite(value):
    """False if a JSON value holds a NaN or an infinite number at any depth: 1e400, [1, NaN], {"a": -Infinity}."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return all(all_finite(item) for item in value)
    return True


def check_settings(args):
    """UserError unless the settings fit together and the env id is registered (flags or a weights file)."""
    for key, value in args.env_kwargs.items():
        if not all_finite(value):
            raise UserError(f"--env-kwargs {key} must hold finite numbers only, got {value!r}")
    if args.antithetic and args.population_size % 2:
        raise UserError("--population-size must be even with mirrored sampling (or pass --no-antithetic)")
    if args.recurrent and not args.hidden_sizes:
        raise UserError("--recurrent needs at least one hidden layer")
    try:
        register_env_family(args.env_id)
        gym.spec(args.env_id)
    except gym.error.Error as e:
        raise UserError(f"unknown --env-id {args.env_id!r}: {first_line(e)}") from None


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


def is_frames(space):
    """Whether an observation space holds uint8 frames, (H, W) or (H, W, 3)."""
    if not (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8):
        return False
    return len(space.shape) == 2 or (len(space.shape) == 3 and space.shape[-1] == 3)


def check_spaces(env, env_config):
    """UserError unless the policy can use the env's spaces: Discrete or 1-D Box actions (bounded unless
    clipped), 1-D Box vectors or uint8 frames."""
    space = env.action_space
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        bounded = np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))
        if env_config["action_bounding"] != "clip" and not bounded:
            raise UserError(f"action space {space} has infinite bounds: use --action-bounding clip")
    elif not isinstance(space, gym.spaces.Discrete):
        raise UserError(f"action space {space} is not supported: only Discrete and 1-D Box")
    space = env.observation_space
    vectors = isinstance(space, gym.spaces.Box) and len(space.shape) == 1
    if not (is_frames(space) or vectors):
        raise UserError(f"observation space {space} is not supported: only 1-D Box vectors and uint8 images")


def resize_frames(env, size):
    """gymnasium's ResizeObservation to size x size; UserError without OpenCV."""
    try:
        return gym.wrappers.ResizeObservation(env, (size, size))
    except gym.error.DependencyNotInstalled:
        raise UserError("resizing frames needs OpenCV: pip install opencv-python-headless") from None


def gym_make(env_id, render_mode, kwargs):
    """gymnasium.make(env_id, render_mode=..., **kwargs), the optional envs it needs registered first;
    UserError when it fails."""
    register_env_family(env_id)
    try:
        return gym.make(env_id, render_mode=render_mode, **kwargs)
    except (gym.error.Error, TypeError, ValueError, AssertionError) as e:
        raise UserError(f"cannot make env {env_id!r} with {kwargs}: {first_line(e)}") from None


def register_env_family(env_id):
    """Register the optional envs an id needs (ALE/...: ale-py). UserError when they are not installed."""
    if env_id.startswith("ALE/"):
        try:
            import ale_py
        except ImportError:
            raise UserError(f"{env_id} needs the Atari extra: pip install ale-py") from None
        gym.register_envs(ale_py)


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


# Observation normalization
class ObservationStats:
    """Running statistics of the training episodes' vector observations (Salimans et al. 2017): count, sum and
    sum of squares, float64 (O,); mean 0 and variance 1 to start (a pseudo-count of 1e-2). O = 0 without
    --obs-norm (or for images): nothing is counted, mean and std are empty. In a checkpoint: {count, sum, sumsq}
    (`state_dict`); in a weights file's meta: {mean, std, count} (`meta`)."""

    def __init__(self, dim):
        self.count = 1e-2
        self.sum = np.zeros(dim)
        self.sumsq = np.full(dim, 1e-2)

    def add(self, results):
        """Count the observations of the RolloutResults that hold them, in task order."""
        for result in results:
            if result.obs_sums is not None:
                count, total, sumsq = result.obs_sums
                self.count += count
                self.sum += total
                self.sumsq += sumsq

    def mean_std(self):
        """(mean, std), float32 (O,) each; std floored at 0.1 as in the paper."""
        mean = self.sum / self.count
        std = np.sqrt(np.maximum(self.sumsq / self.count - mean**2, 1e-2))
        return mean.astype(np.float32), std.astype(np.float32)

    def state_dict(self):
        return {"count": self.count, "sum": self.sum, "sumsq": self.sumsq}

    @classmethod
    def from_state_dict(cls, state):
        stats = cls(0)  # copies: unpickled arrays may be read-only
        vars(stats).update(count=float(state["count"]), sum=state["sum"].copy(), sumsq=state["sumsq"].copy())
        return stats

    def meta(self):
        mean, std = self.mean_std()
        return {"mean": mean.tolist(), "std": std.tolist(), "count": self.count}

    @classmethod
    def from_meta(cls, norm):
        mean, std, count = np.array(norm["mean"]), np.array(norm["std"]), norm["count"]
        stats = cls(0)
        vars(stats).update(count=count, sum=mean * count, sumsq=(std**2 + mean**2) * count)
        return stats


# Evaluations
# A center at --reward-goal in training is evaluated at once; most are one lucky episode, which a screen catches.
SCREEN_EPISODES = 10


def evaluate(pool, theta, mean_std, args, iteration, screen=False):
    """theta over --num-eval-rollouts episodes (no early stop): (returns float64 (E,), env steps, {mean, std,
    episodes}). With `screen`, the other episodes run only when the first SCREEN_EPISODES reach --reward-goal on
    average (else E = SCREEN_EPISODES: nothing is recorded); one that passes equals one without a screen."""
    episodes = range(args.num_eval_rollouts)
    seeds = [derive_seed(args.seed, EVAL_ENV_STREAM, iteration, episode) for episode in episodes]
    tasks = [RolloutTask(0, 0, 0.0, [seed], False) for seed in seeds]
    first = SCREEN_EPISODES if screen else len(tasks)
    shared = (theta, *mean_std)
    results = pool.map(tasks[:first], shared, f"evaluation {iteration}")
    screened = np.mean([result.episode_returns[0] for result in results])
    if tasks[first:] and screened >= args.reward_goal:
        results += pool.map(tasks[first:], shared, f"evaluation {iteration}")
    returns = np.array([result.episode_returns[0] for result in results])
    steps = sum(result.steps for result in results)
    return returns, steps, summary(returns)


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
    """An OpenAI-ES run (a context manager), from the flags or a checkpoint: configs, optimizer, observation
    statistics, workers; `recorder` keeps the records and turns Ctrl-C, SIGTERM, lost workers into the exit code."""

    def __init__(self, args, given):
        checkpoint = None
        init = None
        if args.resume:
            args, checkpoint, run_dir = self.resume(args, given)
        else:
            if args.init_from:
                init = read_weights_into_args(args, given)
            run_dir = os.path.join(args.logs_dir, args.run_name or default_run_name(args))
        self.args = args
        torch.manual_seed(args.seed)
        self.env_config, self.policy_config, policy, self.dim, obs_dim = build_policy(args, init)
        self.normalize = policy.normalize
        self.obs_stats = ObservationStats(obs_dim)
        counters = {}
        resumed = None  # the generation the checkpoint holds
        if checkpoint:
            counters = self.resume_from(checkpoint, self.resumed_from)
            resumed = self.es.generation
        else:
            theta = parameters_to_vector(policy.parameters()).numpy()
            if init:
                theta = init[0]
                if self.normalize and init[1]["obs_norm"]:
                    self.obs_stats = ObservationStats.from_meta(init[1]["obs_norm"])
            settings = [field.name for field in dataclasses.fields(OpenAIES) if field.init][1:]  # flags, by name
            self.es = OpenAIES(theta, **{name: getattr(args, name) for name in settings})
        worker_args = (self.env_config, self.policy_config)
        sizes = [self.dim, obs_dim, obs_dim]  # theta, obs mean and std
        title = f"OpenAI-ES on {args.env_id} (seed {args.seed})"
        config = {"env_config": self.env_config, "num_params": self.dim}
        records = (run_dir, title, PROGRESS_COLUMNS, config, counters, self.es.generation, resumed)
        self.start(worker_args, sizes, *records)
        self.announce(policy, self.dim)

    def resume_from(self, checkpoint, path):
        """The optimizer and observation statistics of a checkpoint; returns its counters. UserError if incomplete."""
        stats = checkpoint.get("obs_stats")  # None without --obs-norm
        es_complete = set(vars(OpenAIES(np.zeros(1), 2))) <= set(checkpoint["es"])
        stats_complete = stats is not None and {"count", "sum", "sumsq"} <= set(stats)
        if not es_complete or (self.normalize and not stats_complete):
            raise UserError(f"{path} is not a complete {SCRIPT} checkpoint")
        self.es = OpenAIES.from_state_dict(checkpoint["es"])
        if self.normalize:
            self.obs_stats = ObservationStats.from_state_dict(stats)
        return checkpoint["counters"]

    def meta(self, evaluation=None):
        """A weights file's meta: what rebuilds the policy and its env, the evaluation."""
        args = self.args
        norm = self.obs_stats.meta() if self.normalize else None
        return {
            "format_version": FORMAT_VERSION,
            "script": SCRIPT,
            "env_id": args.env_id,
            "env": self.env_config,
            "policy": self.policy_config,
            "obs_norm": norm,
            "evaluation": evaluation,
            "seed": args.seed,
            "iteration": self.es.generation,
            "num_params": self.dim,
        }

    def rollouts(self, tasks):
        """The generation's RolloutResults, in task order, with a progress bar on a terminal."""
        self.drawn_with = (self.es.sigma, self.es.learning_rate)  # before `tell`, which may decay them
        shared = (self.es.theta, *self.obs_stats.mean_std())
        return self.pool.map(tasks, shared, f"generation {self.es.generation + 1}")

    def video_policy(self, theta):
        """(env config, policy) of a video of theta."""
        return self.env_config, make_policy(self.policy_config, theta, self.obs_stats.mean_std())

    def record(self, returns, center_return, evaluation):
        """The generation's row (Recorder's) with the ES scalars: the center's training return and rank."""
        sigma, learning_rate = self.drawn_with
        rank = int(np.sum(returns > center_return)) + 1  # 1: no member beat it
        scalars = {
            "center_return": center_return,
            "center_rank": rank,
            "sigma": sigma,
            "learning_rate": learning_rate,
            "grad_norm": self.es.grad_norm,
            "param_norm": float(np.linalg.norm(self.es.theta)),
            "num_cpus": self.pool.num_cpus,
        }
        note = f"center {center_return:8.2f} rank {rank:>4d} | sigma {sigma:.4f} lr {learning_rate:.4f}"
        self.recorder.record(returns, evaluation, scalars, note)

    def save_checkpoint(self):
        """checkpoint.pkl (Recorder's) with the optimizer and the observation statistics."""
        stats = self.obs_stats.state_dict() if self.normalize else None
        self.recorder.save_checkpoint({"es": self.es.state_dict(), "obs_stats": stats})

    def finish(self, evaluation=None):
        """final.npz (theta, its evaluation in meta) and the last curve. evaluation: the last generation's own;
        else one runs outside the run's record, so a resumed run equals one made in one go."""
        if evaluation is None:
            mean_std = self.obs_stats.mean_std()
            _, _, evaluation = evaluate(self.pool, self.es.theta, mean_std, self.args, self.es.generation)
        self.recorder.finish(self.es.theta, evaluation, self.meta(evaluation))


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


def configs(args):
    """(env config, policy config): what workers, evaluations and weights files need; sizes from a probe env."""
    max_negative_steps = args.max_negative_steps
    if max_negative_steps is None:  # CarRacing's early stop is on by default
        max_negative_steps = 20 if args.env_id.startswith("CarRacing") else 0
    settings = vars(args) | {"max_negative_steps": max_negative_steps}
    env_keys = ("env_id", "env_kwargs", "max_episode_steps", "max_negative_steps", "action_bounding")
    env_config = {key: settings[key] for key in (*env_keys, "frame_size", "frame_stack", "grayscale")}
    env = make_env(env_config, training=False)
    try:  # an env that cannot even take one step is bad input: found now, before any file is written
        env.reset(seed=0)
        env.step(env.action_space.sample())
    except Exception as e:
        raise UserError(f"env {args.env_id!r} with {args.env_kwargs} fails to step: {type(e).__name__}: {e}") from None
    discrete = isinstance(env.action_space, gym.spaces.Discrete)
    env.close()
    return env_config, {
        "obs_shape": list(env.observation_space.shape),
        "discrete": discrete,
        "num_actions": int(env.action_space.n) if discrete else int(env.action_space.shape[0]),
        **{key: settings[key] for key in META_FLAGS["policy"]},
    }


def make_policy(policy_config, params=None, obs_mean_std=None):
    """Policy of a config dict (`configs`, or a weights file's meta) holding `params` (float32 (D,), else
    torch's initialization) and the normalization (mean, std) of vector observations."""
    torch.set_num_threads(1)
    try:
        policy = Policy(**policy_config)
    except RuntimeError:  # torch's allocator refused the layers' weights
        raise MemoryError(f"hidden layers {policy_config['hidden_sizes']} do not fit in memory") from None
    policy = policy.load(params) if params is not None else policy
    if policy.normalize and obs_mean_std is not None:
        policy.obs_mean, policy.obs_std = (np.asarray(a, np.float32) for a in obs_mean_std)
    return policy


def build_policy(args, weights=None):
    """(env config, policy config, a policy at torch's initialization, D parameters, O normalized inputs);
    UserError unless `weights` (params, meta) from a file fit the env's spaces and the policy's sizes."""
    env_config, policy_config = configs(args)
    policy = make_policy(policy_config)
    dim, obs_dim = sum(p.numel() for p in policy.parameters()), policy.obs_mean.size
    if weights:
        (params, meta), path, want = (weights, args.init_from or args.from_pretrained, weights[1]["policy"])
        if any(want.get(key) != policy_config[key] for key in ("obs_shape", "discrete", "num_actions")):
            raise UserError(
                f"{path} does not fit {meta['env_id']}: its policy takes observations "
                f"{want.get('obs_shape')} and {want.get('num_actions')} actions, the env gives "
                f"{policy_config['obs_shape']} and {policy_config['num_actions']}"
            )
        norm_size = len(meta["obs_norm"]["mean"]) if meta["obs_norm"] else 0
        if params.size != dim or norm_size != obs_dim:
            raise UserError(
                f"{path} holds {params.size} parameters and {norm_size} observation statistics but "
                f"its architecture needs {dim} and {obs_dim}"
            )
    return env_config, policy_config, policy, dim, obs_dim


def default_run_name(args, kind=""):
    """<env-id>__<exp-name>[kind]__<seed>__<unix-time> (CleanRL's run names)."""
    return f"{args.env_id.replace('/', '-')}__{args.exp_name}{kind}__{args.seed}__{int(time.time())}"


# Workers
LOCKSTEP_MAX = 16  # episodes one worker steps together at most: more gains little on small MLPs


def derive_seed(*keys):
    """A 32-bit seed of integer keys >= 0 (seed, stream, generation, ...): numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


class PoolLost(Exception):
    """Workers keep dying or the Ray cluster is gone: the run stops, its last checkpoint kept (exit 1)."""


# The batched forward: B members' MLPs in one numpy pass (lockstep rollouts)
def numpy_selu(h):
    """torch.selu in numpy float32, with torch's constants."""
    negative = np.float32(1.6732632423543772) * np.expm1(np.minimum(h, np.float32(0)))
    return np.float32(1.0507009873554805) * np.where(h > 0, h, negative)


ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "selu": torch.selu}  # the Policy's; in numpy:
NUMPY_ACTIVATIONS = {"tanh": np.tanh, "relu": lambda h: np.maximum(h, np.float32(0)), "selu": numpy_selu}


def stacked_layers(policy, genotypes):
    """The MLP layers of B genotypes float32 (B, D): [(weights (B, out, in), biases (B, out))], views."""
    layers, offset = [], 0
    for weight, _ in policy.linear_params:
        rows, cols = weight.shape
        end = offset + rows * cols  # of the weights, then the biases
        layers.append((genotypes[:, offset:end].reshape(-1, rows, cols), genotypes[:, end : end + rows]))
        offset = end + rows
    return layers


def act_batch(policy, obs, layers):
    """B members' observations (B, O) through their own MLPs (`stacked_layers`), in numpy (twice torch's speed on
    one vector): B actions, ints or float32 (B, A); row b exactly what member b alone gives."""
    x = policy.normalized(obs)
    for weight, bias in layers[:-1]:
        x = policy.numpy_activation(np.matmul(weight, x[:, :, None])[:, :, 0] + bias)
    out = np.matmul(layers[-1][0], x[:, :, None])[:, :, 0] + layers[-1][1]
    return out.argmax(axis=1).tolist() if policy.discrete else (np.tanh(out) if policy.squash else out)


class Members:
    """B genotypes float32 (B, D) acting together in `rollout`: an MLP in one numpy pass (`act_batch`), a conv or
    LSTM policy one member (B = 1; ValueError otherwise). `act(observations, playing)`: the actions of the members
    `playing` (ascending indices); `end_episode(b)`: member b's recurrent state back to None."""

    def __init__(self, policy, genotypes):
        self.policy = policy
        self.genotypes = genotypes
        self.batched = not (policy.pixels or policy.recurrent)
        self.states = [None for _ in genotypes]
        self.playing = list(range(len(genotypes)))
        if self.batched:
            self.layers = stacked_layers(policy, genotypes)
        elif len(genotypes) == 1:
            policy.load(genotypes[0])
        else:
            raise ValueError(f"a conv or LSTM policy plays one member at a time, got {len(genotypes)}")

    def act(self, observations, playing):
        if not self.batched:
            action, self.states[0] = self.policy.act(observations[0], self.states[0])
            return [action]
        if playing != self.playing:
            self.playing = playing
            self.layers = stacked_layers(self.policy, self.genotypes[playing])
        return act_batch(self.policy, np.stack(observations), self.layers)

    def end_episode(self, b):
        self.states[b] = None


class RolloutWorker:
    """One worker's envs and policy, built once; `use(theta, obs_mean, obs_std)` points it at a batch's float32
    arrays (no copy). `run(tasks)`: RolloutTasks of one kind (sign 0: the center; an MLP's in one `rollout`) ->
    per task (returns, steps, sums): sums None, or with --obs-norm a training task's observations' (count, sum,
    sum of squares float64 (O,))."""

    def __init__(self, env_config, policy_config):
        self.env_config = env_config
        self.policy = make_policy(policy_config)
        self.batched = not (self.policy.pixels or self.policy.recurrent)  # an MLP: a chunk in one rollout
        self.envs = {True: [], False: []}  # training / evaluation envs, one per task of a chunk
        # A Box2D world keeps state across resets (BipedalWalker returns drift on a reused env): a fresh env each.
        probe = make_env(env_config, training=False)
        self.fresh_env_per_episode = type(probe.unwrapped).__module__.startswith("gymnasium.envs.box2d")
        probe.close()

    def use(self, theta, obs_mean, obs_std):
        self.center = theta
        if self.policy.normalize:
            self.policy.obs_mean = obs_mean
            self.policy.obs_std = obs_std

    def env(self, slot, training):
        """Env `slot` of this kind for a new episode: built at its first use (Box2D: anew each episode)."""
        envs = self.envs[training]
        if slot == len(envs):
            envs.append(make_env(self.env_config, training))
        elif self.fresh_env_per_episode:
            envs[slot].close()
            envs[slot] = make_env(self.env_config, training)
        return envs[slot]

    def run(self, tasks):
        if not self.batched and len(tasks) > 1:
            return [result for task in tasks for result in self.run([task])]
        training = tasks[0].training
        genotypes = [self.center for _ in tasks]  # sign 0: the center
        for b, task in enumerate(tasks):
            if task.sign:
                genotypes[b] = perturb(self.center, task.sigma, task.noise_seed, task.sign)
        observations = [[] for _ in tasks] if training and self.policy.normalize else None
        envs = functools.partial(self.env, training=training)  # env b of this kind
        env_seeds = [task.env_seeds for task in tasks]
        returns, steps = rollout(self.policy, np.stack(genotypes), envs, env_seeds, observations)
        sums = [None for _ in tasks]
        for b, seen in enumerate(observations or []):
            seen = np.asarray(seen, dtype=np.float64)
            sums[b] = (len(seen), seen.sum(axis=0), np.square(seen).sum(axis=0))
        return list(zip(returns, steps, sums))


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


# Weights and checkpoints
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


def save_weights(path, params, meta):
    """Weights file (.npz), atomically: `params` float32 (D,), `meta` a dict as a 0-d unicode array of JSON."""
    params = np.asarray(params, dtype=np.float32)
    atomic_write(path, lambda f: np.savez(f, params=params, meta=np.array(json.dumps(meta))))


def load_weights(path):
    """(params float32 (D,), meta dict) of a weights file of this script. UserError for a missing or corrupt
    file, one without meta (such as the AttentionAgent authors' weights) or another script's, non-finite
    parameters, and a meta whose settings the command line would refuse (env id, sizes, names)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "params" not in data or "meta" not in data:
                raise UserError(f"{path} is not a {SCRIPT} weights file (it needs 'params' and 'meta' arrays)")
            params, meta = data["params"].astype(np.float32).ravel(), json.loads(str(data["meta"]))
        script, version = meta.get("script", "an unknown script"), meta.get("format_version")
        if script != SCRIPT:
            raise UserError(f"{path} was written by {script}, not {SCRIPT}")
        if version != FORMAT_VERSION:
            raise UserError(f"{path} has weights format {version}, this script reads {FORMAT_VERSION}")
        if not np.all(np.isfinite(params)):
            raise UserError(f"{path} holds parameters that are not finite numbers")
        settings = {"env_id": meta["env_id"], **{k: meta[part][k] for part, keys in META_FLAGS.items() for k in keys}}
        check_numbers(settings, lambda key: f"its {key}")
        defaults = vars(build_parser().parse_args([])) | {"env_kwargs": {}}  # the kinds of the flags' values
        wrong = [key for key, value in settings.items() if type(value) is not type(defaults[key])]
        choices = {"activation": ACTIVATIONS, "action_bounding": ("scale", "clip")}  # the Policy's
        wrong += [key for key, known in choices.items() if settings[key] not in known]
        if not wrong:
            check_settings(argparse.Namespace(**(defaults | settings)))
        norm = meta["obs_norm"]
        if wrong:
            raise UserError(f"its {wrong[0]} is not a valid value")
        if norm is not None:
            sizes = len(norm["mean"]) == len(norm["std"]) and float(norm["count"]) > 0
            if not (sizes and np.all(np.isfinite(norm["mean"])) and np.all(np.array(norm["std"]) > 0)):
                raise UserError("its obs_norm is not a valid value")
    except UserError as e:
        raise UserError(str(e) if str(e).startswith(str(path)) else f"{path} has a bad meta: {e}") from None
    except Exception as e:
        raise UserError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
    return params, meta


def read_weights_into_args(args, given):
    """Load --init-from / --from-pretrained weights; the env and architecture flags take their meta's values.
    Returns (params float32 (D,), meta). UserError when --env-id names another env."""
    path = args.init_from or args.from_pretrained
    params, meta = load_weights(path)
    if "env_id" in given and args.env_id != meta["env_id"]:
        raise UserError(f"{path} was trained on {meta['env_id']}, not {args.env_id}")
    settings = {key: meta[part][key] for part, keys in META_FLAGS.items() for key in keys}
    vars(args).update(settings, env_id=meta["env_id"])
    return params, meta


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


# Plots, video, main
PLOT_INTERVAL_S = 30.0  # learning_curve.png is redrawn at an evaluation at most this often, and at the end


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


def record_video(env_config, policy, path_stem, seed):
    """One evaluation episode recorded into path_stem.mp4 (with moviepy) or .gif: (path, return)."""
    env = make_env(env_config, training=False, render_mode="rgb_array")
    genotype = parameters_to_vector(policy.parameters()).numpy()
    returns, _ = rollout(policy, genotype[None], lambda b: env, [[seed]])
    frames = env.render()
    fps = env.metadata.get("render_fps", 30)
    env.close()
    return write_video(frames, fps, path_stem), returns[0][0]


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
    """Evaluate a weights file; the last line printed is the `episode_return mean=...` summary."""
    params, meta = read_weights_into_args(args, given)
    env_config, policy_config, policy, dim, obs_dim = build_policy(args, (params, meta))
    norm = meta["obs_norm"]
    mean_std = ObservationStats(0).mean_std()
    if norm:
        mean_std = (np.array(norm["mean"], np.float32), np.array(norm["std"], np.float32))
    sizes = [dim, obs_dim, obs_dim]  # params, obs mean and std
    with evaluation_pool(args, sizes, env_config, policy_config) as pool:
        print(
            f"{policy}\nparameters: {dim}   env: {args.env_id}   episodes: {args.num_eval_rollouts}   "
            f"workers: {pool.describe()}"
        )
        start = time.perf_counter()
        returns, steps, _ = evaluate(pool, params, mean_std, args, 0)
    elapsed = time.perf_counter() - start
    if args.capture_video:
        run_dir = os.path.join(args.logs_dir, args.run_name or default_run_name(args, "__eval"))
        pretrained_video(args, run_dir, env_config, make_policy(policy_config, params, norm and mean_std))
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

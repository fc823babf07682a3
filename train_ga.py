"""A simple genetic algorithm (GA) over a policy's flat weight vector, on any gymnasium environment.

The genetic algorithm of the ga-openai-gym project in one file. The genotype is the policy's flat
parameter vector. Each generation selects parents (linear ranking, roulette or tournament),
recombines pairs of them (BLX-alpha, Eshelman & Schaffer 1993; one-point; uniform), mutates the
genes (by default every gene, by N(0, 0.02^2)), runs every child for --num-rollouts episodes and
forms the next generation: the original's rule (a pair of children replaces its parents only if
their summed fitness is higher) or generational replacement with elites re-evaluated on fresh
episodes (Such et al. 2017, "Deep Neuroevolution", arXiv:1712.06567). One generation, for a pair
of parents x, y drawn by selection:

    c_i ~ U[min(x_i, y_i) - alpha d_i, max(x_i, y_i) + alpha d_i],  d_i = |x_i - y_i|   (BLX-alpha)
    c_i <- c_i + m_i * N(0, scale^2),  m_i ~ Bernoulli(mutation_rate)                   (mutation)

Two experiments of the original project are included: distillation of a trained policy into a much
smaller one (`--distill-from`), and one network for several environments with hard parameter sharing
(`--multitask`), followed by a noise study.

Examples:
    # CartPole-v1 to 500 over 100 evaluation episodes (the defaults: tournaments of 5, 4 elites,
    # BLX-0.5, every gene mutated by N(0, 0.02^2), fitness over 3 episodes, a 32-32 tanh MLP)
    python train_ga.py --env-id CartPole-v1 --reward-goal 500
    # distill a CartPole policy into a 4-2-2 student and compare both over the same 100 episodes
    python train_ga.py --distill-from pretrained/ga_cartpole.npz --hidden-sizes 2
    # one network for two tasks (shared trunk), then the noise study
    python train_ga.py --multitask CartPole-v1 BipedalWalker-v3 --population-size 64 --max-iter 100
"""

import argparse
import itertools
import os
import signal
import sys
import typing

SCRIPT = "train_ga.py"
FORMAT_VERSION = 1
# Streams of randomness: derive_seed(seed, stream, generation, member, rollout), one per use.
INIT_STREAM = 0  # the initial population
GA_STREAM = 1  # a generation's selection, crossover and mutation
TRAIN_ENV_STREAM = 2  # the training episodes' env seeds
EVAL_ENV_STREAM = 3  # the evaluation episodes' env seeds
SLIME_ID = "SlimeVolley-v0"  # optional slimevolleygym package (old gym API), adapted by this script


class UserError(Exception):
    """Bad input (flags, files, environments): one line `<script>: error: ...`, exit code 2."""


# ---- 1. Configuration ----
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


def build_parser():
    """The parser of every flag: kebab-case, a help string on each, defaults shown once."""
    p = OneLineParser(
        prog=SCRIPT,
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
        epilog=__doc__[__doc__.index("Examples:") :] + f'\nMore: README.md, section "{SCRIPT}"',
    )
    cores = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    add = p.add_argument_group("run").add_argument
    add("--env-id", default="CartPole-v1", help=f"gymnasium environment id, or {SLIME_ID}")
    env_kwargs = "keyword arguments for gymnasium.make (VALUE parsed as JSON), e.g. continuous=true"
    add("--env-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help=env_kwargs)
    add("--seed", type=int, default=1, help="seed of every random draw of the run")
    num_workers = (
        f"rollout worker processes; 1 runs in-process (default: usable cores, here {cores}). "
        "With --ray-address: the most rollouts running at once (default there: every CPU)"
    )
    add("--num-workers", type=int, default=cores, help=num_workers)
    ray_address = "the Ray cluster's head HOST:PORT, or auto (default: $RAY_ADDRESS, else local processes)"
    add("--ray-address", metavar="ADDRESS", help=ray_address)
    add("--population-size", type=int, default=64, help="members per generation")
    add("--max-iter", type=int, default=1000, help="generations, counted from the run's start")
    add("--num-rollouts", type=int, default=3, help="episodes per fitness evaluation (their mean)")
    add("--max-episode-steps", type=int, help="episode length limit (default: the env's TimeLimit)")
    early_stop = "training episodes end after this many negative rewards in a row (default: 20 on CarRacing, else off)"
    add("--max-negative-steps", type=int, help=early_stop)
    add("--eval-every", type=int, default=10, help="evaluate the best member every this many generations")
    add("--num-eval-rollouts", type=int, default=100, help="episodes per evaluation")
    add("--logs-dir", default="runs", help="parent folder of run folders")
    add("--exp-name", default=SCRIPT[:-3], help="experiment name, in the default run folder name")
    add("--run-name", help="run folder name (default: <env-id>__<exp-name>__<seed>__<unix-time>)")
    add("--resume", metavar="PATH", help="continue a run: its checkpoint.pkl or its run folder")
    add("--from-pretrained", metavar="PATH.npz", help="evaluate these weights over --num-eval-rollouts episodes")
    add("--init-from", metavar="PATH.npz", help="start from these weights (member 0; the others mutated copies)")
    add("--capture-video", action="store_true", help="record an episode at each evaluation (GIF, or mp4 with moviepy)")
    goal = "stop when the evaluation mean reaches this; a training best at it is evaluated at once (10 episodes first)"
    add("--reward-goal", type=float, help=goal)
    add("--consecutive-goal-stopping", type=int, default=1, help="... in this many evaluations in a row")
    add("--quiet", action="store_true", help="no per-generation console lines, no progress bar")
    add("--track", action="store_true", help="log the run to Weights & Biases (requirements-track.txt)")
    add("--wandb-project-name", default="neuroevolution", help="the W&B project of --track")
    add("--wandb-entity", help="the W&B team or user of --track (default: your W&B default)")
    add = p.add_argument_group("genetic algorithm").add_argument
    selection = "parent selection: linear ranking, fitness-proportional, or the best of --tournament-size"
    add("--selection", choices=["ranking", "roulette", "tournament"], default="tournament", help=selection)
    selection_pressure = "linear ranking: expected offspring of the best member, in [1, 2] (1 = uniform)"
    add("--selection-pressure", type=float, default=2.0, help=selection_pressure)
    add("--tournament-size", type=int, default=5, help="tournament selection: contestants per draw")
    crossover = "recombination of a pair of parents into two children"
    add("--crossover", choices=["blx-alpha", "one-point", "uniform"], default="blx-alpha", help=crossover)
    add("--crossover-rate", type=float, default=0.9, help="probability that a pair recombines (else copies)")
    add("--blx-alpha", type=float, default=0.5, help="BLX-alpha: child genes on [min - alpha d, max + alpha d]")
    mutation = "noise of a mutated gene: N(0, scale^2) or U(-scale, scale)"
    add("--mutation", choices=["gaussian", "uniform"], default="gaussian", help=mutation)
    add("--mutation-rate", type=float, default=1.0, help="probability that a gene mutates")
    add("--mutation-scale", type=float, default=0.02, help="standard deviation or half-width of a mutation")
    replace = "parents-vs-children: children replace their parents if fitter in sum; generational: all but the elites"
    add("--replacement", choices=["parents-vs-children", "generational"], default="generational", help=replace)
    add("--elite-size", type=int, default=4, help="generational: best members kept, re-evaluated each generation")
    add = p.add_argument_group("policy").add_argument
    widths = "fully connected widths (after a conv net on pixels); --multitask: each task's input layer, then the trunk"
    add("--hidden-sizes", type=int, nargs="*", default=[32, 32], help=widths)
    add("--activation", choices=["tanh", "relu", "selu"], default="tanh", help="hidden activation")
    add("--frame-size", type=int, default=64, help="pixels: frames resized to this square size")
    add("--frame-stack", type=int, default=4, help="pixels: number of stacked frames")
    add("--grayscale", action=argparse.BooleanOptionalAction, default=True, help="pixels: frames in grayscale")
    slime_fitness = (
        f"{SLIME_ID} training reward: the score, or the original's shaped fitness (+0.01 a "
        "step survived, +1 an opponent life taken)"
    )
    add("--slime-fitness", choices=["score", "shaped"], default="score", help=slime_fitness)
    add = p.add_argument_group("experiments").add_argument
    add("--distill-from", metavar="TEACHER.npz", help="distillation: fit a student of --hidden-sizes to this policy")
    add("--distill-episodes", type=int, default=20, help="teacher episodes collected per round")
    add("--distill-rounds", type=int, default=1, help="1: behaviour cloning; more: DAgger rounds (the student drives)")
    add("--distill-epochs", type=int, default=100, help="passes over the collected pairs per round")
    add("--learning-rate", type=float, default=3e-3, help="distillation: Adam step size")
    add("--batch-size", type=int, default=256, help="distillation: minibatch size")
    multitask = "evolve one network on these envs at once (shared trunk); fitness: sum of return / reward threshold"
    add("--multitask", nargs="+", metavar="ENV_ID", help=multitask)
    return p


def parse_args(argv=None):
    """(args, the set of flags given explicitly), checked (kind, range, finiteness, paths, flags
    that exclude each other) before anything is run or written: UserError otherwise."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = flags_given(parser, argv, args)
    check_flags(args, given)
    if args.multitask is not None:
        args.env_id = "+".join(args.multitask)
    args.env_kwargs = parse_env_kwargs(args.env_kwargs)
    check_placement(args, given)
    check_numbers(vars(args), lambda key: "--" + key.replace("_", "-"))
    check_args(args)
    check_paths(args)
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

import gymnasium as gym  # the heavy imports, after the configuration: --help needs none of them
import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters


# ---- 2. Genetic algorithm: the operators and the ask/tell object ----
def selection_probabilities(fitness, method, pressure=2.0):
    """Each member's probability to be drawn as a parent: float64 (N,), summing to one.

    'ranking' (Baker 1985): rank r (0 = worst, ties share their mean rank) gets
    (2 - s) / N + 2 r (s - 1) / (N (N - 1)), s = `pressure` in [1, 2]. 'roulette': proportional
    to fitness - min(fitness) (all equal: uniform). Raises ValueError for another method.
    """
    fitness = np.asarray(fitness, dtype=np.float64)
    n = fitness.size
    if method == "ranking":
        _, inverse, counts = np.unique(fitness, return_inverse=True, return_counts=True)
        ranks = (np.cumsum(counts) - counts + (counts - 1) / 2.0)[inverse]
        return (2 - pressure) / n + 2 * ranks * (pressure - 1) / (n * (n - 1))
    if method == "roulette":
        shifted = fitness - fitness.min()
        total = shifted.sum()
        return shifted / total if total > 0 else np.full(n, 1.0 / n)
    raise ValueError(f"no selection probabilities for {method!r}")


def select_parents(fitness, count, rng, method="ranking", pressure=2.0, tournament_size=3):
    """Indices of `count` parents drawn with replacement, int64 (count,): from
    `selection_probabilities`, or ('tournament') the fittest of `tournament_size` members drawn
    uniformly per parent."""
    fitness = np.asarray(fitness, dtype=np.float64)
    if method == "tournament":
        contestants = rng.integers(0, fitness.size, size=(count, tournament_size))
        return contestants[np.arange(count), np.argmax(fitness[contestants], axis=1)]
    probabilities = selection_probabilities(fitness, method, pressure)
    return rng.choice(fitness.size, size=count, p=probabilities)


def crossover(x, y, rng, method="blx-alpha", alpha=0.5):
    """Two children (float32 (D,) each) of parents x, y. Raises ValueError for an unknown method.

    'blx-alpha' (Eshelman & Schaffer 1993): each gene uniform on [min - alpha d, max + alpha d],
    d = |x - y|. 'one-point': the genes after a cut in [1, D - 1] swapped. 'uniform': each gene
    swapped with probability 1/2.
    """
    if method == "blx-alpha":
        low, high = np.minimum(x, y), np.maximum(x, y)
        d = high - low
        low, high = low - alpha * d, high + alpha * d
        first = (low + rng.random(x.size) * (high - low)).astype(np.float32)
        second = (low + rng.random(x.size) * (high - low)).astype(np.float32)
        return first, second
    if method == "one-point":
        cut = int(rng.integers(1, x.size)) if x.size > 1 else 0
        return np.concatenate([x[:cut], y[cut:]]), np.concatenate([y[:cut], x[cut:]])
    if method == "uniform":
        swap = rng.random(x.size) < 0.5
        return np.where(swap, y, x), np.where(swap, x, y)
    raise ValueError(f"unknown crossover {method!r}")


def mutate(x, rng, rate=1.0, scale=0.02, method="gaussian"):
    """x with each gene mutated with probability `rate`, a new float32 (D,) array: a mutated gene
    gets N(0, scale^2) ('gaussian') or U(-scale, scale) ('uniform') added."""
    mask = rng.random(x.size) < rate
    if method == "gaussian":
        noise = rng.standard_normal(x.size) * scale
    else:
        noise = rng.uniform(-scale, scale, x.size)
    return (x + np.where(mask, noise, 0.0)).astype(np.float32)


class GeneticAlgorithm:
    """The GA as ask/tell: `ask()` -> candidates float32 (N, D); `tell(fitness)`, N values (higher
    is better).

    Generation 0 evaluates the initial population; later ones select N parents, recombine
    consecutive pairs (with probability crossover_rate) and mutate every child. Replacement
    'parents-vs-children' (ga-openai-gym): children pair k replaces its parents only if
    f(c1) + f(c2) > f(p1) + f(p2) (even N); 'generational': the `elite_size` best, unchanged and
    re-evaluated on fresh episodes, then children (Such et al. 2017). Draws of generation g come
    from (seed, GA_STREAM, g); attribute names are the checkpoint format (`state_dict`). Raises
    ValueError for a population it cannot run. Example: README.md, "Python API".
    """

    def __init__(
        self,
        population,
        selection="tournament",
        selection_pressure=2.0,
        tournament_size=5,
        crossover="blx-alpha",
        crossover_rate=0.9,
        blx_alpha=0.5,
        mutation="gaussian",
        mutation_rate=1.0,
        mutation_scale=0.02,
        replacement="generational",
        elite_size=4,
        seed=0,
    ):
        population = np.asarray(population, dtype=np.float32)
        n = population.shape[0]
        if n < 2 or (replacement == "parents-vs-children" and n % 2) or not 0 <= elite_size < n:
            raise ValueError("population must have >= 2 members (even for parents-vs-children), 0 <= elite_size < N")
        self.population = population.copy()  # (N, D) members
        self.fitness = None  # (N,) their fitness; None until the first tell
        self.selection = selection  # "ranking", "roulette" or "tournament"
        self.selection_pressure = selection_pressure  # ranking: the best's expected offspring
        self.tournament_size = tournament_size  # tournament: contestants per draw
        self.crossover = crossover  # "blx-alpha", "one-point" or "uniform"
        self.crossover_rate = crossover_rate  # probability that a pair recombines
        self.blx_alpha = blx_alpha  # BLX-alpha: how far children reach beyond their parents
        self.mutation = mutation  # a mutated gene's noise: "gaussian" or "uniform"
        self.mutation_rate = mutation_rate  # probability that a gene mutates
        self.mutation_scale = mutation_scale  # the noise's standard deviation or half-width
        self.replacement = replacement  # "generational" or "parents-vs-children"
        self.elite_size = elite_size  # generational: best members kept unchanged
        self.seed = seed  # generation g draws from (seed, GA_STREAM, g)
        self.generation = 0  # generations told
        self.pending = None  # (candidates, parent indices) between ask and tell
        self.children_accepted = 0  # new members of the last population (diagnostic)

    def ask(self):
        """The candidates of this generation: float32 (N, D). Generational: the elites first."""
        if self.fitness is None:
            self.pending = (self.population, None)
            return self.population.copy()
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, GA_STREAM, self.generation]))
        if self.replacement == "generational":
            elites = self.population[np.argsort(-self.fitness, kind="stable")[: self.elite_size]]
            children, parents = self.breed(len(self.population) - self.elite_size, rng)
            candidates = np.concatenate([elites, children])
        else:
            candidates, parents = self.breed(len(self.population), rng)
        self.pending = (candidates, parents)
        return candidates.copy()

    def tell(self, fitness):
        """Form the next population from the fitness (N,) of `ask()`'s candidates. Raises
        ValueError on a bad shape."""
        fitness = np.asarray(fitness, dtype=np.float64)
        candidates, parents = self.pending
        if fitness.shape != (len(candidates),):
            raise ValueError(f"expected {len(candidates)} fitness values, got shape {fitness.shape}")
        if parents is None or self.replacement == "generational":
            self.population, self.fitness = candidates.copy(), fitness
            self.children_accepted = len(candidates) - (0 if parents is None else self.elite_size)
        else:  # main bit of parents-vs-children: a pair of children replaces its parents if fitter
            population = self.population[parents.ravel()]
            new_fitness = self.fitness[parents.ravel()]
            accepted = fitness[0::2] + fitness[1::2] > new_fitness[0::2] + new_fitness[1::2]
            keep = np.repeat(accepted, 2)
            self.population = np.where(keep[:, None], candidates, population).astype(np.float32)
            self.fitness = np.where(keep, fitness, new_fitness)
            self.children_accepted = int(keep.sum())
        self.pending = None
        self.generation += 1

    def breed(self, count, rng):
        """`count` children (float32 (count, D)) and their parents' indices (int64 (pairs, 2))."""
        pairs = (count + 1) // 2
        parents = select_parents(
            self.fitness, 2 * pairs, rng, self.selection, self.selection_pressure, self.tournament_size
        ).reshape(pairs, 2)
        children = []
        for a, b in parents:
            x, y = self.population[a], self.population[b]
            if rng.random() < self.crossover_rate:  # main bit: recombine, then mutate each child
                x, y = crossover(x, y, rng, self.crossover, self.blx_alpha)
            for child in (x, y):
                children.append(mutate(child, rng, self.mutation_rate, self.mutation_scale, self.mutation))
        return np.stack(children[:count]), parents

    def best(self):
        """(parameters float32 (D,), fitness) of the current population's fittest member."""
        i = int(np.argmax(self.fitness))
        return self.population[i].copy(), float(self.fitness[i])

    def state_dict(self):
        """Everything the GA holds (numpy arrays and plain values), copied, for the checkpoint."""
        return {key: value.copy() if isinstance(value, np.ndarray) else value for key, value in vars(self).items()}

    @classmethod
    def from_state_dict(cls, state):
        """The GA exactly as `state_dict()` saw it."""
        ga = cls.__new__(cls)
        vars(ga).update(state)
        return ga


def initial_population(policy_config, size, seed, init=None, rng_args=None):
    """float32 (size, D): member i is PyTorch's initialization under seed (seed, INIT_STREAM, i);
    with `init` (D,), member 0 is `init`, the others mutate(init, *rng_args)."""
    members = []
    for i in range(size):
        if init is None:
            torch.manual_seed(derive_seed(seed, INIT_STREAM, i))
            members.append(parameters_to_vector(build_policy(policy_config).parameters()).numpy())
        elif i == 0:
            members.append(init)
        else:
            rng = np.random.default_rng(derive_seed(seed, INIT_STREAM, i))
            members.append(mutate(init, rng, *rng_args))
    return np.stack(members).astype(np.float32)


# ---- 3. Policy, environment, rollout ----
def load_flat(policy, params):
    """Set a policy's weights from a flat genotype (D,) (copied as float32). Returns the policy."""
    vector_to_parameters(torch.from_numpy(np.array(params, dtype=np.float32)), policy.parameters())
    return policy


class Policy(nn.Module):
    """Deterministic policy for one env: an MLP on float32 vectors (D,); on uint8 frames (frames,
    H, W[, 3]), scaled to [0, 1], first Conv 8x8/4 -> 16, Conv 4x4/2 -> 32 (Mnih et al. 2013).
    Discrete: argmax of the logits; Box: tanh (the env rescaled to [-1, 1]). `act` runs a vector
    MLP in numpy (half torch's cost, `act_batch`); `forward` (torch) serves pixels and
    distillation. Genotype: `parameters_to_vector`, float32."""

    def __init__(self, obs_shape, num_actions, discrete, hidden_sizes=(32, 32), activation="tanh"):
        super().__init__()
        self.obs_shape = tuple(obs_shape)  # (O,) floats, or (frames, H, W[, 3]) uint8 frames
        self.discrete = discrete  # Discrete actions, else a Box on [-1, 1]
        self.pixels = len(obs_shape) > 1
        self.activation = ACTIVATIONS[activation]
        self.numpy_activation = NUMPY_ACTIVATIONS[activation]  # the same on numpy arrays
        self.conv = None
        features = self.obs_shape[0]
        if self.pixels:
            channels = self.obs_shape[0] * (self.obs_shape[3] if len(self.obs_shape) == 4 else 1)
            conv = [nn.Conv2d(channels, 16, 8, stride=4), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2), nn.ReLU()]
            self.conv = nn.Sequential(*conv, nn.Flatten(0))
            with torch.no_grad():
                features = self.conv(torch.zeros(channels, *self.obs_shape[1:3])).numel()
        widths = [features, *hidden_sizes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.head = nn.Linear(widths[-1], num_actions)
        self.requires_grad_(False)  # evolved; only a distillation student turns gradients on
        # Plain lists for the hot path (nn.Module attribute lookup costs ~0.3 us).
        self.linear_params = [(layer.weight, layer.bias) for layer in [*self.layers, self.head]]
        self.load(parameters_to_vector(self.parameters()).numpy())

    def load(self, params):
        """`load_flat`, then numpy views of the layers for `act`."""
        load_flat(self, params)
        self.numpy_layers = [(w.detach().numpy()[None], b.detach().numpy()[None]) for w, b in self.linear_params]
        return self

    def forward(self, x):
        """x: float32 (D,), (B, D) or (C, H, W). Returns logits (discrete) or tanh actions, (A,)
        or (B, A)."""
        h = self.conv(x) if self.pixels else x
        for weight, bias in self.linear_params[:-1]:
            h = self.activation(linear(weight, bias, h))
        out = linear(*self.linear_params[-1], h)
        return out if self.discrete else torch.tanh(out)

    def preprocess(self, obs):
        """One env observation (numpy) -> float32 tensor for `forward`: frames scaled to [0, 1],
        RGB ones (frames, H, W, 3) as (frames * 3, H, W)."""
        x = torch.from_numpy(np.asarray(obs))
        if not self.pixels:
            return x.float()
        x = x.float().div_(255.0)
        return x.permute(0, 3, 1, 2).flatten(0, 1) if x.dim() == 4 else x

    def act(self, obs):
        """obs: one env observation (numpy). Returns the action: int, or float32 (A,) in [-1, 1]."""
        if not self.pixels:
            return act_batch(self, np.asarray(obs)[None], self.numpy_layers)[0]
        out = self(self.preprocess(obs)).numpy()  # logits, or actions already squashed by tanh
        return int(out.argmax()) if self.discrete else out


def build_policy(policy_config):
    """Policy or MultitaskPolicy from a config dict (see `policy_config_from_envs`); float32."""
    torch.set_num_threads(1)
    try:
        if "multitask" in policy_config:
            return MultitaskPolicy(**policy_config)
        return Policy(**policy_config)
    except (RuntimeError, MemoryError):  # torch's allocator refused the layers' weights
        raise UserError(f"hidden layers {policy_config['hidden_sizes']} do not fit in this machine's memory") from None


def num_params(policy):
    """Length of the policy's flat genotype: int."""
    return sum(p.numel() for p in policy.parameters())


def make_env(env_config, training, render_mode=None):
    """`gymnasium.make` (or the SlimeVolley adapter) plus gymnasium's wrappers: frames uint8
    (frame_stack, size, size[, 3]), Box actions on [-1, 1]. UserError: unknown id, missing
    dependency, bad kwargs, unusable space."""
    env = make_bare_env(env_config, training, render_mode)  # gymnasium.make, or SlimeVolley's
    if render_mode is not None:
        env = gym.wrappers.RenderCollection(env)
    if training and env_config["max_negative_steps"] > 0:
        env = NegativeRewardEarlyStop(env, env_config["max_negative_steps"])
    check_spaces(env)  # Discrete or bounded 1-D Box actions; vectors or uint8 frames
    space = env.action_space
    if isinstance(space, gym.spaces.Box) and (np.any(space.low != -1) or np.any(space.high != 1)):
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)
    space = env.observation_space
    if is_frames(space):
        if env_config["grayscale"] and len(space.shape) == 3:
            env = gym.wrappers.GrayscaleObservation(env)
        try:
            env = gym.wrappers.ResizeObservation(env, (env_config["frame_size"],) * 2)
        except gym.error.DependencyNotInstalled:
            message = "resizing frames needs OpenCV: pip install opencv-python-headless"
            raise UserError(message) from None
        env = gym.wrappers.FrameStackObservation(env, env_config["frame_stack"])
    return env


def rollout(policy, genotypes, env_for, env_seeds, observations=None):
    """The episode loop of training, evaluation, distillation and video: member b of genotypes
    float32 (B, D) plays an episode per seed of env_seeds[b] on env_for(b), the B stepped together,
    each exactly as alone (B = 1: the plain loop). observations: None or B lists that get what each
    member sees. Returns (B lists of episode returns, B env step counts)."""
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
                    if seeds[b]:
                        envs[b] = env_for(b)
                        obs[b], _ = envs[b].reset(seed=seeds[b].pop(0))
                    else:
                        finished.append(b)
            playing = [b for b in playing if b not in finished]
    return returns, steps


# ---- 4. Training loop ----
class RolloutTask(typing.NamedTuple):
    """A worker's job: row `member` of the batch's float32 (rows, D) members matrix drives one
    episode per env seed, in training (early stop, shaped fitness) or in evaluation; `noisy`: the
    tasks whose observations the noise study replaces by noise."""

    member: int
    env_seeds: list
    training: bool
    noisy: tuple = ()


class RolloutResult(typing.NamedTuple):
    """A task's returns, a list per env seed (one return per task of the policy), and its env
    steps in all."""

    episode_returns: list
    steps: int


def train(args, given):
    """The GA, each generation: ask -> rollouts -> tell -> record -> evaluate the best member ->
    checkpoint, to --max-iter. Returns the exit code: 0; 1 when the workers are lost; 130 when
    interrupted (Ctrl-C, SIGTERM), the last generation's checkpoint kept."""
    if args.distill_from:
        return run_distillation(args, given)
    with Run(args, given) as run:  # from the flags or a checkpoint: the GA, the workers, the logs
        args, ga = run.args, run.ga
        evaluation = None
        while ga.generation < args.max_iter:
            candidates = ga.ask()  # float32 (N, D); generational: the elites first
            tasks = []
            for i in range(len(candidates)):  # every candidate, elites too, meets fresh episodes
                seeds = [
                    derive_seed(args.seed, TRAIN_ENV_STREAM, ga.generation, i, r) for r in range(args.num_rollouts)
                ]
                tasks.append(RolloutTask(i, seeds, True))
            results = run.pool.map(tasks, [candidates], f"generation {ga.generation + 1}")
            returns = np.array([result.episode_returns for result in results])  # (N, rollouts, T)
            fitness = (returns / run.scales).sum(2).mean(1)  # (N,): the rollouts' mean
            ga.tell(fitness)
            run.recorder.count_generation(fitness, sum(result.steps for result in results))
            scheduled = ga.generation % args.eval_every == 0
            evaluation = None
            if scheduled or run.recorder.reaches_goal(ga.best()[1]):  # off schedule: screened first
                evaluation = evaluate_best(run, screen=not scheduled)
            run.record(fitness, returns, evaluation)  # progress.csv, TensorBoard, W&B, console
            run.save_checkpoint()
            if run.recorder.goal_reached():
                break
        run.finish(evaluation)  # the noise study (--multitask), final.npz, the learning curve
    return run.recorder.exit_code


def evaluate_best(run, screen=False):
    """Evaluate the best member after this generation: best.npz when it is the best so far, the
    goal streak, the console line, the video. Returns its {mean, std, episodes[, tasks]}, or None
    when `screen` stopped it after its first episodes (then no evaluation is recorded)."""
    params = run.ga.best()[0]
    evaluation, returns, steps = evaluation_of(run, params, f"evaluation {run.ga.generation}", screen)
    run.recorder.count_steps(steps)
    if returns.size < run.args.num_eval_rollouts:
        run.recorder.screened_out(evaluation)  # the goal streak ends
        return None
    run.record_evaluation(params, evaluation)  # best.npz, the goal streak, the console, a video
    return evaluation


# == Machinery: a first-time reader may skip what follows (checks, the run, workers, files, main) ==
import contextlib
import csv
import fcntl
import importlib
import inspect
import io
import json
import logging
import math
import multiprocessing as mp
import pickle
import platform
import shutil
import socket
import tempfile
import threading
import time
import uuid
import warnings
import zipfile
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

# gymnasium's image wrappers warn of the float64 bounds they cast: harmless, it would bury errors.
warnings.filterwarnings("ignore", message=".*precision lowered by casting.*")

# progress.csv: the columns every script writes, then the GA's own (and with --multitask each task's mean return).
PROGRESS_COLUMNS = ["iteration", "evaluations", "env_steps", "wall_time_s"]
PROGRESS_COLUMNS += ["return_min", "return_mean", "return_max", "return_std"]
PROGRESS_COLUMNS += ["eval_return_mean", "eval_return_std"]
PROGRESS_COLUMNS += ["best_fitness", "children_accepted", "mutation_rate", "mutation_scale", "param_norm", "num_cpus"]
# learning_curve.png's lines, the first drawn boldest
CURVES = [
    ("return_mean", "candidates mean"),
    ("return_max", "candidates max"),
    ("best_fitness", "best member's fitness"),
]
PLOT_INTERVAL_S = 30.0  # learning_curve.png redrawn at an evaluation at most this often
# Flags that --resume may set anew; the rest comes from the checkpoint.
PLACEMENT_FLAGS = ("num_workers", "ray_address")  # never taken from a checkpoint
EVAL_FLAGS = ("eval_every", "num_eval_rollouts", "capture_video", "reward_goal", "consecutive_goal_stopping")
LOG_FLAGS = ("quiet", "track", "wandb_project_name", "wandb_entity")
RESUME_FLAGS = {"resume", "max_iter", *PLACEMENT_FLAGS, *EVAL_FLAGS, *LOG_FLAGS}
# Settings that --init-from / --from-pretrained / --distill-from take from the weights file's meta.
META_ENV_FLAGS = ("env_kwargs", "frame_size", "frame_stack", "grayscale", "slime_fitness")
META_POLICY_FLAGS = ("hidden_sizes", "activation")
INT_MAX = 2**31 - 1  # counts and sizes: a C int at most
# (smallest, largest[, True: smallest excluded]) of each number a flag, checkpoint or weights meta sets; ints
# where the flag is an int. The limits between flags are check_args's.
LIMITS = {
    "seed": (0, math.inf),
    "num_workers": (1, INT_MAX),
    "population_size": (2, INT_MAX),
    "max_iter": (1, INT_MAX),
    "num_rollouts": (1, INT_MAX),
    "max_episode_steps": (1, INT_MAX),
    "max_negative_steps": (0, INT_MAX),
    "eval_every": (1, INT_MAX),
    "num_eval_rollouts": (1, INT_MAX),
    "reward_goal": (-math.inf, math.inf),
    "consecutive_goal_stopping": (1, INT_MAX),
    "selection_pressure": (1.0, 2.0),
    "tournament_size": (1, INT_MAX),
    "crossover_rate": (0.0, 1.0),
    "blx_alpha": (0.0, math.inf),
    "mutation_rate": (0.0, 1.0),
    "mutation_scale": (0.0, math.inf, True),
    "elite_size": (0, INT_MAX),
    "hidden_sizes": (1, INT_MAX),
    "frame_size": (36, INT_MAX),
    "frame_stack": (1, INT_MAX),
    "distill_episodes": (1, INT_MAX),
    "distill_rounds": (1, INT_MAX),
    "distill_epochs": (1, INT_MAX),
    "learning_rate": (0.0, math.inf, True),
    "batch_size": (1, INT_MAX),
}
# The numbers that None leaves unset.
OPTIONAL_NUMBERS = ("num_workers", "max_episode_steps", "max_negative_steps", "reward_goal")
# What a checkpoint holds beyond its format version, script, args and counters, and the counters.
CHECKPOINT_PARTS = {"ga": dict}  # GeneticAlgorithm.state_dict(): numpy arrays and plain values
CHECKPOINT_MODULES = ()  # packages whose objects a checkpoint holds, beyond numpy's and builtins
COUNTERS = ("evaluations", "env_steps", "wall_time_s", "best_return", "best_eval", "goal_streak")
# A run folder's files, as the last console line names them.
RUN_FILES = ("args.json", "progress.csv", "learning_curve.png", "checkpoint.pkl", "final.npz", "best.npz", "videos/")
RUN_FILES += ("noise_study.csv", "noise_study.png")  # --multitask's


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
    """UserError for flags that exclude each other, or that a checkpoint or weights file sets."""
    exclusive = (args.resume, args.from_pretrained, args.init_from, args.distill_from)
    if sum(value is not None for value in exclusive) > 1:
        raise UserError("--resume, --from-pretrained, --init-from and --distill-from exclude each other")
    if args.multitask is not None:
        if len(args.multitask) < 2 or len(set(args.multitask)) < len(args.multitask):
            raise UserError("--multitask needs at least two different env ids")
        if {"env_id", "capture_video", "distill_from"} & given:
            raise UserError("--multitask excludes --env-id (it names the envs), --capture-video and --distill-from")
    fixed = set()
    if args.resume:  # a resumed run keeps its settings
        fixed = given - RESUME_FLAGS
        source = "the checkpoint (a resumed run keeps its settings)"
    elif args.init_from or args.from_pretrained:  # weights bring their env and architecture
        fixed = given & {*META_ENV_FLAGS, *META_POLICY_FLAGS, "multitask"}
        source = "the weights file's meta"
    elif args.distill_from:  # the teacher brings its env
        fixed = given & set(META_ENV_FLAGS)
        source = "the teacher's meta"
    if fixed:
        flag = "--" + min(fixed).replace("_", "-")
        raise UserError(f"{flag} cannot be given here: it comes from {source}")


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


def check_args(args):
    """UserError unless the settings (flags, a checkpoint's or a meta's) keep the rules between them."""
    n = args.population_size
    unset = [key for key in LIMITS if getattr(args, key) is None and key not in OPTIONAL_NUMBERS]
    if unset:
        raise UserError(f"--{unset[0].replace('_', '-')} must be set, got None")
    if args.selection == "tournament" and args.tournament_size > n:
        raise UserError(f"--tournament-size must be in [1, {n}], got {args.tournament_size!r}")
    if args.replacement == "generational" and args.elite_size > n - 1:
        raise UserError(f"--elite-size must be in [0, {n - 1}], got {args.elite_size!r}")
    if args.replacement == "parents-vs-children" and n % 2:
        raise UserError("--population-size must be even with --replacement parents-vs-children (pairs of members)")
    if args.multitask is not None and len(args.hidden_sizes) < 2:
        raise UserError("--multitask needs at least two --hidden-sizes (task input layer, then the shared trunk)")
    known = (
        args.activation in ACTIVATIONS
        and args.slime_fitness in ("score", "shaped")
        and isinstance(args.grayscale, bool)
        and isinstance(args.env_kwargs, dict)
    )
    if not known:
        raise UserError("--activation, --slime-fitness, --grayscale or --env-kwargs holds an unknown value")
    for key, value in args.env_kwargs.items():
        if not all_finite(value):
            raise UserError(f"--env-kwargs {key} must hold finite numbers only, got {value!r}")
    for env_id in args.multitask or [args.env_id]:
        check_env_id(env_id)


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


def check_env_id(env_id):
    """UserError unless `env_id` is an env this machine can make (registering Atari's on the way)."""
    package = None
    try:
        if env_id == SLIME_ID:
            package = "slimevolleygym"
            return __import__(package)
        if str(env_id).startswith("ALE/"):
            package = "ale-py"
            gym.register_envs(__import__("ale_py"))
        gym.spec(env_id)
    except ImportError:
        raise UserError(f"{env_id} needs an optional package: pip install {package}") from None
    except (gym.error.Error, TypeError) as e:
        raise UserError(f"unknown env id {env_id!r}: {first_line(e)}") from None


def check_spaces(env):
    """UserError unless actions are Discrete or a bounded 1-D Box, observations 1-D vectors or uint8 frames."""
    space = env.action_space
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        if not space.is_bounded():
            raise UserError(f"action space {space} has infinite bounds: the policy's tanh cannot map onto it")
    elif not isinstance(space, gym.spaces.Discrete):
        raise UserError(f"action space {space} is not supported: only Discrete and 1-D Box")
    space = env.observation_space
    vectors = isinstance(space, gym.spaces.Box) and len(space.shape) == 1
    if not (is_frames(space) or vectors):
        raise UserError(f"observation space {space} is not supported: only 1-D Box vectors and uint8 images")


def is_frames(space):
    """Whether an observation space holds uint8 frames, (H, W) or (H, W, 3)."""
    if not (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8):
        return False
    return len(space.shape) == 2 or (len(space.shape) == 3 and space.shape[-1] == 3)


# The run: the algorithm's part
SCREEN_EPISODES = 10  # a training best at --reward-goal (mostly luck): these evaluated first


def evaluation_of(run, params, label, screen=False):
    """params over this generation's --num-eval-rollouts evaluation episodes: ({mean, std, episodes[, tasks]},
    fitness float64 (E,), env steps). `screen`: the rest only if the first SCREEN_EPISODES reach the goal (then
    the same as without a screen)."""
    args = run.args
    generation = run.ga.generation
    first = min(SCREEN_EPISODES, args.num_eval_rollouts) if screen else args.num_eval_rollouts
    per_task, steps = evaluate(run.pool, params, args.seed, generation, first, label=label)
    if first < args.num_eval_rollouts and (per_task / run.scales).sum(1).mean() >= args.reward_goal:
        rest, rest_steps = evaluate(
            run.pool, params, args.seed, generation, args.num_eval_rollouts, label=label, start=first
        )
        per_task = np.concatenate([per_task, rest])
        steps += rest_steps
    returns = (per_task / run.scales).sum(1)
    evaluation = summary(returns)
    if args.multitask:
        evaluation["tasks"] = {e: float(m) for e, m in zip(run.env_ids, per_task.mean(0))}
    return evaluation, returns, steps


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
    """A GA run, as a context manager: settings, envs, policy layout, GA (new, --init-from's or the checkpoint's),
    workers, `recorder`; leaving it closes them (Recorder.close: the exit code). UserError before any file."""

    def __init__(self, args, given):
        checkpoint = None
        init = None
        if args.resume:
            args, checkpoint, run_dir = self.resume(args, given)
            check_args(args)
        else:
            if args.init_from:
                init = read_weights_into_args(args.init_from, args, given)
            run_dir = os.path.join(args.logs_dir, args.run_name or default_run_name(args))
        self.args = args
        self.env_configs = env_configs_from_args(args)
        self.env_ids = [config["env_id"] for config in self.env_configs]
        self.scales = np.ones(1)  # fitness: the sum over tasks of return / scale
        ylabel = "episode return"
        columns = list(PROGRESS_COLUMNS)
        if args.multitask:
            self.scales = np.array([return_scale(config) for config in self.env_configs])
            ylabel = "fitness (sum of normalized returns)"
            columns += [f"return_mean[{env_id}]" for env_id in self.env_ids]
        self.policy_config = policy_config_from_envs(self.env_configs, args.hidden_sizes, args.activation)
        policy = build_policy(self.policy_config)
        self.dim = num_params(policy)
        counters = {}
        resumed = None  # the generation the checkpoint holds
        if checkpoint:
            ga = GeneticAlgorithm.from_state_dict(checkpoint["ga"])
            counters = checkpoint["counters"]
            resumed = ga.generation
        else:  # PyTorch's initialization, or --init-from's weights and mutated copies
            init_params = None
            if init:  # it fits, or UserError
                load_policy(args.init_from, *init, self.policy_config)
                init_params = init[0]
            mutation = (args.mutation_rate, args.mutation_scale, args.mutation)
            population = initial_population(self.policy_config, args.population_size, args.seed, init_params, mutation)
            settings = list(inspect.signature(GeneticAlgorithm).parameters)[1:]  # flags of the same names
            ga = GeneticAlgorithm(population, **{key: getattr(args, key) for key in settings})
        self.ga = ga
        worker_args = (self.env_configs, self.policy_config, self.dim)
        sizes = [args.population_size * self.dim]
        title = f"GA on {args.env_id} (seed {args.seed})"
        config = {"env_configs": self.env_configs, "num_params": self.dim}
        self.start(worker_args, sizes, run_dir, title, columns, config, counters, ga.generation, resumed, ylabel)
        notes = []
        if args.multitask:
            terms = [f"{env_id} / {scale:g}" for env_id, scale in zip(self.env_ids, self.scales)]
            notes.append("multitask fitness = " + " + ".join(terms))
        self.announce(policy, self.dim, *notes)

    def meta(self, evaluation=None):
        """A weights file's meta after this generation."""
        return weights_meta(self.args, self.env_configs, self.policy_config, self.dim, evaluation, self.ga.generation)

    def evaluation_note(self, evaluation):
        """With --multitask: the tasks' means."""
        means = [f"{env_id} {mean:.2f}" for env_id, mean in evaluation.get("tasks", {}).items()]
        return f"  ({', '.join(means)})" if means else ""

    def video_policy(self, params):
        """(env config, policy) of a video of `params`."""
        return self.env_configs[0], build_policy(self.policy_config).load(params)

    def record(self, fitness, returns, evaluation):
        """Recorder's row with the GA's scalars. returns: the raw ones, float64 (N, rollouts, T)."""
        ga = self.ga
        best_params, best_fitness = ga.best()
        scalars = {
            "best_fitness": best_fitness,
            "children_accepted": ga.children_accepted,
            "mutation_rate": float(ga.mutation_rate),
            "mutation_scale": float(ga.mutation_scale),
            "param_norm": float(np.linalg.norm(best_params)),
            "num_cpus": self.pool.num_cpus,
        }
        if self.args.multitask:
            for env_id, mean in zip(self.env_ids, returns.mean((0, 1))):
                scalars[f"return_mean[{env_id}]"] = float(mean)
        note = f"best member {best_fitness:8.2f} | children in {ga.children_accepted:>4d}"
        self.recorder.record(fitness, evaluation, scalars, note)

    def save_checkpoint(self):
        self.recorder.save_checkpoint({"ga": self.ga.state_dict()})

    def finish(self, evaluation=None):
        """The noise study (--multitask); final.npz with the last generation's evaluation, else one not recorded (so
        a resumed run equals one made in one go)."""
        args = self.args
        params = self.ga.best()[0]
        if args.multitask:
            print(f"noise study over {args.num_eval_rollouts} episodes per condition:")
            noise_study(self.pool, params, self.env_ids, args.seed, args.num_eval_rollouts, self.recorder.dir)
        if evaluation is None:
            evaluation = evaluation_of(self, params, "final evaluation")[0]
        self.recorder.finish(params, evaluation, self.meta(evaluation))


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


def evaluate(pool, params, seed, iteration, episodes, noisy=(), label=None, start=0):
    """Per-task returns of `params` in evaluation episodes start..episodes-1 (no early stop): (float64 (E, T), env
    steps)."""
    tasks = []
    for episode in range(start, episodes):
        env_seed = derive_seed(seed, EVAL_ENV_STREAM, iteration, episode)
        tasks.append(RolloutTask(0, [env_seed], False, tuple(noisy)))
    results = pool.map(tasks, [np.asarray(params, np.float32)], label)
    returns = np.array([result.episode_returns[0] for result in results], dtype=np.float64)
    return returns, sum(result.steps for result in results)


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


def default_run_name(args, kind=""):
    """<env-id>__<exp-name>[kind]__<seed>__<unix-time> (CleanRL's run names)."""
    return f"{args.env_id.replace('/', '-')}__{args.exp_name}{kind}__{args.seed}__{int(time.time())}"


# The environments: gymnasium's or SlimeVolley, the early stop, the settings
def make_bare_env(env_config, training, render_mode=None):
    """`gymnasium.make`, or SlimeVolley's adapter: `make_env` before its wrappers. UserError (see make_env)."""
    env_id = env_config["env_id"]
    kwargs = dict(env_config["env_kwargs"])
    steps = env_config["max_episode_steps"]
    if env_id.startswith("ALE/"):  # registered in each process
        gym.register_envs(__import__("ale_py"))
    try:
        if env_id == SLIME_ID:
            env = SlimeVolleyAdapter(training and env_config["slime_fitness"] == "shaped", render_mode)
            if steps is not None:
                env = gym.wrappers.TimeLimit(env, steps)
            return env
        if steps is None:
            return gym.make(env_id, render_mode=render_mode, **kwargs)
        return gym.make(env_id, render_mode=render_mode, **kwargs, max_episode_steps=steps)
    except gym.error.DependencyNotInstalled as e:
        raise UserError(f"{env_id} needs an optional dependency: {first_line(e)}") from None
    except (gym.error.Error, TypeError, ValueError, AssertionError) as e:
        raise UserError(f"cannot make env {env_id!r} with {kwargs}: {first_line(e)}") from None


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


class SlimeVolleyAdapter(gym.Env):
    """`slimevolleygym.SlimeVolleyEnv` (old gym API) as a gymnasium env against its built-in opponent: float32
    (12,) observations, Discrete(6) actions, reward +1/-1 a life the opponent/the agent loses."""

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
        reward = float(reward)
        if self.shaped:
            reward = 0.01 + max(reward, 0.0)
        return np.asarray(obs, dtype=np.float32), reward, bool(done), False, info

    def render(self):
        return self.env.render(mode="rgb_array")


def env_configs_from_args(args):
    """One env config dict per task: what workers and weights files need."""
    configs = []
    for env_id in args.multitask or [args.env_id]:
        negative_steps = args.max_negative_steps
        if negative_steps is None:  # CarRacing's training-time early stop is on by default
            negative_steps = 20 if env_id.startswith("CarRacing") else 0
        configs.append(
            {
                "env_id": env_id,
                "env_kwargs": args.env_kwargs,
                "max_episode_steps": args.max_episode_steps,
                "max_negative_steps": negative_steps,
                "frame_size": args.frame_size,
                "frame_stack": args.frame_stack,
                "grayscale": args.grayscale,
                "slime_fitness": args.slime_fitness,
            }
        )
    return configs


def policy_config_from_envs(env_configs, hidden_sizes, activation):
    """`build_policy`'s {obs_shape, discrete, num_actions, hidden_sizes, activation}, or for several tasks
    {hidden_sizes, activation, multitask: [tasks]}. UserError for multitask images."""
    tasks = []
    for config in env_configs:
        env = make_env(config, training=False)
        discrete = isinstance(env.action_space, gym.spaces.Discrete)
        num_actions = int(env.action_space.n) if discrete else int(env.action_space.shape[0])
        tasks.append({"obs_shape": list(env.observation_space.shape), "discrete": discrete, "num_actions": num_actions})
        env.close()
        if len(env_configs) > 1 and len(tasks[-1]["obs_shape"]) != 1:
            raise UserError(f"--multitask takes vector observations only; {config['env_id']} gives images")
    base = {"hidden_sizes": list(hidden_sizes), "activation": activation}
    if len(tasks) == 1:
        return dict(tasks[0], **base)
    return dict(base, multitask=tasks)


# The policy's speed: the MLP in numpy, for one member or B members at once
# The Policy's activations, and the same on float32 numpy arrays (selu with torch's constants).
ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "selu": torch.selu}
NUMPY_ACTIVATIONS = {
    "tanh": np.tanh,
    "relu": lambda h: np.maximum(h, np.float32(0)),
    "selu": lambda h: (
        np.float32(1.0507009873554805)
        * np.where(h > 0, h, np.float32(1.6732632423543772) * np.expm1(np.minimum(h, np.float32(0))))
    ),
}


def linear(weight, bias, h):
    """bias + h @ weight.T for h (D,) (torch.addmv: half of nn.Linear's cost) or (B, D)."""
    if h.dim() == 1:
        return torch.addmv(bias, weight, h)
    return torch.addmm(bias, h, weight.t())


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
    """B members' observations (B, O) through their MLPs in numpy: B ints, or float32 (B, A) in [-1, 1]; row b is
    exactly what member b's observation alone gives."""
    h = np.asarray(obs, dtype=np.float32)
    for weight, bias in layers[:-1]:
        h = policy.numpy_activation(np.matmul(weight, h[:, :, None])[:, :, 0] + bias)
    out = np.matmul(layers[-1][0], h[:, :, None])[:, :, 0] + layers[-1][1]
    if policy.discrete:
        return out.argmax(axis=1).tolist()
    return np.tanh(out)


# Workers: the policy's rollouts, on a pool of this process, local processes or a Ray cluster
LOCKSTEP_MAX = 16  # episodes one worker steps together at most: more gains little on small MLPs


class Members:
    """B genotypes float32 (B, D) acting in `rollout`: an MLP's in one numpy pass (`act_batch`), a conv policy's one
    (B = 1). `act(observations, playing)`: the actions of the members `playing`."""

    def __init__(self, policy, genotypes):
        self.policy = policy
        self.genotypes = genotypes
        self.playing = None  # the members whose layers are stacked
        if policy.pixels:
            policy.load(genotypes[0])

    def act(self, observations, playing):
        if self.policy.pixels:
            return [self.policy.act(observations[0])]
        if playing != self.playing:
            self.playing = playing
            self.layers = stacked_layers(self.policy, self.genotypes[playing])
        return act_batch(self.policy, np.stack(observations), self.layers)


class RolloutWorker:
    """One process's envs and policy, built once. `run(tasks)`: per RolloutTask (episode returns [[T floats] per
    episode], env steps), a plain tuple (RolloutPool.map makes it a RolloutResult)."""

    def __init__(self, env_configs, policy_config, dim):
        torch.set_num_threads(1)
        self.env_configs = env_configs
        self.dim = dim
        self.members = None
        # (task t, training) -> its envs, one per episode stepped at once (more built at first use)
        self.envs = {
            (t, training): [make_env(config, training)]
            for t, config in enumerate(env_configs)
            for training in (True, False)
        }
        self.policy = build_policy(policy_config)

    def use(self, members):
        """The members: a view of a flat float32 array as (rows, D)."""
        self.members = members.reshape(-1, self.dim)

    def env(self, t, training, slot=0):
        """Env number `slot` of task t for a new episode. A Box2D world keeps state across resets (BipedalWalker's
        returns drift on a reused env with the same seed): Box2D envs are rebuilt per episode (~0.4 ms)."""
        envs = self.envs[t, training]
        if slot == len(envs):
            envs.append(make_env(self.env_configs[t], training))
        elif type(envs[slot].unwrapped).__module__.startswith("gymnasium.envs.box2d"):
            envs[slot].close()
            envs[slot] = make_env(self.env_configs[t], training)
        return envs[slot]

    def run(self, tasks):
        """An MLP steps the tasks (all training, or all evaluation) together, a conv policy one by one."""
        if isinstance(self.policy, MultitaskPolicy):
            return [self.run_multitask(task) for task in tasks]
        if self.policy.pixels:
            return [result for task in tasks for result in self.run_together([task])]
        return self.run_together(tasks)

    def run_together(self, tasks):
        genotypes = self.members[[task.member for task in tasks]]
        env_seeds = [task.env_seeds for task in tasks]
        returns, steps = rollout(self.policy, genotypes, lambda b: self.env(0, tasks[0].training, b), env_seeds)
        return [([[r] for r in returns[b]], steps[b]) for b in range(len(tasks))]

    def run_multitask(self, task):
        self.policy.load(self.members[task.member])
        returns, steps = [], 0
        for env_seed in task.env_seeds:
            envs = [self.env(t, task.training) for t in range(len(self.env_configs))]
            episode_returns, episode_steps = multitask_rollout(envs, self.policy, env_seed, task.noisy)
            returns.append(episode_returns)
            steps += episode_steps
        return returns, steps


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


def write_csv(path, header, rows):
    """A small CSV table (a header, rows of plain values), written atomically."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *rows])
    atomic_write(path, text.getvalue().encode())


def save_weights(path, params, meta):
    """Weights file (.npz), atomically: `params` float32 (D,), `meta` a dict as a 0-d unicode array of JSON."""
    params = np.asarray(params, dtype=np.float32)
    atomic_write(path, lambda f: np.savez(f, params=params, meta=np.array(json.dumps(meta))))


def load_weights(path):
    """(params float32 (D,), meta dict) of this script's weights file. UserError: an unusable file, or a meta
    without its env ids, env and policy settings (their values are check_args's to check)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            params = data["params"].astype(np.float32).ravel()
            meta = json.loads(str(data["meta"]))
    except FileNotFoundError:
        raise UserError(f"weights file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a weights file (.npz)") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read weights file {path} (it needs 'params' and 'meta' arrays): {e}") from None
    owner = meta.get("script") if isinstance(meta, dict) else None
    if owner != SCRIPT:
        raise UserError(f"{path} was written by {owner or 'an unknown script'}, not {SCRIPT}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has weights format {meta.get('format_version')}, this script reads {FORMAT_VERSION}")
    policy, env_ids = meta.get("policy"), meta.get("env_ids")
    tasks = policy.get("multitask", [policy]) if isinstance(policy, dict) else None
    sound = (
        isinstance(env_ids, list)
        and env_ids
        and all(isinstance(e, str) for e in env_ids)
        and isinstance(meta.get("env_id"), str)
        and isinstance(meta.get("env"), dict)
        and set(META_ENV_FLAGS) <= set(meta["env"])
        and isinstance(tasks, list)
        and all(isinstance(t, dict) for t in tasks)
        and set(META_POLICY_FLAGS) <= set(policy)
    )
    if not sound:
        raise UserError(f"{path} has a broken meta: its env ids, env settings or policy sizes are missing or invalid")
    if not np.all(np.isfinite(params)):
        raise UserError(f"{path} holds parameters that are not finite (nan or inf)")
    return params, meta


def read_weights_into_args(path, args, given):
    """(params, meta) of a weights file, its env(s) and architecture put into args and checked. UserError."""
    params, meta = load_weights(path)
    if "env_id" in given and args.env_id != meta["env_id"]:
        raise UserError(f"{path} was trained on {meta['env_id']}, not {args.env_id}")
    args.env_id = meta["env_id"]
    args.multitask = meta["env_ids"] if len(meta["env_ids"]) > 1 else None
    for key in META_ENV_FLAGS:
        setattr(args, key, meta["env"][key])
    for key in META_POLICY_FLAGS:
        setattr(args, key, meta["policy"][key])
    try:
        check_numbers(vars(args), lambda key: "--" + key.replace("_", "-"))
        check_args(args)
    except UserError as e:
        raise UserError(f"{path} has a bad meta: {e}") from None
    return params, meta


def weights_meta(args, env_configs, policy_config, dim, evaluation=None, iteration=None, **extra):
    """The `meta` of a weights file: everything needed to rebuild the policy and its envs."""
    meta = {
        "format_version": FORMAT_VERSION,
        "script": SCRIPT,
        "env_id": args.env_id,
        "env_ids": [c["env_id"] for c in env_configs],
        "env": env_configs[0],
        "envs": env_configs,
        "policy": policy_config,
        "obs_norm": None,
        "evaluation": evaluation,
        "seed": args.seed,
        "iteration": iteration,
        "num_params": dim,
    }
    return dict(meta, **extra)


def load_policy(path, params, meta, config):
    """The policy of `config` holding a weights file's `params`. UserError: they do not fit."""
    policy = build_policy(config)

    def spaces(c):
        return [(t.get("obs_shape"), t.get("discrete"), t.get("num_actions")) for t in c.get("multitask", [c])]

    theirs, ours = spaces(meta["policy"]), spaces(config)
    if theirs != ours:
        message = f"its policy takes (observations, discrete, actions) {theirs}, the env gives {ours}"
        raise UserError(f"{path} does not fit {meta['env_id']}: {message}")
    if params.size != num_params(policy):
        raise UserError(f"{path} holds {params.size} parameters but its architecture needs {num_params(policy)}")
    return policy.load(params)


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


# Plots and video
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


# Experiments: one network for several tasks and its noise study; distillation; a weights file
class MultitaskPolicy(nn.Module):
    """One network for several vector tasks (hard parameter sharing), multitask: [{obs_shape: [O_t], discrete,
    num_actions: A_t}]: task input layers (O_t -> hidden_sizes[0]), concatenated, feed a shared trunk
    (hidden_sizes[1:]) and a head per task, which sees every task's input (the noise study probes it)."""

    def __init__(self, multitask, hidden_sizes=(32, 32), activation="tanh"):
        super().__init__()
        self.tasks = multitask
        self.activation = ACTIVATIONS[activation]
        self.inputs = nn.ModuleList(nn.Linear(t["obs_shape"][0], hidden_sizes[0]) for t in multitask)
        widths = [hidden_sizes[0] * len(multitask), *hidden_sizes[1:]]
        self.trunk = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.heads = nn.ModuleList(nn.Linear(widths[-1], t["num_actions"]) for t in multitask)
        self.requires_grad_(False)

    load = load_flat

    def act(self, observations):
        """One numpy observation per task -> one action per task: int or float32 (A_t,)."""
        xs = [torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in observations]
        h = torch.cat([self.activation(layer(x)) for layer, x in zip(self.inputs, xs)])
        for layer in self.trunk:
            h = self.activation(layer(h))
        actions = []
        for head, task in zip(self.heads, self.tasks):
            if task["discrete"]:
                actions.append(int(head(h).argmax()))
            else:
                actions.append(torch.tanh(head(h)).numpy())
        return actions


def multitask_rollout(envs, policy, seed, noisy=()):
    """One episode of every task stepped together, each env reset with `seed`: (T returns, steps). A finished
    task feeds its last observation; `noisy` tasks' observations are U(-1, 1) noise."""
    rng = np.random.default_rng(seed)
    observations = [env.reset(seed=seed)[0] for env in envs]
    running = [True] * len(envs)
    totals = [0.0] * len(envs)
    steps = 0
    with torch.inference_mode():
        while any(running):
            inputs = []
            for t, obs in enumerate(observations):
                if t in noisy:
                    obs = rng.uniform(-1, 1, np.shape(obs)).astype(np.float32)
                inputs.append(obs)
            actions = policy.act(inputs)
            for t, env in enumerate(envs):
                if running[t]:
                    observations[t], reward, terminated, truncated, _ = env.step(actions[t])
                    totals[t] += float(reward)
                    steps += 1
                    running[t] = not (terminated or truncated)
    return totals, steps


def return_scale(env_config):
    """A task's return over this in multitask fitness: its reward threshold (SlimeVolley: 5; none: 1)."""
    if env_config["env_id"] == SLIME_ID:
        return 5.0
    return float(gym.spec(env_config["env_id"]).reward_threshold or 1)


def noise_study(pool, params, env_ids, seed, episodes, run_dir):
    """Returns with all inputs real, noise into each task's, into all, on the same episodes: table, csv, png."""
    tasks = tuple(range(len(env_ids)))
    every = "both" if len(tasks) == 2 else "all"
    conditions = [(f"{every} real", ())] + [(f"noise into {env_ids[t]}", (t,)) for t in tasks]
    conditions.append((f"noise into {every}", tasks))
    names = [name for name, _ in conditions]
    returns = [
        evaluate(pool, params, seed, 0, episodes, noisy, f"noise study: {name}")[0] for name, noisy in conditions
    ]
    means = np.array([r.mean(0) for r in returns])  # (conditions, tasks)
    stds = np.array([r.std(0) for r in returns])
    width = max(len(name) for name in names)
    print(f"{'condition':<{width}} | " + " | ".join(f"{env_id:>24}" for env_id in env_ids))
    for name, mean, std in zip(names, means, stds):
        print(f"{name:<{width}} | " + " | ".join(f"{m:11.2f} ± {s:10.2f}" for m, s in zip(mean, std)))
    header = ["condition"] + [f"{e} mean" for e in env_ids] + [f"{e} std" for e in env_ids]
    rows = [
        [name] + [f"{m:.2f}" for m in mean] + [f"{s:.2f}" for s in std] for name, mean, std in zip(names, means, stds)
    ]
    write_csv(os.path.join(run_dir, "noise_study.csv"), header, rows)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(env_ids), 4))
    colors = ["tab:green", "tab:orange", "tab:blue", "tab:red", "tab:purple"][: len(names)]
    for t, (ax, env_id) in enumerate(zip(fig.subplots(1, len(env_ids)), env_ids)):
        ax.bar(range(len(names)), means[:, t], yerr=stds[:, t], capsize=3, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set(title=env_id, ylabel="episode return")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "noise_study.png"), dpi=100)


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
    """Evaluate a weights file (a multitask one: and the noise study); last line `episode_return mean=...`."""
    params, meta = read_weights_into_args(args.from_pretrained, args, given)
    env_configs = env_configs_from_args(args)
    policy_config = policy_config_from_envs(env_configs, args.hidden_sizes, args.activation)
    policy = load_policy(args.from_pretrained, params, meta, policy_config)
    print(policy)
    run_dir = os.path.join(args.logs_dir, args.run_name or default_run_name(args, "__eval"))
    with evaluation_pool(args, [params.size], env_configs, policy_config, params.size) as pool:
        header = f"parameters: {params.size}   env: {args.env_id}   episodes: {args.num_eval_rollouts}   "
        print(f"{header}workers: {pool.describe()}")
        start = time.perf_counter()
        returns, steps = evaluate(pool, params, args.seed, 0, args.num_eval_rollouts, label="evaluation")
        elapsed = time.perf_counter() - start
        if args.multitask:
            os.makedirs(run_dir, exist_ok=True)
            noise_study(pool, params, args.multitask, args.seed, args.num_eval_rollouts, run_dir)
    if args.capture_video and not args.multitask:
        pretrained_video(args, run_dir, env_configs[0], policy)
    if args.multitask:
        scales = np.array([return_scale(c) for c in env_configs])
        print_evaluation(steps, elapsed, (returns / scales).sum(1))
    else:
        print_evaluation(steps, elapsed, returns[:, 0])
    return 0


def distill_round(student, teacher, env_config, args, round_index, pairs):
    """A round of distillation: `pairs` (lists x, y) gets the observations met while the teacher (round 0) or
    the student (DAgger) drives, labelled by the teacher; the student is fitted to all pairs with Adam
    (cross-entropy on the teacher's argmax, or MSE on its actions)."""
    label = None if args.quiet else f"round {round_index + 1}/{args.distill_rounds}: "
    driver, driver_name = (teacher, "teacher") if round_index == 0 else (student, "student")
    genotype = parameters_to_vector(driver.parameters()).detach().numpy()
    observations, returns = [], []
    with live_bar(label and label + driver_name, args.distill_episodes) as bar:
        for e in range(args.distill_episodes):
            env = make_env(env_config, training=False)
            seed = derive_seed(args.seed, TRAIN_ENV_STREAM, round_index, e)
            episode_returns, steps = rollout(driver, genotype[None], lambda b, env=env: env, [[seed]], [observations])
            bar.done(1, steps[0])
            returns.append(episode_returns[0][0])
            env.close()
    pairs[0].append(torch.stack([teacher.preprocess(o) for o in observations]).numpy())
    with torch.inference_mode():
        pairs[1].append(teacher(torch.from_numpy(pairs[0][-1])).numpy())
    x = torch.from_numpy(np.concatenate(pairs[0]))
    y = torch.from_numpy(np.concatenate(pairs[1]))
    if teacher.discrete:
        labels, loss_fn = y.argmax(1), nn.functional.cross_entropy
    else:
        labels, loss_fn = y, nn.functional.mse_loss
    torch.manual_seed(derive_seed(args.seed, GA_STREAM, round_index))
    student.requires_grad_(True)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.learning_rate)
    with live_bar(label and label + "student fit", args.distill_epochs, "epoch") as bar:
        for _ in range(args.distill_epochs):
            order, total = torch.randperm(len(x)), 0.0
            for start in range(0, len(x), args.batch_size):
                batch = order[start : start + args.batch_size]
                loss = loss_fn(student(x[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            bar.set_postfix_str(f"loss {total / len(x):.3g}", refresh=False)
            bar.update()
    student.requires_grad_(False)
    print(
        f"round {round_index + 1}/{args.distill_rounds}: {driver_name} drove {args.distill_episodes} episodes "
        f"(mean return {np.mean(returns):.2f}); {len(x)} pairs; loss {total / len(x):.3g}"
    )


def run_distillation(args, given):
    """Distil a teacher into a smaller student, both evaluated on the same episodes; student.npz, a table."""
    if "hidden_sizes" not in given:
        raise UserError("--distill-from needs --hidden-sizes: the student's layer widths")
    student_flags = {key: getattr(args, key) for key in given & {"hidden_sizes", "activation"}}
    teacher_params, teacher_meta = read_weights_into_args(args.distill_from, args, given)
    if args.multitask:
        raise UserError(f"{args.distill_from} is a multitask policy: distillation takes single-task teachers")
    env_configs = env_configs_from_args(args)
    teacher_config = policy_config_from_envs(env_configs, args.hidden_sizes, args.activation)  # the meta's
    vars(args).update(student_flags)
    teacher = load_policy(args.distill_from, teacher_params, teacher_meta, teacher_config)
    if teacher.pixels:
        raise UserError("distillation takes vector-observation teachers only")
    student_config = dict(teacher_config, hidden_sizes=list(args.hidden_sizes), activation=args.activation)
    torch.manual_seed(derive_seed(args.seed, INIT_STREAM, 0))
    student = build_policy(student_config)
    run_dir = os.path.join(args.logs_dir, args.run_name or default_run_name(args, "_distill"))
    if os.path.exists(os.path.join(run_dir, "student.npz")):
        raise UserError(f"{run_dir} already holds a distillation: pick another --run-name")
    os.makedirs(run_dir, exist_ok=True)
    config = dict(vars(args), env_config=env_configs[0], versions=versions())
    atomic_write(os.path.join(run_dir, "args.json"), json.dumps(config, indent=2).encode())
    print(f"teacher: {args.distill_from} ({num_params(teacher)} parameters)\nstudent: {student}")
    start, pairs = time.perf_counter(), ([], [])
    for round_index in range(args.distill_rounds):
        distill_round(student, teacher, env_configs[0], args, round_index, pairs)
    rows = []
    for name, config, policy in (("teacher", teacher_config, teacher), ("student", student_config, student)):
        params = parameters_to_vector(policy.parameters()).numpy()
        with evaluation_pool(args, [params.size], env_configs, config, params.size) as pool:
            returns = evaluate(pool, params, args.seed, 0, args.num_eval_rollouts, label=f"evaluation of the {name}")
        returns = returns[0][:, 0]
        sizes = [config["obs_shape"][0], *config["hidden_sizes"], config["num_actions"]]
        architecture = "-".join(map(str, sizes))
        rows.append([name, architecture, params.size, f"{returns.mean():.2f}", f"{returns.std():.2f}"])
    teacher_file = os.path.basename(args.distill_from)
    meta = weights_meta(args, env_configs, student_config, params.size, summary(returns), distilled_from=teacher_file)
    save_weights(os.path.join(run_dir, "student.npz"), params, meta)
    header = ["model", "architecture", "parameters", "mean", "std"]
    write_csv(os.path.join(run_dir, "distillation.csv"), header, rows)
    print(
        f"\ndistillation of {args.env_id} over the same {args.num_eval_rollouts} episodes "
        f"({time.perf_counter() - start:.1f} s)"
    )
    print(f"{'model':<8} | {'architecture':<16} | {'parameters':>10} | return mean ± std")
    for name, architecture, size, mean, std in rows:
        print(f"{name:<8} | {architecture:<16} | {size:>10} | {mean} ± {std}")
    print(f"files in {run_dir}: args.json distillation.csv student.npz")
    print(summary_line(returns))
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

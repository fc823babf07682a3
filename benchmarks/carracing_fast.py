"""CarRacing-v3: gymnasium's stock env against train_cmaes.py's FastCarRacing, side by side in one run.

1. The env alone: both envs step through the same random actions on the same tracks, in alternating
   episodes, on one core; steps/s of each.
2. The env and the agent: the authors' AttentionAgent drives --episodes evaluation episodes (1000
   steps, no early stop) on each env, alternating; steps/s of each path, the agent's own time per
   step, and the returns, which must be identical episode by episode.

    python benchmarks/carracing_fast.py --episodes 20
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_cmaes as cm  # noqa: E402


def make(stock, steps):
    return cm.make_env({"env_id": "CarRacing-v3", "max_episode_steps": steps, "max_negative_steps": 0,
                        "stock_env": stock}, training=False)


def env_alone(env, seed, steps):
    """Seconds spent in env.step over one episode of random actions: (seconds, steps)."""
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    seconds = 0.0
    for step in range(steps):
        action = rng.uniform([-1, -1, -1], [1, 1, 1]).astype(np.float32)
        start = time.perf_counter()
        _, _, terminated, truncated, _ = env.step(action)
        seconds += time.perf_counter() - start
        if terminated or truncated:
            return seconds, step + 1
    return seconds, steps


def with_agent(env, agent, seed):
    """One evaluation episode driven by the agent: (return, steps, env seconds, agent seconds)."""
    obs, _ = env.reset(seed=seed)
    state, total, steps, env_s, agent_s = agent.initial_state(), 0.0, 0, 0.0, 0.0
    with torch.inference_mode():
        while True:
            start = time.perf_counter()
            action, state, _ = agent(obs, state)
            middle = time.perf_counter()
            obs, reward, terminated, truncated, _ = env.step(action)
            env_s += time.perf_counter() - middle
            agent_s += middle - start
            total += float(reward)
            steps += 1
            if terminated or truncated:
                return total, steps, env_s, agent_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-episodes", type=int, default=4, help="random-action episodes per env")
    parser.add_argument("--episodes", type=int, default=20, help="episodes of the authors' agent per env")
    parser.add_argument("--weights", default=os.path.join(ROOT, "..", "shared", "weights", "attentionagent_carracing.npz"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    envs = {"stock": make(True, 1000), "fast": make(False, 1000)}
    alone = {name: [0.0, 0] for name in envs}
    for episode in range(args.env_episodes):
        for name, env in envs.items():
            seconds, steps = env_alone(env, 100 + episode, 1000)
            alone[name][0] += seconds
            alone[name][1] += steps
    rate = {name: steps / seconds for name, (seconds, steps) in alone.items()}
    print(f"env alone, random actions, {alone['stock'][1]} steps each: stock {rate['stock']:.1f} steps/s, "
          f"fast {rate['fast']:.1f} steps/s, ratio {rate['fast'] / rate['stock']:.2f}")

    agent = cm.AttentionAgent()
    with np.load(args.weights, allow_pickle=False) as data:
        agent.set_flat(data["params"])
    totals = {name: np.zeros(3) for name in envs}  # steps, env seconds, agent seconds
    returns = {name: [] for name in envs}
    for episode in range(args.episodes):
        seed = cm.derive_seed(1, cm.EVAL_ENV_STREAM, 0, episode)
        for name, env in envs.items():
            episode_return, steps, env_s, agent_s = with_agent(env, agent, seed)
            returns[name].append(episode_return)
            totals[name] += (steps, env_s, agent_s)
    for name in envs:
        steps, env_s, agent_s = totals[name]
        print(f"{name:>5} env + agent: {steps / (env_s + agent_s):.1f} steps/s (env {1e3 * env_s / steps:.2f} ms, "
              f"agent {1e3 * agent_s / steps:.2f} ms per step); return {np.mean(returns[name]):.2f} ± "
              f"{np.std(returns[name]):.2f} over {len(returns[name])} episodes")
    speedup = (totals["stock"][1] + totals["stock"][2]) / (totals["fast"][1] + totals["fast"][2])
    identical = returns["stock"] == returns["fast"]
    print(f"env + agent speed-up {speedup:.2f}; returns identical episode by episode: {identical}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()

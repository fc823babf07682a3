"""train_cmaes.py's training frames (DirectCarRacing, drawn at 96 x 96) against gymnasium's (FastCarRacing),
side by side on the same trajectories: the authors' agent drives on gymnasium's frames, the same actions
step a DirectCarRacing too (the physics are the same), and each step's two frames are compared: mean and
max absolute pixel difference (0-255), and whether the agent's top-k patches agree on them (as a set, and
in order). Then the time a frame takes on each (the env step, render included), on one core.

    python benchmarks/carracing_frames.py --episodes 5 --steps 1000
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


def compare(agent, seeds, steps):
    """Per frame: (mean |diff|, max |diff|, top-k sets agree, top-k orders agree, share of the top-k in
    both), and the seconds of the two envs' steps: (float64 (F, 5), gymnasium seconds, direct seconds)."""
    config = {"env_id": "CarRacing-v3", "max_episode_steps": steps, "max_negative_steps": 0, "stock_env": False,
              "training_frames": "direct", "evaluation_frames": "gymnasium"}
    gymnasium_env = cm.make_env(config, training=False)
    direct_env = cm.make_env(config, training=True)
    rows = []
    seconds = np.zeros(2)
    with torch.inference_mode():
        for seed in seeds:
            obs, _ = gymnasium_env.reset(seed=seed)
            twin, _ = direct_env.reset(seed=seed)
            state = agent.initial_state()
            while True:
                diff = np.abs(obs.astype(np.int16) - twin.astype(np.int16))
                action, state, top = agent(obs, state)
                twin_top = agent.attend(twin)
                common = len(set(top.tolist()) & set(twin_top.tolist())) / len(top)
                rows.append((diff.mean(), diff.max(), common == 1.0, top.tolist() == twin_top.tolist(), common))
                start = time.perf_counter()
                obs, _, terminated, truncated, _ = gymnasium_env.step(action)
                middle = time.perf_counter()
                twin, _, _, _, _ = direct_env.step(action)
                seconds += (middle - start, time.perf_counter() - middle)
                if terminated or truncated:
                    break
    return np.array(rows, dtype=np.float64), seconds[0], seconds[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000, help="steps per episode")
    parser.add_argument("--weights", default=os.path.join(ROOT, "..", "shared", "weights", "attentionagent_carracing.npz"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cm.cv2.setNumThreads(1)
    agent, _, _ = cm.agent_from_file(args.weights, 96, 3)
    seeds = [cm.derive_seed(1, cm.EVAL_ENV_STREAM, 0, episode) for episode in range(args.episodes)]
    rows, gymnasium_s, direct_s = compare(agent, seeds, args.steps)
    frames = len(rows)
    print(f"{frames} frames of {args.episodes} episodes (the authors' agent on gymnasium's frames)")
    print(f"pixel |difference| (0-255): mean {rows[:, 0].mean():.3f}, per-frame mean at most {rows[:, 0].max():.3f}; "
          f"max {rows[:, 1].max():.0f} (median of the frames' max {np.median(rows[:, 1]):.0f})")
    print(f"top-{agent.top_k} patches: the same set on {100 * rows[:, 2].mean():.1f}% of frames, "
          f"the same order on {100 * rows[:, 3].mean():.1f}%; {100 * rows[:, 4].mean():.1f}% of the patches in both")
    print(f"env step: gymnasium's frames {1e3 * gymnasium_s / frames:.3f} ms, direct {1e3 * direct_s / frames:.3f} ms "
          f"({gymnasium_s / direct_s:.2f}x)")


if __name__ == "__main__":
    main()

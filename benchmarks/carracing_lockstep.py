"""Issue 38's first path, measured: the AttentionAgent's training forward run for several members' frames at
once (workers stepping B members in lockstep, the attention as batched products) against train_cmaes.py's
DirectForward one member at a time. Each member is the authors' weights plus N(0, 0.01^2) noise (a CMA-ES
population near a solution), on real DirectCarRacing frames (member b sees frame t + b); CPU time of the
agent alone per member and frame, on one core, the two forwards alternated (medians), and how often the
batched top-k equals DirectForward's as a set (they round differently).

    python benchmarks/carracing_lockstep.py --members 1 4 8 16
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


class LockstepForward:
    """DirectForward's arithmetic for B members at once: frames uint8 (B, S, S, 3), LSTM state (h, c) float32
    (B, hidden) or None -> actions float32 (B, 3), state, top-k int64 (B, k). The authors' LSTM controller."""

    def __init__(self, agents):
        forwards = [cm.DirectForward(agent) for agent in agents]
        self.agent = agents[0]
        self.weight = torch.stack([f.weight for f in forwards]).transpose(1, 2)  # (B, d, 2 q)
        self.bias = torch.stack([f.bias for f in forwards]).unsqueeze(1)  # (B, 1, 2 q)
        self.cell_weight = torch.stack([f.cell_weight for f in forwards])  # (B, 4 h, 2 k + h)
        self.cell_bias = torch.stack([f.cell_bias for f in forwards]).unsqueeze(2)
        self.fc_weight = torch.stack([agent.fc.weight for agent in agents])
        self.fc_bias = torch.stack([agent.fc.bias for agent in agents]).unsqueeze(2)

    def __call__(self, frames, state):
        agent = self.agent
        q = agent.fc_q.out_features
        p = agent.patch_size
        s = agent.patch_stride
        patches = torch.from_numpy(frames).float().div_(255.0).unfold(1, p, s).unfold(2, p, s)
        patches = patches.permute(0, 1, 2, 4, 5, 3).reshape(len(frames), -1, agent.patch_dim)
        qk = torch.baddbmm(self.bias, patches, self.weight)  # (B, n^2, 2 q)
        logits = torch.bmm(qk[:, :, :q], qk[:, :, q:].transpose(1, 2))  # (B, n^2, n^2)
        largest = qk.abs().amax(dim=1)
        if (largest[:, :q] * largest[:, q:]).sum(dim=1).max() > cm.EXP2_SAFE:
            logits.sub_(logits.amax(dim=2, keepdim=True))
        weights = logits.exp2_()
        rows = weights.sum(dim=2).reciprocal_().unsqueeze(1)  # (B, 1, n^2)
        top = torch.topk(torch.bmm(rows, weights).squeeze(1), agent.top_k, dim=1).indices
        x = agent.patch_positions[top].flatten(1)
        h, c = (torch.zeros(len(frames), agent.fc.in_features),) * 2 if state is None else state
        gates = torch.baddbmm(self.cell_bias, self.cell_weight, torch.cat([x, h], dim=1).unsqueeze(2)).squeeze(2)
        i, f, _, o = torch.sigmoid(gates).chunk(4, dim=1)
        g = torch.tanh(gates[:, 2 * h.shape[1] : 3 * h.shape[1]])
        c = torch.addcmul(f * c, i, g)
        h = o * torch.tanh(c)
        action = torch.tanh(torch.baddbmm(self.fc_bias, self.fc_weight, h.unsqueeze(2)).squeeze(2))
        return action.numpy(), (h, c), top


def direct_frames(count, seed):
    """uint8 (count, 96, 96, 3): a DirectCarRacing episode's frames under uniform random actions."""
    config = {
        "env_id": "CarRacing-v3",
        "max_episode_steps": count,
        "max_negative_steps": 0,
        "stock_env": False,
        "training_frames": "direct",
        "evaluation_frames": "gymnasium",
    }
    env = cm.make_env(config, training=True)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    frames = [obs]
    while len(frames) < count:
        obs, _, terminated, truncated, _ = env.step(rng.uniform([-1, 0, 0], 1).astype(np.float32))
        frames.append(obs)
        if terminated or truncated:
            obs, _ = env.reset(seed=seed + len(frames))
    return np.stack(frames)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 4, 8, 16], help="lockstep batch sizes B")
    parser.add_argument("--frames", type=int, default=200, help="lockstep steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=7, help="alternations of the two forwards")
    parser.add_argument(
        "--weights", default=os.path.join(ROOT, "..", "shared", "weights", "attentionagent_carracing.npz")
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    frames = direct_frames(args.frames + max(args.members), seed=1)
    authors, _, _ = cm.agent_from_file(args.weights, 96, 3)
    rng = np.random.default_rng(0)
    print("members | DirectForward us a member-frame | lockstep us a member-frame | lockstep / one | top-k sets equal")
    for members in args.members:
        agents = []
        for _ in range(members):
            agent = cm.AttentionAgent()
            flat = authors.get_flat()
            agent.set_flat((flat + 0.01 * rng.standard_normal(flat.size)).astype(np.float32))
            agents.append(agent)
        times = {"one": [], "lockstep": []}
        equal = []
        with torch.inference_mode():
            forwards = [cm.DirectForward(agent) for agent in agents]
            lockstep = LockstepForward(agents)
            for _ in range(args.repeats):
                start = time.process_time()
                states = [None] * members
                for t in range(args.frames):
                    for b in range(members):
                        _, states[b], _ = forwards[b](frames[t + b], states[b])
                times["one"].append(time.process_time() - start)
                start = time.process_time()
                state = None
                for t in range(args.frames):
                    _, state, _ = lockstep(frames[t : t + members], state)
                times["lockstep"].append(time.process_time() - start)
            for t in range(0, args.frames, 10):
                _, _, top = lockstep(frames[t : t + members], None)
                for b in range(members):
                    equal.append(set(top[b].tolist()) == set(forwards[b](frames[t + b], None)[2].tolist()))
        one, batched = (np.median(times[k]) / (args.frames * members) * 1e6 for k in ("one", "lockstep"))
        print(f"{members:7d} | {one:31.1f} | {batched:26.1f} | {batched / one:13.2f} | {np.mean(equal):.1%}")


if __name__ == "__main__":
    main()

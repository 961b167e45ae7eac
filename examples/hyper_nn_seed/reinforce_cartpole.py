"""REINFORCE on CartPole-v1 with a generated static hypernetwork as the policy (PyTorch).

    python examples/hyper_nn_seed/reinforce_cartpole.py            # full run
    python examples/hyper_nn_seed/reinforce_cartpole.py --quick    # two updates (CI)

hyper-nn's notebooks trained its README policy (8-256-256-4, LunarLander's sizes) with
REINFORCE. LunarLander needs Box2D, which has to be compiled, so this runs the same policy
architecture with CartPole's sizes (``cartpole_policy.py``: 4-256-256-2, 67,584 weights) on
gymnasium's CartPole-v1, which is pure Python. ``cartpole_policy_torch_static.py`` was generated
from it by ``hypernn-gen`` (pyproject job); its 16,910 parameters make the policy's 67,584.

Each update samples a batch of episodes with one generated weight set (``generate_params()``
once, then ``hypernetwork(obs, generated_params=flat)`` per step, without gradients), then
recomputes the log-probabilities of the taken actions on all the batch's states in one
differentiable call and takes an Adam step on ``-log pi(a|s) * normalised return-to-go``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cartpole_policy_torch_static import FLAT_SIZE, CartpolePolicyHyperNetwork  # noqa: E402

try:
    import gymnasium as gym
except ImportError:  # pragma: no cover - reported, not hidden
    sys.exit("this example needs gymnasium: pip install gymnasium (CartPole needs no download)")


def run_episode(
    env: gym.Env,
    hypernetwork: CartpolePolicyHyperNetwork,
    flat: torch.Tensor,
    *,
    seed: int,
    greedy: bool,
    generator: torch.Generator,
) -> tuple[list[np.ndarray], list[int], list[float]]:
    observations, actions, rewards = [], [], []
    obs, _ = env.reset(seed=seed)
    done = False
    with torch.no_grad():
        while not done:
            x = torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0)
            logits, _ = hypernetwork(x, generated_params=flat)
            if greedy:
                action = int(logits.argmax(-1))
            else:
                action = int(torch.multinomial(F.softmax(logits[0], -1), 1, generator=generator))
            observations.append(obs)
            actions.append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            rewards.append(float(reward))
            done = terminated or truncated
    return observations, actions, rewards


def returns_to_go(rewards: list[float], gamma: float) -> np.ndarray:
    out, running = np.zeros(len(rewards)), 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def evaluate(env: gym.Env, hypernetwork, episodes: int, seed: int) -> float:
    flat = hypernetwork.generate_params().detach()
    generator = torch.Generator().manual_seed(seed)
    totals = [
        sum(
            run_episode(env, hypernetwork, flat, seed=seed + i, greedy=True, generator=generator)[2]
        )
        for i in range(episodes)
    ]
    return float(np.mean(totals))


def plot(history: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(
        history["update"],
        history["mean_return"],
        color="tab:blue",
        alpha=0.35,
        label="mean return of the update's episodes",
    )
    window = 10
    if len(history["mean_return"]) >= window:
        smooth = np.convolve(history["mean_return"], np.ones(window) / window, mode="valid")
        ax.plot(
            history["update"][window - 1 :],
            smooth,
            color="tab:blue",
            label=f"moving average ({window} updates)",
        )
    ax.axhline(500, color="grey", linestyle=":", linewidth=0.8)
    ax.set(xlabel="update", ylabel="episode return", title=title, ylim=(0, 520))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two updates, no return check")
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--episodes", type=int, default=8, help="episodes per update")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="where to save cartpole_returns.png (default: next to this "
        "file; --quick: a temporary directory)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = args.out_dir or (Path(tempfile.mkdtemp()) if args.quick else HERE)
    out_dir.mkdir(parents=True, exist_ok=True)
    updates = 2 if args.quick else args.updates
    episodes = 2 if args.quick else args.episodes

    torch.manual_seed(args.seed)
    env = gym.make("CartPole-v1")
    hypernetwork = CartpolePolicyHyperNetwork()
    n_hyper = sum(p.numel() for p in hypernetwork.parameters() if p.requires_grad)
    print(f"gymnasium {gym.__version__}, CartPole-v1")
    print(f"policy weights generated: {FLAT_SIZE:,}")
    print(f"hypernetwork trainable parameters: {n_hyper:,}")
    optimizer = torch.optim.Adam(hypernetwork.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    history: dict[str, list[float]] = {"update": [], "mean_return": []}
    start, episode_seed = time.perf_counter(), args.seed * 100_000
    for update in range(1, updates + 1):
        flat = hypernetwork.generate_params().detach()  # one weight set for the whole batch
        states, actions, advantages, totals = [], [], [], []
        for _ in range(episodes):
            obs, acts, rewards = run_episode(
                env, hypernetwork, flat, seed=episode_seed, greedy=False, generator=generator
            )
            episode_seed += 1
            states += obs
            actions += acts
            advantages.append(returns_to_go(rewards, args.gamma))
            totals.append(sum(rewards))
        adv = torch.as_tensor(np.concatenate(advantages), dtype=torch.float32)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        logits, _ = hypernetwork(torch.as_tensor(np.stack(states), dtype=torch.float32))
        log_prob = F.log_softmax(logits, -1).gather(1, torch.as_tensor(actions)[:, None])[:, 0]
        loss = -(log_prob * adv).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history["update"].append(update)
        history["mean_return"].append(float(np.mean(totals)))
        if update % 10 == 0 or update == updates:
            recent = np.mean(history["mean_return"][-10:])
            print(
                f"update {update:4d}  mean return {history['mean_return'][-1]:6.1f}  "
                f"last-10 average {recent:6.1f}  ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    final = evaluate(env, hypernetwork, episodes=2 if args.quick else 20, seed=10_000_000)
    print(f"final training return (last 10 updates): {np.mean(history['mean_return'][-10:]):.1f}")
    print(f"evaluation return (greedy policy, {2 if args.quick else 20} episodes): {final:.1f}")
    path = out_dir / "cartpole_returns.png"
    plot(
        history,
        path,
        f"REINFORCE on CartPole-v1: a generated static hypernetwork\n"
        f"({n_hyper:,} parameters) makes the policy's {FLAT_SIZE:,} weights",
    )
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

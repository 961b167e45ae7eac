"""The loss/accuracy figure shared by the digits examples (PyTorch and Flax)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_curves(
    histories: dict[str, dict[str, list[float]]],
    path: Path,
    title: str,
    target_accuracy: float = 0.95,
) -> None:
    """Loss (train solid, test dashed) and test accuracy per epoch, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for (label, h), color in zip(histories.items(), ("tab:blue", "tab:orange"), strict=False):
        epochs = np.arange(1, len(h["step"]) + 1)
        ax_loss.plot(epochs, h["train_loss"], color=color, label=f"{label}: train")
        ax_loss.plot(epochs, h["test_loss"], color=color, linestyle="--", label=f"{label}: test")
        ax_acc.plot(epochs, 100 * np.asarray(h["test_acc"]), color=color, label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy", ylim=(80, 100))
    ax_acc.axhline(100 * target_accuracy, color="grey", linewidth=0.8, linestyle=":")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

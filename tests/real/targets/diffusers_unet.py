"""A tiny diffusers UNet2DModel, built from a config: nothing is downloaded."""

import diffusers
import torch


def make_target():
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


example_call = ((torch.zeros(2, 3, 8, 8),), {"timestep": torch.zeros(2, dtype=torch.long)})

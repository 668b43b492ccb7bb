"""Fixed 2-D sine-cosine position embeddings (as used by MAE for ViT pretraining)."""

from __future__ import annotations

import torch

from simmim.errors import ConfigError


def sincos_2d_pos_embed(dim: int, grid: int, temperature: float = 10000.0) -> torch.Tensor:
    """A (grid*grid, dim) table: a quarter of the channels each for sin/cos of row and column.

    Row-major token order, matching a flattened (grid, grid) patch grid.
    """
    if dim % 4 != 0:
        raise ConfigError([f"sin-cos position embeddings need a width divisible by 4, got {dim}; "
                           "use model.pos_embed=learned"])
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")  # (g, g)
    angle_y = rows.flatten()[:, None].double() * omega[None]  # (g*g, D/4)
    angle_x = cols.flatten()[:, None].double() * omega[None]  # (g*g, D/4)
    table = torch.cat([angle_y.sin(), angle_y.cos(), angle_x.sin(), angle_x.cos()], dim=1)
    return table.float()  # (g*g, D)

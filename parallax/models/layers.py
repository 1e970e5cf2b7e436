"""Building blocks shared by every family: RMSNorm, rotary embedding, fused linears."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from parallax.models import fused_ops


class RMSNorm(nn.Module):
    """RMSNorm as transformers computes it: normalise in fp32, cast back, then scale.

    Normalising in bf16 diverges on small models (SmolLM2), so the fp32 step is not optional.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_ops.rms_norm(x, self.weight, self.eps)
        if fused is not None:
            return fused
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_config_parameters(config) -> dict:
    """The rope dict of a transformers config (v5 `rope_parameters`, v4 `rope_scaling`)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    params = dict(params or {})
    params.setdefault("rope_type", params.get("type", "default"))
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return params


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by absolute position (any rope type transformers knows).

    `rotary_dim` below head_dim gives partial rotary (the first rotary_dim channels rotate).
    """

    def __init__(self, config, head_dim: int, rotary_dim: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.rotary_dim = rotary_dim or head_dim
        self.max_positions = int(getattr(config, "max_position_embeddings", 8192) or 8192)
        self.cos = self.sin = None
        self._positions: torch.Tensor | None = None  # positions of the cached step tables
        self._step_tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self.build("cpu" if torch.get_default_device().type == "meta" else None)

    def build(self, device) -> None:
        """(Re)compute the tables on a device; called again after meta-device construction."""
        with torch.device("cpu"):  # rope init functions allocate on the default device (meta)
            self._build(device)

    def _build(self, device) -> None:
        params = rope_config_parameters(self.config)
        rope_type = params["rope_type"]
        if rope_type in ("default", "dynamic"):
            # dynamic NTK only changes beyond the trained length; use the base table.
            exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float, device="cpu")
            inv_freq, scaling = 1.0 / (params["rope_theta"] ** (exponents / self.rotary_dim)), 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](self.config, "cpu")
        else:
            raise ValueError(
                f"rope type {rope_type!r} is not supported; supported: default, "
                f"{', '.join(ROPE_INIT_FUNCTIONS)}"
            )
        positions = torch.arange(self.max_positions, dtype=torch.float, device="cpu")
        freqs = torch.outer(positions, inv_freq.float().cpu())  # [P, rotary_dim/2]
        self.cos = (freqs.cos() * scaling).to(device)
        self.sin = (freqs.sin() * scaling).to(device)
        self._positions = self._step_tables = None

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, KVH, D], positions: [T] → rotated q, k (rotate-half layout)."""
        cos, sin = self.step_tables(positions)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)

    def step_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, R] cos and signed sin at `positions`, in the full rotate-half layout.

        Every layer of a step rotates at the same positions tensor, so the tables are gathered
        once per step (by identity: the runner builds a new positions tensor each step)."""
        if positions is not self._positions:
            cos, sin = self.cos[positions], self.sin[positions]  # [T, R/2]
            self._step_tables = (torch.cat((cos, cos), dim=-1).unsqueeze(1),
                                 torch.cat((-sin, sin), dim=-1).unsqueeze(1))
            self._positions = positions
        return self._step_tables

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] rotated by step_tables' cos/sin: x1*cos - x2*sin | x2*cos + x1*sin,
        bit for bit, as x*cos + (x2 | x1)*(-sin | sin) in four ops instead of eight."""
        dtype = x.dtype
        half = self.rotary_dim // 2
        rot = x[..., : self.rotary_dim].float()
        swapped = torch.cat((rot[..., half:], rot[..., :half]), dim=-1)
        rotated = (rot * cos + swapped * sin).to(dtype)
        if self.rotary_dim == x.shape[-1]:
            return rotated
        return torch.cat((rotated, x[..., self.rotary_dim :]), dim=-1)

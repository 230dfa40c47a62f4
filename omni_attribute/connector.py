"""The trainable connector: MLLM hidden states → M attribute tokens of width D.

Paper's final configuration: 8 self-attention layers + 1 linear layer. The paper does not give
widths, the token count or which hidden states are read; our defaults (documented in README) are
M = 16 learned query tokens that attend, through the self-attention stack, to the MLLM's last hidden
states at the image positions and at the instruction positions (``read_image``; with it off, the
instruction positions only), then one linear layer to the generator's context width D (4096 for
FLUX). When the connector width differs from the MLLM hidden size an input projection is added.

With ``image_positions`` each image token also gets a learned map of 2D sin-cos features of its place
added: attention alone is blind to where a token sits, and the place is what separates a triangle from a
diamond or light from the left from light from the right (a linear probe on the tiny world's mean-pooled
image states reads shape 0.51 and lighting 0.68, on the states in place 0.88 and 0.98).

Reading the image positions lets the trainable connector pick the asked attribute out of the image
states itself, guided by the instruction states; without it, everything must pass through the frozen
MLLM's (LoRA-tuned) attention from the instruction to the image. The image states do not depend on the
instruction, so the shared-prefix encoding still runs the image once for K attributes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ConnectorConfig:
    in_dim: int                 # MLLM hidden size (3584 for Qwen2.5-VL-7B)
    out_dim: int = 4096         # generator text-context width D (FLUX: 4096)
    num_tokens: int = 16        # M attribute tokens
    width: int = 1024           # width of the self-attention stack
    num_layers: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0
    read_image: bool = True     # also read the image-token states (False: instruction states only)
    image_positions: bool = True   # add a learned map of 2D sin-cos features of each image token's place

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ConnectorConfig":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known.setdefault("image_positions", False)  # adapters written before the field existed have none
        return cls(**known)


class Connector(nn.Module):
    def __init__(self, config: ConnectorConfig):
        super().__init__()
        if config.width % config.num_heads:
            raise ValueError(f"connector width {config.width} is not divisible by {config.num_heads} heads")
        if config.image_positions and not config.read_image:
            raise ValueError("connector image_positions needs read_image (there are no image tokens to place)")
        self.config = config
        self.input_proj = nn.Linear(config.in_dim, config.width) if config.in_dim != config.width else nn.Identity()
        self.queries = nn.Parameter(torch.randn(config.num_tokens, config.width) * config.width ** -0.5)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=config.width,
                nhead=config.num_heads,
                dim_feedforward=int(config.width * config.mlp_ratio),
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(config.width)
        self.output = nn.Linear(config.width, config.out_dim)
        if config.image_positions:
            self.image_position = nn.Linear(4 * POSITION_FREQUENCIES, config.width, bias=False)
            nn.init.normal_(self.image_position.weight, std=0.02)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                image_grid: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B,L,in_dim], mask [B,L] (True = real token) → (tokens [B,M,D], pooled [B,D]).

        ``image_grid`` (rows, columns): the first rows × columns positions of ``hidden`` are image tokens
        in row-major order; with ``image_positions`` they get their place added."""
        b = hidden.shape[0]
        m = self.config.num_tokens
        states = self.input_proj(hidden)
        if self.config.image_positions:
            if image_grid is None:
                raise ValueError("this connector was trained with image positions: pass image_grid")
            rows, cols = image_grid
            place = self.image_position(grid_features(rows, cols, states.device).to(states.dtype))
            states = torch.cat([states[:, :rows * cols] + place, states[:, rows * cols:]], dim=1)
        x = torch.cat([self.queries.to(hidden.dtype).expand(b, -1, -1), states], dim=1)
        padding = None
        if mask is not None:
            keep = torch.cat([torch.ones(b, m, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)
            padding = ~keep
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        tokens = self.output(self.norm(x[:, :m]))
        return tokens, tokens.mean(dim=1)


POSITION_FREQUENCIES = 8


def grid_features(rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    """[rows·cols, 4F] sin-cos features of each cell's centre in relative coordinates (0..1), so that a
    place means the same at every resolution; F frequencies per axis, from one period across the image
    up to 2^(F−1)."""
    freqs = torch.pi * 2.0 ** torch.arange(POSITION_FREQUENCIES, device=device)
    y = (torch.arange(rows, device=device) + 0.5) / rows
    x = (torch.arange(cols, device=device) + 0.5) / cols
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    angles = torch.cat([yy.reshape(-1, 1) * freqs, xx.reshape(-1, 1) * freqs], dim=1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)

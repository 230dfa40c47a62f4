"""The trainable connector: MLLM hidden states → M attribute tokens of width D.

Paper's final configuration: 8 self-attention layers + 1 linear layer. The paper does not give
widths, the token count or which hidden states are read; our defaults (documented in README) are
M = 16 learned query tokens that attend, through the self-attention stack, to the MLLM's last hidden
states at the image positions and at the instruction positions (``read_image``; with it off, the
instruction positions only), then one linear layer to the generator's context width D (4096 for
FLUX). When the connector width differs from the MLLM hidden size an input projection is added.

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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ConnectorConfig":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class Connector(nn.Module):
    def __init__(self, config: ConnectorConfig):
        super().__init__()
        if config.width % config.num_heads:
            raise ValueError(f"connector width {config.width} is not divisible by {config.num_heads} heads")
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

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B,L,in_dim], mask [B,L] (True = real token) → (tokens [B,M,D], pooled [B,D])."""
        b = hidden.shape[0]
        m = self.config.num_tokens
        x = torch.cat([self.queries.to(hidden.dtype).expand(b, -1, -1), self.input_proj(hidden)], dim=1)
        padding = None
        if mask is not None:
            keep = torch.cat([torch.ones(b, m, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)
            padding = ~keep
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        tokens = self.output(self.norm(x[:, :m]))
        return tokens, tokens.mean(dim=1)

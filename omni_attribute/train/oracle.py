"""Oracle tokens: a diagnostic stand-in for the attribute encoder in the generative loss.

Each pair record's ``labels`` name the shared value of each positive attribute ("color=red"). The oracle
gives every label one learned vector and puts label i into token slot i (a learned slot vector added; slots
without a label get the "no label" vector), so the tokens carry exactly the ground truth of the asked
attributes, in the adapter's token count and width. Trained with Lgen and the IP-Adapter alone, it measures
what the generation path can carry at all: if oracle tokens do not transfer an attribute, the bottleneck is
the IP path or its training, not the encoder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..files import atomic_save_safetensors

NO_LABEL = "<none>"
ORACLE_FILE = "oracle_tokens.safetensors"  # beside adapter.safetensors in the output folder


class OracleTokens(nn.Module):
    def __init__(self, labels: list[str], num_tokens: int, width: int):
        super().__init__()
        self.vocabulary = [NO_LABEL] + sorted(set(labels) - {NO_LABEL})
        self.index = {label: i for i, label in enumerate(self.vocabulary)}
        self.num_tokens = num_tokens
        self.table = nn.Embedding(len(self.vocabulary), width)
        nn.init.normal_(self.table.weight, std=1.0)  # about the scale of the connector's normalised tokens
        self.slots = nn.Parameter(torch.randn(num_tokens, width) * 0.02)

    def forward(self, labels: list[list[str]]) -> torch.Tensor:
        """One label list per sample → tokens [B, num_tokens, width]."""
        ids = torch.zeros(len(labels), self.num_tokens, dtype=torch.long)
        for row, names in enumerate(labels):
            if len(names) > self.num_tokens:
                raise ValueError(f"{len(names)} labels for {self.num_tokens} oracle token slots: raise "
                                 "adapter.num_tokens or give fewer positive attributes per pair")
            unknown = [n for n in names if n not in self.index]
            if unknown:
                raise KeyError(f"oracle labels {unknown} were not in the training data's labels")
            ids[row, :len(names)] = torch.tensor([self.index[n] for n in names], dtype=torch.long)
        return self.table(ids.to(self.slots.device)) + self.slots

    def save(self, path: str | Path) -> None:
        atomic_save_safetensors({k: v.detach().contiguous() for k, v in self.state_dict().items()}, path,
                                {"vocabulary": "\n".join(self.vocabulary), "num_tokens": str(self.num_tokens)})


def load_oracle(path: str | Path) -> OracleTokens:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata() or {}
    if "vocabulary" not in meta:
        raise ValueError(f"{path} is not an oracle-token file (no vocabulary in its metadata)")
    tensors = load_file(str(path))
    oracle = OracleTokens(meta["vocabulary"].split("\n"), int(meta["num_tokens"]), tensors["table.weight"].shape[1])
    oracle.load_state_dict(tensors)
    return oracle.eval().requires_grad_(False)

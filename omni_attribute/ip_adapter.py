"""IP-Adapter for FLUX-family DiTs: decoupled cross-attention from image tokens to attribute tokens.

In every block that carries it, the block's own image queries (after FLUX's q-norm and RoPE, i.e.
exactly the queries of its joint attention) also attend to the attribute tokens through the
adapter's per-block K/V projections; the result is added to the image positions of the block's
attention output, before the block's output projection, scaled by a weight:

    attn_img ← attn_img + w · mask · softmax(q_img k_ipᵀ / √d) v_ip,   k_ip = RMSNorm(W_k A), v_ip = W_v A

This is the original IP-Adapter formulation (a second attention sharing the query) on FLUX's joint
attention. It costs two small projections of the M attribute tokens and an N×M attention per
block: no extra projection of the image stream.

One :class:`IPAdapter` module serves both implementations: ComfyUI (``nodes/apply.py``, through
``dit`` block-replacement patches and an attention override) and diffusers (the processors below),
so parameter names are the same on both sides: ``double_blocks.<i>.to_k.weight`` ↔ ComfyUI
``double_blocks[i]`` ↔ diffusers ``transformer_blocks[i]``; ``single_blocks.<i>`` ↔ ComfyUI
``single_blocks[i]`` ↔ diffusers ``single_transformer_blocks[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterMismatchError


@dataclass(frozen=True)
class IPAdapterConfig:
    hidden_size: int                 # DiT width (3072 for FLUX.1)
    num_heads: int                   # 24 for FLUX.1
    context_dim: int                 # attribute token width D (4096)
    double_blocks: tuple[int, ...]   # indices of double-stream blocks that carry IP attention
    single_blocks: tuple[int, ...]   # indices of single-stream blocks that carry IP attention
    family: str = "flux"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "hidden_size": self.hidden_size, "num_heads": self.num_heads,
                "context_dim": self.context_dim, "double_blocks": list(self.double_blocks),
                "single_blocks": list(self.single_blocks)}

    @classmethod
    def from_dict(cls, data: dict) -> "IPAdapterConfig":
        return cls(hidden_size=int(data["hidden_size"]), num_heads=int(data["num_heads"]),
                   context_dim=int(data["context_dim"]), double_blocks=tuple(int(i) for i in data["double_blocks"]),
                   single_blocks=tuple(int(i) for i in data["single_blocks"]), family=data.get("family", "flux"))

    @classmethod
    def for_layout(cls, layout, double: str | list[int] = "all", single: str | list[int] = "none",
                   context_dim: int | None = None) -> "IPAdapterConfig":
        """Block selection from a FluxLayout: "all", "none", "every2" or an explicit index list."""
        def pick(spec, depth):
            if isinstance(spec, (list, tuple)):
                return tuple(int(i) for i in spec)
            return {"all": tuple(range(depth)), "none": (), "every2": tuple(range(0, depth, 2))}[spec]
        return cls(hidden_size=layout.hidden_size, num_heads=layout.num_heads,
                   context_dim=context_dim or layout.context_dim,
                   double_blocks=pick(double, layout.depth_double), single_blocks=pick(single, layout.depth_single))


class IPBlock(nn.Module):
    """K/V projections of the attribute tokens for one DiT block."""

    def __init__(self, config: IPAdapterConfig):
        super().__init__()
        self.heads = config.num_heads
        self.to_k = nn.Linear(config.context_dim, config.hidden_size, bias=False)
        self.to_v = nn.Linear(config.context_dim, config.hidden_size, bias=False)
        self.norm_k = nn.RMSNorm(config.head_dim, eps=1e-6)  # like FLUX's key norm
        nn.init.normal_(self.to_k.weight, std=config.context_dim ** -0.5)
        nn.init.zeros_(self.to_v.weight)  # a fresh adapter leaves the generator unchanged
        self.stats: list[torch.Tensor] | None = None  # diagnostics (diffusers twin): |IP term| / |attention output|

    def keys_values(self, tokens: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B,M,D] → k, v [B,H,M,Dh] on the device and in the dtype of ``like`` (the queries)."""
        weight_k, weight_v = self.to_k.weight, self.to_v.weight
        if weight_k.device != like.device or weight_k.dtype != like.dtype:  # only if offloading left us behind
            weight_k, weight_v = weight_k.to(like), weight_v.to(like)
        tokens = tokens.to(like)
        b, m, _ = tokens.shape
        k = F.linear(tokens, weight_k).view(b, m, self.heads, -1)
        v = F.linear(tokens, weight_v).view(b, m, self.heads, -1)
        k = F.rms_norm(k, k.shape[-1:], self.norm_k.weight.to(like), self.norm_k.eps)
        return k.transpose(1, 2), v.transpose(1, 2)

    def contribution(self, q_img: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor | None,
                     scale: torch.Tensor, value_scale: torch.Tensor | None = None) -> torch.Tensor:
        """q_img [B,H,N,Dh] (post norm + RoPE), tokens [B,M,D], key_mask [B,M] bool, scale [B,N] or [B,1],
        value_scale [B,M] (weights of token groups attended together) → the term to add to the image
        positions of the attention output, [B,N,H*Dh]."""
        k, v = self.keys_values(tokens, q_img)
        if value_scale is not None:
            v = scale_values(v, value_scale)
        mask = key_mask[:, None, None, :].to(q_img.device) if key_mask is not None else None
        return self.attend(q_img, k, v, mask, scale)

    @staticmethod
    def attend(q_img: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
               scale: torch.Tensor) -> torch.Tensor:
        """The IP term from keys/values already projected (``keys_values``, values × their weights):
        q_img [B,H,N,Dh], k/v [B,H,M,Dh], attn_mask [B,1,1,M] bool, scale [B,N] or [B,1] → [B,N,H*Dh].
        Device work only: a caller that keeps k/v for a whole sampling run pays the projections once."""
        out = F.scaled_dot_product_attention(q_img, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).flatten(2)
        return out * scale.to(out)[..., None]


def scale_values(v: torch.Tensor, value_scale: torch.Tensor) -> torch.Tensor:
    """v [B,H,M,Dh] × each token's weight value_scale [B,M] (token groups attended together)."""
    return v * value_scale.to(v)[:, None, :, None]


class IPAdapter(nn.Module):
    def __init__(self, config: IPAdapterConfig):
        super().__init__()
        self.config = config
        # not `double`/`single`: nn.Module.double() exists
        self.double_blocks = nn.ModuleDict({str(i): IPBlock(config) for i in config.double_blocks})
        self.single_blocks = nn.ModuleDict({str(i): IPBlock(config) for i in config.single_blocks})

    def named_blocks(self) -> list[tuple[str, IPBlock]]:
        return ([(f"double{i}", b) for i, b in self.double_blocks.items()]
                + [(f"single{i}", b) for i, b in self.single_blocks.items()])

    def record_stats(self, on: bool) -> None:
        """Start (clearing) or stop recording each block's |IP term| / |attention output| in the diffusers twin."""
        for _, block in self.named_blocks():
            block.stats = [] if on else None

    def stats(self) -> dict[str, float]:
        """The recorded ratios (mean per block since record_stats(True)), the gradient norm of all IP weights
        and the mean norm of the value projections (zero when fresh)."""
        out = {}
        for name, block in self.named_blocks():
            if block.stats:
                out[f"ip_ratio_{name}"] = float(torch.stack(block.stats).mean())
        grads = [p.grad.detach().float().norm() for p in self.parameters() if p.grad is not None]
        if grads:
            out["ip_grad_norm"] = float(torch.stack(grads).norm())
        blocks = [b for _, b in self.named_blocks()]
        if blocks:
            out["ip_value_norm"] = float(torch.stack([b.to_v.weight.detach().float().norm() for b in blocks]).mean())
        return out

    def block(self, kind: str, index: int) -> IPBlock | None:
        table = self.double_blocks if kind == "double" else self.single_blocks
        return table[str(index)] if str(index) in table else None

    def check_layout(self, hidden_size: int, num_heads: int, depth_double: int, depth_single: int,
                     where: str = "this model") -> None:
        c = self.config
        problems = []
        if c.hidden_size != hidden_size or c.num_heads != num_heads:
            problems.append(f"width {c.hidden_size} with {c.num_heads} heads, {where} has {hidden_size} with {num_heads}")
        bad_double = [i for i in c.double_blocks if i >= depth_double]
        bad_single = [i for i in c.single_blocks if i >= depth_single]
        if bad_double or bad_single:
            problems.append(f"blocks double {bad_double} / single {bad_single}, {where} has {depth_double} double "
                            f"and {depth_single} single blocks")
        if problems:
            raise AdapterMismatchError("the IP-Adapter was made for another block layout: adapter has "
                                       + "; ".join(problems))


def generator_metadata(layout, config: IPAdapterConfig) -> dict:
    """The adapter file's ``generator`` entry: the DiT's layout (a FluxLayout) and where the IP-Adapter sits."""
    return {"family": config.family, "layout": layout.to_dict(), "ip": config.to_dict()}


def load_ip_adapter(generator: dict | None, tensors: dict[str, torch.Tensor], adapter_name: str) -> IPAdapter:
    """Build the IP modules from an adapter file's ``generator`` metadata and ``ip_adapter`` tensors."""
    from .errors import AdapterFileError

    from .validation import Fields, compare_shapes, expected_shapes, ip_fields

    if isinstance(generator, dict) and "ip" in generator and not tensors:
        raise AdapterFileError(
            f"{adapter_name}: its metadata describes an IP-Adapter but the file holds no IP-Adapter weights: the "
            "file is incomplete (was its ip_adapter section stripped?); re-export it with omni-attribute-train"
        )
    if not generator or "ip" not in generator or not tensors:
        raise AdapterFileError(
            f"{adapter_name} has no IP-Adapter weights: it can encode attributes but cannot inject them into a "
            "generator. Use an adapter trained with the generator (omni-attribute-train writes both)."
        )
    fix = "the file is damaged or was edited by hand: re-export it with omni-attribute-train"
    config = IPAdapterConfig.from_dict(ip_fields(Fields(generator["ip"], "generator.ip", adapter_name,
                                                        AdapterFileError, fix)))
    # names and shapes checked on the meta device before the real modules are allocated
    compare_shapes(expected_shapes(lambda: IPAdapter(config)), {k: v.shape for k, v in tensors.items()},
                   "IP-Adapter", adapter_name, AdapterFileError, fix[0].upper() + fix[1:])
    module = IPAdapter(config)
    module.load_state_dict(tensors, strict=True)
    return module.eval().requires_grad_(False)


# ---- diffusers twin ---------------------------------------------------------------------------------

class OmniAttributeFluxAttnProcessor:
    """FluxAttnProcessor with the IP term, for ``diffusers.FluxTransformer2DModel`` (training and parity).

    Extra call arguments arrive through ``joint_attention_kwargs``: ``ip_tokens`` [B,M,D],
    ``ip_key_mask`` [B,M] bool, ``ip_scale`` [B,N] or [B,1] and ``ip_txt_len`` (text length, needed in
    single blocks where text and image come concatenated).
    """

    def __init__(self, ip_block: IPBlock | None):
        self.ip_block = ip_block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 ip_tokens=None, ip_key_mask=None, ip_scale=None, ip_txt_len=None, ip_value_scale=None):
        from diffusers.models.embeddings import apply_rotary_emb

        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        txt_len = ip_txt_len or 0
        if encoder_hidden_states is not None:  # double block: text first, then image
            txt_len = encoder_hidden_states.shape[1]
            eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1)))
            ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1)))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B,H,L,Dh]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask).transpose(1, 2).flatten(2).to(q.dtype)
        if self.ip_block is not None and ip_tokens is not None:
            term = self.ip_block.contribution(q[:, :, txt_len:], ip_tokens, ip_key_mask, ip_scale, ip_value_scale)
            if self.ip_block.stats is not None:
                self.ip_block.stats.append(term.detach().norm() / out[:, txt_len:].detach().norm().clamp_min(1e-12))
            out = torch.cat([out[:, :txt_len], out[:, txt_len:] + term], dim=1)
        if encoder_hidden_states is None:
            return out
        txt_out, img_out = out[:, :txt_len], out[:, txt_len:]
        img_out = attn.to_out[1](attn.to_out[0](img_out))
        return img_out, attn.to_add_out(txt_out)


def attach_to_diffusers(transformer, ip_adapter: IPAdapter) -> None:
    """Install the IP processors on every attention of a FluxTransformer2DModel (blocks without IP get
    the same processor without an IP block, so all blocks accept the extra keyword arguments)."""
    ip_adapter.check_layout(transformer.config.num_attention_heads * transformer.config.attention_head_dim,
                            transformer.config.num_attention_heads, len(transformer.transformer_blocks),
                            len(transformer.single_transformer_blocks), where="the diffusers transformer")
    for i, block in enumerate(transformer.transformer_blocks):
        block.attn.set_processor(OmniAttributeFluxAttnProcessor(ip_adapter.block("double", i)))
    for i, block in enumerate(transformer.single_transformer_blocks):
        block.attn.set_processor(OmniAttributeFluxAttnProcessor(ip_adapter.block("single", i)))


def ip_kwargs(tokens: torch.Tensor | None, weight: float | torch.Tensor, txt_len: int,
              key_mask: torch.Tensor | None = None, spatial: torch.Tensor | None = None) -> dict:
    """joint_attention_kwargs for the diffusers twin: weight per row ([B] or scalar), optional spatial [B,N]."""
    if tokens is None:
        return {}
    b = tokens.shape[0]
    scale = torch.as_tensor(weight, dtype=torch.float32).reshape(-1, 1).expand(b, 1)
    if spatial is not None:
        scale = scale * spatial
    return {"ip_tokens": tokens, "ip_key_mask": key_mask, "ip_scale": scale, "ip_txt_len": txt_len}

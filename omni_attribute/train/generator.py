"""The frozen generator D for training: diffusers' FluxTransformer2DModel with the IP-Adapter twin,
an image codec (latents) and text encoders.

Two generator families (``generator.kind``):

* ``flux``: a FLUX.1 diffusers folder (transformer/, vae/, text_encoder/ = CLIP-L, text_encoder_2 =
  T5-XXL, tokenizers).
* ``tiny``: a small FLUX layout, an exact pixel codec standing in for the VAE and a small hashed-token
  text encoder — seeded random (tests), or a trained *tiny generator folder* (``path``): ``transformer/``
  (diffusers), ``text_encoder.safetensors``, ``tokenizer/`` and ``tiny_generator.json``, as the
  laboratory writes it with :func:`save_tiny_generator`.

A new family is one more branch of :func:`build_generator` returning the same :class:`Generator`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..errors import GeneratorFolderError
from ..files import atomic_save_safetensors
from ..flux_models import FluxLayout, build_diffusers_flux, diffusers_flux_forward
from ..ip_adapter import IPAdapter, IPAdapterConfig, attach_to_diffusers, generator_metadata, ip_kwargs


class PixelCodec(nn.Module):
    """Tiny stand-in for the VAE: 2×2 pixel-unshuffle of RGB in [−1,1] (12 channels) padded to 16 latent
    channels. Exactly invertible; no weights."""

    latent_channels = 16

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = F.pixel_unshuffle(images * 2 - 1, 2)
        return torch.cat([x, x.new_zeros(x.shape[0], self.latent_channels - x.shape[1], *x.shape[2:])], dim=1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((F.pixel_shuffle(latents[:, :12], 2) + 1) / 2).clamp(0, 1)


class FluxVAECodec(nn.Module):
    """FLUX's AutoencoderKL: latents = (z − shift) · scale."""

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32):
        super().__init__()
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype).requires_grad_(False).eval()
        self.scale = self.vae.config.scaling_factor
        self.shift = self.vae.config.shift_factor or 0.0

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.sample()
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((self.vae.decode(latents / self.scale + self.shift).sample + 1) / 2).clamp(0, 1)


class TinyTextEncoder(nn.Module):
    """A small text encoder for the tiny generator: token ids (any tokenizer) hashed into a table,
    two transformer layers, fixed length. Returns (context [B,L,context_dim], pooled [B,pooled_dim])."""

    def __init__(self, tokenizer, context_dim: int, pooled_dim: int, max_length: int = 24, buckets: int = 4096):
        super().__init__()
        self.tokenizer, self.max_length, self.buckets = tokenizer, max_length, buckets
        self.embed = nn.Embedding(buckets, context_dim)
        self.position = nn.Parameter(torch.randn(max_length, context_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(context_dim, 2, 2 * context_dim, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.pool = nn.Linear(context_dim, pooled_dim)

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        for i, caption in enumerate(captions):
            tokens = self.tokenizer(caption, add_special_tokens=False)["input_ids"][: self.max_length - 1]
            ids[i, 1:len(tokens) + 1] = torch.tensor(tokens, dtype=torch.long) % (self.buckets - 1) + 1
        x = self.embed(ids.to(self.position.device)) + self.position
        x = self.layers(x)
        return x, self.pool(x.mean(dim=1))


class FluxTextEncoders(nn.Module):
    """FLUX.1's text side: T5-XXL hidden states (context) and CLIP-L's pooled output."""

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.bfloat16, max_length: int = 512):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        folder = Path(folder)
        self.clip = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype).requires_grad_(False).eval()
        self.t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2", torch_dtype=dtype).requires_grad_(False).eval()
        self.clip_tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.t5_tokenizer = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
        self.max_length = max_length

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.t5.device
        clip_ids = self.clip_tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                                       return_tensors="pt").input_ids.to(device)
        t5_ids = self.t5_tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                                   return_tensors="pt").input_ids.to(device)
        return self.t5(t5_ids).last_hidden_state, self.clip(clip_ids).pooler_output


@dataclass
class GeneratorSpec:
    kind: str = "tiny"                 # "tiny" (a tiny generator folder, or seeded random without a path)
                                       # or "flux" (a diffusers FLUX.1 folder)
    path: str | None = None            # the folder (optional for tiny)
    seed: int = 0                      # tiny: weight seed
    ip_double: str | list[int] = "all"
    ip_single: str | list[int] = "none"
    guidance: float = 3.5              # FLUX.1-dev is guidance-distilled: the value it is trained at


class Generator(nn.Module):
    """Frozen DiT + codec + text encoder, with trainable IP-Adapter modules."""

    def __init__(self, transformer, layout: FluxLayout, codec: nn.Module, text_encoder: nn.Module, ip: IPAdapter,
                 guidance: float):
        super().__init__()
        self.transformer, self.layout, self.codec, self.text_encoder, self.ip = transformer, layout, codec, text_encoder, ip
        self.guidance = guidance
        self.transformer.requires_grad_(False).eval()
        self.text_encoder.requires_grad_(False).eval()
        attach_to_diffusers(self.transformer, self.ip)

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self.text_encoder(captions)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 tokens: torch.Tensor | None, token_weight: torch.Tensor) -> torch.Tensor:
        guidance = torch.full((x_t.shape[0],), self.guidance, device=x_t.device) if self.layout.guidance_embed else None
        kwargs = ip_kwargs(tokens, token_weight, txt_len=context.shape[1]) if tokens is not None else None
        return diffusers_flux_forward(self.transformer, x_t, t, context, pooled, guidance, joint_attention_kwargs=kwargs)

    def metadata(self) -> dict:
        return generator_metadata(self.layout, self.ip.config)


def build_generator(spec: GeneratorSpec, tokenizer, context_dim: int | None = None,
                    dtype: torch.dtype = torch.float32) -> Generator:
    """Build D from a spec. ``tokenizer`` feeds the tiny text encoder (the backbone's tokenizer)."""
    if spec.kind == "flux":
        from diffusers import FluxTransformer2DModel

        if not spec.path:
            raise ValueError("generator.kind 'flux' needs generator.path: a diffusers FLUX.1 folder")
        folder = Path(spec.path)
        transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype)
        c = transformer.config
        layout = FluxLayout(hidden_size=c.num_attention_heads * c.attention_head_dim, num_heads=c.num_attention_heads,
                            depth_double=c.num_layers, depth_single=c.num_single_layers,
                            context_dim=c.joint_attention_dim, vec_in_dim=c.pooled_projection_dim,
                            in_channels=c.in_channels, axes_dim=list(c.axes_dims_rope), guidance_embed=c.guidance_embeds)
        codec, text = FluxVAECodec(folder / "vae", dtype), FluxTextEncoders(folder, dtype)
    elif spec.kind == "tiny" and spec.path:
        transformer, text, layout = load_tiny_generator(spec.path, tokenizer)
        codec = PixelCodec()
    elif spec.kind == "tiny":
        layout = FluxLayout.tiny()
        torch.manual_seed(spec.seed)
        transformer = build_diffusers_flux(layout, dtype=dtype)
        text = TinyTextEncoder(tokenizer, layout.context_dim, layout.vec_in_dim)
        codec = PixelCodec()
    else:
        raise ValueError(f"unknown generator kind {spec.kind!r}: use 'tiny' or 'flux'")
    ip = IPAdapter(IPAdapterConfig.for_layout(layout, spec.ip_double, spec.ip_single, context_dim=context_dim))
    return Generator(transformer, layout, codec, text, ip.to(dtype), spec.guidance)


# ---- the tiny generator folder ------------------------------------------------------------------------

TINY_GENERATOR_META = "tiny_generator.json"


def save_tiny_generator(folder: str | Path, transformer, text: TinyTextEncoder, tokenizer, layout: FluxLayout,
                        info: dict | None = None) -> Path:
    """Write a trained tiny generator as a folder that :func:`load_tiny_generator` (and the laboratory's
    ComfyUI loader) read; ``info`` (steps, seed, …) is kept in the metadata."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    transformer.eval().save_pretrained(str(folder / "transformer"), safe_serialization=True)
    atomic_save_safetensors(text.state_dict(), folder / "text_encoder.safetensors", {"kind": "tiny-text-encoder"})
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    meta = {"layout": layout.to_dict(), "text": {"max_length": text.max_length, "buckets": text.buckets},
            "codec": "pixel", **(info or {})}
    (folder / TINY_GENERATOR_META).write_text(json.dumps(meta, indent=2))
    return folder


def read_tiny_generator_meta(folder: str | Path) -> dict:
    path = Path(folder) / TINY_GENERATOR_META
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a tiny generator folder (no {TINY_GENERATOR_META}); "
                                "the laboratory's benchmarks/tiny_world.py writes one")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GeneratorFolderError(f"{path} is not valid JSON ({exc}): write the folder again") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("layout"), dict):
        raise GeneratorFolderError(f"{path} must be a JSON object with a 'layout' object (the generator's sizes): "
                                   "write the folder again")
    return meta


def load_tiny_text_encoder(folder: str | Path, tokenizer=None) -> TinyTextEncoder:
    """The generator's frozen text encoder, with the tokenizer saved beside it unless one is given."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    meta = read_tiny_generator_meta(folder)
    layout = FluxLayout.from_dict(meta["layout"])
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), fix_mistral_regex=False)
    text = TinyTextEncoder(tokenizer, layout.context_dim, layout.vec_in_dim, **meta["text"])
    text.load_state_dict(load_file(str(folder / "text_encoder.safetensors")))
    return text.eval().requires_grad_(False)


def load_tiny_generator(folder: str | Path, tokenizer=None):
    """(diffusers transformer, text encoder, layout) of a tiny generator folder, frozen."""
    from diffusers import FluxTransformer2DModel

    folder = Path(folder)
    layout = FluxLayout.from_dict(read_tiny_generator_meta(folder)["layout"])
    transformer = FluxTransformer2DModel.from_pretrained(str(folder / "transformer")).eval().requires_grad_(False)
    return transformer, load_tiny_text_encoder(folder, tokenizer), layout

"""Training configuration: a YAML (or JSON) file, validated before any model is loaded."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..adapter_file import AdapterMetadata
from ..config_files import apply_overrides, build_dataclass, read_config_file
from ..connector import ConnectorConfig
from ..errors import OmniAttributeError
from ..lora import DEFAULT_TARGETS
from ..prompt import DEFAULT_TEMPLATE
from .generator import GeneratorSpec


class ConfigError(OmniAttributeError):
    """The training configuration is malformed; the message names the key."""


@dataclass
class DataConfig:
    pairs: str | list[str] = ""          # JSONL file(s) or glob
    validation_pairs: str | list[str] | None = None
    image_size: int = 32                 # training resolution of the generator's target images (square)
    streaming: bool = False              # read pairs as a stream (large shard sets) instead of indexing them
    shuffle_buffer: int = 1024           # streaming: size of the seeded shuffle buffer
    preflight_lines: int = 2000          # streaming: lines checked (schema, image files) before training


@dataclass
class BackboneConfig:
    path: str = ""                        # HF-format Qwen2.5-VL folder
    dtype: str = "fp32"                   # fp32 | bf16


@dataclass
class AdapterConfig:
    num_tokens: int = 16
    connector_width: int = 1024
    connector_layers: int = 8
    connector_heads: int = 16
    connector_reads_image: bool = True    # the connector also reads the image-token states
    connector_image_positions: bool = True  # ... with their 2D place added (see connector.py)
    lora_r: int = 32
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    lora_targets: str | None = None       # regex; None = the language model's attention and MLP projections
    prompt_template: str = DEFAULT_TEMPLATE
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448
    init_from: str | None = None          # continue from an existing adapter file
    # Train only the IP-Adapter, on the tokens of the init_from adapter's encoder (LoRA and connector frozen; Lgen
    # only): a second stage after an encoder stage, or an IP path for another DiT of the family. No backward pass
    # through the MLLM (tiny world: 0.16 s a step instead of 0.93 s). The IP path learns fast from tokens that
    # hold still when they carry the attribute (oracle tokens: 200 steps). The tiny world's recipe ends every
    # encoder with such a stage at a tenth of the joint stage's IP learning rate (optim.ip_lr_scale 0.3 instead
    # of 3 there): on its 1000-step encoder attribute fidelity 0.417 → 0.465, two-reference composition 0.389 →
    # 0.451 at training seed 0 (no measurable gain at seed 1); at the joint stage's rate Lgen does not fall below
    # its value without tokens, and the joint stage itself at the low rate transfers less (BENCHMARKS.md, issue 12).
    freeze_encoder: bool = False

    def metadata(self, backbone_info: dict, out_dim: int, training: dict | None = None,
                 generator: dict | None = None) -> AdapterMetadata:
        """The adapter file's metadata for these settings on a backbone, for tokens ``out_dim`` wide."""
        return AdapterMetadata(
            backbone=backbone_info,
            lora={"r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                  "target_modules": self.lora_targets or DEFAULT_TARGETS},
            connector=ConnectorConfig(in_dim=backbone_info["hidden_size"], out_dim=out_dim, num_tokens=self.num_tokens,
                                      width=self.connector_width, num_layers=self.connector_layers,
                                      num_heads=self.connector_heads, read_image=self.connector_reads_image,
                                      image_positions=self.connector_image_positions and self.connector_reads_image),
            prompt_template=self.prompt_template,
            image={"min_pixels": self.min_pixels, "max_pixels": self.max_pixels},
            generator=generator,
            training=training or {},
        )


@dataclass
class LossConfig:
    lambda_gen: float = 1.0
    lambda_con: float = 0.01              # the paper's final setting
    tau: float = 0.1                      # the paper's final setting
    in_batch_negatives: bool = False      # extension, not in the paper
    attributes_per_pair: int = 1          # up to n a+ and n a− per pair, Lcon over all n×n (a+, a−) tuples;
                                          # extension: one image pass serves them all (shared prefix)
    timestep_sampling: str = "logit_normal"
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    timestep_shift: float = 1.0
    drop_text: float = 0.1                # caption replaced by "" (learns D(E, ∅))
    drop_tokens: float = 0.1              # attribute tokens dropped (learns D(∅, c))
    # Reconstruction (the original IP-Adapter recipe): with this probability a sample's target is its reference
    # image itself, with the reference's own caption (dropped with drop_text). Everything the tokens carry is
    # then in the target, so the IP path gets a strong, consistent signal from the first steps; a warm-up stage
    # is a run with reconstruct = 1 continued by the paper's pairs through adapter.init_from.
    reconstruct: float = 0.0
    # Diagnostic: replace the encoder in Lgen by oracle tokens, one learned vector per pair label (the shared
    # value of each positive attribute, the records' "labels"); only the IP-Adapter and that table train
    # (lambda_con must be 0). Measures what the generation path can carry at all (omni_attribute/train/oracle.py).
    oracle_tokens: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-4
    # The IP-Adapter's learning rate = lr × this. Its values start at zero, so a larger rate gets the IP path
    # going while the encoder trains (tiny world: 3); on a frozen encoder a smaller one (tiny world: 0.3 with lr
    # 1e-3) — at 3 each step overshot: Lgen stayed above its value without tokens.
    ip_lr_scale: float = 1.0
    weight_decay: float = 0.0
    batch_size: int = 2
    grad_accum: int = 1
    max_steps: int = 1000
    warmup_steps: int = 0
    grad_clip: float = 1.0


@dataclass
class RuntimeConfig:
    mixed_precision: str = "no"           # no | bf16 | fp16 (accelerate)
    cpu: bool = False                     # train on the CPU even where a GPU is present (accelerate's cpu=True)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    validate_every: int = 0               # 0: only at the end
    tensorboard: bool = False
    crash_after_step: int = 0             # testing: hard-kill the process after this step (0 = never)
    # Diagnostics in metrics.jsonl: per IP block the norm of its term relative to the attention output it is
    # added to, the IP-Adapter's gradient norm and its value projections' weight norm (costs a host read per block)
    log_ip_stats: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "runs/omni-attribute"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    generator: GeneratorSpec = field(default_factory=GeneratorSpec)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, data: Any, where: str):
    return build_dataclass(cls, data, where, ConfigError)


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML/JSON config; ``overrides`` are 'section.key=value' strings (value parsed as YAML)."""
    path = Path(path)
    data, _ = read_config_file(path, ConfigError)
    apply_overrides(data, list(overrides), ConfigError)
    config = _build(TrainConfig, data, path.name)
    base = path.parent
    for section, key in (("backbone", "path"), ("generator", "path"), ("adapter", "init_from")):
        value = getattr(getattr(config, section), key)
        if value and not Path(value).is_absolute():
            setattr(getattr(config, section), key, str((base / value).resolve()))
    for key in ("pairs", "validation_pairs"):
        value = getattr(config.data, key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            setattr(config.data, key, str(base / value))
        elif isinstance(value, list):
            setattr(config.data, key, [v if Path(v).is_absolute() else str(base / v) for v in value])
    if config.output_dir and not Path(config.output_dir).is_absolute():
        config.output_dir = str((base / config.output_dir).resolve())
    check_values(config)
    return config


def check_values(config: TrainConfig) -> None:
    problems = []
    if not config.data.pairs:
        problems.append("data.pairs is empty: name the JSONL pair file(s)")
    if not config.backbone.path:
        problems.append("backbone.path is empty: name an HF-format Qwen2.5-VL folder")
    if config.backbone.dtype not in ("fp32", "bf16"):
        problems.append(f"backbone.dtype {config.backbone.dtype!r}: use fp32 or bf16")
    if config.runtime.mixed_precision not in ("no", "bf16", "fp16"):
        problems.append(f"runtime.mixed_precision {config.runtime.mixed_precision!r}: use no, bf16 or fp16")
    for name, value in (("optim.batch_size", config.optim.batch_size), ("optim.max_steps", config.optim.max_steps),
                        ("optim.grad_accum", config.optim.grad_accum), ("adapter.num_tokens", config.adapter.num_tokens)):
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("loss.drop_text", config.loss.drop_text), ("loss.drop_tokens", config.loss.drop_tokens)):
        if not 0 <= value < 1:
            problems.append(f"{name} must be in [0, 1), got {value}")
    if not 0 <= config.loss.reconstruct <= 1:
        problems.append(f"loss.reconstruct must be in [0, 1], got {config.loss.reconstruct}")
    if config.loss.oracle_tokens and (config.loss.lambda_con != 0 or config.loss.lambda_gen <= 0):
        problems.append("loss.oracle_tokens replaces the encoder in the generative loss only: set loss.lambda_con=0 "
                        "and loss.lambda_gen > 0")
    if config.adapter.freeze_encoder and not config.adapter.init_from:
        problems.append("adapter.freeze_encoder trains the IP-Adapter on a fixed encoder: set adapter.init_from to the "
                        "adapter file of the encoder stage")
    if config.adapter.freeze_encoder and (config.loss.lambda_con != 0 or config.loss.lambda_gen <= 0):
        problems.append("adapter.freeze_encoder leaves only the IP-Adapter to train, which only Lgen reaches: set "
                        "loss.lambda_con=0 and loss.lambda_gen > 0")
    if config.loss.tau <= 0:
        problems.append(f"loss.tau must be positive, got {config.loss.tau}")
    if config.loss.attributes_per_pair < 1:
        problems.append(f"loss.attributes_per_pair must be at least 1, got {config.loss.attributes_per_pair}")
    if config.loss.lambda_gen == 0 and config.loss.lambda_con == 0:
        problems.append("loss.lambda_gen and loss.lambda_con are both 0: nothing to train")
    if problems:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))


def dump_config(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2, default=str)

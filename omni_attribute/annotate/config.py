"""Configurations of annotation runs and of the expert's fine-tuning: YAML (or JSON) files with
``section.key=value`` overrides, read like the trainer's (``omni_attribute.config_files``; paths relative to
the file)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config_files import apply_overrides, build_dataclass, read_config_file
from .errors import AnnotateError

DEFAULT_MAX_PIXELS = 448 * 448     # at most 16 x 16 = 256 image tokens per image (Qwen2.5-VL: one token per 28 x 28)
DEFAULT_MIN_PIXELS = 56 * 56       # Qwen2.5-VL's processor default


class ConfigError(AnnotateError):
    """An annotation or fine-tuning configuration is malformed; the message names the key."""


# ---- annotation ----------------------------------------------------------------------------------------

@dataclass
class EndpointConfig:
    backend: str = "http"                 # http (an OpenAI-compatible server) | transformers (local, see `local`)
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "Qwen/Qwen2.5-VL-72B-Instruct"
    api_key_env: str = "OPENAI_API_KEY"   # name of the environment variable holding the key ("" or unset: no key)
    timeout_s: float = 300.0              # one request, from sending to the whole answer
    connect_timeout_s: float = 10.0
    concurrency: int = 16                 # requests in flight at most
    max_attempts: int = 6                 # per request, over timeouts, 429, 5xx and dropped connections
    backoff_base_s: float = 1.0           # exponential backoff: base * 2^attempt (with jitter), at most backoff_max_s
    backoff_max_s: float = 60.0
    max_retry_after_s: float = 600.0      # a 429's Retry-After is honoured up to this many seconds
    structured_output: str = "auto"       # auto (send the JSON schema, drop it if the server refuses) | on | off
    temperature: float = 0.0
    max_tokens: int = 1024                # the answer's cap (the teacher's reasoning + JSON)
    check_endpoint: bool = True           # GET /models first: a wrong key, an unknown model or no server stop the run
    abort_after_failed_pairs: int = 3     # this many pairs in a row lost to transport errors stop the run


@dataclass
class LocalConfig:
    model_path: str = ""                  # HF-format Qwen2.5-VL folder (endpoint.backend: transformers)
    adapter: str = ""                     # optional PEFT LoRA folder (the expert fine-tuning's adapter/)
    dtype: str = "fp32"                   # fp32 | bf16
    device: str = "cpu"


@dataclass
class PromptConfig:
    style: str = "teacher"                # teacher (reasons, then answers) | expert (the short prompt)
    max_rejections: int = 2               # re-asks after an answer that fails validation (the reason is sent back)


@dataclass
class ImageConfig:
    max_pixels: int = DEFAULT_MAX_PIXELS  # images are resized (aspect kept, sides multiples of 28) into this budget
    min_pixels: int = DEFAULT_MIN_PIXELS
    format: str = "png"                   # png | jpeg (the data URL's encoding)
    jpeg_quality: int = 90


@dataclass
class RunConfig:
    source: str = ""                      # written into every record's "source" ("" = annotate:<model>)
    keep_reasoning: bool = True           # keep the teacher's reasoning in the record (the trainer ignores it)
    progress: bool = True


@dataclass
class AnnotateConfig:
    seed: int = 0                         # jitter of the backoff (answers come from the server)
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- expert fine-tuning ----------------------------------------------------------------------------------

@dataclass
class FinetuneDataConfig:
    conversations: str | list[str] = ""   # JSONL file(s) or glob written by `omni-attribute-annotate export`
    validation: str | list[str] | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_pixels: int = DEFAULT_MIN_PIXELS


@dataclass
class FinetuneBackboneConfig:
    path: str = ""                        # HF-format Qwen2.5-VL folder (e.g. Qwen2.5-VL-32B-Instruct)
    dtype: str = "bf16"                   # fp32 | bf16 (frozen weights; LoRA trains in fp32)


@dataclass
class FinetuneLoraConfig:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    targets: str | None = None            # regex; None = the language model's attention and MLP projections


@dataclass
class FinetuneOptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 1
    grad_accum: int = 8
    max_steps: int = 1000
    warmup_steps: int = 20
    grad_clip: float = 1.0


@dataclass
class FinetuneRuntimeConfig:
    mixed_precision: str = "no"           # no | bf16 | fp16 (accelerate)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    crash_after_step: int = 0             # testing: hard-kill the process after this step (0 = never)


@dataclass
class FinetuneConfig:
    output_dir: str = "runs/expert"
    seed: int = 0
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    backbone: FinetuneBackboneConfig = field(default_factory=FinetuneBackboneConfig)
    lora: FinetuneLoraConfig = field(default_factory=FinetuneLoraConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    runtime: FinetuneRuntimeConfig = field(default_factory=FinetuneRuntimeConfig)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- loading ---------------------------------------------------------------------------------------------

def _load(cls, path: str | Path | None, overrides: list[str]):
    """The config dataclass from a file (or the defaults) and overrides, and the folder paths start from."""
    data, base = read_config_file(path, ConfigError)
    data = apply_overrides(data, list(overrides), ConfigError, example="endpoint.concurrency=8")
    return build_dataclass(cls, data, Path(path).name if path else "config", ConfigError), base


def _resolve(value, base: Path):
    if isinstance(value, str) and value and not Path(value).is_absolute():
        return str((base / value).resolve())
    if isinstance(value, list):
        return [_resolve(v, base) for v in value]
    return value


def load_annotate_config(path: str | Path | None = None, overrides: list[str] = ()) -> AnnotateConfig:
    config, base = _load(AnnotateConfig, path, overrides)
    config.local.model_path = _resolve(config.local.model_path, base)
    config.local.adapter = _resolve(config.local.adapter, base)
    check_annotate_config(config)
    return config


def check_annotate_config(config: AnnotateConfig) -> None:
    e, problems = config.endpoint, []
    if isinstance(e.structured_output, bool):   # YAML reads a bare on/off as true/false
        e.structured_output = "on" if e.structured_output else "off"
    if e.backend not in ("http", "transformers"):
        problems.append(f"endpoint.backend {e.backend!r}: use http or transformers")
    if e.backend == "http" and not str(e.base_url).startswith(("http://", "https://")):
        problems.append(f"endpoint.base_url {e.base_url!r}: give the server's URL, e.g. http://127.0.0.1:8000/v1")
    if e.backend == "transformers" and not config.local.model_path:
        problems.append("local.model_path is empty: name an HF-format Qwen2.5-VL folder for the transformers backend")
    if e.structured_output not in ("auto", "on", "off"):
        problems.append(f"endpoint.structured_output {e.structured_output!r}: use auto, on or off")
    for name in ("concurrency", "max_attempts", "max_tokens", "abort_after_failed_pairs"):
        value = getattr(e, name)
        if not isinstance(value, int) or value < 1:
            problems.append(f"endpoint.{name} must be a positive integer, got {value!r}")
    for name in ("timeout_s", "connect_timeout_s"):
        if not isinstance(getattr(e, name), (int, float)) or getattr(e, name) <= 0:
            problems.append(f"endpoint.{name} must be a positive number of seconds, got {getattr(e, name)!r}")
    if config.prompt.style not in ("teacher", "expert"):
        problems.append(f"prompt.style {config.prompt.style!r}: use teacher or expert")
    if not isinstance(config.prompt.max_rejections, int) or config.prompt.max_rejections < 0:
        problems.append(f"prompt.max_rejections must be 0 or more, got {config.prompt.max_rejections!r}")
    check_image_budget(config.image.min_pixels, config.image.max_pixels, "image", problems)
    if config.image.format not in ("png", "jpeg"):
        problems.append(f"image.format {config.image.format!r}: use png or jpeg")
    if config.local.dtype not in ("fp32", "bf16"):
        problems.append(f"local.dtype {config.local.dtype!r}: use fp32 or bf16")
    if problems:
        raise ConfigError("invalid annotation config:\n  " + "\n  ".join(problems))


def check_image_budget(min_pixels, max_pixels, section: str, problems: list[str]) -> None:
    if not isinstance(max_pixels, int) or max_pixels < 28 * 28:
        problems.append(f"{section}.max_pixels must be an integer of at least 784 (28 x 28), got {max_pixels!r}")
    elif not isinstance(min_pixels, int) or not 28 * 28 <= min_pixels <= max_pixels:
        problems.append(f"{section}.min_pixels must be an integer between 784 and max_pixels, got {min_pixels!r}")


def load_finetune_config(path: str | Path, overrides: list[str] = ()) -> FinetuneConfig:
    config, base = _load(FinetuneConfig, path, overrides)
    config.output_dir = _resolve(config.output_dir, base)
    config.backbone.path = _resolve(config.backbone.path, base)
    config.data.conversations = _resolve(config.data.conversations, base)
    config.data.validation = _resolve(config.data.validation, base)
    check_finetune_config(config)
    return config


def check_finetune_config(config: FinetuneConfig) -> None:
    problems = []
    if not config.data.conversations:
        problems.append("data.conversations is empty: name the JSONL file(s) written by `omni-attribute-annotate export`")
    if not config.backbone.path:
        problems.append("backbone.path is empty: name an HF-format Qwen2.5-VL folder")
    if config.backbone.dtype not in ("fp32", "bf16"):
        problems.append(f"backbone.dtype {config.backbone.dtype!r}: use fp32 or bf16")
    if config.runtime.mixed_precision not in ("no", "bf16", "fp16"):
        problems.append(f"runtime.mixed_precision {config.runtime.mixed_precision!r}: use no, bf16 or fp16")
    for name, value in (("optim.batch_size", config.optim.batch_size), ("optim.max_steps", config.optim.max_steps),
                        ("optim.grad_accum", config.optim.grad_accum), ("lora.r", config.lora.r),
                        ("runtime.checkpoint_every", config.runtime.checkpoint_every),
                        ("runtime.log_every", config.runtime.log_every)):
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(config.optim.lr, (int, float)) or config.optim.lr <= 0:
        problems.append(f"optim.lr must be a positive number, got {config.optim.lr!r}")
    check_image_budget(config.data.min_pixels, config.data.max_pixels, "data", problems)
    if problems:
        raise ConfigError("invalid fine-tuning config:\n  " + "\n  ".join(problems))

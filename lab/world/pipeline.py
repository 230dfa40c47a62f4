"""The tiny attribute world end to end: data → judge → captioner backbone → generator → four encoders →
evaluation. Each stage is cached in a folder keyed by its settings; a cached stage is reused and says so.

Used by ``benchmarks/tiny_world.py`` (the table), the main job (``lab.demo``) and the CI test.
"""

from __future__ import annotations

import hashlib
import math
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from devtools.fixtures import copy_tokenizer, make_tiny_backbone_folder, qwen25_tokenizer_dir
from omni_attribute.adapter_file import load_adapter
from omni_attribute.encoder import load_encoder
from omni_attribute.images import load_rgb_batch, pil_to_tensor
from omni_attribute.ip_adapter import attach_to_diffusers, load_ip_adapter
from omni_attribute.train.config import load_config
from omni_attribute.train.generator import load_tiny_generator
from omni_attribute.train.oracle import OracleTokens, load_oracle
from omni_attribute.train.trainer import train

from .captioner import pretrain_captioner
from .evaluate import (
    attribute_tokens,
    composition_all_hits,
    composition_scores,
    embed_by_factor,
    paired_gap_spread,
    personalization_scores,
    retrieval,
    selectivity,
    selectivity_spread,
)
from .factors import FACTORS, HELD_OUT_PHRASINGS, PHRASINGS, TRAIN_PHRASINGS, Assignment, caption_without, sample_assignment
from .generator import sample_composed, sample_images, train_world_generator
from .judge import FactorJudge, accuracy, load_judge, save_judge, train_judge
from .pairs import make_images, make_pairs, read_images
from .render import render
from .weights import COMMAND_STAGE, install, kind_of, matching, model_hash

REPO = Path(__file__).resolve().parents[2]
TRAIN_CONFIG = REPO / "configs" / "train_tiny.yaml"

SIZES: dict[str, dict] = {
    "full": {"gen_images": 4000, "gen_steps": 1000, "gen_batch": 48, "caption_steps": 400, "judge_images": 4000,
             "pairs": 2000, "encoder_steps": 300, "ip_steps": 300, "encoder_batch": 8, "eval_images": 240, "eval_cases": 72},
    "ci": {"gen_images": 2000, "gen_steps": 4000, "gen_batch": 32, "caption_steps": 250, "judge_images": 4000,
           "pairs": 800, "ip_pairs": 4000, "encoder_steps": 1000, "ip_steps": 1000, "encoder_batch": 8, "eval_images": 160,
           "eval_cases": 144},
    # for a lent GPU (--device cuda): the ci world with twice the encoder steps at twice the batch, a backbone
    # pre-trained four times longer, five times the pairs and twice the cases (no committed weights: all trained)
    "gpu": {"gen_images": 2000, "gen_steps": 4000, "gen_batch": 32, "caption_steps": 1000, "judge_images": 4000,
            "pairs": 4000, "ip_pairs": 20000, "encoder_steps": 2000, "ip_steps": 2000, "encoder_batch": 16,
            "eval_images": 320, "eval_cases": 288},
}
# "ip_pairs": the second stage's training pairs, drawn apart from the first stage's (another seed; a size without
# it trains both stages on its "pairs"). Measured at CI size (BENCHMARKS.md, 144 cases, seed 0): on the first
# stage's 800 pairs the second stage fits them — 3000 steps lose background — and reaches attribute fidelity
# +0.243 over text only; on 4000 pairs of its own +0.306 (the committed table), background 0.48 → 0.72,
# composition both 0.208 → 0.236. The first stages keep the world's pairs (their committed weights were trained
# on them). The gpu size's 20000 is five times ci's, like its other counts, and not measured yet.
IP_PAIRS_SEED_OFFSET = 40  # the world's own pairs are drawn with seed + 4
# Each generator caption leaves each factor out with this probability, so prompts that leave a factor to a
# reference are in its distribution (trained on full captions only, it drew noise for them).
GENERATOR_DROP_FACTOR = 0.25
GENERATOR_LR = 1e-3
# The judge reads every factor of held-out renders at 1.00 with 4000 images and 12 epochs (0.89 shape, 0.91 size
# with 1500 and 6: too weak to check a generator against a 0.90 goal).
JUDGE_EPOCHS = 12
# The tiny MLLM: a real Qwen2.5-VL architecture, 4 layers of width 128, a 4-block vision tower of width 64.
BACKBONE_SHAPE = {"hidden_size": 128, "layers": 4, "vision_hidden": 64, "vision_depth": 4}
# Weight of the backbone pre-training's auxiliary factor read-out (lab.world.captioner). Read-back of 96 held-out
# images after 250 steps (BENCHMARKS.md): captioning alone sees colour 0.98 and background 1.00 but shape 0.25,
# pattern 0.33, lighting 0.31 (chance 0.25-0.33); with the read-out at weight 1 pattern 0.98, lighting 0.79.
BACKBONE_FACTOR_WEIGHT = 1.0
# The phrasings the backbone's pre-training asks with ("training": the committed backbone; "all": the held-out
# ones too — BENCHMARKS.md: with "training" the backbone has never read "illumination", which costs lighting)
BACKBONE_WORDS = {"training": TRAIN_PHRASINGS, "all": PHRASINGS}
# Measured at CI size, contrastive loss only, 200-300 steps, selectivity on held-out images (BENCHMARKS.md):
# lr 3e-4 barely moves Lcon in the steps we can afford and 3e-3 stalls it, 1e-3 works (3e-3 for the
# IP-Adapter); one (a+, a−) tuple per pair, no image positions, a 64-wide 2-layer connector: +0.01;
# three of each per pair (9 tuples) with image positions: +0.065; and a 128-wide 4-layer connector: +0.11.
ENCODER_SETTINGS = ["optim.lr=0.001", "optim.ip_lr_scale=3", "adapter.min_pixels=12544", "adapter.max_pixels=12544",
                    "adapter.num_tokens=8", "adapter.connector_width=128", "adapter.connector_layers=4",
                    "adapter.connector_heads=4", "adapter.connector_image_positions=true", "loss.attributes_per_pair=3",
                    "generator.guidance=1.0"]
# The holistic encoder's instruction: no {attributes} placeholder, so the same tokens whatever attribute is asked
HOLISTIC_TEMPLATE = "adapter.prompt_template='Describe the whole image:'"
VARIANTS: dict[str, list[str]] = {
    "Omni-Attribute (Lgen + Lcon)": ["loss.lambda_gen=1.0", "loss.lambda_con=1.0"],
    "generative loss only": ["loss.lambda_gen=1.0", "loss.lambda_con=0.0"],
    "contrastive loss only": ["loss.lambda_gen=0.0", "loss.lambda_con=1.0"],
    "holistic encoder": ["loss.lambda_gen=1.0", "loss.lambda_con=0.0", HOLISTIC_TEMPLATE],
}
OMNI = "Omni-Attribute (Lgen + Lcon)"
# The recipe's second stage, the same for every variant (trainer options adapter.init_from + freeze_encoder):
# the encoder of the first stage frozen, its IP-Adapter alone trained on with Lgen at a tenth of the first
# stage's IP learning rate (3e-4 instead of 3e-3). Measured on the committed Omni-Attribute encoder (BENCHMARKS.md,
# 144 cases, 1000 steps, at the attribute weight w = 3 of then): at 3e-3 Lgen on the training pairs stays *above*
# its value without tokens (0.039 vs 0.033: each step overshoots) and attribute fidelity moves 0.417 → 0.431; at
# 3e-4 Lgen falls below it (0.0325) and fidelity reaches 0.465, composition of 2 references 0.389 → 0.451
# (training seed 1: 0.354, no measurable gain over its first stage). More text dropout (0.5, to train the
# D(E, ∅) the guider uses) did not help (0.389), nor 3000 steps instead of 1000 (0.382: the 800 pairs are fitted,
# background is lost), nor the joint stage at this low rate too (0.340, then 0.403 after this stage: the joint
# stage needs its high rate to get the IP path going from zero). For the contrastive-only variant this stage is
# the only one that trains an IP-Adapter at all (its first stage has λgen = 0).
IP_STAGE = ["loss.lambda_gen=1.0", "loss.lambda_con=0.0", "adapter.freeze_encoder=true", "optim.ip_lr_scale=0.3"]
# s_T of the flow-blend rule in the evaluation (and the shipped tiny-world workflow): the small generator
# draws clean images only with guidance on its caption (s_T = 1 leaves them blocky and noisy)
TEXT_SCALE = 3.0
# The weight w_i of each attribute's term v(E_i,∅) − v(∅,∅) in the evaluation (and the tiny-world workflow). It
# is a guidance scale like s_T: at w = 1 against s_T = 3 the prompt's pull outweighs the reference's. With oracle
# tokens (BENCHMARKS.md, 144 cases) attribute fidelity is 0.51 at w = 1, 0.69 at 2, 0.81 at 3. With the committed
# Omni-Attribute encoder, on validation cases that the table does not use (benchmarks/attribute_weight.py, case
# seed 100): 0.35 / 0.40 / 0.48 / 0.53 / 0.57 at w = 2 / 3 / 4 / 6 / 8 while text fidelity falls 0.99 → 0.93 and
# copy-paste rises 0.004 → 0.030. Taken: the largest w of that sweep at which text fidelity stays within 0.05 of
# text only's (0.996) and copy-paste within text only + 0.05 — w = 6 (0.960, 0.013). The same w for every encoder.
ATTRIBUTE_SCALE = 6.0


@dataclass(frozen=True)
class Compute:
    """Where the laboratory's stages run: the torch device, and bf16 autocast (mixed precision for the encoders'
    training). The default, the CPU in fp32, is what CI runs. A cached stage is reused whatever device made it."""
    device: str = "cpu"
    bf16: bool = False

    def trainer_overrides(self) -> list[str]:
        """omni-attribute-train settings for this compute (accelerate would take a GPU wherever there is one)."""
        overrides = ["runtime.mixed_precision=bf16"] if self.bf16 else []
        if self.device == "cpu" and torch.cuda.is_available():
            overrides.append("runtime.cpu=true")
        return overrides


CPU = Compute()


def default_work(size_name: str) -> Path:
    """The stage cache of a world size when no --work is given: runs/tiny-world-ci, runs/tiny-world (full) or
    runs/tiny-world-gpu."""
    return REPO / "runs" / {"ci": "tiny-world-ci", "full": "tiny-world", "gpu": "tiny-world-gpu"}[size_name]


def add_compute_arguments(parser) -> None:
    """--device and --bf16 of the laboratory's commands."""
    parser.add_argument("--device", default="cpu",
                        help="torch device of every stage: cpu (the default, what CI runs), cuda, cuda:1, …")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast for the generator and sampling, bf16 mixed precision for the encoders")


def compute_from(args, parser) -> Compute:
    """The Compute of parsed --device/--bf16; a device this machine lacks is a usage error."""
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA GPU (torch {torch.__version__}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: the laboratory runs on cpu or cuda")
    return Compute(str(device), args.bf16)


@dataclass
class WorldModels:
    """Where the trained world lives: what the ComfyUI main job loads."""
    backbone: Path
    generator: Path
    judge: Path
    adapters: dict[str, Path]


def stage_name(name: str, settings: dict) -> str:
    """A stage's folder name: its name and a hash of its settings."""
    return f"{name}-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]}"


def _stage(work: Path, name: str, settings: dict, force: set[str], log: Callable[[str], None]) -> tuple[Path, bool]:
    folder = work / stage_name(name, settings)
    done = (folder / "done.json").is_file() and name not in force
    log(f"[{name}] {'cached: reusing ' if done else 'running: '}{folder}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder, done


def _mark_done(folder: Path, info: dict) -> None:
    (folder / "done.json").write_text(json.dumps(info, indent=2))


def data_settings(size_name: str, seed: int = 0) -> dict:
    size = SIZES[size_name]
    return {"size": {k: size[k] for k in ("gen_images", "judge_images", "eval_images", "pairs")}, "seed": seed, "v": 5}


def generator_settings(size_name: str, seed: int = 0) -> dict:
    """Everything the generator stage's result depends on (its cache key, and what committed weights must match)."""
    size = SIZES[size_name]
    return {"data": data_settings(size_name, seed), "steps": size["gen_steps"], "batch": size["gen_batch"],
            "seed": seed, "v": 4, "lr": GENERATOR_LR, "drop_factor": GENERATOR_DROP_FACTOR}


def variant_slug(name: str) -> str:
    """The stage name of an encoder variant: "Omni-Attribute (Lgen + Lcon)" → "omni-attribute"."""
    return name.split(" (")[0].replace(" ", "-").lower()


def backbone_settings(size_name: str, seed: int = 0, caption_steps: int | None = None,
                      backbone_words: str = "training") -> dict:
    """``backbone_words``: "training" (the pre-training asks with the training phrasings only) or "all" (with the
    held-out ones too: the words a real MLLM knows; the encoders' training pairs still use the training ones)."""
    if backbone_words not in BACKBONE_WORDS:
        raise ValueError(f"backbone_words={backbone_words!r}: use one of {sorted(BACKBONE_WORDS)}")
    words = {} if backbone_words == "training" else {"words": backbone_words}  # the committed backbone's key stays
    return {"data": stage_name("data", data_settings(size_name, seed)),
            "steps": caption_steps or SIZES[size_name]["caption_steps"], "seed": seed, "shape": BACKBONE_SHAPE,
            "factor_weight": BACKBONE_FACTOR_WEIGHT, "v": 3, **words}


def encoder_settings(size_name: str, overrides: list[str], seed: int = 0, caption_steps: int | None = None,
                     steps: int | None = None, backbone_words: str = "training") -> dict:
    """An encoder stage's settings (committed weights also name the files they were trained on: "trained_on")."""
    return {"gen": stage_name("generator", generator_settings(size_name, seed)),
            "backbone": stage_name("backbone", backbone_settings(size_name, seed, caption_steps, backbone_words)),
            "steps": steps or SIZES[size_name]["encoder_steps"], "o": overrides, "settings": ENCODER_SETTINGS}


def ip_stage_settings(size_name: str, variant: str, overrides: list[str], seed: int = 0,
                      caption_steps: int | None = None, steps: int | None = None,
                      backbone_words: str = "training") -> dict:
    """A second stage's settings: its first stage (the folder), its own steps and options ("trained_on" as above)."""
    first = encoder_settings(size_name, overrides, seed, caption_steps, steps, backbone_words)
    pairs = SIZES[size_name].get("ip_pairs")
    return {"encoder": stage_name(f"encoder-{variant_slug(variant)}", first),
            "steps": steps or SIZES[size_name]["ip_steps"], "o": IP_STAGE, **({"pairs": pairs} if pairs else {})}


def own_pairs(work: Path, count: int, seed: int, log: Callable[[str], None] = print) -> Path:
    """A pair set of its own (``count`` pairs drawn with seed + IP_PAIRS_SEED_OFFSET, apart from the world's), cached
    in ``work``: the second stage's training pairs (and those of the diagnostics' --pairs). Returns its pairs.jsonl."""
    folder, cached = _stage(work, "pairs", {"count": count, "seed": seed + IP_PAIRS_SEED_OFFSET, "v": 1}, set(), log)
    if not cached:
        make_pairs(folder, count, seed + IP_PAIRS_SEED_OFFSET)
        _mark_done(folder, {})
    return folder / "pairs.jsonl"


def train_world(size_name: str, work: Path, seed: int = 0, force: set[str] = frozenset(),
                variants: dict[str, list[str]] = VARIANTS, log: Callable[[str], None] = print,
                committed: frozenset[str] = frozenset(COMMAND_STAGE), compute: Compute = CPU,
                caption_steps: int | None = None, encoder_steps: int | None = None,
                backbone_words: str = "training") -> tuple[WorldModels, dict]:
    """Train (or reuse) every stage on ``compute``; returns the model paths and the stage reports. A stage of
    a kind in ``committed`` (generator, backbone, encoder) comes from the committed weights (lab/weights,
    hash-checked) when they were trained with this stage's settings — for an encoder, on these very backbone
    and generator files. ``caption_steps``: the backbone's pre-training steps instead of the size's (a
    diagnostic: how much the backbone's sight limits the encoders); ``encoder_steps``: the steps of both of each
    encoder's training stages instead of the size's (a smoke of the training path; their own stages). The stage reports name, per
    stage, the settings that committed weights must match and the trained model folder (``lab.world.weights``
    exports them)."""
    size, work = SIZES[size_name], Path(work).resolve()
    size = {**size, "caption_steps": caption_steps or size["caption_steps"],
            "encoder_steps": encoder_steps or size["encoder_steps"], "ip_steps": encoder_steps or size["ip_steps"]}
    stages: dict = {}
    commit_settings: dict[str, dict] = {}
    model_folders: dict[str, Path] = {}
    data, cached = _stage(work, "data", data_settings(size_name, seed), force, log)
    if not cached:
        make_images(data / "gen", size["gen_images"], seed + 1)
        make_images(data / "judge-train", size["judge_images"], seed + 2)
        make_images(data / "held-out", size["eval_images"], seed + 3)
        make_pairs(data / "pairs", size["pairs"], seed + 4)
        _mark_done(data, {})
    gen_rows = read_images(data / "gen" / "images.jsonl")
    held_out = read_images(data / "held-out" / "images.jsonl")

    judge_dir, cached = _stage(work, "judge", {"data": data.name, "epochs": JUDGE_EPOCHS}, force, log)
    if not cached:
        rows = read_images(data / "judge-train" / "images.jsonl")
        judge = train_judge(load_rgb_batch([p for p, _, _ in rows]), [a for _, a, _ in rows], epochs=JUDGE_EPOCHS,
                            seed=seed, device=compute.device)
        scores = accuracy(judge, load_rgb_batch([p for p, _, _ in held_out]), [a for _, a, _ in held_out])
        save_judge(judge, judge_dir / "judge.safetensors")
        _mark_done(judge_dir, {"held_out_accuracy": scores})
    stages["judge"] = json.loads((judge_dir / "done.json").read_text())

    settings = backbone_settings(size_name, seed, caption_steps, backbone_words)
    backbone_dir, cached = _stage(work, "backbone", settings, force, log)
    backbone = backbone_dir / "captioner"
    source = matching("backbone", size_name, settings) if not cached and "backbone" in committed else None
    if source:
        log(f"[backbone] committed weights: {source} (hash-checked; python -m lab.world.weights --stage backbone "
            "re-creates them)")
        install(source, backbone, "backbone")
        copy_tokenizer(qwen25_tokenizer_dir(), backbone)
        _mark_done(backbone_dir, {"source": "committed"})
    elif not cached:
        make_tiny_backbone_folder(backbone_dir / "random", seed=seed, **BACKBONE_SHAPE)
        last: list[float] = []
        pretrain_captioner(backbone_dir / "random", backbone_dir / "captioner",
                           load_rgb_batch([p for p, _, _ in gen_rows]), [a for _, a, _ in gen_rows],
                           steps=size["caption_steps"], seed=seed, progress=_every(50, "backbone", log, last),
                           device=compute.device, factor_weight=BACKBONE_FACTOR_WEIGHT,
                           phrasings=BACKBONE_WORDS[backbone_words])
        _mark_done(backbone_dir, {"final_loss": last[-1] if last else None, "source": "trained here"})
    commit_settings["backbone"], model_folders["backbone"] = settings, backbone
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(backbone), fix_mistral_regex=False)

    settings = generator_settings(size_name, seed)
    gen_dir, cached = _stage(work, "generator", settings, force, log)
    if not cached:
        source = matching("generator", size_name, settings) if "generator" in committed else None
        if source:
            log(f"[generator] committed weights: {source} (hash-checked; python -m lab.world.weights --stage "
                "generator re-creates them)")
            install(source, gen_dir / "model", "generator")
            tokenizer.save_pretrained(str(gen_dir / "model" / "tokenizer"))
        else:
            train_world_generator(load_rgb_batch([p for p, _, _ in gen_rows]), [a for _, a, _ in gen_rows], tokenizer,
                                  gen_dir / "model", steps=size["gen_steps"], batch_size=size["gen_batch"], seed=seed,
                                  lr=GENERATOR_LR, drop_factor=GENERATOR_DROP_FACTOR,
                                  progress=_every(100, "generator", log), device=compute.device, bf16=compute.bf16)
        report = _generator_report(gen_dir / "model", load_judge(judge_dir / "judge.safetensors"),
                                   [a for _, a, _ in held_out[:96]], seed, compute)
        _mark_done(gen_dir, {**report, "source": "committed" if source else "trained here"})
    stages["generator"] = json.loads((gen_dir / "done.json").read_text())
    commit_settings["generator"], model_folders["generator"] = settings, gen_dir / "model"

    # the encoders' committed weights hold only on the very files they were trained on
    trained_on = {kind: model_hash(model_folders[kind], kind) for kind in ("backbone", "generator")} if variants else {}
    ip_pairs = own_pairs(work, size["ip_pairs"], seed, log) if variants and size.get("ip_pairs") else None
    adapters = {}
    for name, overrides in variants.items():
        slug = variant_slug(name)
        base = [f"data.pairs={data / 'pairs' / 'pairs.jsonl'}", "data.validation_pairs=null", f"backbone.path={backbone}",
                "generator.kind=tiny", f"generator.path={gen_dir / 'model'}", f"optim.batch_size={size['encoder_batch']}",
                "runtime.validate_every=0", "runtime.checkpoint_every=100000", "runtime.log_every=25", *ENCODER_SETTINGS,
                *overrides]
        first = _trained_stage(
            work, f"encoder-{slug}", encoder_settings(size_name, overrides, seed, caption_steps, encoder_steps, backbone_words),
            trained_on, [*base, f"optim.max_steps={size['encoder_steps']}"], size_name, force, committed, compute, log,
            commit_settings, model_folders)
        second = _trained_stage(
            work, f"ip-{slug}", ip_stage_settings(size_name, name, overrides, seed, caption_steps, encoder_steps,
                                                 backbone_words),
            {**trained_on, f"encoder-{slug}": model_hash(first, "encoder")} if trained_on else {},
            [*base, f"optim.max_steps={size['ip_steps']}", f"adapter.init_from={first / 'adapter.safetensors'}", *IP_STAGE,
             *([f"data.pairs={ip_pairs}"] if ip_pairs else [])],
            size_name, force, committed, compute, log, commit_settings, model_folders)
        adapters[name] = second / "adapter.safetensors"
    models = WorldModels(backbone, gen_dir / "model", judge_dir / "judge.safetensors", adapters)
    return models, {"stages": stages, "held_out": str(data / "held-out" / "images.jsonl"),
                    "settings": commit_settings, "models": model_folders}


def _trained_stage(work: Path, stage: str, settings: dict, trained_on: dict, config_overrides: list[str], size_name: str,
                   force: set[str], committed: frozenset[str], compute: Compute, log: Callable[[str], None],
                   commit_settings: dict, model_folders: dict) -> Path:
    """One adapter-training stage (an encoder's first or second): cached, committed (hash-checked, trained on
    these very files) or trained here with omni-attribute-train. Returns its run folder (adapter.safetensors)."""
    folder, cached = _stage(work, stage, settings, force, log)
    run_dir = folder / "run"
    commit_settings[stage], model_folders[stage] = {**settings, "trained_on": trained_on}, run_dir
    kind = kind_of(stage)
    source = matching(stage, size_name, commit_settings[stage]) if not cached and kind in committed else None
    if source:
        log(f"[{stage}] committed weights: {source} (hash-checked, trained on these very files; python -m "
            f"lab.world.weights --stage {COMMAND_STAGE[kind]} re-creates them)")
        install(source, run_dir, stage)
        _mark_done(folder, {"source": "committed"})
    elif not cached:
        config = load_config(TRAIN_CONFIG, [f"output_dir={run_dir}", *config_overrides, *compute.trainer_overrides()])
        train(config, resume=False, progress=False)
        _mark_done(folder, {"source": "trained here"})
    return run_dir


def _generator_report(model: Path, judge: FactorJudge, truth: list[Assignment], seed: int,
                      compute: Compute = CPU) -> dict:
    """How well the judge reads back the generator's images of full captions, and of partial prompts
    (each naming a random half of the factors: scored on the named ones only)."""
    transformer, text, layout = load_generator(model, compute)
    full = accuracy(judge, sample_images(transformer, text, layout, [caption_without(a, set()) for a in truth],
                                         seed=seed, bf16=compute.bf16), truth)
    rng = random.Random(seed + 5)
    omitted = [set(rng.sample(list(FACTORS), len(FACTORS) // 2)) for _ in truth]
    seen = judge.predict(sample_images(transformer, text, layout,
                                       [caption_without(a, o) for a, o in zip(truth, omitted)], seed=seed,
                                       bf16=compute.bf16))
    partial = {}
    for f in FACTORS:
        named = [(s, a) for s, a, o in zip(seen, truth, omitted) if f not in o]
        partial[f] = sum(s[f] == a[f] for s, a in named) / max(1, len(named))
    return {"text_fidelity_of_captions": full, "text_fidelity_of_partial_prompts": partial}


def _every(n: int, name: str, log: Callable[[str], None], last: list[float] | None = None):
    def report(step: int, total: int, loss: float) -> None:
        if last is not None:
            last.append(loss)
        if step % n == 0 or step == total:
            log(f"[{name}] step {step}/{total} loss {loss:.4f}")
    return report


def load_generator(folder: Path, compute: Compute = CPU):
    """The frozen tiny generator (transformer, text encoder, layout) on ``compute``'s device."""
    transformer, text, layout = load_tiny_generator(folder)
    return transformer.to(compute.device), text.to(compute.device), layout


def run_benchmark(size_name: str, work: Path, seed: int = 0, force: set[str] = frozenset(),
                  variants: dict[str, list[str]] = VARIANTS, log: Callable[[str], None] = print,
                  compute: Compute = CPU) -> tuple[WorldModels, dict]:
    """Train (or reuse) the world, evaluate every variant; writes results.json and results.md into ``work``."""
    started = time.time()
    work = Path(work).resolve()
    models, info = train_world(size_name, work, seed, force, variants, log, compute=compute)
    size = SIZES[size_name]
    held_out = read_images(Path(info["held_out"]))
    judge = load_judge(models.judge)
    images, truth = load_rgb_batch([p for p, _, _ in held_out]), [a for _, a, _ in held_out]
    rows, text_only = {}, None
    for name, adapter in models.adapters.items():
        rows[name] = evaluate(adapter, models.backbone, models.generator, judge, images, truth, size["eval_cases"], seed,
                              text_only, compute=compute)
        text_only = rows[name]["text_only_baseline"]  # the same prompts and seeds for every encoder
        log(f"[{name}] {json.dumps(rows[name]['summary'])}")
    report = {"size": size_name, "seed": seed, "device": compute.device, "bf16": compute.bf16,
              "stages": info["stages"], "rows": rows,
              "seconds": round(time.time() - started)}
    (work / "results.json").write_text(json.dumps(report, indent=2))
    (work / "results.md").write_text(render_table(report))
    return models, report


# What gives the attribute tokens of a case: (reference assignments, asked factor of each) → tokens [B, M, D]
TokenSource = Callable[[list[Assignment], list[str]], torch.Tensor]


def encoder_tokens(encoder, phrasings: dict[str, str] = HELD_OUT_PHRASINGS) -> TokenSource:
    """The encoder's tokens of each rendered reference under its asked factor's held-out phrasing (or
    ``phrasings``: one name per factor)."""
    return lambda refs, asked: attribute_tokens(encoder, render_batch(refs), asked, phrasings)


def oracle_tokens(oracle: OracleTokens) -> TokenSource:
    """The oracle-token diagnostic's ground-truth tokens: the reference's value of the asked factor."""
    return lambda refs, asked: oracle([[f"{f}={r[f]}"] for r, f in zip(refs, asked)]).detach()


def evaluate(adapter: Path, backbone: Path, generator: Path, judge: FactorJudge, images: torch.Tensor,
             truth: list[Assignment], cases: int, seed: int, text_only: dict | None = None,
             oracle: Path | None = None, reuse_every: int | None = None, compute: Compute = CPU,
             attribute_scale: float = ATTRIBUTE_SCALE) -> dict:
    """Retrieval on held-out images (held-out phrasings); personalization and composition on fresh cases.
    ``text_only``: the text-only baseline of an earlier call with the same cases and seed (not recomputed).
    ``oracle``: an oracle-token file (the diagnostic) gives the tokens instead of the encoder; no retrieval.
    ``reuse_every``: sample with the guider's approximate "reuse Δ every k steps" rule instead of the exact one."""
    summary: dict = {}
    retrieval_rows: dict = {}
    if oracle is None:
        encoder = load_encoder(backbone, adapter, device=compute.device)
        embeddings = embed_by_factor(encoder, images)
        retrieval_rows = retrieval(embeddings, truth)
        mean = lambda key: sum(r[key] for r in retrieval_rows.values()) / len(retrieval_rows)  # noqa: E731
        summary = {"retrieval_precision": mean("precision"), "retrieval_chance": mean("chance"),
                   "leakage": mean("leakage"), "leakage_chance": mean("leakage_chance"),
                   "selectivity": selectivity(retrieval_rows), "selectivity_spread": selectivity_spread(embeddings, truth)}
        tokens_of = encoder_tokens(encoder)
    else:
        tokens_of = oracle_tokens(load_oracle(oracle))
    generation = evaluate_generation(tokens_of, adapter, generator, judge, cases, seed, text_only, reuse_every, compute,
                                     attribute_scale)
    return {"retrieval": retrieval_rows, **generation, "summary": {**summary, **generation["summary"]}}


def evaluate_generation(tokens_of: TokenSource, adapter: Path, generator: Path, judge: FactorJudge, cases: int,
                        seed: int, text_only: dict | None = None, reuse_every: int | None = None,
                        compute: Compute = CPU, attribute_scale: float = ATTRIBUTE_SCALE) -> dict:
    """Personalization (one reference, its asked factor left out of the prompt) and composition (2 and 3
    references) through the adapter's IP-Adapter on the frozen generator, read back by the judge.

    The text-only baseline samples the same prompts without tokens; the *text ceiling* samples prompts that
    name the reference's value of the asked factor: what the generator draws when told in words, the most
    the tokens can be expected to give. ``reuse_every``: the approximate flow-blend rule (each attribute's
    v(E_i,∅) − v(∅,∅) evaluated every k steps, held in between) for the samples with tokens; ``attribute_scale``:
    the weight w of every attribute's term. ``seed`` draws the cases and the noise: another seed, other cases."""
    transformer, text, layout = load_generator(generator, compute)
    file = load_adapter(adapter)
    ip = load_ip_adapter(file.metadata.generator, file.section("ip_adapter"), adapter.name).to(compute.device)
    attach_to_diffusers(transformer, ip)
    rng = random.Random(seed + 11)
    factors = list(FACTORS)
    asked = [rng.choice(factors) for _ in range(cases)]
    refs = [sample_assignment(rng) for _ in range(cases)]
    targets = [sample_assignment(rng) for _ in range(cases)]
    prompts = [caption_without(t, {f}) for t, f in zip(targets, asked)]
    sample = lambda prompt, token_sets: judge.predict(sample_composed(  # noqa: E731
        transformer, text, layout, prompt, token_sets, [attribute_scale] * len(token_sets), seed=seed,
        text_scale=TEXT_SCALE, reuse_every=reuse_every if token_sets else None, bf16=compute.bf16))
    personal = personalization_scores(sample(prompts, [tokens_of(refs, asked)]), refs, targets, asked)
    fresh = text_only is None
    if fresh:
        told = [caption_without(Assignment.of({**t.as_dict(), f: r[f]}), set()) for t, r, f in zip(targets, refs, asked)]
        text_only = {**personalization_scores(sample(prompts, []), refs, targets, asked),
                     "text_ceiling": personalization_scores(sample(told, []), refs, targets, asked)["attribute_fidelity"]}
    composed, all_hits = {}, {}
    for n in (2, 3):
        picks = [rng.sample(factors, n) for _ in range(cases)]
        references = [[sample_assignment(rng) for _ in range(n)] for _ in range(cases)]
        target = [sample_assignment(rng) for _ in range(cases)]
        prompt = [caption_without(t, set(fs)) for t, fs in zip(target, picks)]
        token_sets = [tokens_of([r[i] for r in references], [p[i] for p in picks]) for i in range(n)]
        judged = sample(prompt, token_sets)
        composed[f"{n} references"] = composition_scores(judged, references, picks)
        all_hits[n] = composition_all_hits(judged, references, picks)
        composed[f"{n} references, all asked"] = sum(all_hits[n]) / cases
        if fresh and n == 2:  # what the prompts alone give on these cases (the factors asked are not in them)
            unguided = sample(prompt, [])
            unguided_hits = composition_all_hits(unguided, references, picks)
            text_only.update(composition_2=composition_scores(unguided, references, picks),
                             composition_2_all=sum(unguided_hits) / cases, composition_2_all_hits=unguided_hits)
    spread = lambda p: math.sqrt(p * (1 - p) / cases)  # noqa: E731  (binomial standard error over the cases)
    return {"personalization": personal, "text_only_baseline": text_only, "composition": composed,
            "summary": {**{k: v for k, v in personal.items() if k != "hits"},
                        "attribute_fidelity_spread": spread(personal["attribute_fidelity"]),
                        "attribute_fidelity_gap_spread": paired_gap_spread(personal["hits"], text_only["hits"]),
                        "composition_2": composed["2 references"], "composition_3": composed["3 references"],
                        "composition_2_all": composed["2 references, all asked"],
                        "composition_2_all_gap_spread": paired_gap_spread(all_hits[2], text_only["composition_2_all_hits"]),
                        "composition_2_spread": spread(composed["2 references"])}}


def render_batch(assignments: list[Assignment]) -> torch.Tensor:
    """World images of these assignments: [B,3,32,32] in [0,1]."""
    return torch.stack([pil_to_tensor(render(a)) for a in assignments])


def render_table(report: dict) -> str:
    lines = [f"Tiny attribute world — size {report['size']}, seed {report['seed']}, {report['seconds']} s", "",
             "| encoder | retrieval P@10 (chance) | leakage (chance) | selectivity | attribute fidelity | text fidelity | copy-paste | composition 2 / 3 refs (2 refs, both) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in report["rows"].items():
        s = row["summary"]
        lines.append(f"| {name} | {s['retrieval_precision']:.3f} ({s['retrieval_chance']:.3f}) | {s['leakage']:.3f} "
                     f"({s['leakage_chance']:.3f}) | {selectivity(row['retrieval']):+.3f} ± {s.get('selectivity_spread', 0.0):.3f} | {s['attribute_fidelity']:.3f} ± {s.get('attribute_fidelity_spread', 0.0):.3f} | "
                     f"{s['text_fidelity']:.3f} | {s['copy_paste']:.3f} | {s['composition_2']:.3f} / "
                     f"{s['composition_3']:.3f} ({s.get('composition_2_all', float('nan')):.3f}) |")
    base = next(iter(report["rows"].values()))["text_only_baseline"]
    lines += ["", f"Text only (no attribute tokens, same prompts): attribute fidelity {base['attribute_fidelity']:.3f}, "
              f"text fidelity {base['text_fidelity']:.3f}, copy-paste {base['copy_paste']:.3f}; prompts naming the "
              f"reference's value (the text ceiling): attribute fidelity {base.get('text_ceiling', float('nan')):.3f}; "
              f"composition with 2 references {base.get('composition_2', float('nan')):.3f} "
              f"(both {base.get('composition_2_all', float('nan')):.3f}).", "",
              "Over text only on the same cases (± paired standard error), and attribute fidelity per asked factor:", "",
              "| encoder | attribute fidelity gap | composition 2 refs, both: gap | " + " | ".join(FACTORS) + " |",
              "| --- | --- | --- |" + " --- |" * len(FACTORS)]
    by_factor = base.get("attribute_fidelity_by_factor", {})
    lines.append("| text only | — | — | " + " | ".join(f"{by_factor.get(f, float('nan')):.2f}" for f in FACTORS) + " |")
    for name, row in report["rows"].items():
        s = row["summary"]
        factors = " | ".join(f"{s.get('attribute_fidelity_by_factor', {}).get(f, float('nan')):.2f}" for f in FACTORS)
        lines.append(f"| {name} | {s['attribute_fidelity'] - base['attribute_fidelity']:+.3f} ± "
                     f"{s.get('attribute_fidelity_gap_spread', float('nan')):.3f} | "
                     f"{s['composition_2_all'] - base.get('composition_2_all', float('nan')):+.3f} ± "
                     f"{s.get('composition_2_all_gap_spread', float('nan')):.3f} | {factors} |")
    lines += ["", "Retrieval per factor, precision@10 / leakage:", "",
              "| encoder | " + " | ".join(FACTORS) + " |", "| --- |" + " --- |" * len(FACTORS)]
    for name, row in report["rows"].items():
        cells = [f"{row['retrieval'][f]['precision']:.2f} / {row['retrieval'][f]['leakage']:.2f}" for f in FACTORS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    first = next(iter(report["rows"].values()))["retrieval"]
    lines.append("| chance | " + " | ".join(f"{first[f]['chance']:.2f} / {first[f]['leakage_chance']:.2f}"
                                            for f in FACTORS) + " |")
    stages = report["stages"]
    lines += ["", f"Judge held-out accuracy: {_rounded(stages['judge']['held_out_accuracy'])}",
              f"Generator (captions only) read back by the judge: "
              f"{_rounded(stages['generator']['text_fidelity_of_captions'])}"]
    if "text_fidelity_of_partial_prompts" in stages["generator"]:
        lines.append("Generator on prompts naming half the factors, named factors read back: "
                     f"{_rounded(stages['generator']['text_fidelity_of_partial_prompts'])}")
    return "\n".join(lines) + "\n"


def _rounded(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in scores.items())

"""Committed weights of the world's slow stages — the generator, the backbone and the four encoders (both stages
of each): the main job and CI load them (after a hash check) instead of training them again, which takes longer
than CI can afford.

    python -m lab.world.weights [--size ci] [--stage generator|backbone|encoders|ip-stages] [--check]

trains the stage of that size from its seed exactly as the pipeline would (the same data stage, settings and
code; the other stages come from the committed weights or the benchmark's cache) and writes it to
``lab/weights/<stage>-<size>/`` with ``settings.json`` (what it was trained with; the pipeline uses the folder only
when its own settings are the same) and ``SHA256SUMS``. ``--check`` trains again and compares the hashes with
the committed ones (training is deterministic on one machine; another CPU or library version may differ in the
last bits, which the evaluation's margins cover). Tokenizers are not committed: both models use the Qwen2.5
tokenizer that ComfyUI ships.

The encoders were trained on the committed backbone and generator, bit for bit: their settings name the
SHA-256 of those two models' weights, and the pipeline uses them only on the same files (a backbone trained
elsewhere, even from the same seed, may differ in its last bits and then the encoders are trained again). The
second stages (``ip-<variant>``: each encoder frozen, its IP-Adapter trained on, on pairs of its own: the size's
"ip_pairs") name their first stage's file too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
# the files of each kind of stage, relative to its model folder
FILES: dict[str, tuple[str, ...]] = {
    "generator": ("tiny_generator.json", "text_encoder.safetensors", "transformer/config.json",
                  "transformer/diffusion_pytorch_model.safetensors"),
    "backbone": ("config.json", "generation_config.json", "model.safetensors"),
    "encoder": ("adapter.safetensors",),  # an encoder's first stage (LoRA, connector and IP-Adapter jointly)
    "ip": ("adapter.safetensors",),       # its second stage (the IP-Adapter alone, on the frozen encoder)
}
# the file whose hash identifies a model another stage was trained on
WEIGHTS_FILE = {"generator": "transformer/diffusion_pytorch_model.safetensors", "backbone": "model.safetensors",
                "encoder": "adapter.safetensors"}
COMMAND_STAGE = {"generator": "generator", "backbone": "backbone", "encoder": "encoders", "ip": "ip-stages"}  # kind → --stage


class CommittedWeightsError(RuntimeError):
    """A committed weights folder does not match its SHA256SUMS."""


def kind_of(stage: str) -> str:
    """A stage's kind: ``generator``, ``backbone``, ``encoder`` (of ``encoder-<variant>``) or ``ip``."""
    return stage.split("-", 1)[0]


def files_of(stage: str) -> tuple[str, ...]:
    """The files of a stage: ``generator``, ``backbone``, ``encoder-<variant>`` or ``ip-<variant>``."""
    return FILES[kind_of(stage)]


def committed_folder(stage: str, size: str) -> Path:
    return WEIGHTS / f"{stage}-{size}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sums(folder: Path) -> dict[str, str]:
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    return dict(line.split("  ", 1)[::-1] for line in lines if line.strip())


def verify(folder: Path, stage: str) -> None:
    expected = _sums(folder)
    bad = [n for n in files_of(stage) if not (folder / n).is_file() or sha256(folder / n) != expected.get(n)]
    if bad:
        raise CommittedWeightsError(f"the committed {stage} in {folder} does not match its SHA256SUMS ({', '.join(bad)}): "
                                    "restore it from git (git checkout -- lab/weights) or re-create it with "
                                    f"python -m lab.world.weights --stage {COMMAND_STAGE[kind_of(stage)]}")


def matching(stage: str, size: str, settings: dict) -> Path | None:
    """The committed folder of this stage and size if it was trained with exactly ``settings`` (hash-checked),
    else None (the stage is then trained)."""
    folder = committed_folder(stage, size)
    if not (folder / "settings.json").is_file() or json.loads((folder / "settings.json").read_text()) != settings:
        return None
    verify(folder, stage)
    return folder


def model_hash(model: Path, kind: str) -> str:
    """What identifies a trained generator, backbone or first-stage encoder folder to the stages trained on it."""
    return sha256(model / WEIGHTS_FILE[kind])


def install(committed: Path, model: Path, stage: str) -> None:
    """Copy a committed stage's files into its stage folder (the caller adds the tokenizer where one belongs)."""
    for name in files_of(stage):
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(committed / name, model / name)


def export(model: Path, stage: str, size: str, settings: dict) -> Path:
    folder = committed_folder(stage, size)
    folder.mkdir(parents=True, exist_ok=True)
    for name in files_of(stage):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model / name, folder / name)
    (folder / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    (folder / "SHA256SUMS").write_text("".join(f"{sha256(folder / n)}  {n}\n" for n in files_of(stage)))
    return folder


def differing_files(model: Path, stage: str, size: str) -> list[str]:
    """The files of a freshly trained stage folder whose hashes differ from the committed ones."""
    expected = _sums(committed_folder(stage, size))
    return [name for name in files_of(stage) if sha256(model / name) != expected.get(name)]


def main() -> None:
    import argparse
    import time

    from .pipeline import REPO, SIZES, VARIANTS, train_world, variant_slug

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="ci")
    parser.add_argument("--stage", choices=list(COMMAND_STAGE.values()), default="generator")
    parser.add_argument("--work", type=Path, default=None, help="stage cache (default: the benchmark's, runs/tiny-world-<size>)")
    parser.add_argument("--check", action="store_true", help="compare the retrained weights with the committed ones "
                        "instead of replacing them")
    parser.add_argument("--from-cache", action="store_true", help="export the stage as the pipeline already trained "
                        "it in --work (the same settings and code) instead of training it again")
    args = parser.parse_args()
    if args.check and args.from_cache:
        parser.error("--check compares a fresh training with the committed weights: leave out --from-cache")
    started = time.time()
    work = args.work or REPO / "runs" / f"tiny-world-{args.size}"
    kind = {command: kind for kind, command in COMMAND_STAGE.items()}[args.stage]
    per_variant = kind in ("encoder", "ip")
    stages = [f"{kind}-{variant_slug(name)}" for name in VARIANTS] if per_variant else [kind]
    _, info = train_world(args.size, work, variants=VARIANTS if per_variant else {},
                          force=set() if args.from_cache else set(stages), committed=frozenset(COMMAND_STAGE) - {kind},
                          log=lambda m: print(m, flush=True))
    for stage in stages:
        model = info["models"][stage]
        if args.check:
            differ = differing_files(model, stage, args.size)
            print(f"{stage}: differs from the committed weights: {differ}" if differ
                  else f"{stage}: identical to the committed weights")
        else:
            trained_on = info["settings"][stage].get("trained_on", {})
            stale = [other for other, digest in trained_on.items()
                     if digest != model_hash(committed_folder(other, args.size), kind_of(other))]
            if stale:
                raise SystemExit(f"{stage} was trained on a {' and a '.join(stale)} other than the committed one "
                                 f"({work}): commit that first (--stage {COMMAND_STAGE[kind_of(stale[0])]}) "
                                 "or train in a fresh --work")
            print(f"wrote {export(model, stage, args.size, info['settings'][stage])}")
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()

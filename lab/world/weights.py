"""Committed weights of the world's slowest stage, the generator: the main job and CI load them (after a hash
check) instead of training the generator again, which takes longer than CI can afford.

    python -m lab.world.weights [--size ci] [--check]

trains the generator of that size from its seed exactly as the pipeline would (the same data stage, settings
and code; the stages before it are reused from the benchmark's cache) and writes it to ``lab/weights/generator-<size>/`` with ``settings.json`` (what it was trained
with; the pipeline uses the folder only when its own settings are the same) and ``SHA256SUMS``. ``--check``
trains again and compares the hashes with the committed ones (training is
deterministic on one machine; another CPU or library version may differ in the last bits, which the
evaluation's margins cover). The tokenizer is not committed: it is the backbone's Qwen2.5 tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
FILES = ("tiny_generator.json", "text_encoder.safetensors", "transformer/config.json",
         "transformer/diffusion_pytorch_model.safetensors")


class CommittedWeightsError(RuntimeError):
    """A committed weights folder does not match its SHA256SUMS."""


def committed_folder(size: str) -> Path:
    return WEIGHTS / f"generator-{size}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(folder: Path) -> None:
    sums = folder / "SHA256SUMS"
    expected = dict(line.split("  ", 1)[::-1] for line in sums.read_text().splitlines() if line.strip())
    bad = [name for name in FILES if not (folder / name).is_file() or _sha256(folder / name) != expected.get(name)]
    if bad:
        raise CommittedWeightsError(f"the committed generator in {folder} does not match its SHA256SUMS ({', '.join(bad)}): "
                                    "restore it from git (git checkout -- lab/weights) or re-create it with "
                                    "python -m lab.world.weights")


def matching_generator(size: str, settings: dict) -> Path | None:
    """The committed generator of this size if it was trained with exactly ``settings`` (checked), else None."""
    folder = committed_folder(size)
    if not (folder / "settings.json").is_file() or json.loads((folder / "settings.json").read_text()) != settings:
        return None
    verify(folder)
    return folder


def install(committed: Path, model: Path, tokenizer) -> None:
    """Copy a committed generator into a stage folder as a complete tiny generator folder."""
    for name in FILES:
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(committed / name, model / name)
    tokenizer.save_pretrained(str(model / "tokenizer"))


def export(model: Path, folder: Path, settings: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model / name, folder / name)
    (folder / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    (folder / "SHA256SUMS").write_text("".join(f"{_sha256(folder / n)}  {n}\n" for n in FILES))


def same_as_committed(model: Path, size: str) -> list[str]:
    """The files of a freshly trained generator folder whose hashes differ from the committed ones."""
    sums = (committed_folder(size) / "SHA256SUMS").read_text().splitlines()
    expected = dict(line.split("  ", 1)[::-1] for line in sums if line.strip())
    return [name for name in FILES if _sha256(model / name) != expected.get(name)]


def main() -> None:
    import argparse
    import time

    from .pipeline import REPO, SIZES, generator_settings, train_world

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="ci")
    parser.add_argument("--work", type=Path, default=None, help="stage cache (default: the benchmark's, runs/tiny-world-<size>)")
    parser.add_argument("--check", action="store_true", help="compare the retrained weights with the committed ones "
                        "instead of replacing them")
    args = parser.parse_args()
    started = time.time()
    work = args.work or REPO / "runs" / f"tiny-world-{args.size}"
    models, _ = train_world(args.size, work, variants={}, force={"generator"}, use_committed=False,
                            log=lambda m: print(m, flush=True))
    if args.check:
        differ = same_as_committed(models.generator, args.size)
        print(f"differs from the committed weights: {differ}" if differ else "identical to the committed weights")
    else:
        export(models.generator, committed_folder(args.size), generator_settings(args.size))
        print(f"wrote {committed_folder(args.size)}")
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()

"""The committed world (generator, backbone, four encoders in two stages each): each matches its hashes and the
pipeline's settings, the encoders name the very files they were trained on (backbone and generator; a second
stage also its first), and a damaged copy is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab.world.pipeline import (
    VARIANTS,
    backbone_settings,
    encoder_settings,
    generator_settings,
    ip_stage_settings,
    variant_slug,
)
from lab.world.weights import (
    CommittedWeightsError,
    committed_folder,
    files_of,
    matching,
    model_hash,
    verify,
)


def test_the_committed_generator_and_backbone_match_the_pipelines_settings_and_hashes():
    for stage, settings in (("generator", generator_settings), ("backbone", backbone_settings)):
        assert matching(stage, "ci", settings("ci")) == committed_folder(stage, "ci")
        assert matching(stage, "ci", settings("ci", seed=1)) is None  # other settings: trained instead
    assert matching("generator", "ci", {**generator_settings("ci"), "steps": 1}) is None
    assert matching("backbone", "ci", backbone_settings("ci", caption_steps=1000)) is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_committed_encoder_was_trained_on_the_committed_backbone_and_generator(variant):
    stage = f"encoder-{variant_slug(variant)}"
    trained_on = {kind: model_hash(committed_folder(kind, "ci"), kind) for kind in ("backbone", "generator")}
    settings = {**encoder_settings("ci", VARIANTS[variant]), "trained_on": trained_on}
    assert matching(stage, "ci", settings) == committed_folder(stage, "ci")
    # on a backbone that differs in any bit (one trained on another machine) the encoders are trained again
    assert matching(stage, "ci", {**settings, "trained_on": {**trained_on, "backbone": "0" * 64}}) is None
    assert matching(stage, "ci", {**settings, "steps": 200}) is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_committed_second_stage_was_trained_on_the_committed_first_stage(variant):
    slug = variant_slug(variant)
    trained_on = {kind: model_hash(committed_folder(kind, "ci"), kind) for kind in ("backbone", "generator")}
    trained_on[f"encoder-{slug}"] = model_hash(committed_folder(f"encoder-{slug}", "ci"), "encoder")
    settings = {**ip_stage_settings("ci", variant, VARIANTS[variant]), "trained_on": trained_on}
    assert matching(f"ip-{slug}", "ci", settings) == committed_folder(f"ip-{slug}", "ci")
    # a first stage trained again elsewhere (another file) makes the second stage train again too
    assert matching(f"ip-{slug}", "ci", {**settings, "trained_on": {**trained_on, f"encoder-{slug}": "0" * 64}}) is None


def test_a_damaged_committed_folder_is_refused(tmp_path):
    copy = tmp_path / "generator-ci"
    shutil.copytree(committed_folder("generator", "ci"), copy)
    verify(copy, "generator")
    weights = copy / files_of("generator")[-1]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CommittedWeightsError, match="does not match its SHA256SUMS .*diffusion_pytorch_model.*git checkout"):
        verify(copy, "generator")
    (copy / files_of("generator")[1]).unlink()
    with pytest.raises(CommittedWeightsError, match="text_encoder.safetensors"):
        verify(copy, "generator")
    encoder = tmp_path / "encoder-omni-attribute-ci"
    shutil.copytree(committed_folder("encoder-omni-attribute", "ci"), encoder)
    (encoder / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(CommittedWeightsError, match="adapter.safetensors.*--stage encoders"):
        verify(encoder, "encoder-omni-attribute")


def test_the_sums_cover_every_committed_file():
    for folder in sorted(committed_folder("generator", "ci").parent.iterdir()):
        stage = folder.name.rsplit("-", 1)[0]
        listed = {line.split("  ", 1)[1] for line in (folder / "SHA256SUMS").read_text().splitlines()}
        assert listed == set(files_of(stage)), folder
        on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        assert on_disk == listed | {"SHA256SUMS", "settings.json"}, folder
        assert json.loads((folder / "settings.json").read_text())["steps"] > 0, folder


def test_the_reproducing_command_refuses_to_check_a_cached_stage():
    result = subprocess.run([sys.executable, "-m", "lab.world.weights", "--stage", "encoders", "--check", "--from-cache"],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert result.returncode == 2 and "leave out --from-cache" in result.stderr, result.stderr

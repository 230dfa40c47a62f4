"""The committed world generator: it matches its hashes and its settings, and a damaged copy is refused."""

from __future__ import annotations

import shutil

import pytest

from lab.world.pipeline import generator_settings
from lab.world.weights import FILES, CommittedWeightsError, committed_folder, matching_generator, verify


def test_the_committed_ci_generator_matches_the_pipelines_settings_and_hashes():
    assert matching_generator("ci", generator_settings("ci")) == committed_folder("ci")
    assert matching_generator("ci", {**generator_settings("ci"), "steps": 1}) is None  # other settings: trained instead
    assert matching_generator("ci", generator_settings("ci", seed=1)) is None


def test_a_damaged_committed_generator_is_refused(tmp_path):
    copy = tmp_path / "generator-ci"
    shutil.copytree(committed_folder("ci"), copy)
    verify(copy)
    weights = copy / FILES[-1]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CommittedWeightsError, match="does not match its SHA256SUMS .*diffusion_pytorch_model.*git checkout"):
        verify(copy)
    (copy / FILES[1]).unlink()
    with pytest.raises(CommittedWeightsError, match="text_encoder.safetensors"):
        verify(copy)

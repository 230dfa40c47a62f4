"""Faults in the trainer's data (data side only): a pair file whose last line was cut short, an image deleted
while the run goes on. An in-memory run stops before training with a message naming the file and line; a
streaming run goes on, skipping and counting each fault in ``skipped_samples``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omni_attribute.train import data as data_module
from omni_attribute.train.config import load_config
from omni_attribute.train.data import (DatasetError, MalformedRecord, PairDataset, StreamingPairs, iter_records,
                                       shard_files)
from omni_attribute.train.trainer import preflight, train

REPO = Path(__file__).resolve().parents[2]


def with_truncated_last_line(pairs: Path, folder: Path) -> Path:
    """The tiny pairs with absolute image paths, plus a last line cut off in the middle (no newline)."""
    lines = []
    for line in pairs.read_text().splitlines():
        record = json.loads(line)
        record.update(image_a=str(pairs.parent / record["image_a"]), image_b=str(pairs.parent / record["image_b"]))
        lines.append(json.dumps(record))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n" + lines[0][: len(lines[0]) // 2])
    return path


def config_for(folder: Path, pairs: Path, backbone: Path, *extra: str):
    return load_config(REPO / "configs" / "train_tiny.yaml", [
        f"output_dir={folder / 'run'}", f"data.pairs={pairs}", "data.validation_pairs=null",
        f"backbone.path={backbone}", "runtime.validate_every=0", "runtime.log_every=1", *extra])


def test_a_truncated_last_line_is_named_and_stops_an_in_memory_run_before_training(tmp_path, tiny_pairs,
                                                                                     tiny_backbone):
    pairs = with_truncated_last_line(tiny_pairs, tmp_path)
    last = len(pairs.read_text().splitlines())
    with pytest.raises(DatasetError) as caught:
        preflight(config_for(tmp_path, pairs, tiny_backbone))
    assert f"pairs.jsonl:{last}: not valid JSON" in str(caught.value)
    assert "ends without a newline: was the file cut short?" in str(caught.value)
    with pytest.raises(DatasetError):
        train(config_for(tmp_path, pairs, tiny_backbone, "optim.max_steps=2"), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any step


def test_a_stream_keeps_a_bad_line_in_its_place_and_the_dataset_counts_it(tmp_path, tiny_pairs):
    pairs = with_truncated_last_line(tiny_pairs, tmp_path)
    records = list(iter_records(shard_files(str(pairs)), keep_malformed=True))
    assert isinstance(records[-1], MalformedRecord) and "cut short" in str(records[-1].error)
    assert not any(isinstance(r, MalformedRecord) for r in records[:-1])
    stream = [r for _, r in zip(range(len(records)), StreamingPairs([pairs], seed=1, buffer=4).records())]
    assert sum(isinstance(r, MalformedRecord) for r in stream) == 1  # one pass holds it exactly once
    dataset = PairDataset(stream, image_size=16)
    samples = [dataset[i] for i in range(len(stream))]
    assert sum(s is None for s in samples) == 1 and dataset.skips.skipped == 1
    assert dataset.skips.reasons == {"DatasetError": 1}


def test_a_streaming_run_skips_and_counts_a_truncated_line_and_an_image_deleted_mid_run(tmp_path, tiny_pairs,
                                                                                        tiny_backbone, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for image in tiny_pairs.parent.glob("*.png"):
        (images / image.name).write_bytes(image.read_bytes())
    pairs = with_truncated_last_line(tiny_pairs, tmp_path)
    pairs.write_text(pairs.read_text().replace(str(tiny_pairs.parent), str(images)))
    deleted: list[Path] = []
    real_load = data_module.load_rgb

    def load_and_delete_another(path: Path, size: int):
        """On the first image read, another pair's image disappears (the run is already going)."""
        if not deleted:
            victim = next(p for p in sorted(images.glob("*.png")) if p.name[:-5] != path.name[:-5])
            victim.unlink()
            deleted.append(victim)
        return real_load(path, size)

    monkeypatch.setattr(data_module, "load_rgb", load_and_delete_another)
    # preflight looks at the first 4 lines only, so the cut line is met mid-run; 6 steps of 2 pass every line once
    config = config_for(tmp_path, pairs, tiny_backbone, "data.streaming=true", "data.preflight_lines=4",
                        "data.shuffle_buffer=2", "optim.max_steps=6", "runtime.checkpoint_every=100")
    adapter = train(config, progress=False)
    assert adapter.is_file() and deleted
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 6
    assert metrics[-1]["skipped_samples"] >= 2  # the cut line and the pair whose image went away

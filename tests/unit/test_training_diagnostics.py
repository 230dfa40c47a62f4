"""The trainer's diagnostic and recipe options: oracle tokens, reconstruction, IP statistics in the metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from omni_attribute.adapter_file import load_adapter
from omni_attribute.train.config import ConfigError
from omni_attribute.train.data import DatasetError, iter_records, shard_files
from omni_attribute.train.oracle import ORACLE_FILE, load_oracle
from omni_attribute.train.trainer import build_model, preflight, train
from tests.unit.test_training import fixed_loss, tiny_config


def labelled(pairs: Path, folder: Path) -> Path:
    """The tiny pairs with labels: the shared colour (the disc's shape is the same in every image)."""
    lines = []
    for line in pairs.read_text().splitlines():
        record = json.loads(line)
        colour = record["caption_a"].split()[1]
        record.update(labels=[f"color={colour}", "shape=disc"],
                      image_a=str(pairs.parent / record["image_a"]), image_b=str(pairs.parent / record["image_b"]))
        lines.append(json.dumps(record))
    path = folder / "labelled.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_oracle_tokens_train_the_ip_path_alone_and_are_saved(tmp_path, tiny_pairs, tiny_backbone):
    pairs = labelled(tiny_pairs, tmp_path)
    config = tiny_config(tmp_path, pairs, tiny_backbone, "loss.oracle_tokens=true", "loss.lambda_con=0",
                         "runtime.log_ip_stats=true", "optim.max_steps=40", "runtime.validate_every=0",
                         "data.validation_pairs=null", "optim.ip_lr_scale=3")
    records, info = preflight(config)
    model = build_model(config, info, records)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("generator.ip.", "oracle.")) for n in trainable)
    assert model.oracle.vocabulary == ["<none>", "color=blue", "color=green", "color=red", "color=yellow", "shape=disc"]
    before = fixed_loss(model, config, pairs)
    train(config, resume=False, progress=False)
    oracle = load_oracle(tmp_path / "run" / ORACLE_FILE)
    assert oracle.vocabulary == model.oracle.vocabulary
    trained = build_model(config, info, records)
    trained.oracle.load_state_dict(oracle.state_dict())
    trained.generator.ip.load_state_dict(load_adapter(tmp_path / "run" / "adapter.safetensors").section("ip_adapter"))
    after = fixed_loss(trained, config, pairs)
    assert after["lgen"] < before["lgen"] and after["lcon"] == 0.0, (before, after)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    ratios = [k for k in last if k.startswith("ip_ratio_")]
    assert len(ratios) == len(trained.generator.ip.named_blocks()) and all(math.isfinite(last[k]) for k in ratios)
    assert metrics[0]["ip_value_norm"] < last["ip_value_norm"] and last["ip_grad_norm"] > 0
    assert last[ratios[0]] > 0  # the value projections moved away from zero: the IP term is no longer nothing


def test_reconstruction_makes_the_reference_the_target(tmp_path, tiny_pairs, tiny_backbone):
    config = tiny_config(tmp_path, tiny_pairs, tiny_backbone, "loss.reconstruct=1", "loss.drop_text=0",
                         "loss.lambda_con=0")
    records, info = preflight(config)
    model = build_model(config, info, records)
    seen = {"references": [], "targets": [], "captions": []}
    encode_image, encode, encode_text = model.encoder.encode_image, model.generator.codec.encode, model.generator.encode_text
    model.encoder.encode_image = lambda image, *a, **k: (seen["references"].append(image[0]), encode_image(image, *a, **k))[1]
    model.generator.codec.encode = lambda images: (seen["targets"].append(images), encode(images))[1]
    model.generator.encode_text = lambda captions: (seen["captions"].extend(captions), encode_text(captions))[1]
    from omni_attribute.train.data import PairDataset

    dataset = PairDataset(records, config.data.image_size)
    batch = [dataset[i] for i in range(4)]
    with torch.no_grad():
        model(batch, step_seed=7)
    assert torch.equal(torch.stack(seen["references"]), seen["targets"][0])
    captions = {r.caption_a for r in records} | {r.caption_b for r in records}
    for sample, reference, caption in zip(batch, seen["references"], seen["captions"]):  # the reference's own caption
        own = sample.record.caption_a if torch.equal(reference, sample.image_a) else sample.record.caption_b
        assert caption == own and caption in captions


def test_a_frozen_encoder_stage_trains_only_the_ip_adapter_on_the_first_stage_tokens(tmp_path, tiny_pairs, tiny_backbone):
    first = tiny_config(tmp_path / "a", tiny_pairs, tiny_backbone, "optim.max_steps=4", "runtime.validate_every=0")
    train(first, resume=False, progress=False)
    start = tmp_path / "a" / "run" / "adapter.safetensors"
    config = tiny_config(tmp_path / "b", tiny_pairs, tiny_backbone, f"adapter.init_from={start}",
                         "adapter.freeze_encoder=true", "loss.lambda_con=0", "optim.max_steps=6",
                         "runtime.validate_every=0", "optim.ip_lr_scale=3")
    records, info = preflight(config)
    model = build_model(config, info, records)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("generator.ip.") for n in trainable), sorted(trainable)[:5]
    train(config, resume=False, progress=False)
    before, after = load_adapter(start), load_adapter(tmp_path / "b" / "run" / "adapter.safetensors")
    for section in ("lora", "connector"):
        assert before.section(section).keys() == after.section(section).keys()
        assert all(torch.equal(before.section(section)[k], after.section(section)[k]) for k in before.section(section))
    assert any(not torch.equal(before.section("ip_adapter")[k], v) for k, v in after.section("ip_adapter").items())


def test_bad_diagnostic_settings_and_unlabelled_pairs_are_refused(tmp_path, tiny_pairs, tiny_backbone):
    with pytest.raises(ConfigError, match="loss.oracle_tokens .*set loss.lambda_con=0"):
        tiny_config(tmp_path, tiny_pairs, tiny_backbone, "loss.oracle_tokens=true")
    with pytest.raises(ConfigError, match="adapter.freeze_encoder trains the IP-Adapter on a fixed encoder: set "
                                          "adapter.init_from"):
        tiny_config(tmp_path, tiny_pairs, tiny_backbone, "adapter.freeze_encoder=true", "loss.lambda_con=0")
    with pytest.raises(ConfigError, match="adapter.freeze_encoder leaves only the IP-Adapter .* set loss.lambda_con=0"):
        tiny_config(tmp_path, tiny_pairs, tiny_backbone, "adapter.freeze_encoder=true",
                    f"adapter.init_from={tiny_backbone}")
    with pytest.raises(ConfigError, match=r"loss.reconstruct must be in \[0, 1\], got nan"):
        tiny_config(tmp_path, tiny_pairs, tiny_backbone, "loss.reconstruct=.nan")
    config = tiny_config(tmp_path, tiny_pairs, tiny_backbone, "loss.oracle_tokens=true", "loss.lambda_con=0")
    with pytest.raises(ValueError, match=r"needs a 'labels' list in every pair record; 8 have none \(first: pairs.jsonl:1\)"):
        preflight(config)
    bad = tmp_path / "bad.jsonl"
    record = json.loads(tiny_pairs.read_text().splitlines()[0])
    bad.write_text(json.dumps({**record, "labels": ["color=red"]}) + "\n")
    with pytest.raises(DatasetError, match="'labels' has 1 entries for 2 positive attributes"):
        list(iter_records(shard_files(str(bad))))

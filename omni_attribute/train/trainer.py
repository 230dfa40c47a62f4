"""The trainer: LoRA (MLLM) + connector + IP-Adapter, with the MLLM and the generator frozen.

Everything random in a step (reference/target choice, a+/a−, caption and token dropout, timesteps,
noise) is drawn from generators seeded by (seed, micro-step, rank), and the data order is a
permutation seeded by (seed, epoch): a run restored from a checkpoint (weights, optimizer,
scheduler, micro-step) continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapter_file import check_backbone, config_hash, load_adapter, read_adapter_metadata, save_adapter
from ..backbone import load_backbone, read_folder_config
from ..encoder import AttributeEncoder, backbone_info_from_config, build_encoder
from ..lora import load_lora_state_dict
from ..prompt import format_instruction
from .config import TrainConfig
from .data import (PairDataset, PairSample, StreamingPairs, check_images_exist, choose_attribute_sets,
                   choose_attributes, collate, iter_records, shard_files)
from .generator import Generator, build_generator
from .losses import (contrastive_loss, delta_pos_neg, flow_matching_loss, in_batch_contrastive_loss, noisy_latents,
                     sample_timesteps)

log = logging.getLogger("omni_attribute.train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class OmniAttributeModel(nn.Module):
    """E (frozen MLLM + LoRA + connector) and D (frozen DiT + IP-Adapter); forward returns the losses."""

    def __init__(self, encoder: AttributeEncoder, generator: Generator, config: TrainConfig):
        super().__init__()
        self.encoder, self.generator, self.config = encoder, generator, config
        self.shared_prefix = not config.runtime.gradient_checkpointing  # HF turns the KV cache off under checkpointing

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: param for name, param in self.named_parameters() if param.requires_grad}

    def forward(self, batch: list[PairSample], step_seed: int) -> dict[str, torch.Tensor]:
        cfg = self.config.loss
        rng = random.Random(step_seed)
        gen = torch.Generator().manual_seed(step_seed)
        device = self.encoder.compute_device
        template = self.encoder.metadata.prompt_template
        need_gen, need_con = cfg.lambda_gen > 0, cfg.lambda_con > 0
        ref_tokens, targets, captions, pooled = [], [], [], {"xp": [], "yp": [], "xn": [], "yn": []}
        for sample in batch:
            record = sample.record
            positives, negatives = choose_attribute_sets(record, rng, cfg.attributes_per_pair)
            ref_is_a = rng.random() < 0.5
            joint = format_instruction(record.positive_attributes, template)
            contrast = [format_instruction([a], template) for a in positives + negatives] if need_con and negatives else []
            rows = {}
            for name, image, is_ref in (("x", sample.image_a, ref_is_a), ("y", sample.image_b, not ref_is_a)):
                instructions = ([joint] if need_gen and is_ref else []) + contrast
                if not instructions:
                    continue
                tokens, pool = self.encoder.encode_image(image[None].to(device), instructions, self.shared_prefix)
                if need_gen and is_ref:
                    ref_tokens.append(tokens[0])
                    pool = pool[1:]
                rows[name] = pool
            if contrast:  # every (a+, a−) tuple: rows [0, P) are the a+ embeddings, [P, P+N) the a− ones
                p = len(positives)
                for i in range(p):
                    for j in range(p, len(contrast)):
                        for key, row in (("xp", rows["x"][i]), ("yp", rows["y"][i]), ("xn", rows["x"][j]),
                                         ("yn", rows["y"][j])):
                            pooled[key].append(row)
            if need_gen:
                targets.append(sample.image_b if ref_is_a else sample.image_a)
                caption = record.caption_b if ref_is_a else record.caption_a
                captions.append("" if rng.random() < cfg.drop_text else caption)
        zero = torch.zeros((), device=device)
        lgen, lcon = zero, zero
        if need_gen:
            token_weight = torch.tensor([0.0 if rng.random() < cfg.drop_tokens else 1.0 for _ in targets])
            x0 = self.generator.codec.encode(torch.stack(targets).to(device)).float()
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = sample_timesteps(x0.shape[0], cfg.timestep_sampling, gen, cfg.timestep_mean, cfg.timestep_std,
                                 cfg.timestep_shift).to(device)
            context, pooled_text = self.generator.encode_text(captions)
            velocity = self.generator.velocity(noisy_latents(x0, noise, t), t, context.to(device), pooled_text.to(device),
                                               torch.stack(ref_tokens), token_weight.to(device))
            lgen = flow_matching_loss(velocity, x0, noise)
        if need_con and pooled["xp"]:
            stacked = {k: torch.stack(v) for k, v in pooled.items()}
            lcon = contrastive_loss(stacked["xp"], stacked["yp"], stacked["xn"], stacked["yn"], cfg.tau)
            if cfg.in_batch_negatives and len(pooled["xp"]) > 1:
                lcon = lcon + in_batch_contrastive_loss(stacked["xp"], stacked["yp"], cfg.tau)
        loss = cfg.lambda_gen * lgen + cfg.lambda_con * lcon
        return {"loss": loss, "lgen": lgen.detach(), "lcon": lcon.detach()}


# ---- building ------------------------------------------------------------------------------------------

def preflight(config: TrainConfig) -> tuple[list, dict]:
    """Everything that can be checked without loading a model: data, images, backbone vs adapter sizes.
    Streaming runs check the first ``data.preflight_lines`` records only."""
    stream = iter_records(shard_files(config.data.pairs))
    if config.data.streaming:
        records = [record for _, record in zip(range(config.data.preflight_lines), stream)]
    else:
        records = list(stream)
    if not records:
        raise ValueError(f"no pairs in {config.data.pairs}")
    check_images_exist(records)
    backbone_info = backbone_info_from_config(read_folder_config(config.backbone.path), config.backbone.path)
    if config.adapter.init_from:
        check_backbone(read_adapter_metadata(config.adapter.init_from), backbone_info,
                       Path(config.adapter.init_from).name)
    if config.generator.kind == "flux" and not (config.generator.path and Path(config.generator.path, "transformer").is_dir()):
        raise ValueError(f"generator.path {config.generator.path!r} is not a diffusers FLUX.1 folder (no transformer/)")
    return records, backbone_info


def build_model(config: TrainConfig, backbone_info: dict) -> OmniAttributeModel:
    dtype = DTYPES[config.backbone.dtype]
    backbone = load_backbone(config.backbone.path, dtype=dtype)
    torch.manual_seed(config.seed)
    generator = build_generator(config.generator, backbone.tokenizer, dtype=dtype)
    metadata = config.adapter.metadata(backbone.info(), generator.layout.context_dim,
                                       {"config_hash": config_hash(config.to_dict())})
    encoder = build_encoder(backbone, metadata, "training")
    if config.adapter.init_from:
        initial = load_adapter(config.adapter.init_from)
        load_lora_state_dict(encoder.mllm, initial.section("lora"), Path(config.adapter.init_from).name)
        encoder.connector.load_state_dict(initial.section("connector"))
        if initial.section("ip_adapter"):
            generator.ip.load_state_dict(initial.section("ip_adapter"))
    if config.runtime.gradient_checkpointing:
        encoder.mllm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        encoder.mllm.train()  # HF only checkpoints in training mode; LoRA dropout is 0 by default
        generator.transformer.enable_gradient_checkpointing()
    for param in generator.ip.parameters():
        param.requires_grad_(True)
    model = OmniAttributeModel(encoder, generator, config)
    for param in model.parameters():
        if param.requires_grad:  # trainable parts stay fp32 (AdamW on bf16 weights loses small updates)
            param.data = param.data.float()
    return model


def export_adapter(model: OmniAttributeModel, path: Path, extra: dict) -> None:
    encoder, generator = model.encoder, model.generator
    metadata = encoder.metadata
    metadata.generator = generator.metadata()
    metadata.training = {**metadata.training, **extra}
    save_adapter(path, metadata, {**encoder.adapter_sections(), "ip_adapter": dict(generator.ip.state_dict())})


# ---- checkpoints ------------------------------------------------------------------------------------------

def checkpoint_root(config: TrainConfig) -> Path:
    return Path(config.output_dir) / "checkpoints"


def latest_checkpoint(config: TrainConfig) -> Path | None:
    pointer = checkpoint_root(config) / "latest"
    if not pointer.is_file():
        return None
    folder = checkpoint_root(config) / pointer.read_text().strip()
    return folder if (folder / "state.json").is_file() else None


def save_checkpoint(config: TrainConfig, model: OmniAttributeModel, optimizer, scheduler, state: dict) -> Path:
    """Atomic: written into a temporary folder, renamed, then the 'latest' pointer is replaced."""
    root = checkpoint_root(config)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['global_step']:07d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.trainable_state().items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer_tmp = root / f".latest-{os.getpid()}"
    pointer_tmp.write_text(name)
    os.replace(pointer_tmp, root / "latest")
    kept = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in kept[:-max(1, config.runtime.keep_checkpoints)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore_checkpoint(folder: Path, model: OmniAttributeModel, optimizer, scheduler) -> dict:
    tensors = load_file(str(folder / "trainable.safetensors"))
    params = model.trainable_state()
    if set(tensors) != set(params):
        raise ValueError(f"checkpoint {folder} does not match this configuration's trainable parameters; "
                         "use another output_dir or the config the run was started with")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    return json.loads((folder / "state.json").read_text())


# ---- the loop ---------------------------------------------------------------------------------------------

def batch_indices(n_records: int, batch_size: int, world: int, rank: int, micro_index: int, seed: int) -> list[int]:
    """Indices of this rank's micro-batch number ``micro_index`` (epochs reshuffled from the seed)."""
    per_step = batch_size * world
    per_epoch = n_records // per_step
    if per_epoch == 0:
        raise ValueError(f"{n_records} pairs are fewer than one global batch ({per_step}): lower optim.batch_size")
    epoch, position = divmod(micro_index, per_epoch)
    order = torch.randperm(n_records, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    start = position * per_step + rank * batch_size
    return order[start:start + batch_size]


@torch.no_grad()
def validate(model: OmniAttributeModel, records: list, config: TrainConfig, limit: int = 64) -> dict:
    """Δ(pos, neg) and Lcon on validation pairs (fixed a+/a− choice from the seed)."""
    rng = random.Random(config.seed)
    dataset = PairDataset(records[:limit], config.data.image_size)
    encoder = model.encoder
    template = encoder.metadata.prompt_template
    rows = {"xp": [], "yp": [], "xn": [], "yn": []}
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample is None or not sample.record.negative_attributes:
            continue
        positive, negative = choose_attributes(sample.record, rng)
        instructions = [format_instruction([positive], template), format_instruction([negative], template)]
        for name, image in (("x", sample.image_a), ("y", sample.image_b)):
            _, pool = encoder.encode_image(image[None].to(encoder.compute_device), instructions)
            rows[name + "p"].append(pool[0].float().cpu())
            rows[name + "n"].append(pool[1].float().cpu())
    if not rows["xp"]:
        return {}
    stacked = {k: torch.stack(v) for k, v in rows.items()}
    return {"val_delta_pos_neg": delta_pos_neg(stacked["xp"], stacked["yp"], stacked["xn"], stacked["yn"]),
            "val_lcon": float(contrastive_loss(stacked["xp"], stacked["yp"], stacked["xn"], stacked["yn"], config.loss.tau)),
            "val_pairs": len(rows["xp"])}


def train(config: TrainConfig, resume: bool = True, progress: bool = True) -> Path:
    """Run (or continue) training; returns the path of the adapter file written at the end."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    records, backbone_info = preflight(config)
    validation = list(iter_records(shard_files(config.data.validation_pairs))) if config.data.validation_pairs else []
    accelerator = Accelerator(mixed_precision=config.runtime.mixed_precision,
                              gradient_accumulation_steps=config.optim.grad_accum,
                              log_with="tensorboard" if config.runtime.tensorboard else None,
                              project_dir=config.output_dir)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    model = build_model(config, backbone_info).to(accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ip_params = {id(p) for p in model.generator.ip.parameters()}
    groups = [{"params": [p for p in trainable if id(p) not in ip_params]},
              {"params": [p for p in trainable if id(p) in ip_params], "lr": config.optim.lr * config.optim.ip_lr_scale}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.optim.lr,
                                  weight_decay=config.optim.weight_decay)
    warmup = max(1, config.optim.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    state = {"global_step": 0, "micro_index": 0, "consumed": 0, "skipped_samples": 0, "skipped_batches": 0}
    found = latest_checkpoint(config) if resume else None
    if found:
        state = restore_checkpoint(found, model, optimizer, scheduler)
        log.info("resumed from %s at step %d", found, state["global_step"])
    wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if config.runtime.tensorboard:
        accelerator.init_trackers("omni-attribute")
    rank, world = accelerator.process_index, accelerator.num_processes
    if config.data.streaming:  # records come from the stream; the dataset only decodes them
        stream = StreamingPairs(shard_files(config.data.pairs), rank, world, config.seed, config.data.shuffle_buffer)
        pending = stream.records(state.get("consumed", 0))
        dataset = PairDataset([], config.data.image_size)
    else:
        dataset = PairDataset(records, config.data.image_size)
    metrics_path = output / "metrics.jsonl"
    bar = tqdm(total=config.optim.max_steps, initial=state["global_step"], disable=not (progress and accelerator.is_main_process),
               desc="training", unit="step")
    window: list[dict] = []
    started = time.time()
    while state["global_step"] < config.optim.max_steps:
        before = dataset.skips.skipped
        if config.data.streaming:
            dataset.records = [next(pending) for _ in range(config.optim.batch_size)]
            state["consumed"] = state.get("consumed", 0) + config.optim.batch_size
            batch = collate([dataset[i] for i in range(len(dataset.records))])
        else:
            indices = batch_indices(len(records), config.optim.batch_size, world, rank, state["micro_index"], config.seed)
            batch = collate([dataset[i] for i in indices])
        state["skipped_samples"] += dataset.skips.skipped - before
        step_seed = (config.seed * 1_000_003 + state["micro_index"]) * 97 + rank
        state["micro_index"] += 1
        if not batch:
            state["skipped_batches"] += 1
            continue
        with accelerator.accumulate(wrapped):
            out = wrapped(batch, step_seed)
            accelerator.backward(out["loss"])
            if accelerator.sync_gradients and config.optim.grad_clip > 0:
                accelerator.clip_grad_norm_(trainable, config.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        window.append({k: float(v.detach()) for k, v in out.items()})
        if not accelerator.sync_gradients:
            continue
        state["global_step"] += 1
        step = state["global_step"]
        bar.update(1)
        bar.set_postfix(loss=f"{window[-1]['loss']:.4f}")
        if step % config.runtime.log_every == 0 or step == config.optim.max_steps:
            entry = {"step": step, **{k: sum(w[k] for w in window) / len(window) for k in window[0]},
                     "lr": scheduler.get_last_lr()[0], "skipped_samples": state["skipped_samples"],
                     "seconds": round(time.time() - started, 2)}
            window.clear()
            if config.runtime.validate_every and step % config.runtime.validate_every == 0 and validation:
                entry.update(validate(accelerator.unwrap_model(wrapped), validation, config))
            if accelerator.is_main_process:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(entry) + "\n")
            accelerator.log(entry, step=step)
        if step % config.runtime.checkpoint_every == 0 or step == config.optim.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(config, accelerator.unwrap_model(wrapped), optimizer, scheduler, state)
        if config.runtime.crash_after_step and step == config.runtime.crash_after_step:
            os.kill(os.getpid(), signal.SIGKILL)  # testing: die like a preempted job, without any cleanup
    bar.close()
    final = accelerator.unwrap_model(wrapped)
    summary = {"steps": state["global_step"], "skipped_samples": state["skipped_samples"]}
    if validation:
        summary.update(validate(final, validation, config))
    adapter_path = output / "adapter.safetensors"
    if accelerator.is_main_process:
        export_adapter(final, adapter_path, summary)
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
    if state["skipped_samples"]:
        log.warning("%d samples were skipped (unreadable images): %s", state["skipped_samples"], dataset.skips.reasons)
    accelerator.end_training()
    return adapter_path

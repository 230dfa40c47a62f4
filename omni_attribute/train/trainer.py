"""The trainer: LoRA (MLLM) + connector + IP-Adapter, with the MLLM and the generator frozen.

Everything random in a step (reference/target choice, a+/a−, caption and token dropout, timesteps,
noise) is drawn from generators seeded by (seed, micro-step, rank), and the data order is a
permutation seeded by (seed, epoch): a run restored from a checkpoint (weights, optimizer,
scheduler, micro-step) continues exactly as the uninterrupted run would have.

Under accelerate (DDP, FSDP) a checkpoint holds the FULL training state, gathered from every rank: the
trainable parameters and the optimizer state unsharded and keyed by parameter name (what DDP replicates
and FSDP shards), the scheduler and the step counters, which all ranks keep identical. Only the main
process writes; the others wait at a barrier until the checkpoint folder is complete.
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
from ..errors import CheckpointError
from ..lora import ADAPTER_NAME, load_lora_state_dict
from ..prompt import format_instruction
from .config import TrainConfig
from .data import (PairDataset, PairSample, StreamingPairs, check_images_exist, choose_attribute_sets,
                   choose_attributes, collate, iter_records, shard_files)
from .generator import Generator, build_generator
from .oracle import ORACLE_FILE, OracleTokens
from .losses import (contrastive_loss, delta_pos_neg, flow_matching_loss, in_batch_contrastive_loss, noisy_latents,
                     sample_timesteps)

log = logging.getLogger("omni_attribute.train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class OmniAttributeModel(nn.Module):
    """E (frozen MLLM + LoRA + connector) and D (frozen DiT + IP-Adapter); forward returns the losses."""

    def __init__(self, encoder: AttributeEncoder, generator: Generator, config: TrainConfig,
                 oracle: OracleTokens | None = None):
        super().__init__()
        self.encoder, self.generator, self.config, self.oracle = encoder, generator, config, oracle
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
        positive_rows: dict[str, list[torch.Tensor]] = {"x": [], "y": []}  # each (pair, a+) once, for in-batch negatives
        for sample in batch:
            record = sample.record
            positives, negatives = choose_attribute_sets(record, rng, cfg.attributes_per_pair)
            ref_is_a = rng.random() < 0.5
            reconstruct = need_gen and rng.random() < cfg.reconstruct
            joint = format_instruction(record.positive_attributes, template)
            contrast = [format_instruction([a], template) for a in positives + negatives] if need_con and negatives else []
            rows = {}
            if self.oracle is not None:  # the diagnostic: ground-truth tokens instead of the encoder (no Lcon)
                ref_tokens.append(self.oracle([record.labels])[0])
            for name, image, is_ref in (("x", sample.image_a, ref_is_a), ("y", sample.image_b, not ref_is_a)):
                instructions = ([joint] if need_gen and is_ref and self.oracle is None else []) + contrast
                if not instructions:
                    continue
                tokens, pool = self.encoder.encode_image(image[None].to(device), instructions, self.shared_prefix)
                if need_gen and is_ref:
                    ref_tokens.append(tokens[0])
                    pool = pool[1:]
                rows[name] = pool
            if contrast:  # every (a+, a−) tuple: rows [0, P) are the a+ embeddings, [P, P+N) the a− ones
                p = len(positives)
                for name in ("x", "y"):
                    positive_rows[name].extend(rows[name][:p])
                for i in range(p):
                    for j in range(p, len(contrast)):
                        for key, row in (("xp", rows["x"][i]), ("yp", rows["y"][i]), ("xn", rows["x"][j]),
                                         ("yn", rows["y"][j])):
                            pooled[key].append(row)
            if need_gen:
                target_is_a = ref_is_a == reconstruct  # reconstruction: the target is the reference itself
                targets.append(sample.image_a if target_is_a else sample.image_b)
                caption = record.caption_a if target_is_a else record.caption_b
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
            # in-batch negatives over each (pair, a+) once: the tuples repeat every a+ once per a−, and a copy of the
            # positive among its own negatives would cap the loss instead of pushing the other pairs away
            if cfg.in_batch_negatives and len(positive_rows["x"]) > 1:
                lcon = lcon + in_batch_contrastive_loss(torch.stack(positive_rows["x"]), torch.stack(positive_rows["y"]),
                                                        cfg.tau)
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
    if config.loss.oracle_tokens:
        if config.data.streaming:
            raise ValueError("loss.oracle_tokens reads its vocabulary from every record: set data.streaming=false")
        unlabelled = [r.where for r in records if not r.labels]
        if unlabelled:
            raise ValueError(f"loss.oracle_tokens needs a 'labels' list in every pair record; {len(unlabelled)} have "
                             f"none (first: {unlabelled[0]})")
    backbone_info = backbone_info_from_config(read_folder_config(config.backbone.path), config.backbone.path)
    if config.adapter.init_from:
        check_backbone(read_adapter_metadata(config.adapter.init_from), backbone_info,
                       Path(config.adapter.init_from).name)
    if config.generator.kind == "flux" and not (config.generator.path and Path(config.generator.path, "transformer").is_dir()):
        raise ValueError(f"generator.path {config.generator.path!r} is not a diffusers FLUX.1 folder (no transformer/)")
    return records, backbone_info


def build_model(config: TrainConfig, backbone_info: dict, records: list = ()) -> OmniAttributeModel:
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
    if config.adapter.freeze_encoder or config.loss.oracle_tokens:
        encoder.requires_grad_(False)  # only the IP-Adapter trains (and the oracle table, which replaces the encoder)
    oracle = None
    if config.loss.oracle_tokens:
        oracle = OracleTokens([label for r in records for label in r.labels], config.adapter.num_tokens,
                              generator.layout.context_dim)
    model = OmniAttributeModel(encoder, generator, config, oracle)
    for param in model.parameters():
        if param.requires_grad:  # trainable parts stay fp32 (AdamW on bf16 weights loses small updates)
            param.data = param.data.float()
    return model


def clean_name(name: str) -> str:
    """A parameter's name without the wrapper modules FSDP / activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters of the (unwrapped) model, as they appear in checkpoints."""
    return [clean_name(name) for name, param in model.named_parameters() if param.requires_grad]


def export_adapter(model: OmniAttributeModel, path: Path, extra: dict,
                   tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter file. ``tensors``: the full trainable state by parameter name (see gather_training_state);
    under FSDP the model's own parameters are only this rank's shards, so the values come from there."""
    encoder, generator = model.encoder, model.generator
    metadata = encoder.metadata
    metadata.generator = generator.metadata()
    metadata.training = {**metadata.training, **extra}
    if tensors is None:
        sections = {**encoder.adapter_sections(), "ip_adapter": dict(generator.ip.state_dict())}
    else:
        sections = {"lora": {}, "connector": {}, "ip_adapter": {}}
        used = set()
        for section, prefix, module in (("lora", "encoder.mllm.", encoder.mllm),
                                        ("connector", "encoder.connector.", encoder.connector),
                                        ("ip_adapter", "generator.ip.", generator.ip)):
            # named_parameters, not state_dict: under FSDP a state_dict call is a collective and this runs on one rank
            for name, value in [*module.named_parameters(), *module.named_buffers()]:
                name = clean_name(name)
                if section == "lora" and ".lora_" not in name:
                    continue
                key = name.replace(f".{ADAPTER_NAME}.", ".") if section == "lora" else name
                fqn = prefix + name
                if fqn in tensors:
                    used.add(fqn)
                sections[section][key] = tensors.get(fqn, value.detach())
        if used != {name for name in tensors if not name.startswith("oracle.")}:
            raise ValueError(f"trainable tensors outside the adapter's sections: {sorted(set(tensors) - used)[:5]}")
    save_adapter(path, metadata, sections)


# ---- checkpoints ------------------------------------------------------------------------------------------

def checkpoint_root(config: TrainConfig) -> Path:
    return Path(config.output_dir) / "checkpoints"


def latest_checkpoint(config: TrainConfig) -> Path | None:
    pointer = checkpoint_root(config) / "latest"
    if not pointer.is_file():
        return None
    folder = checkpoint_root(config) / pointer.read_text().strip()
    return folder if (folder / "state.json").is_file() else None


def _inner_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def _uses_fsdp1(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return bool(FullyShardedDataParallel.fsdp_modules(model))


def gather_training_state(model: nn.Module, optimizer=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Collective: every rank must call it. Returns the full (unsharded) fp32 trainable parameters by name and,
    if ``optimizer`` is given, the full optimizer state keyed by parameter name, on the CPU of the main process
    (other ranks get an empty parameter dict under FSDP). Works on a plain module, DDP and FSDP (1 and 2) alike.
    On a CPU-only run the tensors may share memory with the live ones: write them out before the next step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    fsdp1 = _uses_fsdp1(model)
    # ignore_frozen_params keeps DDP from copying the frozen backbone to the CPU; FSDP1 gathers every unit
    # anyway (and that option breaks on its non-zero ranks), so there the frozen tensors are dropped after.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not fsdp1)
    names = set(trainable_names(_unwrap(model)))
    full = get_model_state_dict(model, options=options)
    params = {name: tensor.detach().cpu().contiguous() for name, tensor in full.items() if name in names}
    del full
    if optimizer is None:
        return params, {}
    if fsdp1 and next(model.parameters()).device.type == "cpu":
        # torch's FSDP1 "offload to CPU" of a CPU tensor keeps a view of a buffer it reuses for the next state
        # (exp_avg would come back equal to exp_avg_sq); without offload it clones (on every rank; CPU memory only)
        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    return params, get_optimizer_state_dict(model, _inner_optimizer(optimizer), options=options)


def _unwrap(model: nn.Module) -> nn.Module:
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def write_checkpoint(config: TrainConfig, params: dict, optim_state: dict, scheduler_state: dict, state: dict) -> Path:
    """Main process only. Atomic: written into a temporary folder, renamed, then the 'latest' pointer is replaced."""
    root = checkpoint_root(config)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['global_step']:07d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(params, str(tmp / "trainable.safetensors"))
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state))
    except OSError as exc:  # disk full, quota, permissions: the previous checkpoint is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(config)
        raise CheckpointError(
            f"could not write checkpoint {name} into {root}: {exc.strerror or exc}. The last complete "
            f"checkpoint ({previous.name if previous else 'none yet'}) is intact: free space (or fix the "
            "folder) and run the same command again to resume from it") from exc
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


def save_checkpoint(config: TrainConfig, accelerator, model: nn.Module, optimizer, scheduler, state: dict) -> Path:
    """Collective: gathers the full state from every rank, the main process writes it, and every rank waits
    until the folder is complete (so no rank goes on, or reads, before the checkpoint exists)."""
    params, optim_state = gather_training_state(model, optimizer)
    final = checkpoint_root(config) / f"step-{state['global_step']:07d}"
    if accelerator.is_main_process:
        final = write_checkpoint(config, params, optim_state, scheduler.state_dict(),
                                 {**state, "world_size": accelerator.num_processes})
    accelerator.wait_for_everyone()
    return final


def restore_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler) -> dict:
    """Every rank loads the full state from ``folder`` into its (possibly wrapped and sharded) model and optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    tensors = load_file(str(folder / "trainable.safetensors"))
    if set(tensors) != set(trainable_names(_unwrap(model))):
        raise ValueError(f"checkpoint {folder} does not match this configuration's trainable parameters; "
                         "use another output_dir or the config the run was started with")
    options = StateDictOptions(full_state_dict=True, strict=False)  # strict=False: the frozen weights are not in it
    set_model_state_dict(model, tensors, options=options)
    optim_state = torch.load(folder / "optimizer.pt", weights_only=True)
    if all(isinstance(i, int) for group in optim_state.get("param_groups", []) for i in group["params"]):
        if _uses_fsdp1(model):
            raise ValueError(f"checkpoint {folder} holds an optimizer state by position (older format); "
                             "it can be resumed without FSDP only")
        _inner_optimizer(optimizer).load_state_dict(optim_state)  # older checkpoints: state by parameter position
    else:
        set_optimizer_state_dict(model, _inner_optimizer(optimizer), optim_state, options=options)
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
    from accelerate.utils import DistributedType, broadcast_object_list
    from tqdm.auto import tqdm

    records, backbone_info = preflight(config)
    validation = list(iter_records(shard_files(config.data.validation_pairs))) if config.data.validation_pairs else []
    accelerator = Accelerator(mixed_precision=config.runtime.mixed_precision, cpu=config.runtime.cpu,
                              gradient_accumulation_steps=config.optim.grad_accum,
                              log_with="tensorboard" if config.runtime.tensorboard else None,
                              project_dir=config.output_dir)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (output / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    model = build_model(config, backbone_info, records).to(accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ip_params = {id(p) for p in model.generator.ip.parameters()}
    groups = [{"params": [p for p in trainable if id(p) not in ip_params]},
              {"params": [p for p in trainable if id(p) in ip_params], "lr": config.optim.lr * config.optim.ip_lr_scale}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.optim.lr,
                                  weight_decay=config.optim.weight_decay)
    warmup = max(1, config.optim.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    # Every rank keeps the same state (counters are summed over ranks each micro-step), so one copy is the whole of it.
    state = {"global_step": 0, "micro_index": 0, "consumed": 0, "skipped_samples": 0, "skipped_batches": 0}
    wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    rank, world = accelerator.process_index, accelerator.num_processes
    found = latest_checkpoint(config) if resume else None
    if world > 1:  # the main process decides which checkpoint every rank restores
        found = broadcast_object_list([str(found) if found else None])[0]
        found = Path(found) if found else None
    if found:  # restored after prepare: under FSDP the full state is loaded into each rank's shards
        state = restore_checkpoint(found, wrapped, optimizer, scheduler)
        saved_world = state.pop("world_size", world)
        if saved_world != world:
            log.warning("checkpoint %s was written by %d processes and this run has %d: training goes on, but the "
                        "data order and the schedule differ from an uninterrupted %d-process run", found, saved_world,
                        world, saved_world)
        log.info("resumed from %s at step %d", found, state["global_step"])
    if config.runtime.tensorboard:
        accelerator.init_trackers("omni-attribute")
    clip_params = wrapped.parameters if accelerator.distributed_type == DistributedType.FSDP else lambda: trainable
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
        skipped, empty = dataset.skips.skipped - before, int(not batch)
        if world > 1:  # all ranks take the same branch below (one rank skipping alone would hang DDP/FSDP)
            skipped, empty = accelerator.reduce(torch.tensor([skipped, empty], device=accelerator.device), "sum").tolist()
        state["skipped_samples"] += skipped
        step_seed = (config.seed * 1_000_003 + state["micro_index"]) * 97 + rank
        state["micro_index"] += 1
        if empty:
            state["skipped_batches"] += 1
            continue
        ip = accelerator.unwrap_model(wrapped).generator.ip
        if config.runtime.log_ip_stats:
            ip.record_stats(True)
        with accelerator.accumulate(wrapped):
            out = wrapped(batch, step_seed)
            accelerator.backward(out["loss"])
            if config.runtime.log_ip_stats:  # before clipping: the gradient as the loss gives it
                out.update({k: torch.tensor(v) for k, v in ip.stats().items()})
                ip.record_stats(False)
            if accelerator.sync_gradients and config.optim.grad_clip > 0:
                accelerator.clip_grad_norm_(clip_params(), config.optim.grad_clip)  # FSDP: its own (global) norm
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
            means = {k: sum(values) / len(values) for k in window[0] for values in [[w[k] for w in window if k in w]]}
            if world > 1:  # averaged over the ranks
                values = accelerator.reduce(torch.tensor(list(means.values()), dtype=torch.float64, device=accelerator.device),
                                            "mean")
                means = dict(zip(means, values.tolist()))
            entry = {"step": step, **means, "lr": scheduler.get_last_lr()[0], "skipped_samples": state["skipped_samples"],
                     "seconds": round(time.time() - started, 2)}
            window.clear()
            if config.runtime.validate_every and step % config.runtime.validate_every == 0 and validation:
                entry.update(validate(accelerator.unwrap_model(wrapped), validation, config))
            if accelerator.is_main_process:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(entry) + "\n")
            accelerator.log(entry, step=step)
        if step % config.runtime.checkpoint_every == 0 or step == config.optim.max_steps:
            save_checkpoint(config, accelerator, wrapped, optimizer, scheduler, state)
        if config.runtime.crash_after_step and step == config.runtime.crash_after_step:
            os.kill(os.getpid(), signal.SIGKILL)  # testing: die like a preempted job, without any cleanup
    bar.close()
    final = accelerator.unwrap_model(wrapped)
    summary = {"steps": state["global_step"], "skipped_samples": state["skipped_samples"], "world_size": world}
    if validation:
        summary.update(validate(final, validation, config))
    adapter_path = output / "adapter.safetensors"
    tensors, _ = gather_training_state(wrapped)  # collective; the full tensors land on the main process
    if accelerator.is_main_process:
        export_adapter(final, adapter_path, summary, tensors)
        if final.oracle is not None:
            final.oracle.load_state_dict({k.removeprefix("oracle."): v for k, v in tensors.items()
                                          if k.startswith("oracle.")})
            final.oracle.save(output / ORACLE_FILE)
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    if state["skipped_samples"]:
        log.warning("%d samples were skipped (unreadable images): %s", state["skipped_samples"], dataset.skips.reasons)
    accelerator.end_training()
    return adapter_path

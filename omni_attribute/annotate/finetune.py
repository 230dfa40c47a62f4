"""LoRA fine-tuning of a smaller Qwen2.5-VL into the *expert* annotator, on the teacher's answers.

The conventions are the trainer's: a YAML config with ``--set`` overrides; everything random comes from
the seed and the micro-step, the data order from (seed, epoch), so a run restored from its newest
checkpoint (``checkpoints/step-N``: trainable tensors, optimizer, scheduler, counters; written atomically,
``latest`` pointing at it) continues exactly as the uninterrupted run would have; accelerate for mixed
precision, gradient accumulation and several processes (DDP).

The backbone is loaded by ``omni_attribute.backbone.load_backbone`` and LoRA injected by
``omni_attribute.lora.apply_lora`` (by default on the language model's attention and MLP projections).
Output in ``output_dir``: ``metrics.jsonl`` (loss, learning rate; the validation loss before and after),
``adapter/`` — a PEFT LoRA folder (``adapter_config.json``, ``adapter_model.safetensors``) that
``peft.PeftModel.from_pretrained`` and this package's local backend load — and ``summary.json``.
``merge_adapter`` writes a full model folder with the LoRA merged in, which any server (vLLM) serves.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..backbone import load_backbone, read_folder_config
from ..lora import DEFAULT_TARGETS, apply_lora, load_lora_state_dict, lora_state_dict
from .config import FinetuneConfig
from .errors import AnnotateError
from .sft import IGNORE, Conversation, build_inputs, collate, read_conversations

log = logging.getLogger("omni_attribute.annotate.finetune")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEFT_PREFIX = "base_model.model."


def lora_settings(config: FinetuneConfig) -> dict:
    return {"r": config.lora.r, "alpha": config.lora.alpha, "dropout": config.lora.dropout,
            "target_modules": config.lora.targets or DEFAULT_TARGETS}


def preflight(config: FinetuneConfig) -> list[Conversation]:
    conversations = read_conversations(config.data.conversations)
    missing = [f"{c.where}: {p}" for c in conversations for p in c.image_paths() if not p.is_file()]
    if missing:
        raise AnnotateError("missing image files:\n  " + "\n  ".join(missing[:20]))
    unanswered = [c.where for c in conversations if not c.answer]
    if unanswered:
        raise AnnotateError(f"conversations without an assistant answer (nothing to learn): {', '.join(unanswered[:5])}")
    return conversations


# ---- the PEFT adapter folder -------------------------------------------------------------------------------

def save_peft_adapter(folder: Path, tensors: dict[str, torch.Tensor], lora: dict, base_name: str) -> Path:
    """``tensors``: LoRA weights by module path without the adapter name (``...q_proj.lora_A.weight``)."""
    from peft import LoraConfig

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora.get("dropout", 0.0)),
               target_modules=lora["target_modules"], bias="none", task_type="CAUSAL_LM",
               base_model_name_or_path=base_name).save_pretrained(str(tmp))
    save_file({PEFT_PREFIX + k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
              str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def read_peft_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(LoRA settings, tensors by module path without the adapter name) of a PEFT LoRA folder."""
    folder = Path(folder)
    config_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise AnnotateError(f"{folder} is not a PEFT LoRA folder (adapter_config.json and adapter_model.safetensors): "
                            "give the adapter/ folder the expert fine-tuning wrote")
    settings = json.loads(config_path.read_text())
    if settings.get("peft_type") != "LORA":
        raise AnnotateError(f"{folder}/adapter_config.json is a {settings.get('peft_type')!r} adapter; only LoRA is supported")
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(weights)).items()}
    lora = {"r": settings["r"], "alpha": settings["lora_alpha"], "dropout": settings.get("lora_dropout", 0.0),
            "target_modules": settings["target_modules"]}
    return lora, tensors


def load_expert(backbone_folder: str | Path, adapter: str | Path | None, dtype: torch.dtype = torch.float32,
                device: str = "cpu"):
    """A backbone with the expert's LoRA loaded (or without, for the base model)."""
    backbone = load_backbone(backbone_folder, dtype=dtype, device=device)
    if adapter:
        lora, tensors = read_peft_adapter(adapter)
        apply_lora(backbone.model, lora)
        load_lora_state_dict(backbone.model, tensors, Path(adapter).name)
        backbone.model.to(device)
    backbone.model.eval()
    return backbone


def merge_adapter(backbone_folder: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """A full HF model folder with the LoRA merged into the weights (what vLLM serves as a plain model)."""
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    read_folder_config(backbone_folder)
    read_peft_adapter(adapter)
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(backbone_folder), dtype="auto", local_files_only=True,
                                                              use_safetensors=True)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    for source in sorted(Path(backbone_folder).iterdir()):   # tokenizer, processor and chat-template files
        if source.is_file() and source.suffix in (".json", ".txt", ".jinja") and not (out / source.name).exists() \
                and not source.name.endswith(".index.json"):
            shutil.copy(source, out / source.name)
    return out


# ---- checkpoints --------------------------------------------------------------------------------------

def checkpoint_root(config: FinetuneConfig) -> Path:
    return Path(config.output_dir) / "checkpoints"


def latest_checkpoint(config: FinetuneConfig) -> Path | None:
    pointer = checkpoint_root(config) / "latest"
    if not pointer.is_file():
        return None
    folder = checkpoint_root(config) / pointer.read_text().strip()
    return folder if (folder / "state.json").is_file() else None


def write_checkpoint(config: FinetuneConfig, tensors: dict, optimizer_state: dict, scheduler_state: dict,
                     state: dict) -> Path:
    """Atomic: a temporary folder renamed into place, then the 'latest' pointer replaced."""
    root = checkpoint_root(config)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['global_step']:07d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler_state, tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / f".latest-{os.getpid()}"
    pointer.write_text(name)
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-max(1, config.runtime.keep_checkpoints)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def batch_indices(n: int, batch_size: int, world: int, rank: int, micro_index: int, seed: int) -> list[int]:
    per_step = batch_size * world
    per_epoch = n // per_step
    if per_epoch == 0:
        raise AnnotateError(f"{n} conversations are fewer than one global batch ({per_step}): lower optim.batch_size")
    epoch, position = divmod(micro_index, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    start = position * per_step + rank * batch_size
    return order[start:start + batch_size]


# ---- the loop ------------------------------------------------------------------------------------------

class AnswerLoss(torch.nn.Module):
    """Next-token cross-entropy on the answer's tokens only; the vocabulary projection is applied at those
    positions alone (Qwen2.5-VL's vocabulary has 152k entries: full logits over a long image prompt would
    cost far more than the answer needs). A module, so that DDP's hooks see the forward pass."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None) -> torch.Tensor:
        hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                  image_grid_thw=image_grid_thw, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = self.model.lm_head(hidden[:, :-1][keep])
        return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def sample_inputs(backbone, conversation: Conversation, config: FinetuneConfig) -> dict:
    return build_inputs(backbone, conversation.messages, conversation.answer, config.data.min_pixels,
                        config.data.max_pixels)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, backbone, conversations: list[Conversation], config: FinetuneConfig,
                  limit: int = 64) -> float:
    """Mean answer loss of (up to ``limit``) conversations, one at a time; ``model`` is the Qwen2.5-VL."""
    was_training = model.training
    model.eval()
    scorer = AnswerLoss(model)
    device = next(p for p in model.parameters()).device
    total, count = 0.0, 0
    for conversation in conversations[:limit]:
        batch = collate([sample_inputs(backbone, conversation, config)], backbone.tokenizer.pad_token_id or 0)
        total += float(scorer(**{k: v.to(device) for k, v in batch.items()}))
        count += 1
    model.train(was_training)
    return total / max(1, count)


def finetune(config: FinetuneConfig, resume: bool = True, progress: bool = True) -> Path:
    """Run (or continue) the fine-tuning; returns the adapter folder."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    conversations = preflight(config)
    validation = read_conversations(config.data.validation) if config.data.validation else []
    accelerator = Accelerator(mixed_precision=config.runtime.mixed_precision,
                              gradient_accumulation_steps=config.optim.grad_accum)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (output / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    backbone = load_backbone(config.backbone.path, dtype=DTYPES[config.backbone.dtype])
    torch.manual_seed(config.seed)
    lora = lora_settings(config)
    model = apply_lora(backbone.model, lora)
    for param in model.parameters():
        if param.requires_grad:    # LoRA stays fp32 (AdamW on bf16 weights loses small updates)
            param.data = param.data.float()
    if config.runtime.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.to(accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    warmup = max(1, config.optim.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    state = {"global_step": 0, "micro_index": 0}
    wrapped, optimizer, scheduler = accelerator.prepare(AnswerLoss(model), optimizer, scheduler)
    rank, world = accelerator.process_index, accelerator.num_processes
    found = latest_checkpoint(config) if resume else None
    metrics_path = output / "metrics.jsonl"
    if found:
        tensors = load_file(str(found / "trainable.safetensors"))
        if set(tensors) != set(names):  # names of the Qwen2.5-VL's parameters
            raise AnnotateError(f"checkpoint {found} does not match this configuration's LoRA (other rank or targets): "
                                "use another output_dir or the config the run was started with")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        optimizer.load_state_dict(torch.load(found / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(found / "scheduler.pt", weights_only=True))
        state = json.loads((found / "state.json").read_text())
        log.info("resumed from %s at step %d", found, state["global_step"])
    elif validation and accelerator.is_main_process:
        start_loss = evaluate_loss(model, backbone, validation, config)
        with metrics_path.open("a") as handle:
            handle.write(json.dumps({"step": 0, "val_loss": start_loss}) + "\n")
        state["val_loss_start"] = start_loss
    pad_id = backbone.tokenizer.pad_token_id if backbone.tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=config.optim.max_steps, initial=state["global_step"], unit="step", desc="expert",
               disable=not (progress and accelerator.is_main_process))
    window: list[float] = []
    started = time.time()
    while state["global_step"] < config.optim.max_steps:
        indices = batch_indices(len(conversations), config.optim.batch_size, world, rank, state["micro_index"], config.seed)
        batch = collate([sample_inputs(backbone, conversations[i], config) for i in indices], pad_id)
        torch.manual_seed((config.seed * 1_000_003 + state["micro_index"]) * 97 + rank)   # LoRA dropout
        state["micro_index"] += 1
        with accelerator.accumulate(wrapped):
            loss = wrapped(**{k: v.to(accelerator.device) for k, v in batch.items()})
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.optim.grad_clip > 0:
                accelerator.clip_grad_norm_(trainable, config.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        window.append(float(loss.detach()))
        if not accelerator.sync_gradients:
            continue
        state["global_step"] += 1
        step = state["global_step"]
        bar.update(1)
        bar.set_postfix(loss=f"{window[-1]:.4f}")
        if step % config.runtime.log_every == 0 or step == config.optim.max_steps:
            mean_loss = sum(window) / len(window)
            if world > 1:
                mean_loss = float(accelerator.reduce(torch.tensor(mean_loss, device=accelerator.device), "mean"))
            window.clear()
            if accelerator.is_main_process:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps({"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                                             "seconds": round(time.time() - started, 2)}) + "\n")
        if step % config.runtime.checkpoint_every == 0 or step == config.optim.max_steps:
            if accelerator.is_main_process:
                trainable_now = {n: p for n, p in model.named_parameters() if p.requires_grad}
                write_checkpoint(config, trainable_now, optimizer.state_dict(), scheduler.state_dict(), state)
            accelerator.wait_for_everyone()
        if config.runtime.crash_after_step and step == config.runtime.crash_after_step:
            os.kill(os.getpid(), signal.SIGKILL)   # testing: die like a preempted job
    bar.close()
    final = model
    adapter_dir = output / "adapter"
    if accelerator.is_main_process:
        summary = {"steps": state["global_step"], "conversations": len(conversations), "world_size": world,
                   "lora": lora, "backbone": Path(config.backbone.path).name}
        if validation:
            summary["val_loss_start"] = state.get("val_loss_start")
            summary["val_loss"] = evaluate_loss(final, backbone, validation, config)
            with metrics_path.open("a") as handle:
                handle.write(json.dumps({"step": state["global_step"], "val_loss": summary["val_loss"]}) + "\n")
        save_peft_adapter(adapter_dir, lora_state_dict(final), lora, Path(config.backbone.path).name)
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return adapter_dir


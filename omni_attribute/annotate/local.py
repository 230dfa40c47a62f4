"""Annotation through transformers on this machine, with the same interface as the HTTP client: the
expert (a backbone folder plus the fine-tuning's PEFT adapter) or any Qwen2.5-VL folder. One request at a
time; prompt and answer tokens are counted exactly from the model's own inputs and outputs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import torch

from .client import ClientStats, Completion
from .config import AnnotateConfig
from .errors import AnnotateError
from .sft import build_inputs


class LocalChat:
    def __init__(self, config: AnnotateConfig):
        from .finetune import load_expert

        self.config = config
        local = config.local
        if not Path(local.model_path).is_dir():
            raise AnnotateError(f"local.model_path {local.model_path!r} is not a folder: name an HF-format Qwen2.5-VL folder")
        dtype = torch.bfloat16 if local.dtype == "bf16" else torch.float32
        self.backbone = load_expert(local.model_path, local.adapter or None, dtype=dtype, device=local.device)
        self.name = Path(local.model_path).name + (f"+{Path(local.adapter).name}" if local.adapter else "")
        self.lock = asyncio.Lock()
        self.stats = ClientStats(structured_output=False)

    async def check(self) -> list[str]:
        return [self.name]

    async def aclose(self) -> None:
        pass

    def _generate(self, messages: list[dict]) -> Completion:
        backbone, endpoint, image = self.backbone, self.config.endpoint, self.config.image
        inputs = build_inputs(backbone, messages, None, image.min_pixels, image.max_pixels)
        device = backbone.model.device
        ids = inputs["input_ids"][None].to(device)
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": endpoint.max_tokens,
                  "pad_token_id": backbone.tokenizer.pad_token_id}
        if inputs["pixel_values"] is not None:
            kwargs["pixel_values"] = inputs["pixel_values"].to(device, backbone.model.dtype)
            kwargs["image_grid_thw"] = inputs["image_grid_thw"].to(device)
        if endpoint.temperature > 0:
            kwargs.update(do_sample=True, temperature=endpoint.temperature)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        end = backbone.tokenizer.convert_tokens_to_ids("<|im_end|>")
        start = time.perf_counter()
        with torch.no_grad():
            out = backbone.model.generate(**kwargs, eos_token_id=[end])
        latency = time.perf_counter() - start
        new = out[0, ids.shape[1]:].tolist()
        finished = bool(new) and new[-1] == end
        text = backbone.tokenizer.decode([t for t in new if t != end], skip_special_tokens=True)
        return Completion(text, "stop" if finished else "length", ids.shape[1], len(new), latency, self.name)

    async def complete(self, messages: list[dict], style: str) -> Completion:
        async with self.lock:
            self.stats.requests += 1
            return await asyncio.to_thread(self._generate, messages)

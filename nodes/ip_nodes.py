"""Apply Omni-Attribute: attribute tokens into a FLUX MODEL through the adapter's IP-Adapter."""

from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import io

from ..omni_attribute.adapter_file import load_adapter
from ..omni_attribute.errors import AdapterMismatchError
from ..omni_attribute.injection import Injection
from ..omni_attribute.ip_adapter import load_ip_adapter
from . import folders
from .ip_patch import apply_injection, ensure_tensor, sigma_range
from .sockets import Embeds

APPLY_TO = {"all conditions": None, "positive only": frozenset({0})}
COMBINE = ["all rows together", "one row per batch item"]


def load_ip(adapter: str):
    path = folder_paths.get_full_path_or_raise(folders.ADAPTERS, adapter)
    file = load_adapter(path)
    return load_ip_adapter(file.metadata.generator, file.section("ip_adapter"), adapter)


def check_embeds_width(embeds, ip, adapter: str) -> None:
    """Embeds (or a stack condition) must have the token width the IP-Adapter takes."""
    width = embeds.tokens.shape[-1]
    if width != ip.config.context_dim:
        raise AdapterMismatchError(
            f"the embeds are {width} wide but {adapter}'s IP-Adapter takes {ip.config.context_dim}-wide tokens: "
            "encode with the encoder of the same adapter"
        )
    made_by = getattr(embeds, "info", {}).get("adapter")
    if made_by and made_by != adapter:
        logging.warning("Omni-Attribute: embeds were encoded with %s but are applied with %s", made_by, adapter)


class ApplyOmniAttribute(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniAttributeApply",
            display_name="Apply Omni-Attribute",
            category="Omni-Attribute",
            description=("Injects attribute embeddings into a FLUX.1 model through the adapter's IP-Adapter "
                         "(returns a patched copy; the input MODEL is left unchanged). Chain several to stack."),
            inputs=[
                io.Model.Input("model"),
                Embeds.Input("embeds"),
                io.Combo.Input("adapter", options=folder_paths.get_filename_list(folders.ADAPTERS),
                               tooltip="the adapter the embeds were encoded with (its IP-Adapter weights are used)"),
                io.Float.Input("weight", default=1.0, min=-2.0, max=5.0, step=0.05),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Combo.Input("apply_to", options=list(APPLY_TO), default="all conditions",
                               tooltip="positive only: the negative/unconditional pass gets no attribute tokens"),
                io.Combo.Input("combine", options=COMBINE, default=COMBINE[0],
                               tooltip="several embeds rows: act together (tokens concatenated) or one per batch item"),
                io.Mask.Input("mask", optional=True, tooltip="where the attribute acts (white = full weight)"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, embeds, adapter: str, weight: float, start_percent: float, end_percent: float,
                apply_to: str, combine: str, mask=None) -> io.NodeOutput:
        if start_percent > end_percent:
            raise ValueError(f"start_percent {start_percent} is after end_percent {end_percent}: swap them")
        ip = load_ip(adapter)
        check_embeds_width(embeds, ip, adapter)
        sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
        injection = Injection(ip=ip, tokens=embeds.tokens, weight=weight, per_batch_item=combine == COMBINE[1],
                              sigma_start=sigma_start, sigma_end=sigma_end, apply_to=APPLY_TO[apply_to],
                              mask=ensure_tensor(mask))
        return io.NodeOutput(apply_injection(model, injection))

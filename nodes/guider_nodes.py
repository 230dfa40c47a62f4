"""Omni-Attribute Stack · Omni-Attribute Flow Blend Guider."""

from __future__ import annotations

from comfy_api.latest import io

from ..omni_attribute.composition import AttributeCondition
from .flow_blend import MODES, FlowBlendGuider
from .ip_nodes import check_embeds_width, load_ip
from . import folders
from .sockets import Embeds, Stack

import folder_paths

CATEGORY = "Omni-Attribute"


class OmniAttributeStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniAttributeStack",
            display_name="Omni-Attribute Stack",
            category=CATEGORY,
            description="Adds one (embeds, weight, schedule) condition to a list for the flow-blend guider; chain any number.",
            inputs=[
                Embeds.Input("embeds", tooltip="all rows of these embeds act together as one condition"),
                io.Float.Input("weight", default=1.0, min=-5.0, max=10.0, step=0.05,
                               tooltip="w_i in v* = D(∅,c) + Σ w_i (D(E_i,∅) − D(∅,∅))"),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01),
                Stack.Input("stack", optional=True),
            ],
            outputs=[Stack.Output(display_name="stack")],
        )

    @classmethod
    def execute(cls, embeds, weight: float, start_percent: float, end_percent: float, stack=None) -> io.NodeOutput:
        label = " + ".join(dict.fromkeys(embeds.attributes))
        condition = AttributeCondition(embeds.tokens, weight, start_percent, end_percent, label)
        return io.NodeOutput([*(stack or []), condition])


class OmniAttributeFlowBlendGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniAttributeFlowBlendGuider",
            display_name="Omni-Attribute Flow Blend Guider",
            category=CATEGORY,
            description=("Composes several attributes with the paper's rule v* = D(∅,∅) + s_T·(D(∅,c) − D(∅,∅)) + "
                         "Σ w_i·(D(E_i,∅) − D(∅,∅)): N + 2 evaluations per step, batched. 'joint' is a cheaper "
                         "approximation: one pass with all attribute tokens plus ordinary guidance."),
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("adapter", options=folder_paths.get_filename_list(folders.ADAPTERS),
                               tooltip="the adapter the embeds were encoded with (its IP-Adapter weights are used)"),
                io.Conditioning.Input("positive", tooltip="the prompt c"),
                io.Conditioning.Input("empty", tooltip="the empty prompt ∅ (encode an empty string)"),
                Stack.Input("stack"),
                io.Float.Input("text_scale", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="s_T: guidance on the prompt (1 = the paper's formula, no extra cost)"),
                io.Combo.Input("mode", options=list(MODES), default=MODES[0]),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, adapter: str, positive, empty, stack, text_scale: float, mode: str) -> io.NodeOutput:
        ip = load_ip(adapter)
        for condition in stack:
            check_embeds_width(condition, ip, adapter)
        guider = FlowBlendGuider(model, ip, list(stack), text_scale, mode)
        guider.set_conds(positive, empty)
        return io.NodeOutput(guider)

"""Omni-Attribute Stack · Omni-Attribute Flow Blend Guider: the paper's composition rule as a ComfyUI
GUIDER (for SamplerCustomAdvanced).

All N + 2 conditions go through ``comfy.samplers.calc_cond_batch`` in one call, so ComfyUI batches
them into as few forward passes as free memory allows; each attribute condition is a copy of the
empty-text conditioning with its own uuid, and the IP patch reads that condition's tokens from
``transformer_options[COND_CONDITIONS]`` — so every batch row gets its own tokens or none.
"""

from __future__ import annotations

import math

import comfy.samplers
import folder_paths
from comfy_api.latest import io

from omni_attribute.flow_blend import flow_blend
from omni_attribute.injection import AttributeCondition, Injection

from . import folders
from .apply import (
    COND_CONDITIONS,
    apply_injection,
    check_embeds_width,
    load_ip,
    sigma_window,
)
from .sockets import Embeds, Stack

CATEGORY = "Omni-Attribute"
MODES = ("exact", "joint (approximation)")


class FlowBlendGuider(comfy.samplers.CFGGuider):
    def __init__(self, model_patcher, ip, conditions: list[AttributeCondition], text_scale: float = 1.0,
                 mode: str = MODES[0]):
        super().__init__(apply_injection(model_patcher, Injection(ip=ip)))
        self.conditions = conditions
        self.text_scale = text_scale
        self.mode = mode
        self.cfg = text_scale
        self.windows = [sigma_window(model_patcher, c) for c in conditions]

    def set_conds(self, positive, empty):
        conds = {"positive": positive, "negative": empty}
        for i in range(len(self.conditions)):
            conds[f"omni_attribute_{i}"] = empty  # converted separately: fresh uuids per attribute
        self.inner_set_conds(conds)

    def _with_conditions(self, model_options: dict, mapping: dict) -> dict:
        options = dict(model_options)
        options["transformer_options"] = {**model_options.get("transformer_options", {}), COND_CONDITIONS: mapping}
        return options

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        sigma = float(timestep.max())
        active = [i for i, window in enumerate(self.windows) if window.contains(sigma)]
        positive, empty = self.conds.get("positive"), self.conds.get("negative")
        if self.mode == MODES[0]:
            # each attribute's own pass at full strength: its weight enters the flow-blend sum below
            attribute_conds = [self.conds[f"omni_attribute_{i}"] for i in active]
            mapping = {entry["uuid"]: [self.conditions[i].with_weight(1.0)]
                       for i, cond in zip(active, attribute_conds) for entry in cond}
            need_empty = bool(active) or not math.isclose(self.text_scale, 1.0)
            conds = [positive, empty if need_empty else None, *attribute_conds]
            weights = [self.conditions[i].weight for i in active]
        else:
            # one pass with every active attribute attended together, each one's values scaled by its weight
            together = [self.conditions[i] for i in active]
            mapping = {entry["uuid"]: together for entry in positive} if together else {}
            need_empty = not math.isclose(self.text_scale, 1.0)
            conds = [positive, empty if need_empty else None]
            weights = []
        options = self._with_conditions(model_options, mapping)
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, options)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": conds, "conds_out": out, "cond_scale": self.text_scale, "timestep": timestep,
                      "input": x, "sigma": timestep, "model": self.inner_model, "model_options": options})
        text, empty_pred = out[0], out[1]
        if not need_empty:
            empty_pred = text  # s_T = 1 and nothing to subtract from: the empty prediction cancels out
        result = flow_blend(text, empty_pred, list(out[2:]), weights, self.text_scale)
        for fn in model_options.get("sampler_post_cfg_function", []):
            result = fn({"denoised": result, "cond": positive, "uncond": empty, "cond_scale": self.text_scale,
                         "model": self.inner_model, "uncond_denoised": empty_pred, "cond_denoised": text,
                         "sigma": timestep, "model_options": options, "input": x})
        return result


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
        return io.NodeOutput([*(stack or []), embeds.condition(weight, start_percent, end_percent)])


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
            check_embeds_width(condition.tokens, None, ip, adapter)
        guider = FlowBlendGuider(model, ip, list(stack), text_scale, mode)
        guider.set_conds(positive, empty)
        return io.NodeOutput(guider)

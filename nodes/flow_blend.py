"""The flow-blend guider: the paper's composition rule as a ComfyUI GUIDER (for SamplerCustomAdvanced).

All N + 2 conditions go through ``comfy.samplers.calc_cond_batch`` in one call, so ComfyUI batches
them into as few forward passes as free memory allows; each attribute condition is a copy of the
empty-text conditioning with its own uuid, and the IP patch reads that condition's tokens from
``transformer_options[COND_TOKENS]`` — so every batch row gets its own tokens or none.
"""

from __future__ import annotations

import math

import comfy.samplers

from ..omni_attribute.composition import AttributeCondition, flow_blend, joint_tokens
from ..omni_attribute.injection import COND_TOKENS, CondTokens, Injection
from .ip_patch import apply_injection

MODES = ("exact", "joint (approximation)")


class FlowBlendGuider(comfy.samplers.CFGGuider):
    def __init__(self, model_patcher, ip, conditions: list[AttributeCondition], text_scale: float = 1.0,
                 mode: str = MODES[0]):
        super().__init__(apply_injection(model_patcher, Injection(ip=ip, tokens=None, weight=1.0)))
        self.conditions = conditions
        self.text_scale = text_scale
        self.mode = mode
        self.cfg = text_scale
        sampling = model_patcher.get_model_object("model_sampling")
        self.sigma_ranges = [(float(sampling.percent_to_sigma(c.start_percent)),
                              float(sampling.percent_to_sigma(c.end_percent))) for c in conditions]

    def set_conds(self, positive, empty):
        conds = {"positive": positive, "negative": empty}
        for i in range(len(self.conditions)):
            conds[f"omni_attribute_{i}"] = empty  # converted separately: fresh uuids per attribute
        self.inner_set_conds(conds)

    def _with_tokens(self, model_options: dict, mapping: dict) -> dict:
        options = dict(model_options)
        options["transformer_options"] = {**model_options.get("transformer_options", {}), COND_TOKENS: mapping}
        return options

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        sigma = float(timestep.max())
        active = [i for i, (start, end) in enumerate(self.sigma_ranges) if end - 1e-6 <= sigma <= start + 1e-6]
        positive, empty = self.conds.get("positive"), self.conds.get("negative")
        if self.mode == MODES[0]:
            attribute_conds = [self.conds[f"omni_attribute_{i}"] for i in active]
            mapping = {entry["uuid"]: CondTokens(self.conditions[i].tokens)
                       for i, cond in zip(active, attribute_conds) for entry in cond}
            need_empty = bool(active) or not math.isclose(self.text_scale, 1.0)
            conds = [positive, empty if need_empty else None, *attribute_conds]
        else:
            mapping = {}
            if active:
                tokens, value_scale = joint_tokens([self.conditions[i] for i in active])
                mapping = {entry["uuid"]: CondTokens(tokens, value_scale) for entry in positive}
            need_empty = not math.isclose(self.text_scale, 1.0)
            conds = [positive, empty if need_empty else None]
        options = self._with_tokens(model_options, mapping)
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, options)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": conds, "conds_out": out, "cond_scale": self.text_scale, "timestep": timestep,
                      "input": x, "sigma": timestep, "model": self.inner_model, "model_options": options})
        text, empty_pred = out[0], out[1]
        if not need_empty:
            empty_pred = text  # s_T = 1 and nothing to subtract from: the empty prediction cancels out
        weights = [self.conditions[i].weight for i in active] if self.mode == MODES[0] else []
        result = flow_blend(text, empty_pred, list(out[2:]), weights, self.text_scale)
        for fn in model_options.get("sampler_post_cfg_function", []):
            result = fn({"denoised": result, "cond": positive, "uncond": empty, "cond_scale": self.text_scale,
                         "model": self.inner_model, "uncond_denoised": empty_pred, "cond_denoised": text,
                         "sigma": timestep, "model_options": options, "input": x})
        return result


"""Omni-Attribute Stack · Omni-Attribute Flow Blend Guider: the paper's composition rule as a ComfyUI
GUIDER (for SamplerCustomAdvanced).

All N + 2 conditions go through ``comfy.samplers.calc_cond_batch`` in one call, so ComfyUI batches
them into as few forward passes as free memory allows; each attribute condition is a copy of the
empty-text conditioning with its own uuid, and the IP patch reads that condition's tokens from
``transformer_options[COND_CONDITIONS]`` — so every batch row gets its own tokens or none.

Which attributes act at a step (their start/end percent) and whether a step refreshes the held
differences (the reuse mode) are decided on the host from the run's schedule and the sampler's
per-step callback (:class:`~omni_attribute.flow_blend.StepClock`): no step reads the sigma tensor.
"""

from __future__ import annotations

import math

import comfy.samplers
import folder_paths
from comfy_api.latest import io

from omni_attribute.flow_blend import DeltaReuse, StepClock, blend_with_deltas, flow_blend
from omni_attribute.injection import AttributeCondition, Injection

from . import folders, inputs
from .apply import (
    ADAPTER_WHAT,
    COND_CONDITIONS,
    END,
    START,
    apply_injection,
    check_embeds_width,
    load_ip,
    sigma_window,
)
from .search import schema
from .sockets import Embeds, Stack

CATEGORY = "Omni-Attribute"
MODES = ("exact", "joint (approximation)", "reuse Δ every 2 steps (approximation)",
         "reuse Δ every 3 steps (approximation)")
REUSE_EVERY = {MODES[2]: 2, MODES[3]: 3}  # mode → refresh period of the held attribute differences
STACK_WEIGHT = inputs.Number("weight", 1.0, -5.0, 10.0, 0.05,
                             tooltip="w_i in v* = D(∅,c) + Σ w_i (D(E_i,∅) − D(∅,∅))")
TEXT_SCALE = inputs.Number("text_scale", 1.0, 0.0, 30.0, 0.1,
                           tooltip="s_T: guidance on the prompt (1 = the paper's formula, no extra cost)")
ROWS = ("together (one condition)", "each row its own condition")


class FlowBlendGuider(comfy.samplers.CFGGuider):
    def __init__(self, model_patcher, ip, conditions: list[AttributeCondition], text_scale: float = 1.0,
                 mode: str = MODES[0]):
        self.injection = Injection(ip=ip)  # per-condition tokens only: each attribute row gets its own
        super().__init__(apply_injection(model_patcher, self.injection))
        self.conditions = conditions
        self.text_scale = text_scale
        self.mode = mode
        self.cfg = text_scale
        self.windows = [sigma_window(model_patcher, c) for c in conditions]
        self.unit = [c.with_weight(1.0) for c in conditions]  # exact/reuse: each attribute at full strength
        self.reuse = DeltaReuse(REUSE_EVERY.get(mode, 1))
        self.clock: StepClock | None = None

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        """One sampling run: the schedule read once on the host, the step index followed through the
        sampler's callback; the held differences of the reuse mode live for this run only."""
        clock = StepClock.of(sigmas)

        def on_step(index, denoised, x, total_steps):
            clock.step_done(index)
            if callback is not None:
                return callback(index, denoised, x, total_steps)

        self.clock = clock
        self.reuse.reset()
        try:
            return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, on_step, disable_pbar, seed)
        finally:
            self.clock = None
            self.reuse.reset()

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
        if self.clock is not None:
            step, sigma = self.clock.step, self.clock.sigma
        else:  # called outside sample(): no schedule to follow, read this call's sigma
            step, sigma = 0, float(timestep.max())
        active = [i for i, window in enumerate(self.windows) if window.contains(sigma)]
        positive, empty = self.conds.get("positive"), self.conds.get("negative")
        reuse = self.mode in REUSE_EVERY
        if self.mode == MODES[0] or reuse:
            # each attribute's own pass at full strength: its weight enters the flow-blend sum below; the
            # reuse mode evaluates only the attributes whose held difference is due for a refresh
            evaluated = [i for i in active if self.reuse.needs(step, i)] if reuse else active
            attribute_conds = [self.conds[f"omni_attribute_{i}"] for i in evaluated]
            mapping = {entry["uuid"]: [self.unit[i]] for i, cond in zip(evaluated, attribute_conds) for entry in cond}
            need_empty = bool(evaluated) or not math.isclose(self.text_scale, 1.0)
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
        if reuse:
            for i, prediction in zip(evaluated, out[2:]):
                self.reuse.update(i, prediction - empty_pred, sigma)
            result = blend_with_deltas(text, empty_pred if need_empty else None,
                                       [self.reuse.delta(i, sigma, "denoised") for i in active], weights,
                                       self.text_scale)
            if not need_empty:
                empty_pred = text  # not evaluated this step (s_T = 1): what the post-CFG hooks see
        else:
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
        return schema(
            node_id="OmniAttributeStack",
            display_name="Omni-Attribute Stack",
            category=CATEGORY,
            description=("Adds (embeds, weight, schedule) conditions to a list for the flow blend guider, the "
                         "composition of multiple attributes: one for all rows of the embeds, or one per row. "
                         "'stack' and 'stack_2' merge two lists, so large compositions can be built as a tree "
                         "instead of a long chain."),
            inputs=[
                Embeds.Input("embeds",
                             tooltip="its rows act together as one condition, or each row on its own ('rows')"),
                STACK_WEIGHT.input(),
                START.input(),
                END.input(),
                Stack.Input("stack", optional=True, tooltip="conditions to put before these"),
                Stack.Input("stack_2", optional=True, tooltip="a second list to merge (after 'stack'): build trees, "
                                                               "not long chains"),
                io.Combo.Input("rows", options=list(ROWS), default=ROWS[0], optional=True,
                               tooltip="several embeds rows (a batch of images or several attribute lines): one "
                                       "condition for all, or one condition per row (same weight and schedule)"),
            ],
            outputs=[Stack.Output(display_name="stack")],
        )

    @classmethod
    def validate_inputs(cls, embeds=None, weight=None, start_percent=None, end_percent=None, stack=None,
                        stack_2=None, rows=None) -> bool | str:
        return inputs.verdict(inputs.EMBEDS.literal_problem("embeds", embeds),
                              *cls.problems(weight, start_percent, end_percent, rows),
                              inputs.STACK.literal_problem("stack", stack),
                              inputs.STACK.literal_problem("stack_2", stack_2))

    @staticmethod
    def problems(weight, start_percent, end_percent, rows) -> list[str | None]:
        return [STACK_WEIGHT.problem(weight), START.problem(start_percent), END.problem(end_percent),
                inputs.schedule_problem(start_percent, end_percent), inputs.choice_problem("rows", rows, ROWS)]

    @classmethod
    def execute(cls, embeds, weight: float, start_percent: float, end_percent: float, stack=None, stack_2=None,
                rows: str = ROWS[0]) -> io.NodeOutput:
        inputs.ensure(*cls.problems(weight, start_percent, end_percent, rows))
        inputs.EMBEDS.require("embeds", embeds)
        before = [*(inputs.STACK.require("stack", stack) if stack is not None else []),
                  *(inputs.STACK.require("stack_2", stack_2) if stack_2 is not None else [])]
        if rows == ROWS[1]:
            return io.NodeOutput([*before, *embeds.row_conditions(weight, start_percent, end_percent)])
        return io.NodeOutput([*before, embeds.condition(weight, start_percent, end_percent)])


class OmniAttributeFlowBlendGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="OmniAttributeFlowBlendGuider",
            display_name="Omni-Attribute Flow Blend Guider",
            category=CATEGORY,
            description=("A guider for SamplerCustomAdvanced on FLUX.1 (composition of multiple attributes): "
                         "composes them with the paper's rule v* = D(∅,∅) + s_T·(D(∅,c) − D(∅,∅)) + "
                         "Σ w_i·(D(E_i,∅) − D(∅,∅)), N + 2 evaluations per step, batched. 'joint' is a cheaper "
                         "approximation: one pass with all attribute tokens plus ordinary guidance (CFG)."),
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("adapter", options=folder_paths.get_filename_list(folders.ADAPTERS),
                               tooltip="the adapter the embeds were encoded with (its IP-Adapter weights are used)"),
                io.Conditioning.Input("positive", tooltip="the prompt c"),
                io.Conditioning.Input("empty", tooltip="the empty prompt ∅ (encode an empty string)"),
                Stack.Input("stack"),
                TEXT_SCALE.input(),
                io.Combo.Input("mode", options=list(MODES), default=MODES[0]),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def validate_inputs(cls, adapter=None, stack=None, text_scale=None, mode=None) -> bool | str:
        return inputs.verdict(inputs.file_problem("adapter", adapter, folders.ADAPTERS, ADAPTER_WHAT),
                              inputs.STACK.literal_problem("stack", stack), TEXT_SCALE.problem(text_scale),
                              inputs.choice_problem("mode", mode, MODES))

    @classmethod
    def execute(cls, model, adapter: str, positive, empty, stack, text_scale: float, mode: str) -> io.NodeOutput:
        inputs.ensure(TEXT_SCALE.problem(text_scale), inputs.choice_problem("mode", mode, MODES))
        inputs.model_socket().require("model", model)
        inputs.conditioning("positive", positive)
        inputs.conditioning("empty", empty)
        inputs.STACK.require("stack", stack)
        ip = load_ip(adapter)
        for condition in stack:
            check_embeds_width(condition.tokens, None, ip, adapter)
        guider = FlowBlendGuider(model, ip, list(stack), text_scale, mode)
        guider.set_conds(positive, empty)
        return io.NodeOutput(guider)

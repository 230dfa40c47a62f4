"""A corpus of bad inputs sent through the live server's HTTP API: every one is answered clearly, nothing comes
out silently wrong, nothing is lost, nothing outside ComfyUI's folders is touched.

What "answered clearly" means here (``assert_clear``):

* a rejection at ``POST /prompt`` (HTTP 400 with ``node_errors``): every error is the node's own input check
  (``custom_validation_failed``) or one of ComfyUI's standard typed errors that names the input
  (``value_not_in_list``, ``invalid_input_type``, ``return_type_mismatch`` ...); a crash inside validation
  (``exception_during_validation``) is not clear;
* a failure while running: the exception is one of the plugin's user errors (``omni_attribute.errors.*``), never
  a raw ``TypeError``/``KeyError``/safetensors or torch error;
* and in both cases the text names the offending input or file, says the expected thing, and holds none of the
  RAW markers below (Python exception reprs, state_dict dumps, bare quoted keys).

"Silently wrong": an accepted prompt's saved embeds are read back (the reader refuses NaN/inf) and sampled latents
are checked finite by the test pack's OmniTestLatentStats node. "Lost": the server's models/, input/ and output/
folders and a sentinel folder outside ComfyUI (reachable through links placed in those folders) are snapshotted
(inode, mode, size, mtime, content hash of small files) before and after: no file may change or be replaced, new
files may appear only in output/, and the sentinel must stay as it was.

The cases run in groups; after each group a known-good prompt (one that shares no node with the cases, so ComfyUI
runs it afresh) must succeed with bit-identical embeds. ``test_cases_do_not_depend_on_each_other`` runs a sample of
the cases again in reverse order and gets the same answers, so one check per group stands for one per case.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from omni_attribute.embeds import AttributeEmbeds, load_embeds, save_embeds
from omni_attribute.headless import ExecutionFailed, PromptRejected, node_outputs

pytestmark = pytest.mark.host

RAW = ("Traceback", "object has no attribute", "invalid literal", "not supported between", "KeyError", "IndexError",
       "TypeError", "AttributeError", "ZeroDivisionError", "division by zero", "NoneType", "state_dict",
       "Missing key(s)", "Unexpected key(s)", "size mismatch for", "list indices", "unhashable", "embedded null",
       "[Errno", "maximum recursion", "not subscriptable", "is not iterable", "SafetensorError:", "RuntimeError",
       "trust_remote_code=True", "No such file or directory")
COMFY_TYPED = {"custom_validation_failed", "value_not_in_list", "invalid_input_type", "required_input_missing",
               "return_type_mismatch", "bad_linked_input", "value_smaller_than_min", "value_bigger_than_max"}
PLUGIN_ERRORS = "omni_attribute.errors."

IMAGE = dict(width=64, height=64, channels=3, batch=1, seed=0, poison_nan=False)
LOADER = dict(backbone="tiny-qwen25vl", adapter="tiny.safetensors", dtype="auto", device="default")
IP_LOADER = {**LOADER, "adapter": "tiny-ip.safetensors"}
APPLY = dict(adapter="tiny-ip.safetensors", weight=1.0, start_percent=0.0, end_percent=1.0, apply_to="positive only",
             combine="all rows together")
STACK = dict(weight=1.0, start_percent=0.0, end_percent=1.0)
GUIDER = dict(adapter="tiny-ip.safetensors", text_scale=1.0, mode="exact")
NAN, INF = float("nan"), float("inf")


# ---- prompts ------------------------------------------------------------------------------------------------

EXTRA_ATTRIBUTES = ("object shape", "background color", "image lighting")


def encode_prompt(image=None, loader=None, encode=None, save=None, extra_saves: int = 0):
    """Test image → Load Encoder → Encode → Save Embeds (values in the dicts override or replace links); with
    ``extra_saves``, more Encode → Save pairs (other attributes, so other embeds) with the same prefix."""
    def build(g):
        source = g.node("OmniTestImage", **{**IMAGE, **(image or {})})
        encoder = g.node("OmniAttributeEncoderLoader", **{**LOADER, **(loader or {})})
        for attributes in ("object color", *EXTRA_ATTRIBUTES[:extra_saves]):
            embeds = g.node("OmniAttributeEncode", **{"encoder": encoder.out(0), "image": source.out(0),
                                                       "attributes": attributes, **(encode or {})})
            g.node("OmniAttributeSaveEmbeds", **{"embeds": embeds.out(0), "filename_prefix": "corpus", **(save or {})})
    return build


def load_prompt(file: str, save=None):
    def build(g):
        loaded = g.node("OmniAttributeLoadEmbeds", embeds_file=file)
        g.node("OmniAttributeSaveEmbeds", **{"embeds": loaded.out(0), "filename_prefix": "corpus-copy", **(save or {})})
    return build


def _ip_embeds(g, seed=0):
    source = g.node("OmniTestImage", **{**IMAGE, "seed": seed})
    encoder = g.node("OmniAttributeEncoderLoader", **IP_LOADER)
    return g.node("OmniAttributeEncode", encoder=encoder.out(0), image=source.out(0),
                  attributes="object color\nobject shape")


def _sample_to_stats(g, model, tag, positive=None, negative=None, guider=None):
    latent = g.node("EmptySD3LatentImage", width=64, height=64, batch_size=1)
    if guider is None:
        sampled = g.node("KSampler", model=model.out(0), seed=7, steps=2, cfg=2.0, sampler_name="euler",
                         scheduler="simple", positive=positive.out(0), negative=negative.out(0),
                         latent_image=latent.out(0), denoise=1.0)
    else:
        sampled = g.node("SamplerCustomAdvanced", noise=g.node("RandomNoise", noise_seed=7).out(0),
                         guider=guider.out(0), sampler=g.node("KSamplerSelect", sampler_name="euler").out(0),
                         sigmas=g.node("BasicScheduler", model=model.out(0), scheduler="simple", steps=2,
                                       denoise=1.0).out(0), latent_image=latent.out(0))
    g.node("OmniTestLatentStats", samples=sampled.out(0), tag=tag)


def apply_prompt(apply=None, mask: Callable | None = None, family="flux", tag="apply"):
    """Encode (IP adapter) → Apply on the tiny FLUX → KSampler → latent stats."""
    def build(g):
        embeds = _ip_embeds(g)
        model = g.node("OmniTestTinyModel", family=family, seed=0)
        patched = g.node("OmniAttributeApply", **{"model": model.out(0), "embeds": embeds.out(0), **APPLY,
                                                   **(apply or {})})
        if mask is not None:
            patched.set_input("mask", mask(g))
        positive = g.node("OmniTestConditioning", seed=1, length=5, guidance=3.5)
        negative = g.node("OmniTestConditioning", seed=2, length=5, guidance=3.5)
        _sample_to_stats(g, patched, tag, positive, negative)
    return build


def guider_prompt(stack=None, guider=None, leaves: int = 1, rows: str | None = None, adapter_ok=True, tag="guider"):
    """Encode (IP adapter) → a balanced tree of ``leaves`` Stack nodes merged through stack/stack_2 → Flow Blend
    Guider → SamplerCustomAdvanced → latent stats."""
    def build(g):
        embeds = _ip_embeds(g)
        level = []
        for i in range(leaves):
            options = {"embeds": embeds.out(0), **STACK, **(stack if i == 0 and stack else {})}
            if rows:
                options["rows"] = rows
            level.append(g.node("OmniAttributeStack", **options))
        while len(level) > 1:  # merge pairs: a tree of depth log2(leaves)
            merged = []
            for a, b in zip(level[::2], level[1::2]):
                merged.append(g.node("OmniAttributeStack", embeds=embeds.out(0), **STACK, stack=a.out(0),
                                     stack_2=b.out(0)))
            if len(level) % 2:
                merged.append(level[-1])
            level = merged
        model = g.node("OmniTestTinyModel", family="flux", seed=0)
        positive = g.node("OmniTestConditioning", seed=1, length=5, guidance=3.5)
        empty = g.node("OmniTestConditioning", seed=2, length=5, guidance=3.5)
        node = g.node("OmniAttributeFlowBlendGuider", **{"model": model.out(0), "positive": positive.out(0),
                                                        "empty": empty.out(0), "stack": level[0].out(0), **GUIDER,
                                                        **({} if adapter_ok else {"adapter": "tiny.safetensors"}),
                                                        **(guider or {})})
        _sample_to_stats(g, model, tag, guider=node)
    return build


def solid_mask(value):
    return lambda g: g.node("SolidMask", value=value, width=64, height=64).out(0)


def nan_image_mask(g):
    image = g.node("OmniTestImage", **{**IMAGE, "poison_nan": True})
    return g.node("ImageToMask", image=image.out(0), channel="red").out(0)


def primitive_float(value, target: str, where: str = "apply"):
    """A core PrimitiveFloat node (its own check lets NaN through) linked into ``target``: checked when it runs."""
    def build(g):
        number = g.node("PrimitiveFloat", value=value)
        if where == "apply":
            apply_prompt({target: number.out(0)})(g)
        else:
            guider_prompt(guider={target: number.out(0)})(g)
    return build


def without(build, class_type: str, name: str):
    """The prompt ``build`` makes, with input ``name`` of every ``class_type`` node removed."""
    def mutate(prompt):
        for node in prompt.values():
            if node["class_type"] == class_type:
                node["inputs"].pop(name, None)
        return prompt
    build.post = mutate
    return build


# ---- cases --------------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    build: Callable
    expect: str                     # "rejected" (400 at /prompt), "failed" (error while running) or "ok"
    fragment: str = ""              # the explanation the message must contain
    names: tuple[str, ...] = ()     # what the message must name: the input, the file, the folder
    check: Callable | None = None   # ok cases: what the outputs must be
    sample: bool = False            # rerun in test_cases_do_not_depend_on_each_other


def rejected(case_id, build, fragment, *names, sample=False):
    return Case(case_id, build, "rejected", fragment, names, sample=sample)


def failed(case_id, build, fragment, *names, sample=False):
    return Case(case_id, build, "failed", fragment, names, sample=sample)


def ok(case_id, build, check):
    return Case(case_id, build, "ok", check=check)


def numbers() -> list[Case]:
    return [
        rejected("apply-weight-nan", apply_prompt({"weight": NAN}), "weight is nan", "weight", sample=True),
        rejected("apply-weight-inf", apply_prompt({"weight": INF}), "weight is inf", "weight"),
        rejected("apply-weight-minus-inf", apply_prompt({"weight": -INF}), "weight is -inf", "weight"),
        rejected("apply-weight-too-big", apply_prompt({"weight": 6.0}), "weight is 6, outside -2 … 5", "weight"),
        rejected("apply-weight-nan-string", apply_prompt({"weight": "nan"}), "weight is nan", "weight"),
        rejected("apply-weight-text", apply_prompt({"weight": "strong"}), "Failed to convert", "weight"),
        rejected("apply-start-nan", apply_prompt({"start_percent": NAN}), "start_percent is nan", "start_percent"),
        rejected("apply-end-nan", apply_prompt({"end_percent": NAN}), "end_percent is nan", "end_percent"),
        rejected("apply-start-negative", apply_prompt({"start_percent": -0.1}), "outside 0 … 1", "start_percent"),
        rejected("apply-start-after-end", apply_prompt({"start_percent": 0.8, "end_percent": 0.2}),
                 "start_percent 0.8 is after end_percent 0.2: swap them", "start_percent", sample=True),
        rejected("stack-weight-nan", guider_prompt({"weight": NAN}), "weight is nan", "weight"),
        rejected("stack-weight-too-big", guider_prompt({"weight": 11.0}), "outside -5 … 10", "weight"),
        rejected("stack-start-inf", guider_prompt({"start_percent": INF}), "start_percent is inf", "start_percent"),
        rejected("stack-end-nan", guider_prompt({"end_percent": NAN}), "end_percent is nan", "end_percent"),
        rejected("stack-start-after-end", guider_prompt({"start_percent": 1.0, "end_percent": 0.0}),
                 "swap them", "start_percent"),
        rejected("guider-text-scale-nan", guider_prompt(guider={"text_scale": NAN}), "text_scale is nan",
                 "text_scale", sample=True),
        rejected("guider-text-scale-negative", guider_prompt(guider={"text_scale": -1.0}), "outside 0 … 30",
                 "text_scale"),
        rejected("guider-text-scale-inf", guider_prompt(guider={"text_scale": INF}), "text_scale is inf",
                 "text_scale"),
        failed("linked-weight-nan", primitive_float(NAN, "weight"), "weight is nan", "weight",
               "OmniAttributeApply", sample=True),
        failed("linked-text-scale-nan", primitive_float(NAN, "text_scale", "guider"), "text_scale is nan",
               "text_scale", "OmniAttributeFlowBlendGuider"),
    ]


def names() -> list[Case]:
    return [
        rejected("backbone-unknown", encode_prompt(loader={"backbone": "qwen-72b"}),
                 "is not in any registered omni_attribute_backbones folder", "backbone", "qwen-72b", sample=True),
        rejected("backbone-parent-path", encode_prompt(loader={"backbone": "../../etc"}),
                 "is not in any registered", "backbone", "../../etc"),
        rejected("backbone-absolute", encode_prompt(loader={"backbone": "/etc"}),
                 "is not in any registered", "backbone"),
        rejected("backbone-empty", encode_prompt(loader={"backbone": ""}), "is not in any registered", "backbone"),
        rejected("backbone-number", encode_prompt(loader={"backbone": 5}), "backbone 5 is not", "backbone"),
        rejected("adapter-unknown", encode_prompt(loader={"adapter": "missing.safetensors"}),
                 "is not a file in", "adapter", "missing.safetensors"),
        rejected("adapter-traversal", encode_prompt(loader={"adapter": "../omni_attribute/tiny.safetensors"}),
                 "is not a file in", "adapter"),
        rejected("adapter-absolute", encode_prompt(loader={"adapter": "/etc/passwd"}),
                 "is not a file in", "adapter"),
        rejected("adapter-nul", encode_prompt(loader={"adapter": "tiny\x00.safetensors"}), "is not a file in",
                 "adapter"),
        rejected("adapter-broken-link", encode_prompt(loader={"adapter": "corpus-broken-link.safetensors"}),
                 "cannot be read (a broken link?)", "adapter", "corpus-broken-link.safetensors"),
        rejected("dtype-unknown", encode_prompt(loader={"dtype": "fp64"}), "dtype is 'fp64'", "dtype"),
        rejected("device-unknown", encode_prompt(loader={"device": "tpu"}), "device is 'tpu'", "device"),
        rejected("apply-adapter-unknown", apply_prompt({"adapter": "nope.safetensors"}), "is not a file in",
                 "adapter", "nope.safetensors"),
        rejected("apply-to-unknown", apply_prompt({"apply_to": "negative only"}), "not one of its options",
                 "apply_to"),
        rejected("combine-unknown", apply_prompt({"combine": "average"}), "not one of its options", "combine"),
        rejected("guider-adapter-unknown", guider_prompt(guider={"adapter": "x/../../y.safetensors"}),
                 "is not a file in", "adapter"),
        rejected("guider-mode-unknown", guider_prompt(guider={"mode": "turbo"}), "mode is 'turbo'", "mode"),
        rejected("stack-rows-unknown", guider_prompt(rows="diagonal"), "rows is 'diagonal'", "rows"),
        rejected("embeds-file-unknown", load_prompt("missing.safetensors"), "is not a file in", "embeds_file",
                 sample=True),
        rejected("embeds-file-traversal", load_prompt("../../models/omni_attribute/tiny.safetensors"),
                 "is not a file in", "embeds_file"),
        rejected("embeds-file-broken-link", load_prompt("corpus-broken-link.safetensors"),
                 "cannot be read (a broken link?)", "embeds_file"),
    ]


def literals() -> list[Case]:
    return [
        rejected("encoder-literal", encode_prompt(encode={"encoder": "hello"}), "got the value 'hello' typed into",
                 "encoder", "OMNI_ATTRIBUTE_ENCODER", sample=True),
        rejected("encoder-value-wrapper", encode_prompt(encode={"encoder": {"__value__": [1, 2, 3]}}),
                 "typed into the prompt", "encoder"),
        rejected("image-literal", encode_prompt(encode={"image": "photo.png"}), "takes an IMAGE over a link",
                 "image"),
        rejected("save-embeds-literal", encode_prompt(save={"embeds": "hello"}), "typed into the prompt", "embeds",
                 "OMNI_ATTRIBUTE_EMBEDS"),
        rejected("save-embeds-number", encode_prompt(save={"embeds": 3.5}), "got the value 3.5", "embeds"),
        rejected("apply-embeds-literal", apply_prompt({"embeds": "x"}), "typed into the prompt", "embeds"),
        rejected("stack-embeds-object", guider_prompt({"embeds": {"tokens": [1]}}), "typed into the prompt",
                 "embeds"),
        rejected("stack-literal", guider_prompt({"stack": "abc"}), "takes OMNI_ATTRIBUTE_STACK", "stack"),
        rejected("stack-2-literal", guider_prompt({"stack_2": 7}), "typed into the prompt", "stack_2"),
        rejected("guider-stack-literal", guider_prompt(guider={"stack": "abc"}), "typed into the prompt", "stack"),
        rejected("stack-empty-list", guider_prompt({"stack": []}), "Bad linked input", "stack"),
        failed("apply-model-literal", apply_prompt({"model": "flux1-dev"}), "not a MODEL", "model",
               "OmniAttributeApply"),
        failed("apply-mask-literal", apply_prompt(mask=lambda g: "white"), "not a MASK", "mask"),
        failed("guider-positive-literal", guider_prompt(guider={"positive": "a cat"}), "not CONDITIONING",
               "positive"),
    ]


def strings() -> list[Case]:
    return [
        rejected("prefix-nul", encode_prompt(save={"filename_prefix": "a\x00b"}), "control character",
                 "filename_prefix", sample=True),
        rejected("prefix-newline", encode_prompt(save={"filename_prefix": "a\nb"}), "control character",
                 "filename_prefix"),
        rejected("prefix-parent", encode_prompt(save={"filename_prefix": "../escape"}), "leaves the output folder",
                 "filename_prefix"),
        rejected("prefix-deep-parent", encode_prompt(save={"filename_prefix": "a/../../../x"}),
                 "leaves the output folder", "filename_prefix"),
        rejected("prefix-absolute", encode_prompt(save={"filename_prefix": "/tmp/x"}), "leaves the output folder",
                 "filename_prefix"),
        rejected("prefix-too-long", encode_prompt(save={"filename_prefix": "x" * 300}), "too long",
                 "filename_prefix"),
        failed("prefix-through-link", encode_prompt(save={"filename_prefix": "corpus-escape/x"}),
               "leads out of", "filename_prefix"),
        failed("prefix-under-a-file", encode_prompt(save={"filename_prefix": "corpus-a-file/x"}),
               "cannot use the folder", "filename_prefix", "corpus-a-file"),
        rejected("attributes-empty", encode_prompt(encode={"attributes": "  \n "}), "attribute text is empty",
                 "attributes"),
        rejected("attributes-symbols", encode_prompt(encode={"attributes": "?!"}), "no letters or digits",
                 "attributes"),
        rejected("attributes-65-lines", encode_prompt(encode={"attributes": "\n".join(["color"] * 65)}),
                 "65 attribute lines (at most 64)", "attributes"),
        rejected("attributes-17-in-a-line", encode_prompt(encode={"attributes": ", ".join(["color"] * 17)}),
                 "17 attributes in one line", "attributes"),
        rejected("attributes-long-name", encode_prompt(encode={"attributes": "color " * 60}),
                 "characters long (at most 200)", "attributes"),
        rejected("attributes-nul", encode_prompt(encode={"attributes": "\x00"}), "no attribute found",
                 "attributes"),
    ]


def adapter_files() -> list[Case]:
    loader = lambda name: encode_prompt(loader={"adapter": name})  # noqa: E731
    apply = lambda name: apply_prompt({"adapter": name})  # noqa: E731
    return [
        failed("adapter-meta-list", loader("corpus-meta-list.safetensors"),
               "metadata must be a JSON object, found a list", "corpus-meta-list.safetensors", sample=True),
        failed("adapter-meta-not-json", loader("corpus-meta-broken.safetensors"), "metadata is not valid JSON",
               "corpus-meta-broken.safetensors"),
        failed("adapter-version-string", loader("corpus-version-string.safetensors"),
               "'format_version' is '1' (a string); expected the whole number 1", "corpus-version-string.safetensors"),
        failed("adapter-version-newer", loader("corpus-version-newer.safetensors"),
               "format version 2 is newer than this plugin reads (1): update the Omni-Attribute plugin",
               "corpus-version-newer.safetensors"),
        failed("adapter-width-bomb", loader("corpus-width-bomb.safetensors"),
               "'connector.width' is 1048576 (a number); expected a whole number from 1 to 16384",
               "corpus-width-bomb.safetensors", sample=True),
        failed("adapter-layers-bomb", loader("corpus-layers-bomb.safetensors"), "'connector.num_layers' is 100000",
               "corpus-layers-bomb.safetensors"),
        failed("adapter-lora-stripped", loader("corpus-lora-stripped.safetensors"),
               "holds no LoRA weights although its metadata describes LoRA of rank 4",
               "corpus-lora-stripped.safetensors"),
        failed("adapter-connector-shape", loader("corpus-connector-shape.safetensors"),
               "connector tensors do not match the file's own metadata", "corpus-connector-shape.safetensors"),
        failed("adapter-nan", loader("corpus-nan.safetensors"), "NaN or infinite value", "corpus-nan.safetensors"),
        failed("adapter-max-pixels-zero", loader("corpus-max-pixels-zero.safetensors"),
               "'image.max_pixels' is 0", "corpus-max-pixels-zero.safetensors"),
        failed("adapter-hidden-string", loader("corpus-hidden-string.safetensors"),
               "'backbone.hidden_size' is '64' (a string)", "corpus-hidden-string.safetensors"),
        failed("adapter-rank-string", loader("corpus-rank-string.safetensors"), "'lora.r' is '4' (a string)",
               "corpus-rank-string.safetensors"),
        failed("adapter-backbone-list", loader("corpus-backbone-list.safetensors"),
               "'backbone' must be a JSON object, found a list", "corpus-backbone-list.safetensors"),
        failed("adapter-no-connector", loader("corpus-no-connector.safetensors"),
               "metadata lacks connector", "corpus-no-connector.safetensors"),
        failed("adapter-empty-file", loader("corpus-empty.safetensors"), "is not a readable .safetensors file",
               "corpus-empty.safetensors"),
        failed("adapter-lora-other-layers", loader("corpus-lora-other-layers.safetensors"),
               "for modules this backbone does not have", "corpus-lora-other-layers.safetensors"),
        failed("encoder-output-overflow", loader("corpus-overflow.safetensors"),
               "the encoder produced NaN or infinite values", "corpus-overflow.safetensors", "OmniAttributeEncode"),
        failed("ip-shape", apply("corpus-ip-shape.safetensors"), "IP-Adapter tensors do not match",
               "corpus-ip-shape.safetensors", "OmniAttributeApply"),
        failed("ip-stripped", apply("corpus-ip-stripped.safetensors"),
               "metadata describes an IP-Adapter but the file holds no IP-Adapter weights",
               "corpus-ip-stripped.safetensors"),
        failed("ip-duplicate-blocks", apply("corpus-ip-duplicate-blocks.safetensors"),
               "'generator.ip.double_blocks' is [0, 0]", "corpus-ip-duplicate-blocks.safetensors"),
        failed("ip-context-bomb", apply("corpus-ip-context-bomb.safetensors"),
               "'generator.ip.context_dim' is 1099511627776", "corpus-ip-context-bomb.safetensors"),
        failed("ip-nan", apply("corpus-ip-nan.safetensors"), "ip-adapter tensor", "corpus-ip-nan.safetensors"),
    ]


def backbone_folders() -> list[Case]:
    def loader(name, adapter="tiny.safetensors"):
        return encode_prompt(loader={"backbone": name, "adapter": adapter})

    return [
        failed("backbone-config-list", loader("corpus-config-list"), "config.json must hold a JSON object",
               "corpus-config-list", sample=True),
        failed("backbone-config-broken", loader("corpus-config-broken"), "config.json is not valid JSON",
               "corpus-config-broken"),
        failed("backbone-other-family", loader("corpus-llava"), "holds a 'llava' model", "corpus-llava"),
        failed("backbone-hidden-string", loader("corpus-hidden-string"), "'text_config.hidden_size' is '64'",
               "corpus-hidden-string"),
        failed("backbone-vocab-bomb", loader("corpus-vocab-bomb"), "'text_config.vocab_size' is 1099511627776",
               "corpus-vocab-bomb"),
        failed("backbone-remote-code", loader("corpus-remote-code"), "asks to run its own Python code",
               "corpus-remote-code", sample=True),
        failed("backbone-bin-only", loader("corpus-bin-only"), "refuses pickled formats on purpose",
               "corpus-bin-only", "pytorch_model.bin"),
        failed("backbone-truncated-weights", loader("corpus-truncated-weights"), "is damaged or truncated",
               "corpus-truncated-weights", "model.safetensors"),
        failed("backbone-missing-shard", loader("corpus-missing-shard"), "named in model.safetensors.index.json is "
               "missing", "corpus-missing-shard", "model-00002-of-00002.safetensors"),
        failed("backbone-broken-weights-link", loader("corpus-broken-weights-link"), "is a broken link",
               "corpus-broken-weights-link"),
        failed("backbone-missing-tensor", loader("corpus-missing-tensor"), "its weights lack 1 tensor(s)",
               "corpus-missing-tensor"),
        failed("backbone-weights-of-another-size", loader("corpus-size-mismatch"),
               "its weights do not match its config.json", "corpus-size-mismatch"),
        failed("backbone-bad-tokenizer", loader("corpus-bad-tokenizer"), "vocab.json is not valid JSON",
               "corpus-bad-tokenizer"),
        failed("backbone-without-weights", loader("no-weights"), "has no *.safetensors weights", "no-weights"),
        failed("backbone-adapter-mismatch", loader("tiny-qwen25vl", "hidden32.safetensors"),
               "hidden size 32, backbone has 64", "hidden32.safetensors"),
    ]


def embeds_files() -> list[Case]:
    return [
        failed(f"embeds-{name}", load_prompt(f"corpus-{name}.safetensors"), fragment, f"corpus-{name}.safetensors",
               "OmniAttributeLoadEmbeds", sample=name == "meta-list")
        for name, fragment in [
            ("meta-list", "metadata must be a JSON object, found a list"),
            ("labels-string", "'attributes' is 'ab' (a string)"),
            ("index-strings", "'image_index' is ['0', '1']"),
            ("zero-rows", "holds no embedding (tokens [0, 4, 64]"),
            ("zero-tokens", "holds no embedding (tokens [2, 0, 64]"),
            ("nan", "embeds tensor tokens holds 1 NaN or infinite value(s)"),
            ("foreign", "not Omni-Attribute embeds"),
            ("truncated", "is not a readable .safetensors file"),
            ("extra-tensor", "expected tensors 'tokens' and 'pooled'"),
            ("version-string", "'format_version' is '1' (a string)"),
            ("integers", "has dtype int32"),
            ("info-list", "'info' must be a JSON object, found a list"),
        ]
    ]


def world_prompt(generator: str):
    """The laboratory's tiny-world generator loader (its node pack is linked in the test server) → KSampler."""
    def build(g):
        model = g.node("OmniAttributeWorldGeneratorLoader", generator=generator)
        _sample_to_stats(g, model, "world", g.node("OmniTestConditioning", seed=1, length=5, guidance=3.5),
                         g.node("OmniTestConditioning", seed=2, length=5, guidance=3.5))
    return build


def images_and_wiring() -> list[Case]:
    return [
        failed("world-generator-bad-json", world_prompt("corpus-bad-json"), "is not valid JSON",
               "corpus-bad-json", "tiny_generator.json"),
        failed("world-generator-meta-list", world_prompt("corpus-meta-list"), "must be a JSON object with a 'layout'",
               "corpus-meta-list", "tiny_generator.json"),
        failed("image-nan", encode_prompt(image={"poison_nan": True}), "NaN", "IMAGE", "OmniAttributeEncode"),
        failed("image-five-channels", encode_prompt(image={"channels": 5}), "5 channels", "IMAGE"),
        failed("image-extreme-aspect", encode_prompt(image={"width": 600, "height": 1}), "aspect ratio", "600x1"),
        failed("mask-nan-solid", apply_prompt(mask=solid_mask(NAN)), "mask contains NaN", "mask",
               "OmniAttributeApply", sample=True),
        failed("mask-nan-from-image", apply_prompt(mask=nan_image_mask), "mask contains NaN", "mask"),
        failed("apply-on-sd3", apply_prompt(family="sd3"), "supports FLUX.1 models", "MODEL", "OmniAttributeApply"),
        rejected("wiring-stack-into-embeds", lambda g: _stack_into_apply(g), "Return type mismatch", "embeds"),
        rejected("wiring-mask-into-image", lambda g: _mask_into_encode(g), "Return type mismatch", "image"),
        rejected("wiring-missing-image", without(encode_prompt(), "OmniAttributeEncode", "image"),
                 "Required input is missing", "image"),
        failed("guider-without-ip-weights", guider_prompt(adapter_ok=False), "has no IP-Adapter weights",
               "tiny.safetensors", "OmniAttributeFlowBlendGuider"),
        failed("guider-embeds-width", guider_prompt(guider={"adapter": "tiny-ip-32-wide.safetensors"}),
               "embeds are 64 wide", "tiny-ip-32-wide.safetensors"),
    ]


def _stack_into_apply(g):
    embeds = _ip_embeds(g)
    stack = g.node("OmniAttributeStack", embeds=embeds.out(0), **STACK)
    model = g.node("OmniTestTinyModel", family="flux", seed=0)
    patched = g.node("OmniAttributeApply", model=model.out(0), embeds=stack.out(0), **APPLY)
    _sample_to_stats(g, patched, "x", g.node("OmniTestConditioning", seed=1, length=5, guidance=3.5),
                     g.node("OmniTestConditioning", seed=2, length=5, guidance=3.5))


def _mask_into_encode(g):
    encoder = g.node("OmniAttributeEncoderLoader", **LOADER)
    mask = g.node("SolidMask", value=1.0, width=64, height=64)
    embeds = g.node("OmniAttributeEncode", encoder=encoder.out(0), image=mask.out(0), attributes="object color")
    g.node("OmniAttributeSaveEmbeds", embeds=embeds.out(0), filename_prefix="corpus")


# ---- accepted prompts: saved where the loader lists them, never over another file, finite ------------------------

def saved(expected: list[str]):
    """Check: the prompt saved exactly ``expected`` (as Load Embeds lists them, '*' = the counter), each a new file
    in output/omni_attribute_embeds with ComfyUI's usual permissions, listed by Load Embeds, finite."""
    def check(history, ctx):
        items = node_outputs(history, "omni_attribute_embeds")
        root = ctx.base / "output" / "omni_attribute_embeds"
        listed = [i["embeds_file"] for i in items]
        for item, name in zip(items, listed):  # the reported name and the file's place agree
            assert ctx.base / "output" / item["subfolder"] / item["filename"] == root / name, item
        assert len(listed) == len(set(listed)) == len(expected), listed
        for name, pattern in zip(sorted(listed), sorted(expected)):
            assert re.fullmatch(re.escape(pattern).replace(r"\*", r"\d{5}"), name), (name, pattern)
        options = ctx.load_options()
        for name in listed:
            path = root / name
            assert path.is_file() and name not in ctx.before_names, name
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~ctx.umask, oct(path.stat().st_mode)
            assert name in options, (name, "not listed by Load Omni-Attribute Embeds")
            assert torch.isfinite(load_embeds(path).tokens).all()
            ctx.before_names.add(name)
    return check


def finite_latent(history, ctx):
    (stats,) = node_outputs(history, "omni_test_stats")
    assert stats["finite"] and stats["abs_mean"] > 0, stats


def saves() -> list[Case]:
    """Accepted prompts (each with its own image, so that ComfyUI's cache serves none of them)."""
    def encoded(seed, **settings):
        return encode_prompt(image={"seed": seed}, **settings)

    return [
        ok("prefix-empty", encoded(101, save={"filename_prefix": ""}), saved(["omni_attribute_*_.safetensors"])),
        ok("prefix-empty-twice-in-one-prompt", encoded(102, save={"filename_prefix": ""}, extra_saves=1),
           saved(["omni_attribute_*_.safetensors"] * 2)),
        ok("prefix-trailing-slash", encoded(103, save={"filename_prefix": "faces/"}),
           saved(["faces/omni_attribute_*_.safetensors"])),
        ok("prefix-dots-and-doubled-slashes", encoded(104, save={"filename_prefix": "./corpus-a//b"}),
           saved(["corpus-a/b_*_.safetensors"])),
        ok("prefix-same-three-times-in-one-prompt", encoded(105, save={"filename_prefix": "corpus-twice"},
                                                            extra_saves=2),
           saved(["corpus-twice_*_.safetensors"] * 3)),
        ok("prefix-unicode", encoded(106, save={"filename_prefix": "café/ñandú"}),
           saved(["café/ñandú_*_.safetensors"])),
        ok("prefix-number", encoded(107, save={"filename_prefix": 5}), saved(["5_*_.safetensors"])),
        ok("prefix-counter-moves-past-a-taken-name", encoded(108, save={"filename_prefix": "corpus-taken"}),
           saved(["corpus-taken_00008_.safetensors"])),
        ok("adapter-through-a-link", encoded(109, loader={"adapter": "corpus-link-outside.safetensors"}),
           saved(["corpus_*_.safetensors"])),
        ok("load-and-save-again", load_prompt("corpus-good.safetensors"), saved(["corpus-copy_*_.safetensors"])),
        ok("stack-rows-and-tree", guider_prompt(leaves=4, rows="each row its own condition",
                                                guider={"text_scale": 0.0}), finite_latent),
        ok("apply-zero-mask-extreme-weight", apply_prompt({"weight": -2.0, "start_percent": 0.5, "end_percent": 0.5},
                                                          mask=solid_mask(0.0)), finite_latent),
    ]


GROUPS = {"numbers": numbers, "names": names, "literals": literals, "strings": strings,
          "adapter files": adapter_files, "backbone folders": backbone_folders, "embeds files": embeds_files,
          "images and wiring": images_and_wiring, "saves": saves}


def all_cases() -> dict[str, list[Case]]:
    return {group: make() for group, make in GROUPS.items()}


# ---- the bad files, made once ---------------------------------------------------------------------------------

def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}, {k: handle.get_tensor(k) for k in handle.keys()}


def _write_adapter(path: Path, base: Path, change_meta=None, change_tensors=None, raw_meta: str | None = None):
    header, tensors = _read(base)
    meta = json.loads(header["omni_attribute"])
    if change_meta:
        change_meta(meta)
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, str(path), metadata={"omni_attribute": raw_meta if raw_meta is not None else json.dumps(meta)})


def _first(tensors, prefix):
    return next(k for k in sorted(tensors) if k.startswith(prefix))


def make_bad_adapters(folder: Path, tiny: Path, tiny_ip: Path, sentinel: Path) -> list[Path]:
    def setter(path, value):
        def change(meta):
            *parents, last = path.split(".")
            node = meta
            for key in parents:
                node = node[key]
            node[last] = value
        return change

    def drop(prefix):
        return lambda t: [t.pop(k) for k in [k for k in t if k.startswith(prefix)]]

    def reshape(prefix):
        def change(t):
            key = _first(t, prefix)
            t[key] = torch.zeros(t[key].shape[0] + 1, *t[key].shape[1:])
        return change

    def poison(prefix):
        def change(t):
            key = _first(t, prefix)
            t[key] = t[key].clone()
            t[key].view(-1)[0] = float("nan")
        return change

    def relayer(t):
        for key in [k for k in t if ".layers.1." in k and k.startswith("lora.")]:
            t[key.replace(".layers.1.", ".layers.7.")] = t.pop(key)

    def overflow(t):  # finite weights whose layer norm output overflows float32
        t["connector.norm.weight"] = torch.full_like(t["connector.norm.weight"], 3e38)
        t["connector.norm.bias"] = torch.full_like(t["connector.norm.bias"], 3e38)

    made = {
        "corpus-meta-list": dict(base=tiny, raw_meta="[1, 2]"),
        "corpus-meta-broken": dict(base=tiny, raw_meta="{not json"),
        "corpus-version-string": dict(base=tiny, change_meta=setter("format_version", "1")),
        "corpus-version-newer": dict(base=tiny, change_meta=setter("format_version", 2)),
        "corpus-width-bomb": dict(base=tiny, change_meta=setter("connector.width", 2 ** 20)),
        "corpus-layers-bomb": dict(base=tiny, change_meta=setter("connector.num_layers", 100000)),
        "corpus-lora-stripped": dict(base=tiny, change_tensors=drop("lora.")),
        "corpus-connector-shape": dict(base=tiny, change_tensors=reshape("connector.output.weight")),
        "corpus-nan": dict(base=tiny, change_tensors=poison("connector.layers.0")),
        "corpus-max-pixels-zero": dict(base=tiny, change_meta=setter("image.max_pixels", 0)),
        "corpus-hidden-string": dict(base=tiny, change_meta=setter("backbone.hidden_size", "64")),
        "corpus-rank-string": dict(base=tiny, change_meta=setter("lora.r", "4")),
        "corpus-backbone-list": dict(base=tiny, change_meta=setter("backbone", ["qwen2_5_vl", 64])),
        "corpus-no-connector": dict(base=tiny, change_meta=lambda m: m.pop("connector")),
        "corpus-lora-other-layers": dict(base=tiny, change_tensors=relayer),
        "corpus-overflow": dict(base=tiny, change_tensors=overflow),
        "corpus-ip-shape": dict(base=tiny_ip, change_tensors=reshape("ip_adapter.double_blocks.0.to_k")),
        "corpus-ip-stripped": dict(base=tiny_ip, change_tensors=drop("ip_adapter.")),
        "corpus-ip-duplicate-blocks": dict(base=tiny_ip, change_meta=setter("generator.ip.double_blocks", [0, 0])),
        "corpus-ip-context-bomb": dict(base=tiny_ip, change_meta=setter("generator.ip.context_dim", 2 ** 40)),
        "corpus-ip-nan": dict(base=tiny_ip, change_tensors=poison("ip_adapter.double_blocks.0.to_v")),
    }
    paths = []
    for name, how in made.items():
        path = folder / f"{name}.safetensors"
        _write_adapter(path, **how)
        paths.append(path)
    (folder / "corpus-empty.safetensors").write_bytes(b"")
    (folder / "corpus-broken-link.safetensors").symlink_to(folder / "corpus-nowhere.safetensors")
    shutil.copy(tiny, sentinel / "secret.safetensors")
    (folder / "corpus-link-outside.safetensors").symlink_to(sentinel / "secret.safetensors")
    return paths + [folder / f"corpus-{n}.safetensors" for n in ("empty", "broken-link", "link-outside")]


def make_bad_backbones(folder: Path, good: Path) -> list[Path]:
    weights = good / "model.safetensors"

    def copy(name, link_weights=True):
        target = folder / name
        target.mkdir()
        for item in good.iterdir():
            if item.name == "model.safetensors":
                if link_weights:
                    (target / item.name).symlink_to(weights)
            else:
                shutil.copy(item, target / item.name)
        return target

    def edit_config(target, change, text=False):
        path = target / "config.json"
        if text:
            path.write_text(change)
            return
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))

    made = []
    made.append(copy("corpus-config-list")); edit_config(made[-1], "[]", text=True)  # noqa: E702
    made.append(copy("corpus-config-broken")); edit_config(made[-1], "{\"model_type\": ", text=True)  # noqa: E702
    made.append(copy("corpus-llava")); edit_config(made[-1], lambda c: c.update(model_type="llava"))  # noqa: E702
    made.append(copy("corpus-hidden-string"))
    edit_config(made[-1], lambda c: c["text_config"].update(hidden_size="64"))
    made.append(copy("corpus-vocab-bomb"))
    edit_config(made[-1], lambda c: c["text_config"].update(vocab_size=2 ** 40))
    made.append(copy("corpus-remote-code"))
    tokenizer_config = json.loads((made[-1] / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    (made[-1] / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    made.append(copy("corpus-bin-only", link_weights=False))
    (made[-1] / "pytorch_model.bin").write_bytes(b"\x80\x02pickled")
    made.append(copy("corpus-truncated-weights", link_weights=False))
    (made[-1] / "model.safetensors").write_bytes(weights.read_bytes()[:100_000])
    made.append(copy("corpus-missing-shard"))
    (made[-1] / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    made.append(copy("corpus-broken-weights-link", link_weights=False))
    (made[-1] / "model.safetensors").symlink_to(made[-1] / "gone.safetensors")
    made.append(copy("corpus-missing-tensor", link_weights=False))
    header, tensors = _read(weights)
    tensors.pop(_first(tensors, "model.layers.0.mlp.down_proj"))
    save_file(tensors, str(made[-1] / "model.safetensors"), metadata=header)
    made.append(copy("corpus-size-mismatch"))
    edit_config(made[-1], lambda c: (c.update(intermediate_size=256), c["text_config"].update(intermediate_size=256)))
    made.append(copy("corpus-bad-tokenizer"))
    (made[-1] / "vocab.json").write_text("{bad")
    return made


def make_bad_embeds(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good_meta = {"format": "omni-attribute-embeds", "format_version": 1, "attributes": ["object color"] * 2,
                 "image_index": [0, 1], "info": {"adapter": "tiny-ip.safetensors"}}
    tokens = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(0))

    def write(name, meta=None, tensors=None, raw: str | None = None):
        tensors = tensors if tensors is not None else {"tokens": tokens, "pooled": tokens.mean(1)}
        header = {} if meta is False else {"omni_attribute_embeds": raw if raw is not None else json.dumps(
            {**good_meta, **(meta or {})})}
        save_file(tensors, str(folder / f"corpus-{name}.safetensors"), metadata=header)

    nan = tokens.clone()
    nan[1, 2, 3] = float("nan")
    write("meta-list", raw="[1]")
    write("labels-string", {"attributes": "ab"})
    write("index-strings", {"image_index": ["0", "1"]})
    write("zero-rows", {"attributes": [], "image_index": []}, {"tokens": torch.zeros(0, 4, 64),
                                                              "pooled": torch.zeros(0, 64)})
    write("zero-tokens", tensors={"tokens": torch.zeros(2, 0, 64), "pooled": torch.zeros(2, 64)})
    write("nan", tensors={"tokens": nan, "pooled": tokens.mean(1)})
    write("foreign", meta=False)
    write("extra-tensor", tensors={"tokens": tokens, "pooled": tokens.mean(1), "extra": torch.zeros(1)})
    write("version-string", {"format_version": "1"})
    write("integers", tensors={"tokens": tokens.to(torch.int32), "pooled": tokens.mean(1).to(torch.int32)})
    write("info-list", {"info": []})
    good = folder / "corpus-good.safetensors"
    save_embeds(good, AttributeEmbeds(tokens, tokens.mean(1), ["object color"] * 2, [0, 1],
                                      {"adapter": "tiny-ip.safetensors"}))
    (folder / "corpus-truncated.safetensors").write_bytes(good.read_bytes()[:300])
    (folder / "corpus-broken-link.safetensors").symlink_to(folder / "corpus-gone.safetensors")
    return sorted(folder.glob("corpus-*"))


# ---- snapshots ----------------------------------------------------------------------------------------------

def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Every file and link under ``root`` (links not followed): (inode, mode, size, mtime, small files' hash)."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if str(rel / d) not in skip and d != "__pycache__"]
        for name in files + [d for d in dirs if (Path(folder) / d).is_symlink()]:
            path = Path(folder) / name
            key = str(rel / name)
            if key in skip:
                continue
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                entries[key] = ("link", os.readlink(path))
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if info.st_size < 1 << 20 else ""
                entries[key] = (info.st_ino, info.st_mode, info.st_size, info.st_mtime_ns, digest)
    return entries


# ---- running ------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    status: str
    text: str = ""
    reply: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)


def submit(client, graphs, case: Case) -> Outcome:
    g = graphs.builder()
    case.build(g)
    prompt = g.finalize()
    post = getattr(case.build, "post", None)
    if post:
        prompt = post(prompt)
    try:
        return Outcome("ok", history=client.run(prompt))
    except PromptRejected as exc:
        return Outcome("rejected", str(exc), reply=exc.reply)
    except ExecutionFailed as exc:
        return Outcome("failed", str(exc), data=exc.data)


def assert_clear(case: Case, outcome: Outcome) -> None:
    where = f"[{case.id}] {outcome.text}"
    assert outcome.status == case.expect, where
    text = outcome.text
    if outcome.status == "rejected":
        errors = [(node, e) for node, entry in outcome.reply.get("node_errors", {}).items() for e in entry["errors"]]
        assert errors, where
        for _, error in errors:  # only input checks and ComfyUI's typed errors, each naming an input
            assert error["type"] in COMFY_TYPED and (error.get("extra_info") or {}).get("input_name"), (where, error)
    elif outcome.status == "failed":
        assert str(outcome.data.get("exception_type", "")).startswith(PLUGIN_ERRORS), (where, outcome.data)
        body = str(outcome.data.get("exception_message", ""))
        assert len(body) > 30 and " " in body.strip() and not re.fullmatch(r"\s*'[^']*'\s*", body), where
    assert case.fragment in text, (case.fragment, where)
    for name in case.names:
        assert name in text, (name, where)
    raw = [marker for marker in RAW if marker in text]
    assert not raw, (raw, where)


@dataclass
class Context:
    client: object
    graphs: object
    base: Path
    umask: int
    before_names: set
    known_good: AttributeEmbeds | None = None
    outcomes: dict = field(default_factory=dict)

    def load_options(self) -> list[str]:
        info = self.client.get_json("/object_info/OmniAttributeLoadEmbeds")
        return info["OmniAttributeLoadEmbeds"]["input"]["required"]["embeds_file"][1]["options"]


# Two spellings of one known-good prompt (on a CPU server, fp32 on the default device = auto dtype on the cpu):
# alternated, and unlike every case's loader, so that ComfyUI's cache never serves one: each check runs afresh.
KNOWN_GOOD = [encode_prompt(image={"seed": 4242}, loader={"dtype": dtype, "device": device},
                            save={"filename_prefix": "known-good"})
              for dtype, device in (("fp32", "default"), ("auto", "cpu"))]


def run_known_good(ctx: Context) -> AttributeEmbeds:
    ctx.known_good_runs = getattr(ctx, "known_good_runs", -1) + 1
    outcome = submit(ctx.client, ctx.graphs, Case("known-good", KNOWN_GOOD[ctx.known_good_runs % 2], "ok"))
    assert outcome.status == "ok", outcome.text
    (item,) = node_outputs(outcome.history, "omni_attribute_embeds")
    path = ctx.base / "output" / item["subfolder"] / item["filename"]
    embeds = load_embeds(path)
    embeds.path = path
    return embeds


@pytest.fixture(scope="module")
def corpus(comfy_server, comfy_base, client, graphs, tiny_backbone, tiny_adapter, tmp_path_factory):
    """Make the bad files, snapshot, run every group (known-good prompt after each), snapshot again; then remove
    the bad files so that later tests see the server's folders as they were."""
    base = comfy_base
    sentinel = tmp_path_factory.mktemp("sentinel")
    (sentinel / "note.txt").write_text("nothing may write here")
    adapters = base / "models" / "omni_attribute"
    backbones = base / "models" / "omni_attribute_backbones"
    embeds_in = base / "input" / "omni_attribute_embeds"
    embeds_out = base / "output" / "omni_attribute_embeds"
    embeds_out.mkdir(parents=True, exist_ok=True)
    made = make_bad_adapters(adapters, adapters / "tiny.safetensors", adapters / "tiny-ip.safetensors", sentinel)
    made += make_bad_backbones(backbones, backbones / "tiny-qwen25vl")
    made += make_bad_embeds(embeds_in)
    for name, text in (("corpus-bad-json", "{\"layout\": "), ("corpus-meta-list", "[]")):
        folder = base / "models" / "omni_attribute_world" / name
        folder.mkdir()
        (folder / "tiny_generator.json").write_text(text)
        made.append(folder)
    (embeds_out / "corpus-escape").symlink_to(sentinel, target_is_directory=True)
    (embeds_out / "corpus-a-file").write_text("a file where a folder would go")
    (embeds_out / "corpus-taken_00007_.safetensors").write_bytes(b"someone else's file")  # the counter moves past
    made += [embeds_out / "corpus-escape", embeds_out / "corpus-a-file", embeds_out / "corpus-taken_00007_.safetensors"]

    skip = ("comfyui.log", "user", "temp", "custom_nodes")
    before, sentinel_before = snapshot(base, skip), snapshot(sentinel)
    umask = os.umask(0)
    os.umask(umask)
    ctx = Context(client, graphs, base, umask, {str(p.relative_to(embeds_out)) for p in embeds_out.rglob("*")})
    started = time.monotonic()
    ctx.known_good = run_known_good(ctx)
    checks = []
    for group, cases in all_cases().items():
        for case in cases:
            outcome = submit(client, graphs, case)
            ctx.outcomes[case.id] = (case, outcome)
        again = run_known_good(ctx)
        checks.append((group, again.path.name, torch.equal(again.tokens, ctx.known_good.tokens)
                       and torch.equal(again.pooled, ctx.known_good.pooled)))
    ctx.elapsed = time.monotonic() - started
    ctx.checks = checks
    ctx.changes = (before, snapshot(base, skip), sentinel_before, snapshot(sentinel))
    ctx.sentinel = sentinel
    yield ctx
    for path in made:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


CASES = [case for cases in all_cases().values() for case in cases]


def test_the_corpus_is_large_and_covers_every_group():
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)
    assert {c.expect for c in CASES} == {"rejected", "failed", "ok"}


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_bad_input_is_answered_clearly(corpus, case_id):
    case, outcome = corpus.outcomes[case_id]
    assert_clear(case, outcome)
    if case.expect == "ok":
        case.check(outcome.history, corpus)


def test_the_server_keeps_giving_the_same_result_after_every_group(corpus):
    """Bit-identical embeds each time, from a fresh run each time (a new file each time: not served from cache)."""
    print(f"{len(CASES)} cases in {len(corpus.checks)} groups: {corpus.elapsed:.0f} s")
    assert len(corpus.checks) == len(GROUPS) and all(same for _, _, same in corpus.checks), corpus.checks
    files = [name for _, name, _ in corpus.checks] + [corpus.known_good.path.name]
    assert len(set(files)) == len(files), files


def test_nothing_is_lost_or_touched_outside_comfyui_folders(corpus):
    before, after, sentinel_before, sentinel_after = corpus.changes
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, f"files changed or replaced: {changed[:10]}"
    new = [k for k in after if k not in before]
    assert all(k.startswith("output" + os.sep) for k in new), [k for k in new if not k.startswith("output")]
    assert sentinel_after == sentinel_before
    assert not any(k.startswith("output/omni_attribute_embeds/corpus-escape") for k in new)


def test_cases_do_not_depend_on_each_other(corpus, client, graphs):
    """A sample of cases from every kind, run again in reverse order after all the others: the same answers."""
    sample = [case for case in CASES if case.sample]
    assert len(sample) >= 10 and len({c.id.split("-")[0] for c in sample}) >= 6
    for case in reversed(sample):
        again = submit(client, graphs, case)
        first = corpus.outcomes[case.id][1]
        assert (again.status, listing_free(again.text)) == (first.status, listing_free(first.text)), case.id


def listing_free(text: str) -> str:
    """The message without the list of files to pick from (saving cases legitimately add files to it)."""
    return re.sub(r"pick one of .*", "pick one of ...", text)


def test_two_prompts_queued_at_once_keep_both_files(corpus, client, graphs):
    """Two prompts in the queue at the same time, same prefix, other embeds: two files, neither replaced."""
    ids = []
    for seed in (301, 302):
        g = graphs.builder()
        encode_prompt(image={"seed": seed}, save={"filename_prefix": "corpus-race"})(g)
        ids.append(client.queue(g.finalize()))
    g = graphs.builder()
    encode_prompt(image={"seed": 303}, save={"filename_prefix": "corpus-race"})(g)
    last = client.run(g.finalize())
    histories = [client._wait_for_history(prompt_id) for prompt_id in ids] + [last]
    names = [item["filename"] for history in histories for item in node_outputs(history, "omni_attribute_embeds")]
    assert sorted(names) == [f"corpus-race_0000{i}_.safetensors" for i in (1, 2, 3)], names
    tokens = [load_embeds(corpus.base / "output" / "omni_attribute_embeds" / name).tokens for name in names]
    assert not torch.equal(tokens[0], tokens[1]) and not torch.equal(tokens[1], tokens[2])


# ---- how large a composition can be (README, "Limits") -----------------------------------------------------------

CHAIN_LIMIT = 950   # README: chains of nodes validate up to this depth (ComfyUI's recursive validator, Python 3.11)


def chain_prompt(depth: int):
    """A chain of ``depth`` Stack nodes whose deepest node has weight NaN: validation must reach it to answer."""
    def build(g):
        embeds = _ip_embeds(g)
        node = None
        for i in range(depth):
            node = g.node("OmniAttributeStack", embeds=embeds.out(0), **{**STACK, "weight": NAN if i == 0 else 1.0},
                          **({"stack": node.out(0)} if node is not None else {}))
        model = g.node("OmniTestTinyModel", family="flux", seed=0)
        guider = g.node("OmniAttributeFlowBlendGuider", model=model.out(0), stack=node.out(0), **GUIDER,
                        positive=g.node("OmniTestConditioning", seed=1, length=5, guidance=3.5).out(0),
                        empty=g.node("OmniTestConditioning", seed=2, length=5, guidance=3.5).out(0))
        _sample_to_stats(g, model, "chain", guider=guider)
    return build


def test_documented_chain_depth_validates_and_deeper_chains_hit_comfyui_limit(corpus, client, graphs):
    within = submit(client, graphs, Case("chain", chain_prompt(CHAIN_LIMIT), "rejected"))
    assert within.status == "rejected" and "weight is nan" in within.text and "recursion" not in within.text
    beyond = submit(client, graphs, Case("chain", chain_prompt(1000), "rejected"))
    assert beyond.status == "rejected" and "maximum recursion depth" in beyond.text, beyond.text[:300]


def test_a_tree_of_stacks_holds_a_thousand_conditions_at_depth_ten(corpus, client, graphs):
    """512 leaves merged through stack/stack_2 (1023 Stack nodes, depth 10), one leaf with weight NaN: the whole
    tree validates (the answer is the leaf's own message), where a chain of 1023 would fail in ComfyUI."""
    outcome = submit(client, graphs, Case("tree", guider_prompt({"weight": NAN}, leaves=512), "rejected"))
    assert outcome.status == "rejected" and "weight is nan" in outcome.text and "recursion" not in outcome.text

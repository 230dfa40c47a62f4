"""torch.compile with the patch: ComfyUI's own TorchCompileModel node on the tiny FLUX (CPU), then Apply
Omni-Attribute or the Flow Blend Guider; compiled runs give the eager output and the patch adds no graph
break to the unpatched model's (none).

Backend: ``aot_eager`` (Dynamo's graph capture and AOTAutograd, no code generation): it tests exactly what
the patch can break — tracing, guards, graph breaks, recompiles — in seconds. ``inductor`` also works
here (same graphs, outputs within 3e-4 of eager) but takes minutes on a 2-core CPU.

ComfyUI's CPU mode picks its sub-quadratic attention, which asks psutil for free memory inside the
forward and so breaks every graph of the unpatched model too; the tests use ComfyUI's PyTorch attention
(what it picks on a GPU), so that "no graph break" is a statement about the patch.
"""

from __future__ import annotations

import pytest
import torch

from devtools.comfy_flux import build_comfy_flux
from omni_attribute import ip_adapter
from omni_attribute.flux_models import FluxLayout
from omni_attribute.injection import AttributeCondition, Injection, SigmaWindow

BACKEND = "aot_eager"


@pytest.fixture(scope="module")
def setup(plugin_nodes):
    import comfy.model_patcher

    layout = FluxLayout.tiny()
    model = comfy.model_patcher.ModelPatcher(build_comfy_flux(layout, seed=0), load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    torch.manual_seed(5)
    ip = ip_adapter.IPAdapter(ip_adapter.IPAdapterConfig.for_layout(layout, "all", "all"))
    with torch.no_grad():
        for name, param in ip.named_parameters():
            if "to_v" in name:
                param.normal_(0, 0.15)
    g = torch.Generator().manual_seed(2)

    def conditioning():
        return [[torch.randn(1, 5, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}]]

    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    return {"nodes": plugin_nodes, "model": model, "ip": ip, "positive": conditioning(), "empty": conditioning(),
            "noise": torch.randn(1, 16, 8, 8, generator=g), "tokens": torch.randn(1, 4, 64, generator=g), "mask": mask}


@pytest.fixture
def dynamo(monkeypatch):
    """ComfyUI's PyTorch attention, a clean Dynamo before and after, and its counters."""
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.modules.attention as attention
    import torch._dynamo

    monkeypatch.setattr(flux_math, "optimized_attention", attention.attention_pytorch)
    torch._dynamo.reset()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def compiled(model):
    """The MODEL as ComfyUI's TorchCompileModel node returns it."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    return TorchCompileModel.execute(model, BACKEND).result[0]


def run(guider, setup, steps=4):
    import comfy.samplers

    with torch.no_grad():
        return guider.sample(setup["noise"], torch.zeros_like(setup["noise"]), comfy.samplers.ksampler("euler"),
                             torch.linspace(1.0, 0.0, steps + 1), seed=0, disable_pbar=True)


def cfg(model, setup):
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(setup["positive"], setup["empty"])
    guider.set_cfg(3.0)
    return guider


def blend(model, setup, mode="exact"):
    conditions = [AttributeCondition(setup["tokens"], 0.7),
                  AttributeCondition(setup["tokens"] * 0.5, 1.2, start_percent=0.3, end_percent=0.8)]
    guider = setup["nodes"].flow_blend.FlowBlendGuider(model, setup["ip"], conditions, 1.0, mode)
    guider.set_conds(setup["positive"], setup["empty"])
    return guider


def compile_counts(counters, fn):
    """Run ``fn`` and return (its result, graph breaks, graphs compiled) during it."""
    counters.clear()
    out = fn()
    return out, sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def test_compiled_apply_and_guider_match_eager_without_graph_breaks(setup, dynamo):
    model = setup["model"]
    plain_eager = run(cfg(model, setup), setup)
    plain, plain_breaks, plain_graphs = compile_counts(dynamo, lambda: run(cfg(compiled(model), setup), setup))
    assert torch.allclose(plain, plain_eager, atol=1e-5)
    assert plain_breaks == 0 and plain_graphs == 1  # the reference: ComfyUI's FLUX compiles as one graph

    # Apply (a sigma window decided on the device, a MASK) after TorchCompileModel, as a workflow chains them
    injection = Injection(ip=setup["ip"], condition=AttributeCondition(setup["tokens"], 0.8),
                          window=SigmaWindow(0.8, 0.3), mask=setup["mask"])
    patched = setup["nodes"].apply.apply_injection(model, injection)
    eager = run(cfg(patched, setup), setup)
    assert (eager - plain_eager).abs().max() > 1e-3  # the patch acts
    applied = setup["nodes"].apply.apply_injection(compiled(model), injection)
    out, breaks, graphs = compile_counts(dynamo, lambda: run(cfg(applied, setup), setup))
    assert torch.allclose(out, eager, atol=1e-5), (out - eager).abs().max()
    assert breaks == plain_breaks and graphs == plain_graphs  # no break, one graph for every step of the run
    _, _, again = compile_counts(dynamo, lambda: run(cfg(applied, setup), setup))
    assert again == 0  # a second run reuses the compiled graph: nothing per run lands in its guards

    # the guider on a compiled MODEL (batch sizes 3 and 4 while the second attribute drops in and out)
    guider_eager = run(blend(model, setup), setup)
    guider = blend(compiled(model), setup)
    out, breaks, _ = compile_counts(dynamo, lambda: run(guider, setup))
    assert torch.allclose(out, guider_eager, atol=1e-5), (out - guider_eager).abs().max()
    assert breaks == plain_breaks
    _, _, again = compile_counts(dynamo, lambda: run(guider, setup))
    assert again == 0

"""The IP patch and the guider over whole sampling runs (ComfyUI's real sampler, the tiny FLUX): what does
not change during a run is built once (plans, every block's K/V of the attribute tokens), no step reads
a device tensor on the host, the caches follow new embeds / layouts / weights and are empty after a run."""

from __future__ import annotations

import collections
import gc
import traceback
import uuid
import weakref

import pytest
import torch

from devtools.comfy_flux import build_comfy_flux, comfy_flux_forward
from omni_attribute import injection, ip_adapter
from omni_attribute.flux_models import FluxLayout
from omni_attribute.injection import AttributeCondition, Injection, SigmaWindow

HOST_READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")
STEPS = 6


@pytest.fixture(scope="module")
def nodes(plugin_nodes):
    return plugin_nodes


@pytest.fixture(scope="module")
def setup(comfy_in_process):
    import comfy.model_patcher

    layout = FluxLayout.tiny()
    model = comfy.model_patcher.ModelPatcher(build_comfy_flux(layout, seed=0), load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    torch.manual_seed(11)
    ip = ip_adapter.IPAdapter(ip_adapter.IPAdapterConfig.for_layout(layout, "all", "all"))
    with torch.no_grad():
        for name, param in ip.named_parameters():
            if "to_v" in name:
                param.normal_(0, 0.2)
    g = torch.Generator().manual_seed(2)

    def conditioning():
        return [[torch.randn(1, 5, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}]]

    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    return {"model": model, "ip": ip, "positive": conditioning(), "empty": conditioning(),
            "tokens": [torch.randn(1, 4, 64, generator=g), torch.randn(2, 4, 64, generator=g)],
            "noise": torch.randn(1, 16, 8, 8, generator=g), "mask": mask, "blocks": len(list(ip.double_blocks)) +
            len(list(ip.single_blocks))}


class HostReads:
    """Records every read of a tensor's value on the host (``.item()``, ``float(t)``, ``if t:`` …) while
    active: on a GPU each is a synchronisation; on this CPU the trap is how to see them."""

    def __init__(self):
        self.seen: collections.Counter = collections.Counter()
        self._saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def _trap(self, name):
        original = self._saved[name]

        def read(tensor, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            self.seen[f"{name} at {caller.filename}:{caller.lineno}"] += 1
            return original(tensor, *args, **kwargs)
        return read

    def __enter__(self):
        for name in HOST_READS:
            setattr(torch.Tensor, name, self._trap(name))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def watch_steps(guider, reads: HostReads, rows: list[int] | None = None):
    """Host reads are recorded inside each of the guider's predictions (the whole step: ComfyUI's
    condition batching, the diffusion model with the patch, the guider's own blend), not in the sampler's
    own loop; ``rows`` collects the batch size of every diffusion-model call."""
    predict = guider.predict_noise

    def watched(*args, **kwargs):
        with reads:
            return predict(*args, **kwargs)
    guider.predict_noise = watched
    if rows is not None:
        diffusion_model = guider.model_patcher.model.diffusion_model
        hook = diffusion_model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
        return hook
    return None


def sample(guider, setup, steps=STEPS, sampler_name="euler", callback=None):
    import comfy.samplers

    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        return guider.sample(setup["noise"], torch.zeros_like(setup["noise"]), comfy.samplers.ksampler(sampler_name),
                             sigmas, seed=0, disable_pbar=True, callback=callback)


def cfg_guider(model, setup, cfg=3.0):
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(setup["positive"], setup["empty"])
    guider.set_cfg(cfg)
    return guider


@pytest.fixture
def kv_projections(monkeypatch):
    """Counts K/V projections of attribute tokens (IPBlock.keys_values calls)."""
    calls = []
    original = ip_adapter.IPBlock.keys_values

    def counted(self, tokens, like):
        calls.append(tokens.shape)
        return original(self, tokens, like)
    monkeypatch.setattr(ip_adapter.IPBlock, "keys_values", counted)
    return calls


def test_apply_builds_once_per_run_and_never_reads_the_host(nodes, setup, kv_projections):
    """Apply with a sigma window (its steps decided on the device) and a MASK, both conditions in one
    batch, six steps: one plan and one K/V projection per IP block for the whole run, no host read in
    any step, and the cache empty after the run."""
    inj = Injection(ip=setup["ip"], condition=AttributeCondition(setup["tokens"][1], 0.8),
                    window=SigmaWindow(0.8, 0.3), mask=setup["mask"])
    patched = nodes.apply.apply_injection(setup["model"], inj)
    plain_reads, reads = HostReads(), HostReads()
    plain_guider = cfg_guider(setup["model"], setup)
    watch_steps(plain_guider, plain_reads)
    plain = sample(plain_guider, setup)
    assert not plain_reads.seen  # the control: ComfyUI's own step (unpatched) reads nothing on the host
    rows: list[int] = []
    guider = cfg_guider(patched, setup)
    hook = watch_steps(guider, reads, rows)
    try:
        out = sample(guider, setup)
    finally:
        hook.remove()
    assert len(rows) == STEPS and set(rows) == {2}  # both conditions in one forward pass per step
    assert inj.cache.builds == 1
    assert len(kv_projections) == setup["blocks"]
    assert not reads.seen, f"host reads in a step: {dict(reads.seen)}"
    assert len(inj.cache) == 0  # released when the run ended
    # the window acted: the run differs from the unpatched model's and from the same patch without a window
    always = nodes.apply.apply_injection(setup["model"], Injection(
        ip=setup["ip"], condition=AttributeCondition(setup["tokens"][1], 0.8), mask=setup["mask"]))
    assert (out - plain).abs().max() > 1e-4
    assert (out - sample(cfg_guider(always, setup), setup)).abs().max() > 1e-4
    # a second run builds again (the cache does not outlive a run)
    sample(cfg_guider(patched, setup), setup)
    assert inj.cache.builds == 2 and len(inj.cache) == 0


def test_window_on_the_device_equals_the_reference_plan(nodes, setup):
    """Direct calls at sigmas inside and outside the window: the device-side factor gives exactly what the
    per-call reference plan (a host decision per sigma) gives."""
    model = setup["model"]
    inj = Injection(ip=setup["ip"], condition=AttributeCondition(setup["tokens"][0], 0.9), window=SigmaWindow(0.6, 0.3))
    patched = nodes.apply.apply_injection(model, inj)
    g = torch.Generator().manual_seed(4)
    x, context, y = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g), torch.randn(2, 32, generator=g)

    def call(m, sigma):
        options = dict(m.model_options.get("transformer_options", {}))
        options.update(wrappers=m.wrappers, cond_or_uncond=[0, 1], uuids=[uuid.uuid4(), uuid.uuid4()],
                       sigmas=torch.full((2,), sigma))
        with torch.no_grad():
            return comfy_flux_forward(m.model, x, torch.full((2,), sigma), context, y, torch.full((2,), 3.5),
                                      transformer_options=options)

    for sigma in (0.9, 0.6, 0.45, 0.3, 0.1):
        inside = inj.window.contains(sigma)
        reference = (nodes.apply.apply_injection(model, Injection(ip=setup["ip"], condition=AttributeCondition(
            setup["tokens"][0], 0.9))) if inside else model)
        assert torch.equal(call(patched, sigma), call(reference, sigma)), sigma


def test_guider_builds_once_per_layout_and_never_reads_the_host(nodes, setup, kv_projections):
    """Exact mode, N = 2 with one attribute limited to the middle of the run: two batch layouts (4 rows
    while both act, 3 otherwise), each planned once with its K/V; no host read in any step."""
    conditions = [AttributeCondition(setup["tokens"][0], 0.7),
                  AttributeCondition(setup["tokens"][1], 1.3, start_percent=0.3, end_percent=0.7)]
    guider = nodes.flow_blend.FlowBlendGuider(setup["model"], setup["ip"], conditions, 1.0, "exact")
    guider.set_conds(setup["positive"], setup["empty"])
    inj = guider.injection
    reads, rows = HostReads(), []
    seen_steps = []
    hook = watch_steps(guider, reads, rows)
    try:
        sample(guider, setup, callback=lambda i, denoised, x, total: seen_steps.append(i))
    finally:
        hook.remove()
    assert seen_steps == list(range(STEPS))  # the user's callback still runs
    assert set(rows) == {3, 4} and len(rows) == STEPS
    assert inj.cache.builds == 2
    assert len(kv_projections) == 2 * setup["blocks"]
    assert not reads.seen, f"host reads in a step: {dict(reads.seen)}"
    assert len(inj.cache) == 0 and guider.clock is None


def test_caches_follow_new_tokens_layouts_and_weights(nodes, setup):
    """One patched model, direct calls: tokens changed in place, another batch layout, IP weights
    changed in place — each gives what a freshly built patch gives."""
    model = setup["model"]
    tokens = setup["tokens"][0].clone()
    ip = ip_adapter.IPAdapter(setup["ip"].config)
    ip.load_state_dict(setup["ip"].state_dict())
    inj = Injection(ip=ip, condition=AttributeCondition(tokens, 0.8))
    patched = nodes.apply.apply_injection(model, inj)
    g = torch.Generator().manual_seed(6)
    x, context, y = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g), torch.randn(2, 32, generator=g)

    def call(m, kinds):
        options = dict(m.model_options.get("transformer_options", {}))
        options.update(wrappers=m.wrappers, cond_or_uncond=list(kinds), uuids=[uuid.uuid4() for _ in kinds],
                       sigmas=torch.full((2,), 0.5))
        with torch.no_grad():
            return comfy_flux_forward(m.model, x, torch.full((2,), 0.5), context, y, torch.full((2,), 3.5),
                                      transformer_options=options)

    def fresh(kinds):
        copy = ip_adapter.IPAdapter(ip.config)
        copy.load_state_dict(ip.state_dict())
        return call(nodes.apply.apply_injection(model, Injection(ip=copy, condition=AttributeCondition(
            tokens.clone(), 0.8))), kinds)

    first = call(patched, (0,))
    assert torch.equal(first, fresh((0,)))
    assert torch.equal(call(patched, (0, 1)), fresh((0, 1)))  # another layout: its own plan
    assert inj.cache.builds == 2
    with torch.no_grad():
        tokens.mul_(-1.0)  # new embeds in the same tensor
    changed = call(patched, (0,))
    assert (changed - first).abs().max() > 1e-3 and torch.equal(changed, fresh((0,)))
    with torch.no_grad():
        ip.double_blocks["0"].to_v.weight.mul_(2.0)  # weights reloaded in place
    assert torch.equal(call(patched, (0,)), fresh((0,)))
    assert inj.cache.builds == 4


def test_nothing_outlives_the_patched_model(nodes, setup):
    """After a run, dropping the patched MODEL and its guider frees the injection (no registry, no cycle
    kept alive by the caches)."""
    inj = Injection(ip=setup["ip"], condition=AttributeCondition(setup["tokens"][0], 0.8))
    patched = nodes.apply.apply_injection(setup["model"], inj)
    guider = cfg_guider(patched, setup)
    sample(guider, setup, steps=2)
    alive = weakref.ref(inj)
    del inj, patched, guider
    gc.collect()
    assert alive() is None


def test_reuse_mode_evaluates_attributes_every_second_step(nodes, setup):
    """'reuse Δ every 2 steps': N = 2 at s_T = 1 costs 4 rows on refresh steps and 1 row in between; the
    first step is the exact rule bit for bit; the run stays close to exact mode."""
    conditions = [AttributeCondition(setup["tokens"][0], 0.7), AttributeCondition(setup["tokens"][1], 1.3)]
    results, rows = {}, {}
    for mode in ("exact", nodes.flow_blend.MODES[2]):
        guider = nodes.flow_blend.FlowBlendGuider(setup["model"], setup["ip"], conditions, 1.0, mode)
        guider.set_conds(setup["positive"], setup["empty"])
        rows[mode], reads = [], HostReads()
        hook = watch_steps(guider, reads, rows[mode])
        try:
            results[mode] = sample(guider, setup)
            one_step = sample(guider, setup, steps=1)
        finally:
            hook.remove()
        results[mode + " one step"] = one_step
        assert not reads.seen, f"host reads in a step: {dict(reads.seen)}"
        assert not guider.reuse.held  # released after the run
    reuse = nodes.flow_blend.MODES[2]
    assert rows["exact"] == [4] * (STEPS + 1)
    assert rows[reuse] == [4, 1] * (STEPS // 2) + [4]
    assert torch.equal(results[reuse + " one step"], results["exact one step"])
    deviation = (results[reuse] - results["exact"]).abs().max()
    assert 0 < deviation < 0.5 * (results["exact"].abs().max())

"""Training with two CPU processes (gloo): checkpoints hold the full state, and a killed run resumes exactly.

- DDP, the real launcher: ``accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m
  omni_attribute.train.cli ...``; the launcher and its ranks are SIGKILLed once a checkpoint exists,
  the run is started again, and its adapter must equal (bit for bit) an uninterrupted 2-process run's.
- FSDP (accelerate runs FSDP on GPUs only, so this one wraps the tiny model with torch's FSDP itself, on CPU,
  under torchrun): the checkpoint helpers of the trainer gather every rank's shards into full tensors,
  restore them into a fresh sharded model, and training continues bit-identically.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "train_tiny.yaml"
LAUNCH_CONFIG = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
# ACCELERATE_USE_CPU keeps the processes on the CPU (gloo) even on a machine with GPUs.
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def launch(out: Path, pairs: Path, backbone: Path, *more: str) -> list[str]:
    overrides = [f"output_dir={out}", f"data.pairs={pairs}", f"data.validation_pairs={pairs}", f"backbone.path={backbone}",
                 "optim.max_steps=6", "runtime.checkpoint_every=2", "runtime.validate_every=0", "runtime.log_every=1",
                 *more]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIG),
            "-m", "omni_attribute.train.cli", "--config", str(TINY), "--quiet",
            *[arg for value in overrides for arg in ("--set", value)]]


def kill_launch(process: subprocess.Popen) -> list:
    """SIGKILL the launcher's process group and the ranks: torchrun starts each rank in a session of its own,
    so killing the launcher's group alone would leave them training. Returns the ranks still alive after 30 s."""
    import psutil

    try:
        ranks = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        ranks = []
    groups = {process.pid}
    for rank in ranks:
        try:
            groups.add(os.getpgid(rank.pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return psutil.wait_procs(ranks, timeout=30)[1]


def run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    process = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # e.g. ranks that disagree wait for each other for ever
        kill_launch(process)
        stdout, stderr = process.communicate()
        stderr += f"\n[test] killed after {timeout} s"
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def test_two_process_run_killed_and_resumed_ends_like_an_uninterrupted_one(tmp_path, tiny_pairs, tiny_backbone):
    import torch
    from safetensors.torch import load_file

    whole = run(launch(tmp_path / "whole", tiny_pairs, tiny_backbone))
    assert whole.returncode == 0, whole.stderr[-4000:]
    # two ranks really ran: each printed its own line, and the run records its world size
    assert whole.stdout.count("[train] adapter written to") == 2, whole.stdout
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    final = tmp_path / "whole" / "checkpoints" / "step-0000006"
    assert json.loads((final / "state.json").read_text())["world_size"] == 2
    # the checkpoint is the full state: every trainable tensor, with its AdamW moments under the same name
    params = load_file(str(final / "trainable.safetensors"))
    optimizer = torch.load(final / "optimizer.pt", weights_only=True)
    assert set(optimizer["state"]) == set(params) and len(params) > 10
    assert all(optimizer["state"][k]["exp_avg"].shape == v.shape for k, v in params.items())

    # the same run, SIGKILLed (launcher and ranks) as soon as a checkpoint exists. crash_after_step=5
    # only fences the race: should the kill come late, the ranks kill themselves, still before step 6
    killed_out = tmp_path / "killed"
    process = subprocess.Popen(launch(killed_out, tiny_pairs, tiny_backbone, "runtime.crash_after_step=5"), cwd=REPO,
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    pointer = killed_out / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not pointer.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    if process.poll() is None:
        assert kill_launch(process) == []
    log = process.communicate(timeout=60)[0].decode(errors="replace")
    assert process.returncode != 0, log[-4000:]
    assert pointer.read_text() in ("step-0000002", "step-0000004"), log[-4000:]
    if process.returncode != -signal.SIGKILL:
        print("the kill came after step 5; the ranks' own crash_after_step ended the run")
    assert not (killed_out / "adapter.safetensors").exists()
    (killed_out / "checkpoints" / ".tmp-step-0000006-999").mkdir()  # a write that died half-way is ignored

    resumed = run(launch(killed_out, tiny_pairs, tiny_backbone))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.stderr.count("resumed from") == 2, resumed.stderr[-4000:]  # both ranks restored the checkpoint
    a = load_file(str(tmp_path / "whole" / "adapter.safetensors"))
    b = load_file(str(killed_out / "adapter.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    c = load_file(str(killed_out / "checkpoints" / "step-0000006" / "trainable.safetensors"))
    assert all(torch.equal(params[k], c[k]) for k in params)
    earlier = load_file(str(tmp_path / "whole" / "checkpoints" / "step-0000004" / "trainable.safetensors"))
    assert any(not torch.equal(params[k], earlier[k]) for k in params)  # the weights do move between checkpoints


def test_fsdp_checkpoint_gathers_the_shards_and_resumes_exactly(tmp_path, tiny_pairs, tiny_backbone):
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  str(Path(__file__)), "fsdp-worker", str(tmp_path), str(tiny_pairs), str(tiny_backbone)])
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert result.stdout.count("fsdp worker ok") == 2, result.stdout


# ---- the FSDP worker (run by torchrun, one per rank) -----------------------------------------------------------

def fsdp_worker(tmp: Path, pairs: Path, backbone: Path) -> None:
    import functools

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from omni_attribute.adapter_file import load_adapter
    from omni_attribute.train.config import load_config
    from omni_attribute.train.data import PairDataset, collate
    from omni_attribute.train.trainer import (batch_indices, build_model, export_adapter, gather_training_state,
                                              preflight, restore_checkpoint, write_checkpoint)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = load_config(TINY, [f"output_dir={tmp / 'fsdp'}", f"data.pairs={pairs}", f"backbone.path={backbone}"])
    records, info = preflight(config)
    dataset = PairDataset(records, config.data.image_size)

    def wrapped_model():
        model = build_model(config, info)  # the same seed on every rank: the same initial weights
        layers = {type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
        fsdp = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy(layers))
        optimizer = torch.optim.AdamW([p for p in fsdp.parameters() if p.requires_grad], lr=config.optim.lr,
                                      weight_decay=config.optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(min, 1.0))
        return fsdp, optimizer, scheduler

    def train_step(model, optimizer, scheduler, micro: int) -> None:
        batch = collate([dataset[i] for i in batch_indices(len(records), 2, world, rank, micro, config.seed)])
        model(batch, (config.seed * 1_000_003 + micro) * 97 + rank)["loss"].backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    def assert_same(x, y, where: str) -> None:
        if isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for key in x:
                assert_same(x[key], y[key], f"{where}.{key}")
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), where
        elif isinstance(x, list):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                assert_same(u, v, f"{where}[{i}]")
        else:
            assert x == y, where

    model, optimizer, scheduler = wrapped_model()
    local = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sizes = torch.tensor([sum(p.numel() for p in local.values())])
    dist.all_reduce(sizes)
    full_size = sum(p.numel() for p in build_model(config, info).parameters() if p.requires_grad)
    assert int(sizes) == full_size and sum(p.numel() for p in local.values()) < full_size  # really sharded
    for micro in range(2):
        train_step(model, optimizer, scheduler, micro)

    params, optim_state = gather_training_state(model, optimizer)
    with FSDP.summon_full_params(model, writeback=False):  # torch's own gather, to compare with
        reference = {name.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                     for name, p in model.named_parameters() if p.requires_grad}
    folder = tmp / "fsdp" / "checkpoints" / "step-0000002"
    if rank == 0:
        assert_same(params, reference, "gathered parameters")
        assert set(optim_state["state"]) == set(params)
        assert all(optim_state["state"][k]["exp_avg"].shape == v.shape for k, v in params.items())
        folder = write_checkpoint(config, params, optim_state, scheduler.state_dict(),
                                  {"global_step": 2, "micro_index": 2, "world_size": world})
    else:
        assert params == {}  # the parameters are gathered onto the main process only
    dist.barrier()

    fresh, fresh_optimizer, fresh_scheduler = wrapped_model()
    restore_checkpoint(folder, fresh, fresh_optimizer, fresh_scheduler)
    again, again_optim = gather_training_state(fresh, fresh_optimizer)
    if rank == 0:
        assert_same(again, params, "restored parameters")
        assert_same(again_optim, optim_state, "restored optimizer state")
    train_step(model, optimizer, scheduler, 2)  # one more step on the original and on the restored model
    train_step(fresh, fresh_optimizer, fresh_scheduler, 2)
    ahead, ahead_optim = gather_training_state(model, optimizer)
    resumed, resumed_optim = gather_training_state(fresh, fresh_optimizer)
    if rank == 0:
        assert any(not torch.equal(ahead[k], params[k]) for k in params)
        assert_same(resumed, ahead, "parameters one step after the restore")
        assert_same(resumed_optim, ahead_optim, "optimizer state one step after the restore")
        export_adapter(fresh.module, tmp / "fsdp" / "adapter.safetensors", {}, resumed)
        adapter = load_adapter(tmp / "fsdp" / "adapter.safetensors")
        lora = adapter.section("lora")
        assert lora and all(v.numel() > 0 for v in lora.values())
        assert all("_fsdp_wrapped_module" not in k for k in lora)
        assert torch.equal(adapter.section("connector")["output.weight"], resumed["encoder.connector.output.weight"])
    dist.barrier()
    print(f"fsdp worker ok (rank {rank} of {world})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["fsdp-worker"]:
    fsdp_worker(*(Path(a) for a in sys.argv[2:5]))

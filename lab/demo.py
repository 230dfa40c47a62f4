"""The main job: the tiny attribute world end to end, with the generation done by a real ComfyUI server.

    python -m lab.demo [--out DIR] [--work DIR] [--size ci|full]

1. Makes the tiny world (or reuses it: every stage is cached under --work): the world data and the judge,
   the tiny Qwen2.5-VL backbone, the tiny FLUX generator and the four encoders of the benchmark — at CI
   size these three come from the committed weights in ``lab/weights`` (hash-checked) — and evaluates them
   (the benchmark table, ``lab.world.pipeline``).
2. Lays the trained files out as ComfyUI model folders, starts ComfyUI with the plugin and runs the
   laboratory workflow ``lab/workflows/tiny_world_compose.api.json`` headlessly (``omni_attribute.headless``) on
   held-out cases: the object colour from one reference, the background from a second, the rest from
   the prompt; each case also once with the attribute weights at 0 (text only), for comparison.
3. Reads every output back with the world's judge and writes ``tiny_world_grid.png`` (references,
   attributes, outputs) and ``tiny_world_cases.json`` into --out, then prints the benchmark table.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from devtools.comfy_host import LAB_NODES, REPO, ComfyServer
from omni_attribute.headless import ComfyClient, load_workflow, run_workflow, set_inputs
from omni_attribute.images import pil_to_tensor

from .world.factors import caption_without, sample_assignment
from .world.judge import load_judge
from .world.pipeline import ATTRIBUTE_SCALE, OMNI, render_table, run_benchmark
from .world.render import render

WORKFLOW = REPO / "lab" / "workflows" / "tiny_world_compose.api.json"
BACKBONE, GENERATOR, ADAPTER = "tiny-world-qwen25vl", "tiny-world", "tiny-world.safetensors"
ASKED = ("color", "background")          # what the workflow's two Encode nodes ask for (held-out phrasings)
CELL = 128


def install_models(models, base: Path) -> None:
    """Copy the trained files into the ComfyUI base folder's model folders (replacing older copies)."""
    for source, target in ((models.backbone, base / "models" / "omni_attribute_backbones" / BACKBONE),
                           (models.generator, base / "models" / "omni_attribute_world" / GENERATOR)):
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)
    adapters = base / "models" / "omni_attribute"
    adapters.mkdir(parents=True, exist_ok=True)
    shutil.copy(models.adapters[OMNI], adapters / ADAPTER)


def make_cases(count: int, seed: int, folder: Path) -> list[dict]:
    """Held-out cases: two references and a target whose caption leaves colour and background out."""
    rng = random.Random(10_000 + seed)
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(count):
        refs = [sample_assignment(rng) for _ in ASKED]
        target = sample_assignment(rng)
        paths = []
        for j, ref in enumerate(refs):
            path = folder / f"case{i}_reference{j + 1}.png"
            render(ref).save(path)
            paths.append(path)
        cases.append({"references": refs, "paths": paths, "target": target,
                      "prompt": caption_without(target, set(ASKED))})
    return cases


def read_back(path: Path) -> torch.Tensor:
    """A saved output (32 px shown ×4) back to a [3,32,32] world image."""
    with Image.open(path) as image:
        return pil_to_tensor(image.convert("RGB").resize((32, 32), Image.BOX))


def draw_grid(cases: list[dict], out: Path) -> Path:
    header = ["reference 1", "reference 2", "text only", "Omni-Attribute"]
    width, top, label = CELL * len(header), 20, 44
    grid = Image.new("RGB", (width, top + len(cases) * (CELL + label)), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(header):
        draw.text((c * CELL + 4, 4), title, fill="black")
    for r, case in enumerate(cases):
        y = top + r * (CELL + label)
        cells = [Image.open(p).convert("RGB").resize((CELL, CELL), Image.NEAREST) for p in case["paths"]]
        cells += [Image.open(case[k]).convert("RGB").resize((CELL, CELL), Image.NEAREST) for k in ("text_only", "omni")]
        for c, cell in enumerate(cells):
            grid.paste(cell, (c * CELL, y))
        text, omni = case["judged_text_only"], case["judged_omni"]
        lines = [f"asked: colour of ref 1 ({case['references'][0]['color']}), background of ref 2 "
                 f"({case['references'][1]['background']})",
                 f"prompt: {case['prompt']}",
                 f"judge reads: text only {text['color']} / {text['background']}; "
                 f"Omni-Attribute {omni['color']} / {omni['background']}"]
        for k, text in enumerate(lines):
            draw.text((4, y + CELL + 2 + 13 * k), text, fill="black")
    path = out / "tiny_world_grid.png"
    grid.save(path)
    return path


def transferred(cases: list[dict], key: str, factors: tuple[str, ...]) -> int:
    """How many cases' ``key`` output ("omni" or "text_only") the judge reads with every one of ``factors``
    taken from its reference (the colour from reference 1, the background from reference 2)."""
    return sum(all(case[f"judged_{key}"][f] == case["references"][ASKED.index(f)][f] for f in factors)
               for case in cases)


def run_cases(server_url: str, cases: list[dict], out: Path) -> None:
    client = ComfyClient(server_url, timeout=600)
    workflow = load_workflow(WORKFLOW)
    for i, case in enumerate(cases):
        for key, weight in (("omni", ATTRIBUTE_SCALE), ("text_only", 0.0)):
            prompt = set_inputs(json.loads(json.dumps(workflow)), {
                "2.image": str(case["paths"][0]), "3.image": str(case["paths"][1]), "4.backbone": BACKBONE,
                "4.adapter": ADAPTER, "1.generator": GENERATOR, "11.adapter": ADAPTER, "9.text": case["prompt"],
                "7.weight": weight, "8.weight": weight, "12.noise_seed": i, "18.filename_prefix": f"case{i}_{key}"})
            (saved,) = run_workflow(client, prompt, out / "outputs")
            case[key] = saved
            print(f"[demo] case {i} {key}: {saved.name}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "demo-output", help="output folder")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "tiny-world-ci",
                        help="where the trained world is cached (reused by later runs)")
    parser.add_argument("--size", choices=["ci", "full"], default="ci",
                        help="ci: about 8 minutes on 2 cores the first time (committed weights), then cached; "
                             "full: a larger world, trained from scratch (about 40 minutes)")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    print(f"[demo] step 1/3: the tiny world ({args.size} size, cached in {args.work})", flush=True)
    models, report = run_benchmark(args.size, args.work, args.seed, log=lambda m: print(m, flush=True))

    print("[demo] step 2/3: ComfyUI runs lab/workflows/tiny_world_compose.api.json", flush=True)
    base = out / "comfy-base"
    install_models(models, base)
    cases = make_cases(args.cases, args.seed, out / "references")
    with ComfyServer(base, custom_nodes=LAB_NODES) as server:
        print(f"[demo] ComfyUI at {server.url} (log: {server.log_path})", flush=True)
        run_cases(server.url, cases, out)

    print("[demo] step 3/3: the judge reads the outputs", flush=True)
    judge = load_judge(models.judge)
    for key in ("omni", "text_only"):
        for case, seen in zip(cases, judge.predict(torch.stack([read_back(c[key]) for c in cases]))):
            case[f"judged_{key}"] = seen
    grid = draw_grid(cases, out)
    summary = []
    for case in cases:
        row = {"prompt": case["prompt"], "references": [r.as_dict() for r in case["references"]],
               "target": case["target"].as_dict(), "omni": case["judged_omni"], "text_only": case["judged_text_only"]}
        summary.append(row)
    (out / "tiny_world_cases.json").write_text(json.dumps(summary, indent=2))
    print(f"\n[demo] grid: {grid}")
    n = len(cases)
    for factor in ASKED:
        print(f"[demo] {factor} of reference {ASKED.index(factor) + 1} transferred (judge): Omni-Attribute "
              f"{transferred(cases, 'omni', (factor,))}/{n}, text only {transferred(cases, 'text_only', (factor,))}/{n}")
    print(f"[demo] both asked attributes transferred (judge): Omni-Attribute {transferred(cases, 'omni', ASKED)}/{n}, "
          f"text only {transferred(cases, 'text_only', ASKED)}/{n}")
    print(f"\n{render_table(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""omni-attribute-train: train an Omni-Attribute adapter (LoRA + connector + IP-Adapter).

    omni-attribute-train --config configs/train_tiny.yaml
    omni-attribute-train --config configs/train_flux_dev_qwen7b.yaml --set optim.lr=5e-5 --set runtime.mixed_precision=bf16
    accelerate launch --config_file configs/accelerate/ddp_8gpu.yaml -m omni_attribute.train.cli --config ...

The run writes into output_dir: config.json, metrics.jsonl (loss, Lgen, Lcon, lr, skipped samples;
Δ(pos,neg) on validation pairs), checkpoints/step-N (atomic; the newest is resumed automatically),
and adapter.safetensors, which the ComfyUI nodes load as it is (copy it into models/omni_attribute/).
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import OmniAttributeError
from .config import dump_config, load_config


def config_keys_help() -> str:
    """Every config key with its default, generated from the config dataclasses."""

    from .config import TrainConfig

    from ..config_files import config_keys

    return "\n".join(["config keys (section.key = default):", *config_keys(TrainConfig())])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-attribute-train", description=__doc__, epilog=config_keys_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config (YAML or JSON); paths in it are relative to its folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (parsed as YAML), e.g. optim.max_steps=500; repeatable")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from scratch even if output_dir holds a checkpoint (default: resume from the newest)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, the pair files, the images and the backbone/adapter sizes, then stop "
                             "(nothing is loaded onto a device)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and stop")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(config))
            return 0
        from .trainer import preflight, train

        records, backbone = preflight(config)
        print(f"[train] {len(records)} pairs, backbone {backbone['name']} (hidden {backbone['hidden_size']}, "
              f"{backbone['num_hidden_layers']} layers), generator {config.generator.kind}", flush=True)
        if args.dry_run:
            print("[train] dry run: configuration, data and sizes are consistent")
            return 0
        path = train(config, resume=not args.no_resume, progress=not args.quiet)
    except (OmniAttributeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[train] adapter written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m fpt_fast.info`: versions, the native extension's state, and which backend runs which
op on each device here (and why not).

`python -m fpt_fast.info --backbone NAME --image-size H W [--batch B] [--backbone-kwargs YAML]
[--device cuda]`: what a backbone costs before anything runs (width, heads, head size, patch,
prefix tokens, N and n per preset, kernel paths, feature-store bytes per image, an estimate of the
frozen forward's peak memory). Both: fpt_fast.app.environment_report."""
import argparse
import sys

import yaml

from .app.environment_report import backbone_report, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fpt_fast.info", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", help="a backbone as model.backbone takes it (timm name, hf-hub:, local-dir:)")
    parser.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), help="frozen-branch input size")
    parser.add_argument("--batch", type=int, help="images per frozen forward (memory estimate; default 1)")
    parser.add_argument("--backbone-kwargs", metavar="YAML",
                        help="model.backbone_kwargs as a YAML mapping, e.g. '{mlp_layer: SwiGLUPacked}'")
    parser.add_argument("--device", help="device type of the kernel paths (default: cuda when present, else cpu)")
    args = parser.parse_args(argv)
    if args.backbone is None:
        # These describe a backbone: without one they would be ignored, so they are refused.
        for flag in ("image_size", "batch", "backbone_kwargs", "device"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag.replace('_', '-')} needs --backbone")
        print(report())
        return 0
    if args.image_size is None:
        parser.error("--backbone needs --image-size H W")
    batch = 1 if args.batch is None else args.batch
    if batch < 1:
        parser.error("--batch must be >= 1")
    try:
        kwargs = yaml.safe_load(args.backbone_kwargs or "{}") or {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"--backbone-kwargs {args.backbone_kwargs!r} is not a YAML mapping")
        print(backbone_report(args.backbone, args.image_size, batch, kwargs, args.device))
    except (ValueError, yaml.YAMLError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fpt-fast command line: preload, train, evaluate, predict, explain, demo.

    fpt-fast preload  -c run.yaml [--set data.store=/fast/disk/store] [--verify]
    fpt-fast train    -c run.yaml [--set train.lr=1e-4 ...] [--resume | --overwrite]
    fpt-fast evaluate -c run.yaml [--checkpoint runs/x/best.pt] [--split test]
    fpt-fast predict  --checkpoint runs/x/best.pt --images folder/ [--output predictions.csv] [--overwrite]
                      [--explain DIR]
    fpt-fast explain  -c run.yaml --images folder/ or files --out DIR [--checkpoint best.pt] [--layers 10 11]
    fpt-fast demo     [--out fpt_demo]

Settings: see fpt_fast.app.settings (``--print-config`` shows the resolved ones). Bad input ends the
command with exit status 2 and a one-line message naming the file or setting; so do a full disk, a
diverged training run, and a file the command would replace without --overwrite (a run in
train.out_dir, an existing --output).

Several GPUs or nodes: start ``preload`` and ``train`` with torchrun (``torchrun --nproc_per_node=K
-m fpt_fast train ...``); each process finds its place in torchrun's environment variables
(fpt_fast.app.distributed). The other commands run in one process.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from . import distributed
from .settings import Settings, load_settings


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="YAML settings file (sections model, data, preload, train)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting (repeatable), e.g. --set train.lr=1e-4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave unreadable images out (listed at the end) instead of stopping")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fpt-fast", description="Fine-grained Prompt Tuning (FPT / FPT+) "
                                     "for high-resolution medical image classification")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("preload", help="compute the frozen branch's K_sel/V_sel once into a feature store")
    _common(p)
    p.add_argument("--verify", action="store_true", help="check the store afterwards (CRC-32 checksums, values, "
                   "recomputed samples) and measure its read rate")
    p.add_argument("--recompute", type=int, default=4, metavar="N",
                   help="samples per split recomputed by --verify (default 4)")

    p = commands.add_parser("train", help="train the fusion module and side network")
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run in train.out_dir (its checkpoints, "
                   "log and evaluations) instead of refusing to")

    p = commands.add_parser("evaluate", help="metrics and confusion matrix of a checkpoint on a split")
    _common(p)
    p.add_argument("--checkpoint", help="checkpoint file (default: <train.out_dir>/best.pt)")
    p.add_argument("--split", default="test", help="split folder to evaluate (default test)")

    p = commands.add_parser("predict", help="per-image predictions (CSV) for a folder of images")
    _common(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint file (best.pt of a training run)")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--output", default="predictions.csv", help="CSV file to write (default predictions.csv; "
                   "never inside the images folder)")
    p.add_argument("--overwrite", action="store_true", help="replace --output (and --explain outputs) when they exist")
    p.add_argument("--explain", metavar="DIR", help="also write each image's explanation (figure and maps, as "
                   "`explain` does) into DIR")

    p = commands.add_parser("explain", help="what the frozen model looked at: per image, importance heatmaps and "
                            "kept tokens as a PNG figure, and the raw maps as .npy")
    _common(p)
    p.add_argument("--images", required=True, nargs="+", metavar="DIR_OR_FILE",
                   help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="folder for the figures and maps (mirrors the images' paths)")
    p.add_argument("--checkpoint", help="checkpoint file (best.pt of a training run): adds the predicted class "
                   "and its probability to each figure, and its settings are used")
    p.add_argument("--layers", type=int, nargs="+", metavar="BLOCK",
                   help="extracted blocks to draw (default: all of them)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist already")

    p = commands.add_parser("demo", help="synthetic fine-detail task: preload, train, evaluate FPT against "
                            "the side network alone, on the CPU in about a minute")
    p.add_argument("--out", default="fpt_demo", help="working folder (data, store, runs); default fpt_demo")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of training")
    p.add_argument("--print-config", action="store_true", help="print the demo's settings and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _settings(args, base: Optional[dict] = None) -> Settings:
    overrides = list(args.overrides)
    if args.skip_bad_images:
        overrides.append("data.skip_bad_images=true")
    if args.no_progress:
        overrides.append("train.progress=false")
    return load_settings(args.config, overrides, base=base)


def _checkpoint_settings(args, checkpoint_path: str):
    """Settings for a checkpoint: its own, under the config file and --set. The model must stay
    the checkpoint's (an explicit different model setting is an error); "auto" mean/std are its."""
    from .checkpoints import load_checkpoint, with_checkpoint_normalization

    checkpoint = load_checkpoint(checkpoint_path)
    settings = _settings(args, base=checkpoint["settings"])
    stored = Settings.from_tree(checkpoint["settings"])
    num_classes = len(checkpoint["classes"])
    now, then = settings.fpt_config(num_classes).to_dict(), stored.fpt_config(num_classes).to_dict()
    changed = [k for k in now if now[k] != then[k]]
    if changed:
        raise ValueError(f"model settings differ from the checkpoint's ({checkpoint_path}): " + "; ".join(
            f"model.{k}: {then[k]!r} in the checkpoint, {now[k]!r} now" for k in changed))
    return with_checkpoint_normalization(settings.replace("model", **stored.model), checkpoint)


def _print_config(settings: Settings) -> int:
    if _rank() == 0:  # once, not once per torchrun process
        sys.stdout.write(settings.to_yaml())
    return 0


def _rank() -> int:
    env = distributed.torchrun_env()
    return env.rank if env is not None else 0


def _process_label() -> str:
    """" (process r)" under torchrun, so that messages of several processes can be told apart."""
    try:
        env = distributed.torchrun_env()
    except ValueError:  # the bad variables are what the message is about
        return ""
    return f" (process {env.rank})" if env is not None else ""


def _single_process(command: str) -> None:
    """The commands that do not split their work refuse to run once per torchrun process."""
    if distributed.torchrun_env() is not None:
        raise ValueError(f"{command} runs in one process: start it without torchrun "
                         f"(only preload and train use several)")


def run_preload(args) -> int:
    from .preloading import preload, verify_store

    settings = _settings(args)
    if args.print_config:
        return _print_config(settings)
    with distributed.process_group(settings.preload.device):
        preload(settings)
        if not args.verify:
            return 0
        # Rank 0 checks the finished store; every process exits with its verdict.
        group = distributed.Group()
        return 0 if group.broadcast_result(lambda: verify_store(settings, recompute=args.recompute).ok) else 1


def run_train(args) -> int:
    from .training import train

    settings = _settings(args)
    if args.print_config:
        return _print_config(settings)
    with distributed.process_group(settings.train.device):
        result = train(settings, resume=args.resume, overwrite=args.overwrite)
    if _rank() == 0:
        best = (f"best epoch {result.best_epoch} (val {settings.train.selection_metric} {result.best_metric:.4f})"
                if result.best_epoch else "no best epoch")
        print(f"{best}; checkpoints and log in {result.out_dir}")
    return 0


def run_evaluate(args) -> int:
    from .evaluation import evaluate

    _single_process("evaluate")
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = str(Path(_settings(args).train.out_dir) / "best.pt")
    settings = _checkpoint_settings(args, checkpoint)
    if args.print_config:
        return _print_config(settings)
    evaluate(settings, checkpoint, args.split)
    return 0


def run_predict(args) -> int:
    from .evaluation import predict

    _single_process("predict")
    settings = _checkpoint_settings(args, args.checkpoint)
    if args.print_config:
        return _print_config(settings)
    predict(settings, args.checkpoint, args.images, args.output, overwrite=args.overwrite,
            explain_dir=args.explain)
    return 0


def run_explain(args) -> int:
    from .explain import explain

    _single_process("explain")
    settings = _settings(args) if args.checkpoint is None else _checkpoint_settings(args, args.checkpoint)
    if args.print_config:
        return _print_config(settings)
    explain(settings, args.images, args.out, args.checkpoint, args.layers, args.overwrite)
    return 0


def run_demo(args) -> int:
    from . import demo

    _single_process("demo")
    if args.print_config:
        return _print_config(demo.demo_settings(Path(args.out), epochs=args.epochs, seed=args.seed))
    demo.run_demo(Path(args.out), epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    return 0


COMMANDS = {"preload": run_preload, "train": run_train, "evaluate": run_evaluate, "predict": run_predict,
            "explain": run_explain, "demo": run_demo}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``fpt-fast`` and ``python -m fpt_fast``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        if os.environ.get("FPT_FAST_DEBUG"):
            raise
        where = _process_label()
        print(f"fpt-fast {args.command}{where}: error: {e}\n(set FPT_FAST_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fpt-fast {args.command}: interrupted (finished shards/epochs are kept; rerun preload, or "
              f"train with --resume, to continue)", file=sys.stderr)
        return 130

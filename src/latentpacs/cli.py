"""The ``latentpacs`` admin command.

This module only parses arguments, shows progress and maps errors to exit codes; the work
is done by the library modules it calls. Exit codes: 0 success, 1 some inputs of a batch
failed (each named on one line), 2 a usage, configuration or input error.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tqdm import tqdm

from latentpacs import __version__
from latentpacs.config import SETTINGS, Config, load_config
from latentpacs.errors import LatentPacsError

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_ERROR = 2


def _size(text: str) -> tuple[int, int]:
    """Parse ``ROWSxCOLS``."""
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"size {text!r} is not ROWSxCOLS, e.g. 256x208") from exc
    if rows < 16 or cols < 16:
        raise argparse.ArgumentTypeError(f"size {text!r}: rows and columns must be >= 16")
    return rows, cols


def _expand(inputs: Iterable[Path], pattern: str) -> list[Path]:
    """Files as given, and the files under any directory given (recursively)."""
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            paths += sorted(p for p in item.rglob(pattern) if p.is_file())
        else:
            paths.append(item)
    return paths


def _config(args: argparse.Namespace) -> Config:
    overrides = {
        "codec.model": getattr(args, "model", None),
        "codec.tier": getattr(args, "tier", None),
        "codec.device": getattr(args, "device", None),
        "codec.models_dir": getattr(args, "models_dir", None),
    }
    return load_config(args.config, overrides=overrides)


def _engine(config: Config, name: str | None = None):  # noqa: ANN202 - lazy torch import
    from latentpacs.codec.engine import Engine
    from latentpacs.codec.modelfile import load_model

    loaded = load_model(name or config["codec.model"], models_dir=config.models_dir)
    return Engine(loaded, device=config["codec.device"] or None, max_batch=config["codec.max_batch"])


def _finish_batch(outcomes: Sequence, verb: str) -> int:
    failed = [o for o in outcomes if o.error]
    for outcome in failed:
        print(f"latentpacs: {outcome.source}: {outcome.error}", file=sys.stderr)
    done = len(outcomes) - len(failed)
    print(f"{verb} {done} of {len(outcomes)} file(s)")
    return EXIT_PARTIAL if failed else EXIT_OK


def _progress(total: int, desc: str) -> tuple[tqdm, Callable[[object], None]]:
    bar = tqdm(total=total, desc=desc, unit="img", disable=None)
    return bar, lambda _outcome: bar.update(1)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from latentpacs import phantom

    paths = phantom.generate(args.out, args.count, args.seed, size=args.size)
    print(f"wrote {len(paths)} synthetic mammogram(s) under {args.out}")
    return EXIT_OK


def cmd_encode(args: argparse.Namespace) -> int:
    from latentpacs import lpz

    config = _config(args)
    paths = _expand(args.inputs, "*")
    with _engine(config) as engine:
        bar, tick = _progress(len(paths), "encode")
        with bar:
            outcomes = lpz.encode_paths(paths, args.out, engine, config.tier, on_done=tick)
    return _finish_batch(outcomes, f"encoded ({config.tier})")


def cmd_decode(args: argparse.Namespace) -> int:
    from latentpacs import lpz
    from latentpacs.codec.engine import Engine
    from latentpacs.codec.modelfile import find_model_by_sha256, load_model

    config = _config(args)
    engines: dict[str, Engine] = {}

    def engine_for(ref: lpz.ModelRef) -> Engine:
        if ref.sha256 not in engines:
            path = find_model_by_sha256(ref.sha256, config.models_dir)
            loaded = load_model(path, expected_sha256=ref.sha256)
            engines[ref.sha256] = Engine(loaded, device=config["codec.device"] or None)
        return engines[ref.sha256]

    paths = _expand(args.inputs, f"*{lpz.SUFFIX}")
    bar, tick = _progress(len(paths), "decode")
    try:
        with bar:
            outcomes = lpz.decode_paths(paths, args.out, engine_for, on_done=tick)
    finally:
        for engine in engines.values():
            engine.close()
    return _finish_batch(outcomes, "decoded")


def cmd_inspect(args: argparse.Namespace) -> int:
    from latentpacs import lpz

    status = EXIT_OK
    for path in args.files:
        try:
            summary = lpz.summary(lpz.read_lpz(path))
        except LatentPacsError as exc:
            print(f"latentpacs: {path}: {exc.message}", file=sys.stderr)
            status = EXIT_PARTIAL
            continue
        if args.json:
            print(json.dumps({"file": str(path), **summary}, indent=2, sort_keys=True))
            continue
        model = summary["model"]
        geometry = summary["geometry"]
        print(f"{path}")
        print(f"  format version   {summary['format_version']}")
        print(f"  tier             {summary['tier']}")
        print(f"  model            {model['name']} ({model['arch']}) sha256 {model['sha256']}")
        print(
            f"  geometry         {geometry['rows']}x{geometry['columns']}, "
            f"{geometry['bits_stored']} bits stored, {geometry['photometric_interpretation']}"
        )
        print(f"  latent_bytes     {summary['latent_bytes']} ({summary['latent_bits']} bits)")
        print(f"  residual_bytes   {summary['residual_bytes']}")
        print(f"  original bytes   {summary['original']['stored_bytes']}")  # type: ignore[index]
        print(f"  ratio            {summary['compression_ratio']}:1")
        print(f"  SOP Instance UID {summary['header']['sop_instance_uid']}")  # type: ignore[index]
    return status


def cmd_models_list(args: argparse.Namespace) -> int:
    from latentpacs.codec.modelfile import list_models

    config = _config(args)
    cards = list_models(config.models_dir)
    if args.json:
        print(json.dumps([json.loads(card.to_json()) for card in cards], indent=2))
        return EXIT_OK
    print(f"{'name':<12} {'arch':<10} {'input':>6} {'latent':>7} {'bytes':>6} {'params':>10}  sha256")
    for card in cards:
        print(
            f"{card.name:<12} {card.arch:<10} {card.image_size:>6} {card.latent_dim:>7} "
            f"{card.latent_bytes:>6} {card.parameters:>10}  {card.sha256[:16]}"
        )
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from latentpacs.train.loop import TrainConfig, train

    config = TrainConfig(
        data_dirs=tuple(args.data),
        arch=args.arch,
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        image_size=args.image_size,
        latent_dim=args.latent_dim,
        latent_bits=args.latent_bits,
        learning_rate=args.lr,
        seed=args.seed,
        val_fraction=args.val_fraction,
        resume=args.resume,
        device=args.device,
        command="latentpacs " + shlex.join(args.argv),
        cache_dir=args.cache_dir,
    )
    result = train(config)
    card = result.card
    print(
        f"trained {card.name} ({card.arch}): best epoch {result.best_epoch}, "
        f"validation loss {result.best_val_loss:.6g}; sha256 {card.sha256}"
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from latentpacs import demo

    config = _config(args)
    with _engine(config) as engine:
        rows = demo.run_demo(args.out, engine, count=args.count, size=args.size, seed=args.seed)
    print(demo.format_table(rows))
    print(f"figures and files under {args.out}")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    config = _config(args)
    for setting in SETTINGS:
        print(f"{setting.name:<32} {config[setting.name]!r:<28} {setting.env_var}")
    for dest in config.destinations.values():
        print(f"destinations.{dest.aet:<19} {dest.host}:{dest.port}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``latentpacs`` and its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="latentpacs", description="A DICOM node that archives mammograms as learned latents."
    )
    parser.add_argument("--version", action="version", version=f"latentpacs {__version__}")
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def codec_flags(p: argparse.ArgumentParser, model: bool = True) -> None:
        if model:
            p.add_argument("--model", help="model name (default: codec.model, 'ae')")
        p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
        p.add_argument("--models-dir", help="directory of model files (default: shipped models/)")

    p = sub.add_parser("demo-data", help="write synthetic mammograms as DICOM")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_size, help="ROWSxCOLS for every image (default: vendor sizes)")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("encode", help="encode DICOM files into .lpz containers")
    p.add_argument("inputs", nargs="+", type=Path, metavar="IN", help="DICOM files or folders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tier", help="latent | lossless | near-lossless:K (default: latent)")
    codec_flags(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="decode .lpz containers into DICOM files")
    p.add_argument("inputs", nargs="+", type=Path, metavar="FILE", help=".lpz files or folders")
    p.add_argument("--out", type=Path, required=True)
    codec_flags(p, model=False)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("inspect", help="show what an .lpz container holds")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("models", help="the model files")
    models = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p = models.add_parser("list", help="list the models with their hashes")
    p.add_argument("--json", action="store_true")
    p.add_argument("--models-dir", help="directory of model files")
    p.set_defaults(func=cmd_models_list)

    p = sub.add_parser("train", help="train a model on DICOM folders")
    p.add_argument("--data", type=Path, nargs="+", required=True, metavar="DIR")
    p.add_argument("--arch", required=True, help="ae | vae | paper-ae | paper-vae")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--latent-dim", type=int, default=16)
    p.add_argument("--latent-bits", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--resume", action="store_true", help="continue from OUT.checkpoints/last.pt")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--cache-dir", type=Path, help="keep decoded, resized images here")
    p.add_argument("--out", type=Path, required=True, help="models/NAME: writes NAME.safetensors + NAME.json")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="encode and decode synthetic mammograms at every tier")
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--size", type=_size, default=(2294, 1914))
    codec_flags(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config", help="settings")
    cfg = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = cfg.add_parser("show", help="the resolved settings and their environment variables")
    p.set_defaults(func=cmd_config_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``latentpacs`` with ``argv`` (``sys.argv[1:]`` if None); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except LatentPacsError as exc:
        print(f"latentpacs: error: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"latentpacs: error: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("latentpacs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``latentpacs`` admin command.

This module only parses arguments, shows progress and maps errors to exit codes; the work
is done by the library modules it calls. Exit codes: 0 success, 1 some inputs of a batch
failed (each named on one line), 2 a usage, configuration or input error (a usage
error is one line on stderr).

Options behave as in the tools users know. The global options ``--config``, ``-v`` and
``--version`` go before or after the sub-command (``latentpacs serve --config node.toml``
is ``latentpacs --config node.toml serve``); when given in both places the last
``--config`` wins (the one after the sub-command) and ``-v`` counts add up. A list option
may be repeated (``--model ae --model vae`` is ``--model ae vae``), and file operands may
also follow options (``encode a.dcm --out x b.dcm``). A flag that overrides a setting
shows that setting's help and default, taken from :data:`latentpacs.config.SETTINGS`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from tqdm import tqdm

from latentpacs import __version__
from latentpacs.config import SETTINGS, Config, load_config
from latentpacs.errors import ConfigError, LatentPacsError

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_ERROR = 2


def parse_size(text: str) -> tuple[int, int]:
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


#: Command-line flags that override settings: argparse destination -> setting name.
_FLAG_SETTINGS = {
    "model": "codec.model",
    "tier": "codec.tier",
    "coder": "codec.coder",
    "device": "codec.device",
    "models_dir": "codec.models_dir",
    "aet": "node.aet",
    "host": "node.host",
    "port": "node.port",
    "database": "archive.database",
    "data_dir": "archive.data_dir",
    "web_port": "web.port",
}


def _config(args: argparse.Namespace) -> Config:
    overrides = {setting: getattr(args, dest, None) for dest, setting in _FLAG_SETTINGS.items()}
    return load_config(args.config, overrides=overrides)


def _engine(config: Config, name: str | None = None) -> Engine:
    """The engine of ``name`` (default ``codec.model``); torch is imported only here."""
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

    dose = phantom.DEFAULT_DOSE if args.physical and args.dose is None else args.dose
    paths = phantom.generate(args.out, args.count, args.seed, size=args.size, dose=dose)
    print(f"wrote {len(paths)} synthetic mammogram(s) under {args.out}")
    return EXIT_OK


def cmd_encode(args: argparse.Namespace) -> int:
    from latentpacs.image import lpz

    from latentpacs.codec.streams import get_coder

    config = _config(args)
    get_coder(config["codec.coder"])  # an unknown coder is a usage error, not a per-file one
    paths = _expand(args.inputs, "*")
    with _engine(config) as engine:
        bar, tick = _progress(len(paths), "encode")
        with bar:
            outcomes = lpz.encode_paths(paths, args.out, engine, config.tier,
                                        batch=config["codec.max_batch"],
                                        coder=config["codec.coder"], on_done=tick)
    return _finish_batch(outcomes, f"encoded ({config.tier})")


def cmd_decode(args: argparse.Namespace) -> int:
    from latentpacs.image import lpz
    from latentpacs.service import open_engines

    config = _config(args)
    paths = _expand(args.inputs, f"*{lpz.SUFFIX}")
    bar, tick = _progress(len(paths), "decode")
    with open_engines(config, encode=False) as engines, bar:
        outcomes = lpz.decode_paths(paths, args.out, engines.for_sha256, on_done=tick)
    return _finish_batch(outcomes, "decoded")


def cmd_inspect(args: argparse.Namespace) -> int:
    from latentpacs.image import lpz

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
        print(f"  stream_bytes   {summary['stream_bytes']}")
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
    print(f"{'name':<12} {'arch':<18} {'input':>6} {'latent':>7} {'bytes':>6} {'params':>10}  sha256")
    for card in cards:
        print(
            f"{card.name:<12} {card.arch:<18} {card.image_size:>6} {card.latent_dim:>7} "
            f"{card.latent_bytes:>6} {card.parameters:>10}  {card.sha256[:16]}"
        )
    return EXIT_OK


def cmd_train_coder(args: argparse.Namespace) -> int:
    from latentpacs.image.pixels import read_file, stored_values
    from latentpacs.train.coder import CoderTrainConfig, save_coder_model, train_coder
    from latentpacs.train.data import scan_dicom_folders
    from latentpacs.train.split import split_by_patient

    records, skipped = scan_dicom_folders(args.data)
    for path, reason in skipped:
        print(f"latentpacs: skipped {path}: {reason}", file=sys.stderr)
    if not records:
        raise ConfigError(f"no trainable DICOM images under {', '.join(map(str, args.data))}")
    train_records, val_records = split_by_patient(records, val_fraction=args.val_fraction, seed=args.seed)

    def load(chosen: list) -> list:
        images = []
        for record in tqdm(chosen, desc="read", unit="img", disable=None):
            stored, module = stored_values(read_file(record.path))
            images.append((stored, module.bits_stored))
        return images

    checkpoint = args.out.with_name(args.out.name + ".coder-checkpoint.pt")
    config = CoderTrainConfig(out=args.out, epochs=args.epochs, learning_rate=args.lr,
                              samples_per_pass=args.samples, seed=args.seed,
                              checkpoint=checkpoint, resume=args.resume)
    model, metrics = train_coder(load(train_records), load(val_records), config)
    command = "latentpacs " + " ".join(sys.argv[1:])
    training = {
        "command": command, "data": [str(d) for d in args.data], "data_note": args.data_note or "",
        "train_images": len(train_records), "validation_images": len(val_records),
        "train_patients": len({r.patient_id for r in train_records}),
        "validation_patients": len({r.patient_id for r in val_records}),
        "epochs": args.epochs, "samples_per_pass": args.samples, "learning_rate": args.lr,
        "seed": args.seed,
    }
    _, card = save_coder_model(model, args.out.parent, args.out.name,
                               description="learned lossless/near-lossless stream coder "
                                           "(codec.coder = learned)",
                               training=training, metrics=metrics)
    print(f"wrote {args.out}.safetensors (sha256 {card.sha256[:16]}...): validation "
          f"{metrics.get('bpp_near0', '-')} bpp lossless (JPEG-LS {metrics.get('jpegls_bpp_near0', '-')}), "
          f"{metrics.get('bpp_near2', '-')} bpp at NEAR=2 (JPEG-LS {metrics.get('jpegls_bpp_near2', '-')})")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from latentpacs.train.loop import TrainConfig, train

    records = test_records = None
    test_note = ""
    data_note = args.data_note or ""
    if args.cbis_ddsm is not None:
        from latentpacs.train.cbis import select_cbis

        main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
        selection = select_cbis(args.cbis_ddsm, view=args.view or None, abnormality=args.abnormality or None,
                                progress=main_rank)
        official = selection.official_split()  # (train, test): the test set never chooses the checkpoint
        records, test_records = official if official else (selection.records(), None)
        test_note = "the official CBIS-DDSM test set" if official else ""
        if main_rank:
            for missing in selection.missing:
                print(f"latentpacs: CBIS-DDSM image not found: {missing}", file=sys.stderr)
            print(f"CBIS-DDSM: {len(selection.images)} image(s), {len(selection.missing)} not found, "
                  f"{selection.skipped_rows} row(s) skipped; "
                  + ("official test set held out, validation split by patient from the training set"
                     if official else "random split by patient"))
        data_note = data_note or (f"CBIS-DDSM {args.view or 'all views'} {args.abnormality or 'all abnormalities'}"
                                  f", {len(selection.images)} full mammograms")
    config = TrainConfig(
        data_dirs=tuple(args.data or [args.cbis_ddsm]),
        records=records,
        test_records=test_records,
        test_note=test_note,
        arch=args.arch,
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        image_size=args.image_size,
        latent_dim=args.latent_dim,
        latent_bits=args.latent_bits,
        learning_rate=args.lr,
        lr_schedule=args.lr_schedule,
        hflip=args.hflip,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        resume=args.resume,
        device=args.device,
        command="latentpacs " + shlex.join(args.argv),
        cache_dir=args.cache_dir,
        data_note=data_note,
    )
    result = train(config)
    card = result.card
    if result.rank != 0:  # under torchrun only rank 0 reports
        return EXIT_OK
    print(
        f"trained {card.name} ({card.arch}): best epoch {result.best_epoch}, "
        f"validation loss {result.best_val_loss:.6g}; "
        + (f"held-out test MSE {card.metrics['test_mse']:.6g} on {card.metrics['test_images']} images; "
           if "test_mse" in card.metrics else "no held-out test set; ")
        + f"sha256 {card.sha256}"
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from latentpacs import demo

    config = _config(args)
    with _engine(config) as engine:
        rows = demo.run_demo(args.out, engine, count=args.count, size=args.size, seed=args.seed,
                             dose=None if args.white_noise else args.dose,
                             coder=config["codec.coder"])
    print(demo.format_table(rows))
    print(f"figures and files under {args.out}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from latentpacs.node.app import start_node

    config = _config(args)
    # SIGTERM or SIGINT (also one that arrives while the node starts): a graceful stop,
    # Node.stop, bounded by node.shutdown_grace; then exit 0.
    stop = threading.Event()
    received: list[str] = []

    def request_stop(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    from latentpacs import audit

    audit.configure(config)  # before the node: its first association is audited
    try:
        node = start_node(config)
    except BaseException:
        audit.close()
        raise
    audit.application_activity(start=True)
    web = None
    try:
        if config["web.enabled"]:
            from latentpacs.web.server import start_web

            web = start_web(config, node.service)
    except BaseException:
        node.stop(0)
        raise
    card = node.service.engines.primary_card
    print(
        f"{config['node.aet']} listening on {config['node.host']}:{node.port} "
        f"(tier {config.tier}, model {card.name} sha256 {card.sha256[:16]}, "
        f"archive {config.database_url.split('://')[0]})",
        flush=True,
    )
    if web is not None:
        print(f"DICOMweb at {web.url}/dicom-web, viewer at {web.url}/", flush=True)
    # The web port first: once the DIMSE port file exists, both servers answer.
    if args.web_port_file and web is not None:
        _write_port(args.web_port_file, web.port)
    if args.port_file:
        _write_port(args.port_file, node.port)
    try:
        stop.wait()
        print(f"{received[0] if received else 'stop'}: accepting no new associations; "
              f"in-flight ones may finish for {config['node.shutdown_grace']:g} s", flush=True)
    finally:
        if web is not None:
            web.stop()
        node.stop()
        audit.application_activity(start=False)
        audit.close()
    print("stopped", flush=True)
    return EXIT_OK


def _write_port(path: Path, port: int) -> None:
    """Write ``port`` as one line, whole, then rename: a reader never sees half a port."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(f"{port}\n")
    partial.replace(path)


def cmd_web_token(args: argparse.Namespace) -> int:
    import secrets

    from latentpacs.config import WEB_PERMISSIONS
    from latentpacs.web.auth import token_sha256

    name = args.name
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"token name {name!r}: letters, digits, - and _ only")
    services = [s for s in (p.strip() for p in args.services.split(",")) if s]
    unknown = set(services) - set(WEB_PERMISSIONS)
    if not services or unknown:
        raise ConfigError(f"--services: a comma-separated list of {', '.join(WEB_PERMISSIONS)}")
    token = secrets.token_urlsafe(32)
    print(f"token (give it to the client; it is not stored): {token}")
    print("settings entry (add it to the node's TOML file):")
    print(f"[web.tokens.{name}]")
    print(f'sha256 = "{token_sha256(token)}"')
    print("services = [" + ", ".join(f'"{s}"' for s in services) + "]")
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from latentpacs.archive import upgrade

    config = _config(args)
    upgrade(config.database_url)
    print(f"archive schema is up to date ({config.database_url.split('://')[0]})")
    return EXIT_OK


def cmd_archive_stats(args: argparse.Namespace) -> int:
    from latentpacs.archive import Archive
    from latentpacs.archive.blobs import configured_stream_store

    config = _config(args)
    with Archive(config.database_url, blob_store=configured_stream_store(config)) as archive:
        stats = archive.stats()
    if args.json:
        print(json.dumps({
            "patients": stats.patients, "studies": stats.studies, "series": stats.series,
            "instances": stats.instances, "original_bytes": stats.original_bytes,
            "archived_bytes": stats.archived_bytes, "ratio": stats.ratio,
            "pending": stats.pending,
            "tiers": [{"tier": t.tier, "instances": t.instances, "original_bytes": t.original_bytes,
                       "archived_bytes": t.archived_bytes, "ratio": t.ratio} for t in stats.tiers],
            "coders": [{"coder": c.coder, "version": c.version, "streams": c.streams,
                        "stream_bytes": c.stream_bytes, "native_bytes": c.native_bytes,
                        "saved_bytes": c.saved_bytes, "ratio": c.ratio} for c in stats.coders],
        }, indent=2))
        return EXIT_OK
    print(f"patients {stats.patients}  studies {stats.studies}  series {stats.series}  instances {stats.instances}")
    print(f"{'tier':<18} {'instances':>9} {'original bytes':>15} {'archived bytes':>15} {'ratio':>10}")
    for t in stats.tiers:
        print(f"{t.tier:<18} {t.instances:>9} {t.original_bytes:>15} {t.archived_bytes:>15} {t.ratio:>10.1f}")
    print(f"{'all':<18} {stats.instances:>9} {stats.original_bytes:>15} {stats.archived_bytes:>15} {stats.ratio:>10.1f}")
    print(f"pending coding {stats.pending}")
    if stats.coders:
        # Native size: Rows x Columns x Bits Allocated / 8 (x 2 for a 16-bit mammogram).
        print(f"{'coder':<18} {'streams':>9} {'native bytes':>15} {'stream bytes':>15} "
              f"{'saved bytes':>15} {'ratio':>10}")
        for c in stats.coders:
            name = f"{c.coder} v{c.version}"
            print(f"{name:<18} {c.streams:>9} {c.native_bytes:>15} {c.stream_bytes:>15} "
                  f"{c.saved_bytes:>15} {c.ratio:>10.2f}")
    return EXIT_OK


def cmd_archive_code_pending(args: argparse.Namespace) -> int:
    from latentpacs.deferred import code_all
    from latentpacs.service import open_service

    config = _config(args)
    service = open_service(config, lazy_engine=True)
    try:
        total = service.archive.stats().pending
        with tqdm(total=total, desc="code", unit="img", disable=None) as bar:
            def done(instance_id: int, error: str | None) -> None:
                if error is not None:
                    print(f"latentpacs: archive row {instance_id}: {error}", file=sys.stderr)
                bar.update(1)

            coded, failed = code_all(service.archive, service.engines, service.coder, done)
    finally:
        service.close()
    print(f"coded {coded} of {total} pending instance(s)")
    return EXIT_PARTIAL if failed else EXIT_OK


def cmd_archive_recompress(args: argparse.Namespace) -> int:
    from itertools import islice

    from latentpacs.archive import Archive, StreamRow
    from latentpacs.archive.blobs import configured_stream_store
    from latentpacs.recompress import Outcome, candidates, recompress_rows

    config = _config(args)
    coder = config["codec.coder"]
    if args.limit is not None and args.limit < 1:
        _usage_error(args.command_prog, f"--limit must be at least 1, not {args.limit}")
    with Archive(config.database_url, blob_store=configured_stream_store(config)) as archive:
        rows = list(islice(candidates(archive, coder), args.limit))
        bar, tick = _progress(len(rows), f"recompress ({coder})")

        def done(row: StreamRow, _outcome: Outcome | None, error: str | None) -> None:
            if error is not None:
                bar.write(f"latentpacs: {row.sop_instance_uid}: {error}", file=sys.stderr)
            tick(row)

        with bar:
            summary = recompress_rows(archive, coder, rows, on_done=done,
                                      only_smaller=not args.even_if_larger)
    print(f"recompressed {summary.recompressed}, skipped {summary.skipped}, "
          f"failed {summary.failed} of {len(rows)} stream(s) not coded by {coder}")
    for reason, count in sorted(summary.skip_reasons.items()):
        print(f"  skipped {count}: {reason}")
    share = 100.0 * summary.saved_bytes / summary.bytes_before if summary.bytes_before else 0.0
    print(f"stream bytes {summary.bytes_before} -> {summary.bytes_after} "
          f"(saved {summary.saved_bytes}, {share:.1f} %)")
    return EXIT_PARTIAL if summary.failed else EXIT_OK


def cmd_archive_verify(args: argparse.Namespace) -> int:
    from latentpacs.service import open_service

    config = _config(args)
    service = open_service(config, lazy_engine=True)
    failed = checked = 0
    try:
        total = service.archive.stats().instances
        with tqdm(total=total, desc="verify", unit="img", disable=None) as bar:
            # One instance at a time: a corrupt or missing stream fails that instance only.
            for row_id, sop_instance_uid in service.archive.instance_rows():
                checked += 1
                try:
                    service.returned(row_id)
                except LatentPacsError as exc:
                    failed += 1
                    print(f"latentpacs: {sop_instance_uid}: {exc.message}", file=sys.stderr)
                bar.update(1)
    finally:
        service.close()
    print(f"verified {checked - failed} of {checked} instance(s)")
    return EXIT_PARTIAL if failed else EXIT_OK


def cmd_archive_import(args: argparse.Namespace) -> int:
    from latentpacs.service import open_service

    config = _config(args)
    paths = _expand(args.inputs, "*")
    service = open_service(config)
    try:
        bar, tick = _progress(len(paths), f"import ({config.tier})")
        with bar:
            outcomes = service.import_files(paths, on_done=tick)
    finally:
        service.close()
    results = [str(o.result) for o in outcomes if o.result is not None]
    counts = ", ".join(f"{results.count(r)} {r}" for r in sorted(set(results)))
    code = _finish_batch(outcomes, "imported")
    if counts:
        print(f"  ({counts})")
    return code


def cmd_archive_export(args: argparse.Namespace) -> int:
    from pydicom.dataset import Dataset

    from latentpacs import audit
    from latentpacs.service import open_service
    from latentpacs.uid import check_uid, uid_file_name

    config = _config(args)
    check_uid(args.study, "--study")
    service = open_service(config, lazy_engine=True)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = args.study
    try:
        matches = service.matches("STUDY", identifier, root="STUDY")
        if not matches:
            print(f"latentpacs: error: no archived study {args.study}", file=sys.stderr)
            return EXIT_ERROR
        args.out.mkdir(parents=True, exist_ok=True)
        audit.configure(config)
        transfer = audit.Transfer()
        for archived in tqdm(matches, desc="export", unit="img", disable=None):
            ds = service.returned(archived)
            ds.save_as(args.out / uid_file_name(str(ds.SOPInstanceUID), ".dcm"),
                       enforce_file_format=True)
            transfer.add(ds)
        audit.exported(args.out, transfer)  # PS3.15 A.5.3.6 Export
    finally:
        service.close()
        audit.close()
    print(f"exported {len(matches)} instance(s) to {args.out}")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    config = _config(args)
    for setting in SETTINGS:
        value = config[setting.name]
        if setting.name.endswith("secret_access_key") and value:
            value = "(set)"  # a credential is never printed
        print(f"{setting.name:<32} {value!r:<28} {setting.env_var}")
    for dest in config.destinations.values():
        print(f"destinations.{dest.aet:<19} {dest.host}:{dest.port}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from latentpacs.evaluate.run import EvaluationConfig, evaluate

    config = _config(args)
    if args.cbis_ddsm is not None:
        from latentpacs.train.cbis import select_cbis

        selection = select_cbis(args.cbis_ddsm, view=args.view or None, abnormality=args.abnormality or None)
        for missing in selection.missing:
            print(f"latentpacs: CBIS-DDSM image not found: {missing}", file=sys.stderr)
        images = [image.path for image in selection.images]
    else:
        from latentpacs.train.data import scan_dicom_folders

        records, skipped = scan_dicom_folders(args.data)
        for path, reason in skipped:
            logger.info("not evaluated: %s: %s", path, reason)
        images = [record.path for record in records]
    result = evaluate(EvaluationConfig(
        images=tuple(images), out=args.out, models=tuple(args.models), jpeg_quality=args.jpeg_quality,
        tiers=tuple(args.tiers), previews=args.previews, models_dir=config.models_dir,
        device=config["codec.device"] or None, write_dicom=not args.no_dicom,
        map_max_side=args.map_max_side, coders=args.coders,
    ))
    for path, reason in result.skipped:
        print(f"latentpacs: {path}: {reason}", file=sys.stderr)
    print(f"{'codec':<22} {'MSE@1024':>10} {'SSIM':>7} {'bits':>9} {'bpp':>9} {'efficiency':>10}")
    for codec, stats in result.summary["codecs"].items():
        print(f"{codec:<22} {stats['mse']['median']:>10.3e} {stats['ssim']['median']:>7.4f} "
              f"{stats['bits']['median']:>9.0f} {stats['bpp']['median']:>9.4g} {stats['efficiency']['median']:>10.4f}")
    print(f"evaluated {result.summary['images']} image(s); report: {result.report}")
    if result.structured_reports:
        print(f"DICOM: {len(result.structured_reports)} measurement report(s), "
              f"{len(result.difference_maps)} difference map(s) in {args.out / 'dicom'}")
    if "coders" in result.summary:
        from latentpacs.evaluate.coders import markdown_table

        print(markdown_table(result.summary["coders"]))
    for failure in result.coder_failures:
        print(f"latentpacs: {failure.coder} NEAR={failure.near} failed verification on {failure.image}: "
              f"{failure.reason}", file=sys.stderr)
    if result.coder_failures:
        return EXIT_ERROR
    return EXIT_PARTIAL if result.skipped else EXIT_OK


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE`` and a pointer to ``--help``; exit with EXIT_ERROR."""
        _usage_error(self.prog, message)


def _usage_error(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
    raise SystemExit(EXIT_ERROR)


if TYPE_CHECKING:
    from latentpacs.codec.engine import Engine
    _Commands = argparse._SubParsersAction[_Parser]


class _Accumulate(argparse.Action):
    """A list option whose repeats add up (``--model ae --model vae`` is ``--model ae vae``).

    The first use replaces the default; later uses extend what was given.
    """

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        items = [] if current is None or current is self.default else list(current)
        items.extend([values] if isinstance(values, str) else values or [])
        setattr(namespace, self.dest, items)


_SETTING_ROWS = {setting.name: setting for setting in SETTINGS}
#: Namespace attributes of a parsed command: the destination of its positional file list
#: (or None), which file operands after options join, and its ``prog`` for usage errors.
_OPERANDS = "operands"
_PROG = "command_prog"


def _setting_help(name: str) -> str:
    """The help of a flag that overrides setting ``name``: its help and default, from SETTINGS."""
    setting = _SETTING_ROWS[name]
    default = "empty" if setting.default == "" else setting.default
    return f"{setting.help} (setting {name}, default: {default})".replace("%", "%%")


def _add_setting_option(parser: argparse.ArgumentParser, flag: str) -> None:
    """Add ``flag``, which overrides the setting :data:`_FLAG_SETTINGS` maps it to."""
    dest = flag.removeprefix("--").replace("-", "_")
    setting = _SETTING_ROWS[_FLAG_SETTINGS[dest]]
    kind = setting.type if setting.type in (int, float) else str
    parser.add_argument(flag, type=kind, help=_setting_help(setting.name))


def _add_global_options(parser: argparse.ArgumentParser, depth: int) -> None:
    """``--config``, ``-v`` and ``--version``, accepted before and after every sub-command.

    Below the top level (``depth`` > 0) an absent option leaves the value given earlier
    untouched (``argparse.SUPPRESS``); the last ``--config`` wins, ``-v`` counts add up,
    each level counting into its own ``verbose_DEPTH`` (summed by :func:`main`).
    """
    top = depth == 0
    group = parser.add_argument_group("global options" + ("" if top else " (also before the command)"))
    group.add_argument("--version", action="version", version=f"latentpacs {__version__}")
    group.add_argument("--config", type=Path, default=None if top else argparse.SUPPRESS, metavar="FILE",
                       help="TOML settings file (the last one given wins)")
    group.add_argument("-v", "--verbose", action="count", dest="verbose" if top else f"verbose_{depth}",
                       default=0 if top else argparse.SUPPRESS,
                       help="more logging; -vv: also pynetdicom's (counts add up wherever given)")


def _command(sub: _Commands, name: str, text: str,
             func: Callable[[argparse.Namespace], int] | None = None, *, depth: int = 1,
             operands: str | None = None) -> _Parser:
    """Add sub-command ``name`` with the global options; ``func`` runs it.

    ``operands``: the destination of its positional file list, which file names given
    after options join (``encode a.dcm --out x b.dcm``).
    """
    parser = sub.add_parser(name, help=text, description=text)
    _add_global_options(parser, depth)
    if func is not None:
        parser.set_defaults(func=func, **{_OPERANDS: operands, _PROG: parser.prog})
    return parser


def _add_codec_options(parser: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        _add_setting_option(parser, "--model")
    _add_setting_option(parser, "--device")
    _add_setting_option(parser, "--models-dir")


def _add_archive_options(parser: argparse.ArgumentParser) -> None:
    _add_setting_option(parser, "--database")
    _add_setting_option(parser, "--data-dir")


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, nargs="+", action=_Accumulate, metavar="DIR",
                        help="DICOM folders or files (repeat or list several)")
    source.add_argument("--cbis-ddsm", type=Path, metavar="ROOT", help="a CBIS-DDSM download (TCIA layout + CSVs)")
    parser.add_argument("--view", default="MLO", help="CBIS-DDSM view, '' for all (default: MLO)")
    parser.add_argument("--abnormality", default="mass", help="CBIS-DDSM abnormality, '' for all (default: mass)")


def _add_demo_commands(sub: _Commands) -> None:
    p = _command(sub, "demo-data", "write synthetic mammograms as DICOM", cmd_demo_data)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=parse_size, help="ROWSxCOLS for every image (default: vendor sizes)")
    p.add_argument("--physical", action="store_true",
                   help="physical noise model (Poisson quanta, detector blur, electronic noise, "
                        "log transform, air at 0) at the default dose")
    p.add_argument("--dose", type=float,
                   help="photons per pixel of the unattenuated beam (implies --physical)")

    p = _command(sub, "demo", "encode and decode synthetic mammograms at every tier", cmd_demo)
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--size", type=parse_size, default=(2294, 1914))
    p.add_argument("--dose", type=float, default=1000.0,
                   help="photons per pixel of the physical phantom (default: 1000)")
    p.add_argument("--white-noise", action="store_true",
                   help="the plain phantom (anatomy plus white noise) instead of the physical one")
    _add_setting_option(p, "--coder")
    _add_codec_options(p)


def _add_file_commands(sub: _Commands) -> None:
    p = _command(sub, "encode", "encode DICOM files into .lpz containers", cmd_encode, operands="inputs")
    p.add_argument("inputs", nargs="+", type=Path, metavar="IN", help="DICOM files or folders")
    p.add_argument("--out", type=Path, required=True)
    _add_setting_option(p, "--tier")
    _add_setting_option(p, "--coder")
    _add_codec_options(p)

    p = _command(sub, "decode", "decode .lpz containers into DICOM files", cmd_decode, operands="inputs")
    p.add_argument("inputs", nargs="+", type=Path, metavar="FILE", help=".lpz files or folders")
    p.add_argument("--out", type=Path, required=True)
    _add_codec_options(p, model=False)

    p = _command(sub, "inspect", "show what an .lpz container holds", cmd_inspect, operands="files")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--json", action="store_true")


def _add_model_commands(sub: _Commands) -> None:
    models = _command(sub, "models", "the model files").add_subparsers(
        dest="models_command", required=True, metavar="ACTION")
    p = _command(models, "list", "list the models with their hashes", cmd_models_list, depth=2)
    p.add_argument("--json", action="store_true")
    _add_setting_option(p, "--models-dir")

    p = _command(sub, "train", "train a model on DICOM folders or CBIS-DDSM", cmd_train)
    _add_data_options(p)
    p.add_argument("--arch", required=True, help="ae | vae | ae-r16 | vae-r16 (an 8x8 grid at --image-size 128) | paper-ae | paper-vae | pca (principal components, fitted in closed form; --epochs, --lr and --batch-size do not apply)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--latent-dim", type=int, default=16)
    p.add_argument("--latent-bits", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="cosine: the rate falls from --lr to 0 over --epochs (default: constant)")
    p.add_argument("--hflip", action="store_true",
                   help="mirror each training image left-right with probability 1/2 (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of the training patients that validate (choose the best epoch)")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="share of patients held out for the card's test MSE (CBIS-DDSM: the official test set)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.checkpoints/last.pt")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")  # not codec.device
    p.add_argument("--cache-dir", type=Path, help="keep decoded, resized images here")
    p.add_argument("--data-note", help="where the data came from (recorded in the card)")
    p.add_argument("--out", type=Path, required=True, help="models/NAME: writes NAME.safetensors + NAME.json")


def _add_train_coder_command(sub: _Commands) -> None:
    p = _command(sub, "train-coder", "train the learned lossless/near-lossless stream coder",
                 cmd_train_coder)
    p.add_argument("--data", type=Path, nargs="+", required=True, metavar="DIR",
                   help="DICOM folders (e.g. demo-data --physical phantoms)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--samples", type=int, default=40000,
                   help="contexts sampled per image and subimage (default: 40000)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of the patients whose images choose the epoch and measure the card's bpp")
    p.add_argument("--data-note", help="where the data came from (recorded in the card)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT.coder-checkpoint.pt (same settings and data)")
    p.add_argument("--out", type=Path, required=True, help="models/NAME: writes NAME.safetensors + NAME.json")


def _add_evaluate_command(sub: _Commands) -> None:
    p = _command(sub, "evaluate", "measure the models against JPEG and lossless codecs", cmd_evaluate)
    _add_data_options(p)
    p.add_argument("--model", dest="models", nargs="+", action=_Accumulate, default=["ae", "vae", "pca"],
                   metavar="NAME", help="models to evaluate, repeat or list several (default: ae vae pca, "
                   "pca being the linear baseline)")
    p.add_argument("--jpeg-quality", type=int, default=85, help="JPEG baseline quality (default: 85)")
    p.add_argument("--tiers", nargs="*", action=_Accumulate, default=["near-lossless:2", "lossless"],
                   metavar="TIER", help="fidelity tiers to cost with the first model; none: --tiers alone "
                   "(default: near-lossless:2 lossless)")
    p.add_argument("--previews", type=int, default=4, help="images in the reconstruction figures")
    p.add_argument("--no-dicom", action="store_true",
                   help="write no DICOM SR and Parametric Maps (dicom/ beside metrics.csv)")
    p.add_argument("--map-max-side", type=int, default=2048, metavar="N",
                   help="difference maps longer than N pixels are averaged over blocks (0: never)")
    p.add_argument("--coders", action="store_true",
                   help="also compare the lossless/near-lossless coders (stream coders at NEAR 0 1 2 4, JPEG-XL "
                   "e7 e9, JPEG 2000, HTJ2K), every stream verified; slow: ~30 s per 2294x1914 image on 2 cores without the learned coder")
    p.add_argument("--out", type=Path, required=True)
    _add_codec_options(p, model=False)


def _add_serve_command(sub: _Commands) -> None:
    p = _command(sub, "serve", "run the DICOM node", cmd_serve)
    for flag in ("--aet", "--host", "--port", "--tier", "--database", "--data-dir"):
        _add_setting_option(p, flag)
    _add_setting_option(p, "--web-port")
    p.add_argument("--port-file", type=Path, help="write the listening port here once ready")
    p.add_argument("--web-port-file", type=Path, help="write the web server's port here once ready")
    _add_codec_options(p)


def _add_web_commands(sub: _Commands) -> None:
    web = _command(sub, "web", "the DICOMweb server").add_subparsers(
        dest="web_command", required=True, metavar="ACTION")
    p = _command(web, "token", "make a bearer token and print its [web.tokens.NAME] entry",
                 cmd_web_token, depth=2)
    p.add_argument("name", help="the token's name (who it is for)")
    p.add_argument("--services", default="query,retrieve",
                   help="its permissions: store, query, retrieve, metrics (default: query,retrieve)")


def _add_archive_commands(sub: _Commands) -> None:
    db = _command(sub, "db", "the archive database").add_subparsers(
        dest="db_command", required=True, metavar="ACTION")
    _add_archive_options(_command(db, "upgrade", "apply the Alembic migrations", cmd_db_upgrade, depth=2))

    archive = _command(sub, "archive", "archive administration").add_subparsers(
        dest="archive_command", required=True, metavar="ACTION")
    p = _command(archive, "stats", "patients, studies, instances, bytes per tier and per coder, ratio",
                 cmd_archive_stats, depth=2)
    _add_archive_options(p)
    p.add_argument("--json", action="store_true")

    p = _command(archive, "verify", "decode every archived image with its hash-checked model", cmd_archive_verify,
                 depth=2)
    _add_archive_options(p)
    _add_codec_options(p)

    p = _command(archive, "code-pending", "code the images archived as received now (deferred coding)",
                 cmd_archive_code_pending, depth=2)
    _add_archive_options(p)
    _add_codec_options(p)

    p = _command(archive, "recompress", "re-code lossless streams of other coders with codec.coder "
                 "(verified, then swapped)", cmd_archive_recompress, depth=2)
    _add_archive_options(p)
    _add_setting_option(p, "--coder")
    p.add_argument("--limit", type=int, metavar="N", help="recompress at most N streams")
    p.add_argument("--even-if-larger", action="store_true",
                   help="swap in a verified new stream even when it is not smaller")

    p = _command(archive, "export", "write a study's returned objects as DICOM files", cmd_archive_export, depth=2)
    _add_archive_options(p)
    p.add_argument("--study", required=True, help="Study Instance UID")
    p.add_argument("--out", type=Path, required=True)
    _add_codec_options(p)

    p = _command(archive, "import", "archive DICOM files or folders offline, as C-STORE would", cmd_archive_import,
                 depth=2, operands="inputs")
    p.add_argument("inputs", nargs="+", type=Path, metavar="IN", help="DICOM files or folders")
    _add_archive_options(p)
    _add_setting_option(p, "--tier")
    _add_setting_option(p, "--coder")
    _add_codec_options(p)


def _add_config_commands(sub: _Commands) -> None:
    config = _command(sub, "config", "settings").add_subparsers(dest="config_command", required=True, metavar="ACTION")
    _command(config, "show", "the resolved settings and their environment variables", cmd_config_show, depth=2)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``latentpacs`` and its sub-commands (see the module docstring)."""
    parser = _Parser(prog="latentpacs", description="A DICOM node that archives mammograms as learned latents.")
    _add_global_options(parser, 0)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo_commands(sub)
    _add_file_commands(sub)
    _add_model_commands(sub)
    _add_evaluate_command(sub)
    _add_train_coder_command(sub)
    _add_serve_command(sub)
    _add_archive_commands(sub)
    _add_web_commands(sub)
    _add_config_commands(sub)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv`` as :func:`build_parser` describes; a usage error exits with status 2.

    File operands given after options join the command's file list; the ``-v`` counts of
    every level are summed into ``verbose``.
    """
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    operands = getattr(args, _OPERANDS, None)
    if extras and operands is not None and not any(extra.startswith("-") for extra in extras):
        getattr(args, operands).extend(Path(extra) for extra in extras)
        extras = []
    if extras:
        _usage_error(getattr(args, _PROG, parser.prog), f"unrecognized arguments: {' '.join(extras)}")
    args.verbose = sum(value for key, value in vars(args).items() if key.startswith("verbose"))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``latentpacs`` with ``argv`` (``sys.argv[1:]`` if None); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    base = logging.INFO if args.command == "serve" else logging.WARNING
    logging.basicConfig(
        level=max(logging.DEBUG, base - 10 * args.verbose),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pynetdicom logs whole identifiers (patient names among them) at INFO: keep it
    # at WARNING unless asked twice for more.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if args.verbose >= 2 else logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.INFO if args.verbose >= 1 else logging.WARNING)
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

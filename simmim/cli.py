"""``simmim``: train, validate-data, embed, eval and export from the command line.

Errors a user can fix print one line per problem and exit with status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

from simmim.errors import ConfigError, SimMIMError

log = logging.getLogger("simmim")


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from simmim.config import load_config
    from simmim.engine import Progress, train

    cfg = load_config(args.config, args.set)
    stop = {"requested": False}

    def request_stop(signum: int, _frame: object) -> None:
        stop["requested"] = True
        tqdm.write(f"received signal {signum}: checkpointing and stopping (run again to resume)")

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    bar = tqdm(total=None, unit="step", disable=args.quiet, dynamic_ncols=True)

    def on_progress(p: Progress) -> None:
        bar.total = p.total_steps
        bar.n = p.step
        bar.set_postfix(epoch=p.epoch, loss=f"{p.loss:.4f}", lr=f"{p.lr:.2e}",
                        img_s=f"{p.images_per_sec:.1f}", wait=f"{p.data_wait_fraction:.0%}",
                        eta=f"{p.eta_seconds:.0f}s", refresh=False)
        bar.refresh()

    result = train(cfg, on_progress=on_progress, should_stop=lambda: stop["requested"],
                   resume=not args.no_resume)
    bar.close()
    return {
        "experiment": cfg.experiment_name,
        "output_dir": cfg.run.output_dir,
        "steps": result.steps,
        "total_steps": result.total_steps,
        "final_loss": result.final_loss,
        "resumed_from_step": result.resumed_from,
        "stopped_early": result.stopped,
        "checkpoint": str(result.checkpoint.path) if result.checkpoint else None,
        "encoder_dir": str(result.encoder_dir) if result.encoder_dir else None,
        "skipped_images": result.skipped_images,
    }


def cmd_validate_data(args: argparse.Namespace) -> dict[str, Any]:
    from simmim.data import open_source, validate_source

    source = open_source(args.source)
    with tqdm(total=len(source), unit="img", disable=args.quiet) as bar:
        report = validate_source(source, min_size=args.min_size, workers=args.workers,
                                 progress=lambda done, _total: bar.update(done - bar.n))
    if not args.json:
        print(report.summary(), file=sys.stderr)
    return report.to_dict()


def cmd_embed(args: argparse.Namespace) -> dict[str, Any]:
    from simmim.data import open_source
    from simmim.embed import Embedder, save_embeddings

    embedder = Embedder.load(args.model, device=args.device)
    source = open_source(args.source)
    with tqdm(total=len(source), unit="img", disable=args.quiet) as bar:
        result = embedder.embed_source(source, batch_size=args.batch_size, num_workers=args.workers,
                                       pooling=args.pooling, layer=args.layer, normalize=args.normalize,
                                       progress=lambda done, _total: bar.update(done - bar.n))
    npy, names = save_embeddings(result, args.out)
    return {"embeddings": str(npy), "files": str(names), "shape": list(result.embeddings.shape),
            "failed": result.failed}


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from simmim.embed import Embedder
    from simmim.evaluate import evaluate_folders

    embedder = Embedder.load(args.model, device=args.device)
    report = evaluate_folders(embedder, args.train, args.test, k=args.k, pooling=args.pooling, layer=args.layer)
    return report.to_dict()


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from simmim.export import encoder_from_checkpoint, export_encoder, find_checkpoint

    manager, info = find_checkpoint(args.checkpoint)
    model, cfg = encoder_from_checkpoint(manager.load(info))
    out = export_encoder(model, cfg, args.out)
    return {"encoder_dir": str(out), "from_checkpoint": str(info.path), "step": info.step}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simmim", description="SimMIM pretraining for timm encoders.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain from a YAML config")
    p.add_argument("config", nargs="?", help="YAML config (sections data, model, optim, run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set optim.batch_size=64 (repeatable)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in run.output_dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate-data", help="check every image of a source")
    p.add_argument("source")
    p.add_argument("--min-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print only the JSON report")
    p.set_defaults(func=cmd_validate_data)

    for name, func, helptext in (("embed", cmd_embed, "embed every image of a source"),
                                 ("eval", cmd_eval, "k-NN and linear-probe accuracy on labelled folders")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("model", help="exported encoder dir, run dir, or checkpoint file")
        if name == "embed":
            p.add_argument("source")
            p.add_argument("--out", required=True, help="folder for embeddings.npy and files.txt")
            p.add_argument("--batch-size", type=int, default=64)
            p.add_argument("--workers", type=int, default=0)
            p.add_argument("--normalize", action="store_true", help="L2-normalise embeddings")
        else:
            p.add_argument("--train", required=True, help="ImageFolder tree to fit on")
            p.add_argument("--test", required=True, help="ImageFolder tree to score on")
            p.add_argument("--k", type=int, default=5)
        p.add_argument("--pooling", choices=["mean", "cls"], default="mean")
        p.add_argument("--layer", type=int, default=None, help="mean-pool this block/stage instead")
        p.add_argument("--device", default="auto")
        p.set_defaults(func=func)

    p = sub.add_parser("export", help="export a checkpoint's encoder as plain timm weights")
    p.add_argument("checkpoint", help="checkpoint file, checkpoints dir or run dir (newest valid)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], dict[str, Any]] = args.func
    try:
        result = func(args)
    except ConfigError as err:
        print("error: invalid configuration", file=sys.stderr)
        for problem in err.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    except SimMIMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The main job: pretrain SimMIM on a real small dataset end to end with the ``simmim`` CLI.

Writes scikit-learn's digits as PNG files, validates them, pretrains a small ViT, scores
its frozen embeddings (k-NN and linear probe) against the same encoder at random init,
embeds the test images and prints what it produced. Run with ``./dev demo``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from simmim.cli import main as simmim

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "digits_vit_tiny.yaml"


def run(step: str, *argv: str) -> dict[str, Any]:
    """Run one ``simmim`` CLI command, echo it, and return its JSON output."""
    print(f"\n== {step}\n$ simmim {' '.join(argv)}", flush=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = simmim(list(argv))
    if code != 0:
        sys.exit(code)
    result = json.loads(out.getvalue())
    print(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default=str(ROOT / ".demo"))
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    args = parser.parse_args()
    work = Path(args.workdir)

    from simmim.sample_data import write_digits

    print(f"== writing scikit-learn digits as 32 px PNGs under {work / 'digits'}")
    splits = write_digits(work / "digits", size=32)
    run("validate the images", "validate-data", str(splits["train"]), "--min-size", "8")
    run_dir = work / "runs" / "digits_vit_tiny"
    overrides = ["--set", f"data.source={splits['train']}", "--set", f"run.output_dir={run_dir}"]
    if args.epochs:
        overrides += ["--set", f"optim.epochs={args.epochs}"]
    trained = run("pretrain SimMIM (resumes if interrupted)", "train", str(CONFIG), *overrides)
    scores = run("k-NN / linear probe of the pretrained encoder", "eval", trained["encoder_dir"],
                 "--train", str(splits["train"]), "--test", str(splits["test"]))
    emb = run("embed the test images", "embed", trained["encoder_dir"], str(splits["test"]),
              "--out", str(work / "embeddings"))
    vectors = np.load(emb["embeddings"])
    names = (Path(emb["files"])).read_text().splitlines()
    print("\n== first embeddings (mean-pooled patch tokens)")
    for name, vec in list(zip(names, vectors, strict=True))[:3]:
        print(f"{name}: [{', '.join(f'{v:+.3f}' for v in vec[:6])}, ...] ({len(vec)} dims)")
    print(f"\nencoder: {trained['encoder_dir']}  (loads in plain timm, see its config.json)")
    print(f"k-NN accuracy {scores['knn_accuracy']:.3f}, linear probe {scores['linear_probe_accuracy']:.3f}")


if __name__ == "__main__":
    main()

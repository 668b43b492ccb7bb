"""Frozen-feature evaluation: k-nearest-neighbour and linear-probe accuracy.

Labels come from an ImageFolder layout (``root/<class>/<image>``). Both classifiers are
small torch routines on the embeddings, so no extra dependency is needed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from simmim.data import FolderSource
from simmim.embed import Embedder, Pooling
from simmim.errors import DataError


@dataclass(frozen=True)
class EvalReport:
    """Accuracies of the frozen embeddings."""

    knn_accuracy: float
    linear_probe_accuracy: float
    k: int
    num_train: int
    num_test: int
    num_classes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 k: int = 5) -> float:
    """Accuracy of a cosine-similarity k-NN vote (ties go to the larger summed similarity)."""
    tr = F.normalize(torch.as_tensor(train_x, dtype=torch.float32), dim=1)
    te = F.normalize(torch.as_tensor(test_x, dtype=torch.float32), dim=1)
    sims, idx = (te @ tr.T).topk(min(k, len(tr)), dim=1)  # (N_test, k)
    labels = torch.as_tensor(train_y)[idx]  # (N_test, k)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    votes = torch.zeros(len(te), num_classes).scatter_add_(1, labels, torch.ones_like(sims))
    votes += torch.zeros(len(te), num_classes).scatter_add_(1, labels, sims) * 1e-3  # tie-break
    return float((votes.argmax(1).numpy() == test_y).mean())


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                          test_y: np.ndarray, l2: float = 1e-4, max_iter: int = 200) -> float:
    """Accuracy of multinomial logistic regression on standardised features (L-BFGS)."""
    tr = torch.as_tensor(train_x, dtype=torch.float64)
    te = torch.as_tensor(test_x, dtype=torch.float64)
    mean, std = tr.mean(0), tr.std(0).clamp_min(1e-6)
    tr, te = (tr - mean) / std, (te - mean) / std
    y = torch.as_tensor(train_y, dtype=torch.long)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(tr.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(tr @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (te @ weight + bias).argmax(1).numpy()
    return float((pred == test_y).mean())


def labelled_embeddings(embedder: Embedder, root: str | Path, pooling: Pooling = "mean",
                        layer: int | None = None, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Embeddings and integer labels of an ImageFolder tree; returns (x, y, class names)."""
    source = FolderSource(root)
    classes_of = [name.split("/", 1)[0] if "/" in name else "" for name in (source.name(i) for i in range(len(source)))]
    if "" in classes_of:
        raise DataError(f"{root}: images must sit in one sub-folder per class (root/<class>/<image>)")
    classes = sorted(set(classes_of))
    result = embedder.embed_source(source, batch_size=batch_size, pooling=pooling, layer=layer)
    y = np.array([classes.index(c) for c in classes_of])
    keep = np.array([n not in set(result.failed) for n in result.names])
    return result.embeddings[keep], y[keep], classes


def evaluate_folders(embedder: Embedder, train_root: str | Path, test_root: str | Path, k: int = 5,
                     pooling: Pooling = "mean", layer: int | None = None) -> EvalReport:
    """k-NN and linear-probe accuracy: fit on ``train_root``, score on ``test_root``."""
    tr_x, tr_y, classes = labelled_embeddings(embedder, train_root, pooling, layer)
    te_x, te_y, test_classes = labelled_embeddings(embedder, test_root, pooling, layer)
    if test_classes != classes:
        raise DataError(f"class folders differ between {train_root} and {test_root}")
    return EvalReport(
        knn_accuracy(tr_x, tr_y, te_x, te_y, k),
        linear_probe_accuracy(tr_x, tr_y, te_x, te_y),
        k, len(tr_y), len(te_y), len(classes),
    )

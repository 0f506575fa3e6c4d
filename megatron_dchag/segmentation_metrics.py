"""Per-pixel classification scores from a confusion matrix: overall accuracy, mean class accuracy,
Cohen's kappa, IoU per class and its mean.

:class:`ConfusionMatrix` counts ``(true class, predicted class)`` pairs of labelled pixels; pixels
whose label is the ignore index (or any value outside ``[0, num_classes)``) count nowhere. The
counts are integers, so summing them over data-parallel ranks (:meth:`ConfusionMatrix.all_reduce`)
gives exactly the matrix one process would have counted over all the data, and every score is
computed once from that sum (never an average of per-rank scores).

Scores of a class that never occurs in the labels (no support) are ``None``; the means run over
the classes that occur (mean IoU: over the classes that occur in the labels or the predictions).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """``counts[t, p]``: labelled pixels of true class ``t`` predicted as ``p`` (int64, on the CPU)."""

    def __init__(self, num_classes: int, ignore_index: Optional[int] = None):
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.counts = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.counts.zero_()

    def update(self, predicted: torch.Tensor, labels: torch.Tensor) -> None:
        """Add pixels: ``predicted`` and ``labels`` are integer class maps of the same shape."""
        if predicted.shape != labels.shape:
            raise ValueError(f"predicted {tuple(predicted.shape)} and labels {tuple(labels.shape)} differ in shape")
        t = labels.reshape(-1).long().cpu()
        p = predicted.reshape(-1).long().cpu()
        keep = (t >= 0) & (t < self.num_classes)
        if self.ignore_index is not None:
            keep &= t != self.ignore_index
        t, p = t[keep], p[keep].clamp(0, self.num_classes - 1)
        k = self.num_classes
        self.counts += torch.bincount(t * k + p, minlength=k * k).reshape(k, k)

    def all_reduce(self, group=None) -> None:
        """Sum the counts over ``group`` (e.g. the data-parallel ranks); exact (integers)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(self.counts, group=group)

    # -- scores ---------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def support(self) -> List[int]:
        """Labelled pixels of each class."""
        return [int(v) for v in self.counts.sum(1)]

    def class_accuracy(self) -> List[Optional[float]]:
        """Recall of each class (``None`` without support)."""
        c = self.counts.double()
        rows = c.sum(1)
        return [None if rows[i] == 0 else float(c[i, i] / rows[i]) for i in range(self.num_classes)]

    def iou(self) -> List[Optional[float]]:
        """``TP / (TP + FP + FN)`` of each class (``None`` where the class is neither labelled nor predicted)."""
        c = self.counts.double()
        union = c.sum(1) + c.sum(0) - c.diag()
        return [None if union[i] == 0 else float(c[i, i] / union[i]) for i in range(self.num_classes)]

    def overall_accuracy(self) -> Optional[float]:
        n = self.total
        return None if n == 0 else float(self.counts.diag().sum()) / n

    def kappa(self) -> Optional[float]:
        """Cohen's kappa: ``(p_o - p_e) / (1 - p_e)``, ``p_e`` from the row and column marginals."""
        n = self.total
        if n == 0:
            return None
        c = self.counts.double()
        observed = float(c.diag().sum()) / n
        expected = float((c.sum(1) * c.sum(0)).sum()) / (n * n)
        if expected >= 1.0:  # one class only, in labels and predictions: agreement is not informative
            return 1.0 if observed == 1.0 else 0.0
        return (observed - expected) / (1.0 - expected)

    def scores(self) -> Dict[str, Optional[float]]:
        """``overall_accuracy``, ``mean_class_accuracy``, ``kappa``, ``mean_iou``."""
        return {
            "overall_accuracy": self.overall_accuracy(),
            "mean_class_accuracy": _mean(self.class_accuracy()),
            "kappa": self.kappa(),
            "mean_iou": _mean(self.iou()),
        }

    def markdown_table(self, class_names: Sequence[str], title: str, description: str) -> str:
        """The four scores and a per-class table (support, accuracy, IoU) as markdown."""
        s = self.scores()
        lines = [
            f"# {title}",
            "",
            description,
            "",
            "| overall accuracy | mean class accuracy | Cohen's kappa | mean IoU | labelled pixels |",
            "|---:|---:|---:|---:|---:|",
            f"| {_fmt(s['overall_accuracy'])} | {_fmt(s['mean_class_accuracy'])} | {_fmt(s['kappa'])} | "
            f"{_fmt(s['mean_iou'])} | {self.total} |",
            "",
            "| class | name | labelled pixels | predicted pixels | accuracy | IoU |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        predicted = [int(v) for v in self.counts.sum(0)]
        for i, (n, acc, iou) in enumerate(zip(self.support(), self.class_accuracy(), self.iou())):
            lines.append(f"| {i} | {class_names[i]} | {n} | {predicted[i]} | {_fmt(acc)} | {_fmt(iou)} |")
        return "\n".join(lines) + "\n"


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.4f}"

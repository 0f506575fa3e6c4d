"""Per-pixel classifier on the D-CHAG encoder: a cube crop -> class logits of every pixel.

- **Encoder**: :class:`~megatron_dchag.models.encoder.DCHAGEncoder` over all patches (no mask),
  the same module (and so the same checkpoint keys, ``encoder.*``) as the MAE's, so a pretrained
  MAE encoder loads into it as it is.
- **Head**: one linear map per patch token, ``D -> p*p*K`` (``K`` classes), replicated on the TP
  ranks (its input, the encoder's output, is replicated too), seeded by name so every layout
  starts from the same weights; unpatchified to ``[B, K, H, W]``.
- **Loss**: cross-entropy over the labelled pixels (labels equal to ``ignore_index`` count
  nowhere), the mean over them; 0 for a micro-batch without one labelled pixel.

Pipeline parallelism: ``pre_process`` stages own the channel stage, later stages receive hidden
states through :meth:`SegmentationModel.set_input_tensor`, the ``post_process`` stage holds the
head and the loss; ``(L, D)`` tensors travel between stages.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megatron_dchag.config import ConfigError, ExperimentConfig, resolve_config
from megatron_dchag.layers.channel_plan import group_generator
from megatron_dchag.layers.embeddings import xavier_uniform_
from megatron_dchag.models.encoder import DCHAGEncoder, make_transformer_config
from megatron_dchag.models.forecast import unpatchify


class SegmentationOutput(NamedTuple):
    """A tuple, so megatron's Float16Module can cast it; fields in this order."""

    loss: torch.Tensor  # scalar mean cross-entropy over the labelled pixels (identical on all TP ranks)
    logits: torch.Tensor  # [B, K, H, W]


class SegmentationModel(MegatronModule):
    """See the module docstring. ``cfg``: as loaded or resolved, ``segmentation.num_classes`` set."""

    def __init__(self, cfg: ExperimentConfig, seed: int = 1234, wavelengths: Optional[Sequence[float]] = None,
                 pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None):
        cfg = resolve_config(cfg)
        model, seg = cfg.model, cfg.segmentation
        if seg.num_classes is None:
            raise ConfigError("segmentation.num_classes is not set (the task sets it from the label maps)")
        model.validate(cfg.parallel.tensor_model_parallel_size)
        config = make_transformer_config(model, cfg.parallel, cfg.training)
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = pre_process, post_process
        self.num_classes = int(seg.num_classes)
        self.ignore_index = int(seg.ignore_index)
        self.patch_size = model.patch_size
        self.encoder = DCHAGEncoder(
            model, config, seed=seed, wavelengths=wavelengths, pre_process=pre_process, post_process=post_process,
            vp_stage=vp_stage, recompute_channel_stage=cfg.training.recompute_granularity == "channel_stage",
        )
        self.grid = self.encoder.grid
        self._input_range = self.encoder.plan.owned_channel_range(model.shards_channels)
        if post_process:
            d, k = model.hidden_size, self.num_classes * self.patch_size**2
            self.head = nn.Linear(d, k)
            with torch.no_grad():
                xavier_uniform_(self.head.weight, d, k, group_generator(seed, "segmentation.head", 0))
                self.head.bias.zero_()

    @property
    def input_channel_range(self) -> Tuple[int, int]:
        """Input channels this rank reads (the same on every pipeline stage): ``[start, stop)``."""
        return self._input_range

    def set_input_tensor(self, input_tensor) -> None:
        self.encoder.set_input_tensor(input_tensor)

    def forward(self, images: Optional[torch.Tensor], labels: Optional[torch.Tensor] = None):
        """``images [B, C_in_local, H, W]`` (normalized, this rank's input channels), ``labels
        [B, H, W]`` (int64) or ``None``. Returns the hidden states on a non-last pipeline stage,
        else a :class:`SegmentationOutput` (loss 0 when ``labels`` is ``None``)."""
        hidden = self.encoder(images if self.pre_process else None)  # [L, B, D]
        if not self.post_process:
            return hidden
        out = self.head(hidden)  # [L, B, K * p*p]
        seq, b, _ = out.shape
        logits = unpatchify(out.view(seq, b, self.num_classes, self.patch_size**2), self.grid, self.patch_size)
        if labels is None:
            return SegmentationOutput(loss=torch.zeros((), device=logits.device), logits=logits)
        total = F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index, reduction="sum")
        count = (labels != self.ignore_index).sum().clamp(min=1)
        return SegmentationOutput(loss=total / count, logits=logits)

"""Masked autoencoder for hyperspectral cubes on the D-CHAG encoder.

- A fraction ``mask_ratio`` of patch positions is masked **before** tokenization: the encoder's
  tokenizer and aggregation see only the visible patches (:func:`random_patch_mask`).
- A light decoder (its own hidden size and depth, megatron-core ``TransformerBlock`` with the same
  ViT spec) receives the visible tokens plus a learned mask token at masked positions.
- The channel-parallel head reconstructs the masked patches of the rank's own channels; the
  squared error is summed locally, reduced across TP and divided by the global element count, so
  the loss is the MSE over masked patches of **all** channels.
- ``norm_pix_loss`` normalizes each target channel-patch by its own mean and variance (per channel,
  so no communication is needed).
- An optional validity mask (``valid``, False at missing values of the cube; see
  ``data.nodata=mask``) leaves those pixels out of the loss: the squared error and the element
  count run over valid target pixels only (reduced across TP like the sum), and norm_pix_loss
  uses the valid pixels' mean and variance. Without a mask the loss is computed exactly as before.

Pipeline parallelism: the encoder's backbone layers are split over the stages (the first owns the
channel stage); the decoder, head and loss live whole on the last stage. Every tensor sent between
stages is the encoder's ``[L_visible, B, D]`` (``[L_visible/T, B, D]`` under sequence
parallelism). Every stage is given the batch (images and masks): the first tokenizes the visible
patches, the last needs the masks and its output channels' pixels for the loss.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from megatron_dchag.config import ExperimentConfig, MAEConfig, num_masked_patches, resolve_config
from megatron_dchag.layers.channel_plan import group_generator
from megatron_dchag.layers.embeddings import sincos_2d, xavier_uniform_
from megatron_dchag.layers.heads import ChannelParallelHead, reduce_loss_across_tp
from megatron_dchag.layers.tokenizer import patchify_channels_first
from megatron_dchag.models.encoder import DCHAGEncoder, make_transformer_config
from megatron_dchag.models.vit_spec import get_vit_block_spec


def random_patch_mask(
    num_patches: int, mask_ratio: float, batch_size: int, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random split of patch positions: ``(visible [B, Lv], masked [B, Lm])``, sorted."""
    num_masked = num_masked_patches(num_patches, mask_ratio)
    order = torch.argsort(torch.rand(batch_size, num_patches, generator=generator), dim=1)
    visible = torch.sort(order[:, num_masked:], dim=1).values
    masked = torch.sort(order[:, :num_masked], dim=1).values
    return visible, masked


class MAEOutput(NamedTuple):
    """A tuple, so megatron's Float16Module can cast it; fields in this order."""

    loss: torch.Tensor  # scalar MSE over masked patches of all channels, identical on all TP ranks
    prediction: torch.Tensor  # [B, C_local, Lm, p*p] (normalized space if norm_pix_loss)
    target: torch.Tensor  # [B, C_local, Lm, p*p]
    mean_baseline_loss: torch.Tensor  # the loss of predicting the per-channel mean (0 after normalization)


class MaskedAutoencoder(MegatronModule):
    def __init__(self, cfg: ExperimentConfig, seed: int = 1234, wavelengths: Optional[Sequence[float]] = None,
                 pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None):
        cfg = resolve_config(cfg)  # as loaded or already resolved: G and the other defaults filled in
        model, mae = cfg.model, cfg.mae
        model.validate(cfg.parallel.tensor_model_parallel_size)
        enc_config = make_transformer_config(model, cfg.parallel, cfg.training)
        super().__init__(config=enc_config)
        self.model_type = ModelType.encoder_or_decoder
        self.mae: MAEConfig = mae
        self.pre_process, self.post_process = pre_process, post_process
        self.encoder = DCHAGEncoder(
            model, enc_config, seed=seed, wavelengths=wavelengths, pre_process=pre_process,
            post_process=post_process, vp_stage=vp_stage,
            recompute_channel_stage=cfg.training.recompute_granularity == "channel_stage",
        )
        d, dd = model.hidden_size, mae.decoder_hidden_size
        self.patch_size = model.patch_size
        self.grid = self.encoder.grid
        self._input_range = self.encoder.plan.owned_channel_range(model.shards_channels)
        self._output_range = self.encoder.plan.owned_channel_range(sharded=True)
        if not post_process:
            return
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.empty(dd))
        with torch.no_grad():
            xavier_uniform_(self.decoder_embed.weight, d, dd, group_generator(seed, "mae.decoder_embed", 0))
            self.decoder_embed.bias.zero_()
            self.mask_token.normal_(0.0, 0.02, generator=group_generator(seed, "mae.mask_token", 0))
        self.register_buffer("decoder_pos", sincos_2d(self.grid[0], self.grid[1], dd), persistent=False)
        dec_config = make_transformer_config(
            model, cfg.parallel, cfg.training, num_layers=mae.decoder_num_layers, hidden_size=dd,
            num_attention_heads=mae.decoder_num_attention_heads, pipelined=False,
        )
        self.decoder = TransformerBlock(config=dec_config, spec=get_vit_block_spec(dec_config, model.transformer_impl))
        self.head = ChannelParallelHead(self.encoder.plan, dd, self.patch_size**2, seed, name="mae.head")
        assert self.head.channel_range == self._output_range

    @property
    def input_channel_range(self) -> Tuple[int, int]:
        """Input channels this rank reads (the same on every pipeline stage): ``[start, stop)``."""
        return self._input_range

    @property
    def output_channel_range(self) -> Tuple[int, int]:
        return self._output_range

    def forward(self, images: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor,
                valid: Optional[torch.Tensor] = None):
        """``images [B, C_in, H, W]`` with this rank's input channels; ``visible``/``masked`` ``[B, L*]``;
        ``valid`` (bool, like ``images``, optional): the pixels that count in the loss.

        Returns an :class:`MAEOutput` on the last pipeline stage, else the encoder's hidden states
        for the next stage.
        """
        b = images.shape[0]
        latent = self.encoder(images if self.pre_process else None, patch_index=visible)  # [Lv, B, D]
        if not self.post_process:
            return latent
        tokens = self.decoder_embed(latent)  # [Lv, B, Dd]
        num_patches = self.grid[0] * self.grid[1]
        full = self.mask_token.to(tokens.dtype).expand(num_patches, b, -1).clone()
        full = full.scatter(0, visible.t().unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), tokens)
        full = full + self.decoder_pos.to(tokens.dtype).unsqueeze(1)
        decoded = self.decoder(hidden_states=full, attention_mask=None)  # [L, B, Dd]
        at_masked = torch.gather(decoded, 0, masked.t().unsqueeze(-1).expand(-1, -1, decoded.shape[-1]))
        pred = self.head(at_masked)  # [Lm, B, C_out, p*p]
        pred = pred.permute(1, 2, 0, 3)  # [B, C_out, Lm, p*p]

        in_lo = self.input_channel_range[0]
        out_lo, out_hi = self.output_channel_range
        target_imgs = images[:, out_lo - in_lo : out_hi - in_lo]
        patches = patchify_channels_first(target_imgs, self.patch_size)  # [C_out, L, B, k]
        idx = masked.t().reshape(1, -1, b, 1).expand(patches.shape[0], -1, b, patches.shape[-1])
        target = torch.gather(patches, 1, idx).permute(2, 0, 1, 3)  # [B, C_out, Lm, k]
        if valid is not None:
            return self._masked_loss(pred, target, valid[:, out_lo - in_lo : out_hi - in_lo], idx)
        if self.mae.norm_pix_loss:
            mean = target.mean(-1, keepdim=True)
            var = target.var(-1, keepdim=True, unbiased=False)
            target = (target - mean) / (var + 1e-6).sqrt()
        sq_err = ((pred.float() - target.float()) ** 2).sum()
        total = target.shape[0] * self.encoder.plan.num_channels * target.shape[2] * target.shape[3]
        sums = reduce_loss_across_tp(torch.stack([sq_err, (target.float() ** 2).sum().detach()])) / total
        return MAEOutput(loss=sums[0], prediction=pred, target=target, mean_baseline_loss=sums[1])

    def _masked_loss(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                     idx: torch.Tensor) -> MAEOutput:
        """The loss over the valid pixels only (``valid [B, C_out, H, W]``; ``idx`` gathers the
        masked patches as for the target)."""
        weight = torch.gather(patchify_channels_first(valid.float(), self.patch_size), 1, idx).permute(2, 0, 1, 3)
        target = target.float() * weight
        if self.mae.norm_pix_loss:
            n = weight.sum(-1, keepdim=True).clamp(min=1.0)
            mean = target.sum(-1, keepdim=True) / n
            var = (((target - mean) * weight) ** 2).sum(-1, keepdim=True) / n
            target = (target - mean) / (var + 1e-6).sqrt() * weight
        sq_err = (((pred.float() - target) * weight) ** 2).sum()
        sums = reduce_loss_across_tp(torch.stack([sq_err, (target**2).sum().detach(), weight.sum().detach()]))
        count = sums[2].clamp(min=1.0)  # a micro-batch without one valid masked pixel has loss 0
        return MAEOutput(loss=sums[0] / count, prediction=pred, target=target, mean_baseline_loss=sums[1] / count)

    def set_input_tensor(self, input_tensor) -> None:
        self.encoder.set_input_tensor(input_tensor)

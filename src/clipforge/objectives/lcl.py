"""LCL, Latent Compression Learning (LCL, NeurIPS 2024; docs/lcl.md): generation + contrastive on documents.

    L = generation_weight * L_gen + contrastive_weight * L_con            (defaults 1.0 and 0.1, as the official)
    L_gen  next-token cross-entropy over every target that is not an <img> placeholder, <eoi> or padding
           (the text after an image is predicted through the image tokens: the captioning signal)
    L_con  symmetric InfoNCE between each image's pooled latent and the LM state at its <soi> (ln_final and the
           text projection: the model's prediction of the image from what precedes it); an image whose <soi>
           is at position 0 has no context and takes no part (half of all pairs, with image-first pairs)

The temperature is the model's `logit_scale` (ln(1/0.07) at first), clamped to [0, ln 100] after each step as
CLIP's; it is reported in the metrics. Both losses are global means over all ranks: the contrastive one
gathers every rank's images with gradients (a rank with fewer images pads with rows marked invalid), and the
token count of the generation loss is summed over ranks, so W ranks x B documents give the loss and gradients
of 1 rank x W*B. The contrastive logits are computed in fp32, outside autocast (as the official code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.data.batches import IGNORE_INDEX, DocumentBatch
from clipforge.distributed import gather_no_grad, world_info
from clipforge.objectives.base import Objective, ObjectiveOutput
from clipforge.objectives.clip import clamp_logit_scale
from clipforge.objectives.contrastive import contrastive_loss


class LclObjective(Objective):
    batch_type = DocumentBatch  # an instance's: DocumentBatchType with the model's limits (from_config)
    name = "lcl"
    families = ("lcl",)

    def __init__(self, generation_weight: float = 1.0, contrastive_weight: float = 0.1, *, tokenizer=None,
                 max_images: int | None = 6, image_first_prob: float = 0.5):
        super().__init__()
        self.generation_weight = generation_weight
        self.contrastive_weight = contrastive_weight
        if tokenizer is not None:
            from clipforge.data.documents import DocumentBatchType

            self.batch_type = DocumentBatchType(tokenizer, max_images, image_first_prob)

    @classmethod
    def from_config(cls, config, model: nn.Module) -> LclObjective:
        from clipforge.errors import ConfigError
        from clipforge.models.lcl import LclModel, document_tokenizer

        if not isinstance(model, LclModel):
            raise ConfigError(f"objective 'lcl' trains the lcl family (model.family: lcl), not a "
                              f"{type(model).__name__}")
        lcl = config.objective.lcl
        return cls(lcl.generation_weight, lcl.contrastive_weight, tokenizer=document_tokenizer(model),
                   max_images=lcl.max_images, image_first_prob=lcl.image_first_prob)

    def forward(self, model: nn.Module, batch: DocumentBatch) -> ObjectiveOutput:
        pooled, image_embeddings = model.image_latents(batch.images)  # [N, D], [N, P, D]
        hidden = model.hidden_states(batch.tokens, image_embeddings, batch.image_spans)  # [B, T, D]
        generation, token_accuracy = self.generation_loss(model, hidden, batch.targets)
        contrastive, metrics = self.contrastive_loss(model, pooled, hidden, batch.image_spans)
        metrics["next_token_acc"] = token_accuracy
        return ObjectiveOutput(losses={"generation": self.generation_weight * generation,
                                       "contrastive": self.contrastive_weight * contrastive}, metrics=metrics)

    @staticmethod
    def generation_loss(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor):
        """(cross-entropy averaged over the valid targets of all ranks, this rank's next-token accuracy)."""
        valid = targets != IGNORE_INDEX  # [B, T]
        logits = model.next_token_logits(hidden[valid])  # [M, V], only where a target exists
        wanted = targets[valid]  # [M]
        summed = F.cross_entropy(logits.float(), wanted, reduction="sum")
        count = torch.tensor([wanted.numel()], device=hidden.device)
        total = gather_no_grad(count, keep_local_grad=False).sum().clamp_min(1)
        loss = summed / total
        info = world_info()
        if info.enabled:  # DDP averages gradients over ranks: scale back to the gradient of the global mean
            loss = loss * info.world_size
        with torch.no_grad():
            accuracy = (logits.argmax(dim=-1) == wanted).float().mean() if wanted.numel() else logits.new_zeros(())
        return loss, accuracy

    @staticmethod
    def contrastive_loss(model: nn.Module, pooled: torch.Tensor, hidden: torch.Tensor, image_spans: torch.Tensor):
        soi = image_spans[:, 1] - 1  # [N] each image's <soi> position
        valid = soi > 0  # a <soi> at position 0 predicts the image from nothing: no pair
        text = model.text_features(hidden[image_spans[:, 0], soi])  # [N, D]
        # every rank gathers the same shape: pad to the largest image count, padding rows invalid
        count = torch.tensor([pooled.shape[0]], device=pooled.device)
        most = int(gather_no_grad(count, keep_local_grad=False).max())
        padding = most - pooled.shape[0]
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            image_features = F.normalize(F.pad(pooled.float(), (0, 0, 0, padding)), dim=-1)  # [Nmax, D]
            text_features = F.normalize(F.pad(text.float(), (0, 0, 0, padding)), dim=-1)  # [Nmax, D]
            valid = F.pad(valid, (0, padding), value=False)  # [Nmax]
            logit_scale = model.logit_scale.float().exp()
            loss, metrics = contrastive_loss(image_features, text_features, logit_scale, valid=valid)
        metrics["logit_scale"] = logit_scale.detach()
        metrics["contrastive_pairs"] = valid.sum().float()
        return loss, metrics

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        clamp_logit_scale(model)

"""The FineCLIP objective against hand-written references on a micro ViT (32 px, 4 x 4 patch grid)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipforge.config import FineclipObjectiveConfig, load_config
from clipforge.data.batches import RegionBatch
from clipforge.models.dense import encode_image_and_dense
from clipforge.objectives.fineclip import FineclipObjective, text_parameters

open_clip.add_model_config(Path(__file__).resolve().parent.parent / "src" / "clipforge" / "model_configs")

CONTEXT = 24  # clipforge-vit-micro's text context length


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    model = open_clip.create_model("clipforge-vit-micro")
    with torch.no_grad():  # move away from the symmetric initialisation so every term is informative
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def make_batch(boxes, valid, seed: int = 0) -> RegionBatch:
    generator = torch.Generator().manual_seed(seed)
    boxes = torch.tensor(boxes, dtype=torch.float32)  # [B, M, 4]
    batch, slots = boxes.shape[:2]
    return RegionBatch(
        images=torch.randn(batch, 3, 32, 32, generator=generator),
        texts=torch.randint(1, 5000, (batch, CONTEXT), generator=generator),
        labels=torch.full((batch,), -1),
        keys=[str(i) for i in range(batch)],
        boxes=boxes,
        region_texts=torch.randint(1, 5000, (batch, slots, CONTEXT), generator=generator),
        region_valid=torch.tensor(valid, dtype=torch.bool),
    )


def info_nce(rows: torch.Tensor, columns: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Textbook symmetric InfoNCE over matched rows (no masks, no gathers)."""
    logits = scale * rows @ columns.T
    labels = torch.arange(rows.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# Three images, two slots. Boxes chosen so the hand reference needs no RoIAlign and no resize:
# [8, 8, 24, 24] covers patch cells rows/cols 1..2 (pooled = mean of that 2 x 2 block) and, enlarged 2x, is
# the whole image; [0, 0, 32, 32] is the whole image (mean of the map; its 2x crop clips to the image).
BOXES = [
    [[8, 8, 24, 24], [0, 0, 32, 32]],
    [[0, 0, 32, 32], [0, 0, 0, 0]],
    [[0, 0, 0, 0], [8, 8, 24, 24]],
]
VALID = [[True, True], [True, False], [False, True]]
CELLS = {(8, 8, 24, 24): (slice(1, 3), slice(1, 3)), (0, 0, 32, 32): (slice(0, 4), slice(0, 4))}


def hand_reference(model, batch, weights=(1.0, 1.0, 1.0)):
    scale = model.logit_scale.exp()
    embedding, dense = encode_image_and_dense(model, batch.images)
    image_features = F.normalize(embedding, dim=-1)
    with torch.no_grad():
        text_features = model.encode_text(batch.texts, normalize=True)
        teacher = F.normalize(model.encode_image(batch.images), dim=-1)  # every 2x crop is the whole image
    regions, region_texts, cosines = [], [], []
    for b, row in enumerate(BOXES):
        for m, box in enumerate(row):
            if not VALID[b][m]:
                continue
            rows, cols = CELLS[tuple(box)]
            region = F.normalize(dense[b, :, rows, cols].mean(dim=(1, 2)), dim=0)
            regions.append(region)
            cosines.append((region * teacher[b]).sum())
            with torch.no_grad():
                region_texts.append(model.encode_text(batch.region_texts[b, m][None], normalize=True)[0])
    global_loss = info_nce(image_features, text_features, scale)
    distill = 1 - torch.stack(cosines).mean()
    region_loss = info_nce(torch.stack(regions), torch.stack(region_texts), scale)
    return weights[0] * global_loss + weights[1] * distill + weights[2] * region_loss, (global_loss, distill,
                                                                                       region_loss)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_matches_hand_reference():
    model = make_model()
    batch = make_batch(BOXES, VALID)
    config = FineclipObjectiveConfig(w_global=0.7, w_distill=1.3, w_region=0.4, crop_scale=2.0)
    objective = FineclipObjective(config, model=model)
    out = objective(model, batch)
    total, (global_loss, distill, region_loss) = hand_reference(model, batch, (0.7, 1.3, 0.4))
    torch.testing.assert_close(out.losses["global"], 0.7 * global_loss)
    torch.testing.assert_close(out.losses["distill"], 1.3 * distill)
    torch.testing.assert_close(out.losses["region"], 0.4 * region_loss)
    assert float(out.metrics["regions"]) == 4
    assert float(out.metrics["distill_cos"]) == pytest.approx(1 - float(distill.detach()), abs=1e-6)

    out.total.backward()
    ours = grads(model)
    model.zero_grad()
    total.backward()
    reference = grads(model)
    assert ours.keys() == reference.keys() and "logit_scale" in ours
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], atol=1e-6, rtol=1e-4, msg=name)


def test_padding_slots_with_garbage_change_nothing():
    model = make_model()
    config = FineclipObjectiveConfig(crop_scale=2.0, freeze_text=False, teacher_stop_grad=False)
    objective = FineclipObjective(config, model=model)
    batch = make_batch(BOXES, VALID)
    out = objective(model, batch)
    out.total.backward()
    clean = grads(model)

    padded = copy.deepcopy(batch)  # two more slots per image, invalid, full of garbage (NaN boxes too)
    padded.boxes = torch.cat([batch.boxes, torch.tensor([[[float("nan")] * 4, [5.0, 5, 30, 30]]] * 3)], dim=1)
    padded.region_texts = torch.cat([batch.region_texts, torch.randint(1, 5000, (3, 2, CONTEXT))], dim=1)
    padded.region_valid = torch.cat([batch.region_valid, torch.zeros(3, 2, dtype=torch.bool)], dim=1)
    model.zero_grad()
    padded_out = objective(model, padded)
    padded_out.total.backward()
    for name in out.losses:
        torch.testing.assert_close(padded_out.losses[name], out.losses[name])
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, clean[name], atol=1e-6, rtol=1e-5, msg=name)


def test_stop_grad_detaches_the_teacher():
    batch = make_batch(BOXES, VALID)
    only_distill = dict(w_global=0.0, w_region=0.0, crop_scale=2.0)

    def distill_grads(stop_grad: bool, reference: bool = False):
        model = make_model()
        if reference:  # teacher embeddings as constants, student path by hand
            _, dense = encode_image_and_dense(model, batch.images)
            with torch.no_grad():
                teacher = F.normalize(model.encode_image(batch.images), dim=-1)
            cosines = []
            for b, row in enumerate(BOXES):
                for m, box in enumerate(row):
                    if VALID[b][m]:
                        rows, cols = CELLS[tuple(box)]
                        region = F.normalize(dense[b, :, rows, cols].mean(dim=(1, 2)), dim=0)
                        cosines.append((region * teacher[b]).sum())
            (1 - torch.stack(cosines).mean()).backward()
        else:
            objective = FineclipObjective(FineclipObjectiveConfig(teacher_stop_grad=stop_grad, **only_distill),
                                          model=model)
            objective(model, batch).total.backward()
        return grads(model)

    detached, attached, reference = distill_grads(True), distill_grads(False), distill_grads(True, True)
    for name, grad in reference.items():
        torch.testing.assert_close(detached[name], grad, atol=1e-7, rtol=1e-5, msg=name)
    # without stop-grad the teacher branch adds gradient (e.g. to the patch embedding via the crops)
    assert not torch.allclose(attached["visual.conv1.weight"], reference["visual.conv1.weight"], atol=1e-6)


def test_freeze_text_keeps_text_tower_fixed_through_a_step():
    model = make_model()
    objective = FineclipObjective(FineclipObjectiveConfig(crop_scale=2.0), model=model)
    model.train()  # as the loop does; the objective keeps the text tower in eval mode
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = objective(model, make_batch(BOXES, VALID))
    assert not model.transformer.training and model.visual.training
    out.total.backward()
    optimizer.step()
    text_names = {n for n, p in model.named_parameters() if any(p is q for q in text_parameters(model))}
    assert "token_embedding.weight" in text_names and "text_projection" in text_names
    for name, value in model.state_dict().items():
        if name in text_names:
            assert torch.equal(value, before[name]), name
    assert not torch.equal(model.visual.conv1.weight, before["visual.conv1.weight"])
    assert not torch.equal(model.logit_scale, before["logit_scale"])

    trainable = make_model()
    FineclipObjective(FineclipObjectiveConfig(freeze_text=False), model=trainable)
    assert all(p.requires_grad for p in text_parameters(trainable))


def test_batch_without_valid_regions_gives_the_global_loss():
    model = make_model()
    batch = make_batch(BOXES, [[False, False]] * 3)
    batch.boxes[0, 0] = float("nan")
    objective = FineclipObjective(FineclipObjectiveConfig(), model=model)
    out = objective(model, batch)
    global_only = FineclipObjective(FineclipObjectiveConfig(w_distill=0.0, w_region=0.0), model=model)
    expected = global_only(model, batch).total
    assert float(out.losses["distill"].detach()) == 0.0 and float(out.losses["region"].detach()) == 0.0
    torch.testing.assert_close(out.total, expected)
    out.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_unusable_boxes_are_dropped_and_counted():
    model = make_model()
    boxes = [[[8, 8, 24, 24], [float("nan"), 0, 5, 5]], [[10, 10, 10, 20], [-50, -50, 80, 80]]]
    batch = make_batch(boxes, [[True, True], [True, True]])
    out = FineclipObjective(FineclipObjectiveConfig(), model=model)(model, batch)
    assert float(out.metrics["regions"]) == 2  # the NaN box and the zero-width box are dropped
    assert float(out.metrics["regions_unusable"]) == 2  # the oversized box is clipped to the image
    assert all(torch.isfinite(v) for v in out.losses.values())


def test_after_step_clamps_the_shared_temperature():
    model = make_model()
    objective = FineclipObjective(FineclipObjectiveConfig(), model=model)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    objective.after_step(model)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    objective.after_step(model)
    assert float(model.logit_scale.detach()) == 0.0


def test_teacher_resolution_below_the_patch_size_is_a_config_error():
    from clipforge.errors import ConfigError

    with pytest.raises(ConfigError, match="teacher_resolution"):
        FineclipObjective(FineclipObjectiveConfig(teacher_resolution=4), model=make_model())


def test_from_config_reads_weights_and_distributed_mode():
    config = load_config(None, ["objective.name=fineclip", "objective.fineclip.w_region=0",
                                "objective.clip.local_loss=false"])
    objective = FineclipObjective.from_config(config)
    assert objective.config.w_region == 0.0 and objective.local_loss is False
    out = objective(make_model(), make_batch(BOXES, VALID))
    assert set(out.losses) == {"global", "distill"}


def test_fine_tuning_a_saved_open_clip_checkpoint(tmp_path):
    """The common use: start from an existing open_clip checkpoint file. With the text tower frozen, the
    fine-tuned checkpoint keeps the saved text weights bit for bit while the image tower moves."""
    from safetensors.torch import load_file, save_file

    from clipforge.data.generate import generate_synth_shards
    from clipforge.engine.loop import train

    pretrained = make_model(seed=5)
    weights_file = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(weights_file))
    shards = tmp_path / "shards"
    generate_synth_shards(shards, num=16, image_size=32, shard_size=16)
    config = load_config(None, [
        "name=finetune", f"output_dir={tmp_path / 'run'}", f"data.train={shards}", "data.batch_size=8",
        "data.max_regions=2", "model.name=clipforge-vit-micro", f"model.pretrained={weights_file}",
        "objective.name=fineclip", "train.max_steps=2", "train.warmup_steps=1", "train.lr=1e-2",
        "train.device=cpu", "train.tensorboard=false", "train.progress=false",
    ])
    result = train(config)
    tuned = load_file(str(result.checkpoint / "model.safetensors"))
    saved = pretrained.state_dict()
    text_names = [n for n in saved if not n.startswith("visual.") and n != "logit_scale"]
    assert text_names and all(torch.equal(tuned[n], saved[n]) for n in text_names)
    assert not torch.equal(tuned["visual.conv1.weight"], saved["visual.conv1.weight"])
    # the fine-tuned file is a plain open_clip checkpoint
    reloaded = open_clip.create_model("clipforge-vit-micro", pretrained=str(result.checkpoint / "model.safetensors"))
    assert torch.equal(reloaded.visual.proj, tuned["visual.proj"])


def test_reproduction_table_and_results_section(tmp_path):
    from clipforge.reproduce.fineclip import COLUMNS, results_table, write_results_section

    titles = [title for title, *_ in COLUMNS]
    results = {"clip": [dict.fromkeys(titles, 0.25), dict.fromkeys(titles, 0.75)],
               "fineclip": [{**dict.fromkeys(titles, 0.5), "region top-1": float("nan")}]}
    table = results_table(results)
    rows = table.splitlines()
    assert rows[2].startswith("| CLIP | 2 | 50.0 +- 35.4 |")  # mean and sample std over seeds, in percent
    assert rows[3].startswith("| FineCLIP (global + distill + region) | 1 | n/a | 50.0 +- 0.0 |")

    results_md = tmp_path / "results.md"
    results_md.write_text("# Results\n\n## Reliability\n\nkeep me\n", encoding="utf-8")
    write_results_section(results_md, "first")
    write_results_section(results_md, "second")
    text = results_md.read_text(encoding="utf-8")
    assert "keep me" in text and "second" in text and "first" not in text and text.count("fineclip-reproduction:begin") == 1

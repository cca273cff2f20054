"""Region (box) classification against analytic answers: a stub model whose dense map is read off the pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torchvision.transforms import functional as TF

from clipforge.errors import DataError
from clipforge.eval.datasets import EvalDataset
from clipforge.eval.regions import compute_region_features, evaluate_regions, region_label
from clipforge.models.dense import encode_dense, pool_regions

CLASSNAMES = ["red circle", "blue square", "green star", "cyan heart", "pink cross", "purple diamond"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]


class StubModel(torch.nn.Module):
    """Texts -> one-hot class embeddings; the dense map at each 8 x 8 cell is the share of its pixels painted
    with each class's code (red channel = 20 * (class + 1); anything else is background)."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the stub a device

    def encode_text(self, tokens, normalize=False):
        return F.one_hot(tokens[:, 0], len(CLASSNAMES)).float()

    def encode_dense(self, images):
        mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
        red = ((images * std + mean)[:, 0] * 255).round().long()  # [B, H, W]
        code = torch.where(red % 20 == 0, red // 20 - 1, -1)
        code = torch.where((code >= 0) & (code < len(CLASSNAMES)), code, len(CLASSNAMES))
        per_pixel = F.one_hot(code, len(CLASSNAMES) + 1)[..., :-1].permute(0, 3, 1, 2).float()  # [B, C, H, W]
        return F.avg_pool2d(per_pixel, 8)  # [B, C, 8, 8]


def stub_tokenizer(texts):
    return torch.tensor([[next(i for i, name in enumerate(CLASSNAMES) if name in text)] for text in texts])


def painted(cells: dict[tuple[int, int, int, int], int]) -> Image.Image:
    """A 64 x 64 image, grey except pixel rectangles (x0, y0, x1, y1) painted with a class code."""
    pixels = np.full((64, 64, 3), 255, dtype=np.uint8)  # 255 is no code
    for (x0, y0, x1, y1), label in cells.items():
        pixels[y0:y1, x0:x1] = (20 * (label + 1), 0, 0)
    return Image.fromarray(pixels)


def test_region_classification_matches_the_analytic_answer():
    image0 = painted({(0, 0, 16, 16): 0, (32, 32, 56, 64): 1, (56, 32, 64, 64): 2})
    image1 = painted({(8 * col, 0, 8 * col + 8, 64): col + 1 for col in range(5)})
    regions = [
        [
            {"box": [0, 0, 16, 16], "caption": "a large solid red circle"},  # red: right
            {"box": [32, 32, 64, 64], "caption": "a small striped green star"},  # 3/4 blue, 1/4 green: top-5 only
            {"box": [0, 0, 8, 8], "caption": "a tiny thing"},  # no class named: skipped
            {"box": [float("nan"), 0, 8, 8], "caption": "a red circle"},  # bad box: skipped
        ],
        [
            {"box": [0, 0, 40, 64], "caption": "a red circle"},  # five other classes, 1/5 each: wrong, not in top 5
            {"box": [8, 0, 16, 64], "caption": "a dotted green star"},  # right
            {"box": [24, 0, 32, 32], "label": 4},  # column 3 is class 4: right
            {"box": [16, 0, 24, 64], "classname": "Cyan Heart"},  # right
        ],
    ]
    dataset = EvalDataset(name="stub", images=[image0, image1], regions=regions, classnames=CLASSNAMES)
    metrics, details = evaluate_regions(StubModel(), stub_tokenizer, dataset, TEMPLATES, image_size=64,
                                        batch_size=1)
    assert metrics["region_count"] == 6 and metrics["region_skipped"] == 2
    assert metrics["region_acc1"] == pytest.approx(4 / 6)
    assert metrics["region_acc5"] == pytest.approx(5 / 6)
    # classes with boxes: red 1/2, green 1/2, cyan 1, pink 1
    assert metrics["region_mean_per_class_recall"] == pytest.approx(0.75)
    assert details["support"] == [2, 0, 2, 1, 1, 0]


def test_region_label_sources():
    assert region_label({"caption": "a large striped red circle"}, CLASSNAMES) == 0
    assert region_label({"caption": "a large striped redcircle"}, CLASSNAMES) is None
    assert region_label({"caption": "x", "label": 3}, CLASSNAMES) == 3
    assert region_label({"caption": "x", "label": 9}, CLASSNAMES) is None
    assert region_label({"classname": "blue square"}, CLASSNAMES) == 1
    # the longest class name in the caption wins
    assert region_label({"caption": "a dark red circle"}, ["red circle", "dark red circle"]) == 1


def test_open_clip_model_uses_its_dense_map_at_the_requested_resolution():
    open_clip.add_model_config(Path(__file__).resolve().parent.parent / "src" / "clipforge" / "model_configs")
    torch.manual_seed(0)
    model = open_clip.create_model("clipforge-vit-micro").eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8))  # H 16, W 24
    dataset = EvalDataset(name="one", images=[image], classnames=CLASSNAMES,
                          regions=[[{"box": [0, 0, 12, 16], "caption": "a red circle"},
                                    {"box": [6, 4, 24, 12], "caption": "a blue square"}]])
    features, labels, skipped = compute_region_features(model, dataset, CLASSNAMES, image_size=64)
    # by hand: the image squashed to 64 x 64, boxes scaled by (64/24, 64/16)
    tensor = TF.normalize(TF.to_tensor(image.resize((64, 64), Image.BICUBIC)), OPENAI_DATASET_MEAN,
                          OPENAI_DATASET_STD)[None]
    boxes = torch.tensor([[[0.0, 0, 32, 64], [16, 16, 64, 48]]])
    with torch.no_grad():
        expected = pool_regions(encode_dense(model, tensor), boxes, torch.ones(1, 2, dtype=torch.bool), (64, 64))
    assert features.shape == (2, 32) and skipped == 0 and labels.tolist() == [0, 1]
    torch.testing.assert_close(features, expected[0])


def test_dataset_without_regions_is_a_clear_error():
    dataset = EvalDataset(name="plain", images=[painted({})], classnames=CLASSNAMES)
    with pytest.raises(DataError, match="no region annotations"):
        evaluate_regions(StubModel(), stub_tokenizer, dataset, TEMPLATES, image_size=64)


def test_suite_task_gives_the_same_numbers():
    from clipforge.config import EvalConfig
    from clipforge.eval.features import FeatureStore
    from clipforge.eval.tasks import TaskContext, get_task

    image = painted({(0, 0, 16, 16): 0, (32, 32, 56, 64): 1, (56, 32, 64, 64): 2})
    regions = [[{"box": [0, 0, 16, 16], "caption": "a red circle"}, {"box": [32, 32, 64, 64], "caption": "a green star"}]]
    dataset = EvalDataset(name="stub", images=[image], regions=regions, classnames=CLASSNAMES)
    context = TaskContext(features=FeatureStore(StubModel(), None, stub_tokenizer), config=EvalConfig(),
                          templates=TEMPLATES)
    task = get_task("regions")
    assert task.benchmark_task == "region_classification"
    output = task.run(context, dataset)
    expected, _ = evaluate_regions(StubModel(), stub_tokenizer, dataset, TEMPLATES)
    assert output.metrics == expected
    assert output.metrics["region_acc1"] == 0.5 and output.metrics["region_count"] == 2


# ----------------------------------------------------------------------------------------------------------
# Non-square images: height and width never trade places (pooling, clipping, region evaluation)


def painted_wide(cells: dict[tuple[int, int, int, int], int], width: int = 64, height: int = 32) -> Image.Image:
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    for (x0, y0, x1, y1), label in cells.items():
        pixels[y0:y1, x0:x1] = (20 * (label + 1), 0, 0)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("image_size", [None, (64, 64)])  # its own 32 x 64, or squashed to a square
def test_boxes_past_the_shorter_side_of_a_wide_image_are_clipped_to_its_height(image_size):
    image = painted_wide({(0, 0, 16, 32): 0, (40, 0, 64, 32): 2})  # 64 wide, 32 tall: red left, green right
    regions = [[
        {"box": [48, 8, 64, 100], "caption": "a green star"},  # past the bottom: clipped to y 32, all green
        {"box": [-10, 20, 70, 40], "caption": "a green star"},  # past every side: [0, 20, 64, 32], 3 green cols : 2 red
        {"box": [0, 0, 40, 90], "caption": "a red circle"},  # [0, 0, 40, 32]: 2 red columns of 5, the rest blank
        {"box": [0, 40, 16, 60], "caption": "a red circle"},  # wholly below the image: nothing left, skipped
    ]]
    dataset = EvalDataset(name="wide", images=[image], regions=regions, classnames=CLASSNAMES)
    metrics, details = evaluate_regions(StubModel(), stub_tokenizer, dataset, TEMPLATES, image_size=image_size)
    assert metrics["region_count"] == 3 and metrics["region_skipped"] == 1
    assert metrics["region_acc1"] == 1.0 and details["support"] == [1, 0, 2, 0, 0, 0]


def test_pool_regions_on_a_non_square_map_is_the_mean_of_the_covered_cells():
    from clipforge.models.dense import enlarge_boxes

    rows, cols = torch.meshgrid(torch.arange(2.0), torch.arange(4.0), indexing="ij")
    dense = torch.stack([rows, cols, torch.ones(2, 4)])[None]  # [1, 3, h=2, w=4]: cell (r, c) holds (r, c, 1)
    boxes = torch.tensor([[[16.0, 0, 48, 16], [0, 8, 16, 16]]])  # image 64 wide, 16 tall: cells 16 x 8 px
    pooled = pool_regions(dense, boxes, torch.ones(1, 2, dtype=torch.bool), (16, 64), normalize=False)
    torch.testing.assert_close(pooled[0], torch.tensor([[0.5, 1.5, 1.0], [1.0, 0.0, 1.0]]))
    # enlarging clips x to the width and y to the height
    enlarged = enlarge_boxes(torch.tensor([[40.0, 10, 60, 14]]), 2.0, (16, 64))
    torch.testing.assert_close(enlarged, torch.tensor([[30.0, 8, 64, 16]]))


def test_positional_embedding_for_a_non_square_grid_keeps_rows_as_rows():
    from clipforge.models.dense import positional_embedding_for_grid

    open_clip.add_model_config(Path(__file__).resolve().parent.parent / "src" / "clipforge" / "model_configs")
    model = open_clip.create_model("clipforge-vit-micro").eval()
    visual = model.visual  # 32 px, patch 8: a 4 x 4 grid
    with torch.no_grad():
        row_of_patch = torch.arange(16.0).div(4, rounding_mode="floor")  # patch i sits in row i // 4
        visual.positional_embedding[1:] = row_of_patch[:, None].expand(-1, visual.positional_embedding.shape[1])
    resized = positional_embedding_for_grid(visual, (4, 8))  # 4 rows, 8 columns
    assert resized.shape == (1 + 32, visual.positional_embedding.shape[1])
    expected = torch.arange(4.0).repeat_interleave(8)  # each of the 4 rows, 8 times
    torch.testing.assert_close(resized[1:, 0], expected)
    with torch.no_grad():
        dense = encode_dense(model, torch.zeros(1, 3, 32, 64))
    assert dense.shape == (1, 32, 4, 8)  # h = 32 / 8, w = 64 / 8

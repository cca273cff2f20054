"""The HTML report: self-contained (every image inline, nothing fetched), every section present, retrieval
marks and few-shot numbers agreeing with the result files, user text escaped; and the CLI paths around it."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.cli import main
from clipforge.config import EvalConfig, ExperimentConfig, save_config
from clipforge.errors import DataError
from clipforge.eval import EvalDataset, run_suite, write_report
from clipforge.eval.results import read_results

NUM_CLASSES, PER_CLASS, DIM = 6, 12, 16


class PixelIdModel(torch.nn.Module):
    """Image embedding looked up by the id painted in pixel (0, 0); text embedding from a fixed table."""

    def __init__(self, image_table: torch.Tensor, text_table: dict[str, torch.Tensor]):
        super().__init__()
        self.image_table, self.text_table, self.texts = image_table, text_table, []
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, ids):
        return self.image_table[ids[:, 0]]

    def encode_text(self, ids):
        return torch.stack([self.text_table.get(self.texts[i], torch.ones(DIM)) for i in ids[:, 0].tolist()])


def pixel_image(index: int) -> Image.Image:
    image = Image.new("RGB", (16, 16), (40 + 30 * (index % 7), 90, 160))
    image.putpixel((0, 0), (index % 256, index // 256, 0))
    return image


def preprocess(image: Image.Image) -> torch.Tensor:
    red, green, _ = image.getpixel((0, 0))
    return torch.tensor([red + 256 * green])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    save_config(ExperimentConfig(name="report-test"), run / "config.yaml")
    with (run / "metrics.jsonl").open("w") as log:
        for step in range(0, 200, 10):
            log.write(json.dumps({"step": step, "epoch": step // 100, "lr": 1e-3 * min(1, step / 50),
                                  "logit_scale": 14.3 + step / 100, "loss": 4.0 / (1 + step / 50),
                                  "loss/clip": 4.0 / (1 + step / 50), "samples_per_s": 900.0}) + "\n")
        log.write(json.dumps({"step": 100, "event": "eval", "zeroshot_acc1": 0.3}) + "\n")
        log.write('{"step": 210, "loss": 1.0')  # a torn last line (killed run) must not break the report
    (run / "summary.json").write_text(json.dumps({"steps": 200, "final_loss": 1.2}))

    classnames = [f"class {c}" for c in range(NUM_CLASSES)]
    centers = F.normalize(torch.randn(NUM_CLASSES, DIM), dim=-1)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)
    count = len(labels)
    # ids: test 0..N-1, train N..2N-1, shifted variant 2N..3N-1
    table = torch.cat([centers[labels] + 0.6 * torch.randn(count, DIM) for _ in range(2)]
                      + [centers[labels] + 1.2 * torch.randn(count, DIM)])
    texts = {f"a {name}.": centers[c] for c, name in enumerate(classnames)}
    captions = []
    for i, label in enumerate(labels.tolist()):
        first, second = f"<b>{i}</b> & a {classnames[label]}", f"picture {i}"
        texts[first] = table[i] + 0.3 * torch.randn(DIM)
        texts[second] = table[i] + 0.8 * torch.randn(DIM)
        captions.append([first, second])
    model = PixelIdModel(table, texts)

    def tokenizer(batch):
        model.texts.extend(batch)
        return torch.arange(len(model.texts) - len(batch), len(model.texts))[:, None]

    def images(offset):
        return [pixel_image(offset + i) for i in range(count)]

    dataset = EvalDataset(name="toy", images=images(0), labels=labels.tolist(), classnames=classnames,
                          captions=captions)
    dataset.train = EvalDataset(name="toy-train", images=images(count), labels=labels.tolist(),
                                classnames=classnames)
    dataset.variants["noisy"] = EvalDataset(name="toy-noisy", images=images(2 * count), labels=labels.tolist(),
                                            classnames=classnames)
    config = EvalConfig(fewshot_ways=3, fewshot_shots=[1, 3], fewshot_episodes=10, batch_size=32)
    run_suite(model, preprocess, tokenizer, config, dataset, run, model_name="toy-model", templates=["a {}."])
    return run


@pytest.fixture(scope="module")
def page(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    return path.read_text(encoding="utf-8")


def test_report_is_self_contained_and_complete(page):
    assert page.startswith("<!DOCTYPE html>")
    # nothing is fetched: no external URLs in src/href, no linked styles or scripts
    assert not re.search(r'(src|href)\s*=\s*"(?!data:)', page)
    assert "<link" not in page and "<script" not in page and "url(" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    for encoded in images:
        Image.open(io.BytesIO(base64.b64decode(encoded))).verify()  # every inline image is a valid PNG
    for heading in ("Metrics", "Training", "Zero-shot confusion matrices", "Retrieval examples",
                    "Few-shot accuracy vs shots", "Linear probe: choosing C", "Robustness"):
        assert f"<h2>{heading}</h2>" in page, heading


def test_report_numbers_and_marks_agree_with_results(run_dir, page):
    results = {r["clipforge_task"]: r for r in read_results(run_dir / "eval")}
    acc1 = results["zeroshot"]["metrics"]["acc1"]
    assert f"{100 * acc1:.1f}%" in page
    shots = results["fewshot"]["metrics"]
    assert f'{100 * shots["fewshot_acc1@3way3shot"]:.1f}%' in page
    queries = results["retrieval"]["_examples"]["queries"]
    assert len(queries) == 6 and all(len(q["top"]) == 5 for q in queries)
    correct = sum(hit["correct"] for q in queries for hit in q["top"])
    assert page.count('class="cand hit"') == correct
    assert page.count('class="cand miss"') == 5 * len(queries) - correct
    missed = [q for q in queries if not any(hit["correct"] for hit in q["top"])]
    assert all(q["target_rank"] > 5 for q in missed)
    assert page.count('class="cand target"') == len(missed)  # the right image shown beside a miss
    for query in missed:
        assert f'its image: #{query["target_rank"]}<' in page
    assert page.count('class="thumb"') == 5 * len(queries) + len(missed)


def test_user_text_is_escaped(page):
    assert "<b>0</b>" not in page
    assert "&lt;b&gt;0&lt;/b&gt; &amp; a class 0" in page


def test_report_of_training_log_only_and_of_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "lr": 0.1}) + "\n")
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "<h2>Training</h2>" in page and "<h2>Metrics</h2>" not in page
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="nothing to report"):
        write_report(empty)


def test_report_cli(run_dir, tmp_path, capsys):
    output = tmp_path / "page.html"
    assert main(["report", str(run_dir), "--output", str(output)]) == 0
    assert output.is_file() and str(output) in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("clipforge: error:") and "\n" not in error


@pytest.mark.filterwarnings("ignore:.*classes have no images")  # 24 images cannot cover 48 classes
def test_evaluate_run_uses_the_runs_checkpoint_and_settings(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    import clipforge.models.clip_family  # noqa: F401  registers clipforge's architectures with open_clip
    from clipforge.config import load_config
    from clipforge.eval import evaluate_run

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    config = ExperimentConfig(name="tiny-run")
    config.model.name = "clipforge-vit-micro"
    config.data.synth.image_size = 32
    config.data.synth.seed = 5
    config.eval = EvalConfig(tasks=["zeroshot", "retrieval"], num_eval=24, batch_size=16)
    save_config(config, run / "config.yaml")
    torch.manual_seed(1)
    model = open_clip.create_model("clipforge-vit-micro")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(step / "model.safetensors"))
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"path": step.name}))

    summary = evaluate_run(run)
    records = {(r["dataset"], r["clipforge_task"]): r for r in read_results(run / "eval")}
    assert set(records) == {(d, t) for d in ("synthscenes-base", "synthscenes-novel") for t in ("zeroshot", "retrieval")}
    record = records[("synthscenes-base", "zeroshot")]
    assert record["pretrained"] == str(step / "model.safetensors") and record["model"] == "clipforge-vit-micro"
    assert record["data"]["seed"] == 5 and record["data"]["image_size"] == 32 and record["data"]["num_images"] == 24
    assert summary["timing"]["images_encoded"] == 48  # base + novel test images, each once for both tasks
    assert load_config(run / "config.yaml").eval.num_eval == 24
    assert "<h2>Retrieval examples</h2>" in write_report(run).read_text(encoding="utf-8")


def test_the_comparison_report_has_a_section_per_method_with_every_task(tmp_path):
    from clipforge.eval.comparison import write_comparison_report
    from clipforge.eval.report import register_report_section
    from clipforge.eval.results import write_result

    def run(name: str, records: list[tuple[str, dict]]):
        folder = tmp_path / name
        (folder / "eval").mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"steps": 7, "train_time_s": 1.5}))
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                                                      for s in (1, 2, 3)))
        for task, metrics in records:
            write_result({"dataset": "synthscenes-base", "model": name, "task": task, "clipforge_task": task,
                          "metrics": metrics, "details": {"marker": f"{name}-{task}"}}, folder / "eval")
        return folder

    clip = run("clip", [("zeroshot", {"acc1": 0.25})])
    fine = run("fineclip", [("zeroshot", {"acc1": 0.5})])
    tokenizer = run("lgvq", [("reconstruction_test", {"psnr": 19.25, "codebook_usage": 87.5, "flag": True})])
    register_report_section("reconstruction_test",
                            lambda records: f"<p>section of {records[0]['details']['marker']}</p>")
    page = write_comparison_report({"CLIP vs FineCLIP": [clip, fine], "LG-VQ": [tokenizer]},
                                   tmp_path / "report.html", notes={"LG-VQ": "a tokenizer"}).read_text()
    sections = page.split("<section>")[1:]
    assert len(sections) == 2 and "CLIP vs FineCLIP" in sections[0] and "LG-VQ" in sections[1]
    assert "25.00%" in sections[0] and "50.00%" in sections[0] and "psnr" not in sections[0]
    assert "psnr" in sections[1] and "19.25<" in sections[1] and "87.5<" in sections[1] and "codebook_usage" in sections[1]
    assert "flag" not in sections[1]  # booleans are not metrics to compare
    assert "section of lgvq-reconstruction_test" in sections[1] and "a tokenizer" in sections[1]
    with pytest.raises(DataError, match="not found"):
        write_comparison_report({"x": [tmp_path / "missing"]}, tmp_path / "r.html")


def test_tokenizer_generation_and_captioning_sections_show_their_examples():
    from clipforge.eval.report_sections import (
        captioning_section,
        reconstruction_section,
        text_to_image_section,
        usage_histogram_png,
        usage_title,
    )
    from clipforge.eval.results import thumbnail_png_base64

    def png(colour) -> str:
        return thumbnail_png_base64(Image.new("RGB", (8, 8), colour))

    red, blue = png((255, 0, 0)), png((0, 0, 255))
    record = {"dataset": "synthscenes-base", "details": {"code_histogram": [5, 0, 3, 0]},
              "_examples": {"pairs": [{"image": 0, "key": "k0", "original_png_base64": red,
                                       "reconstruction_png_base64": blue}]}}
    fragment = reconstruction_section([record])
    assert red in fragment and blue in fragment and fragment.index(red) < fragment.index(blue)
    assert reconstruction_section([{"dataset": "x"}]) is None
    histogram = Image.open(io.BytesIO(base64.b64decode(usage_histogram_png([5, 0, 3, 0], "d"))))
    assert histogram.size[0] > 100 and usage_title([5, 0, 3, 0], "d") == "d: 2 of 4 codes used"

    t2i = {"dataset": "synthscenes-base", "metrics": {"t2i_acc1": 0.25, "real_acc1": 0.75},
           "_examples": {"grids_png_base64": {"a red circle.": red}}}
    fragment = text_to_image_section([t2i])
    assert "a red circle." in fragment and red in fragment and "25.0%" in fragment and "75.0%" in fragment

    captions = {"dataset": "synthscenes-base", "_examples": {
        "captions": [{"image": 3, "key": "k3", "generated": "a <red> square", "references": ["a red square"]}],
        "thumbnails_png_base64": {"3": blue}}}
    fragment = captioning_section([captions])
    assert "a &lt;red&gt; square" in fragment and "a red square" in fragment and blue in fragment

"""LCL: the sequence layout (specs §1.3), the model's two outputs and the prompt pose (§1.4, §1.6), the
objective's token and pair selection (§1.2), bad input, the jsonl converter, and a document run end to end.

The registry-wide test (tests/test_families.py) covers one step, SIGKILL + resume and reload for `lcl`; the
2-rank parity is tests/test_lcl_distributed.py."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from clipforge.config import ModelConfig, load_config
from clipforge.data.batches import IGNORE_INDEX
from clipforge.data.documents import DocumentBatchType, convert_jsonl_documents, pair_document, read_document
from clipforge.data.samples import Document, Sample, SkipCounter
from clipforge.data.transforms import BatchBuilder
from clipforge.errors import ConfigError, DataError
from clipforge.models import create_model
from clipforge.models.lcl import EOI, EOT, IMAGE, PAD, SOI, SOT, AttentivePooler, LclTokenizer

P = 16  # image tokens of lcl-tiny (32 px, patch 8)


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return create_model(ModelConfig(family="lcl", name="lcl-tiny"))


def picture(seed: int, size: int = 32) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    picture(seed).save(buffer, format="PNG")
    return buffer.getvalue()


def document(key: str, *items, pair: bool = False) -> Document:
    """items: strings (texts) and ints (image numbers)."""
    numbers = sorted({i for i in items if isinstance(i, int)})
    if pair:
        return pair_document(Sample(key=key, image=picture(0), caption=items[1]))
    return Document(key=key, items=[{"text": i} if isinstance(i, str) else {"image": i} for i in items],
                    images=[picture(n) for n in numbers])


def builder_for(bundle, batch_type=None, randomize=False, seed=0, epoch=0):
    from clipforge.objectives.lcl import LclObjective

    batch_type = batch_type or LclObjective(tokenizer=bundle.tokenizer).batch_type
    return BatchBuilder(batch_type, bundle.preprocess_val, bundle.tokenizer, seed=seed, epoch=epoch,
                        randomize=randomize)


# ---- layout ---------------------------------------------------------------------------------------------------

def test_a_text_first_pair_is_laid_out_with_its_targets_and_span(bundle):
    tokenizer = bundle.tokenizer
    caption = tokenizer.encode("a red circle")
    batch = builder_for(bundle)([document("p", 0, "a red circle", pair=True)])  # no randomising: caption first
    n = len(caption)
    expected = [SOT, *caption, SOI, *[IMAGE] * P, EOI, EOT]
    assert batch.tokens[0].tolist() == expected
    assert batch.attention_mask[0].all() and batch.image_spans.tolist() == [[0, n + 2, n + 2 + P]]
    targets = expected[1:] + [IGNORE_INDEX]
    targets = [IGNORE_INDEX if t in (IMAGE, EOI) else t for t in targets]
    assert batch.targets[0].tolist() == targets  # <soi> and the text after the image are targets, <img>/<eoi> not
    assert batch.images.shape == (1, 3, 32, 32)


def test_a_document_starting_with_an_image_has_its_soi_at_position_0_and_no_sot(bundle):
    batch = builder_for(bundle)([document("d", 0, "a red circle."), document("e", "two squares.", 0)])
    assert batch.tokens[0, 0] == SOI and batch.image_spans[0].tolist() == [0, 1, 1 + P]
    assert batch.tokens[1, 0] == SOT
    assert batch.targets[0, P].item() == IGNORE_INDEX  # the last placeholder predicts <eoi>: no loss
    assert batch.targets[0, P + 1].item() == batch.tokens[0, P + 2].item()  # <eoi> predicts the caption
    length = int(batch.attention_mask[0].sum())
    assert (batch.tokens[0, length:] == PAD).all() and (batch.targets[0, length - 1:] == IGNORE_INDEX).all()


def test_truncation_never_cuts_through_an_image_block():
    tokenizer, unlimited = LclTokenizer(context_length=40, image_tokens=4), LclTokenizer(10_000, 4)
    rng = random.Random(0)
    words = "red blue green circle square star dotted small large above below".split()
    for trial in range(300):
        items = []
        for index in range(rng.randint(1, 5)):
            items += [" ".join(rng.choices(words, k=rng.randint(0, 9))) or "x", index]
        if rng.random() < 0.5:
            items.append("the end")
        layout = tokenizer.lay_out(document(f"d{trial}", *items))
        tokens = layout.tokens
        assert len(tokens) <= 40
        soi = [i for i, t in enumerate(tokens) if t == SOI]
        assert soi == [s - 1 for s in layout.starts] and len(soi) == len(layout.images)
        for start in soi:  # every block whole: <soi> <img>x4 <eoi>
            assert tokens[start + 1 : start + 6] == [IMAGE] * 4 + [EOI]
        assert tokens.count(IMAGE) == 4 * len(soi) and tokens.count(EOI) == len(soi)
        untruncated = unlimited.lay_out(document(f"d{trial}", *items)).tokens
        assert untruncated[: len(tokens)] == tokens  # a prefix of the whole document
        if len(untruncated) > 40:  # cut: at the context, or right before the <soi> of the block it would cut
            assert EOT not in tokens
            assert len(tokens) == 40 or untruncated[len(tokens)] == SOI


def test_a_long_caption_is_cut_so_the_pair_image_always_fits():
    tokenizer = LclTokenizer(context_length=32, image_tokens=16)
    pair = document("p", 0, " ".join(["red circle"] * 40), pair=True)
    for image_first in (False, True):
        layout = tokenizer.lay_out(pair, image_first)
        assert len(layout.tokens) == 32 - image_first  # no <sot> before a leading image
        assert layout.images == [0] and layout.tokens[-1] == EOT
        assert layout.tokens.count(IMAGE) == 16


def test_pair_order_is_seeded_per_sample_and_epoch(bundle):
    pairs = [document(f"k{i}", 0, "a red circle", pair=True) for i in range(200)]

    def image_first(epoch: int) -> list[bool]:
        batch = builder_for(bundle, randomize=True, epoch=epoch)(pairs)
        return (batch.tokens[:, 0] == SOI).tolist()

    first = image_first(0)
    assert first == image_first(0)  # the same (seed, epoch, key): the same order
    assert first != image_first(1)
    assert 70 < sum(first) < 130  # image first with probability 0.5
    assert not any((builder_for(bundle)(pairs).tokens[:, 0] == SOI).tolist())  # evaluation: caption first


# ---- model -----------------------------------------------------------------------------------------------------

def test_encode_text_leaves_its_input_alone_and_reads_the_lm_state_at_soi(bundle):
    model, tokenizer = bundle.model.eval(), bundle.tokenizer
    tokens = tokenizer(["a red circle", "two blue squares above a star"])
    before = tokens.clone()
    with torch.no_grad():
        features = model.encode_text(tokens)
        assert torch.equal(tokens, before)  # the official code writes <soi> into the caller's tensor
        ends = (tokens == EOT).int().argmax(dim=1)
        posed = tokens.clone()
        posed[torch.arange(2), ends] = SOI
        hidden = model.hidden_states(posed)
        expected = model.text_features(hidden[torch.arange(2), ends])
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
        # the prompt is posed exactly as a caption before an image in training: the same <soi> feature
        batch = builder_for(bundle)([document("p", 0, "a red circle", pair=True)])
        pooled, image_embeddings = model.image_latents(batch.images)
        trained = model.hidden_states(batch.tokens, image_embeddings, batch.image_spans)
        soi = int(batch.image_spans[0, 1]) - 1
        torch.testing.assert_close(model.text_features(trained[0, soi]), features[0], rtol=1e-5, atol=1e-6)
    model.train()


def test_the_pooled_latent_is_an_attention_mix_of_the_lm_image_tokens():
    torch.manual_seed(0)
    pooler = AttentivePooler(width=8, out_dim=6, heads=1)
    patches = torch.randn(3, 5, 8)
    pooled, tokens = pooler(patches)  # [3, 6], [3, 5, 6]
    query = pooler.q_proj(pooler.norm_query(pooler.query))  # [1, 1, 8]
    keys = pooler.k_proj(pooler.norm_key(patches))  # [3, 5, 8]
    weights = torch.softmax((query @ keys.transpose(1, 2)) / 8 ** 0.5, dim=-1)  # [3, 1, 5]
    torch.testing.assert_close(pooled, (weights @ tokens).squeeze(1), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*classes have no images")
def test_the_model_serves_zero_shot_and_retrieval_unchanged(bundle, tmp_path):
    from clipforge.config import EvalConfig
    from clipforge.eval import model_capabilities, run_suite, synth_eval_datasets

    assert model_capabilities(bundle.model) == {"encode_image", "encode_text", "image_tokens"}
    datasets = synth_eval_datasets(num_eval=24, image_size=32, groups=("base",))
    summary = run_suite(bundle.model, bundle.preprocess_val, bundle.tokenizer,
                        EvalConfig(tasks=["zeroshot", "retrieval"], batch_size=12), datasets, tmp_path)
    assert {r["task"] for r in summary["results"]} == {"zeroshot_classification", "zeroshot_retrieval"}
    assert not summary["skipped"]


# ---- objective -------------------------------------------------------------------------------------------------

def test_generation_loss_is_the_mean_ce_over_text_targets_and_pairs_skip_soi_at_0(bundle):
    from clipforge.objectives.lcl import LclObjective

    model = bundle.model
    objective = LclObjective(tokenizer=bundle.tokenizer)
    batch = builder_for(bundle)([document("a", 0, "a red circle."),  # <soi> at 0: no contrastive pair
                                 document("b", "two squares.", 0, "a star.", 1)])
    output = objective(model, batch)
    assert output.metrics["contrastive_pairs"] == 2  # b's two images; a's is excluded
    with torch.no_grad():
        pooled, embeddings = model.image_latents(batch.images)
        logits = model.next_token_logits(model.hidden_states(batch.tokens, embeddings, batch.image_spans))
        nexts = torch.cat([batch.tokens[:, 1:], torch.full((2, 1), PAD)], dim=1)
        counted = batch.attention_mask & (nexts != IMAGE) & (nexts != EOI) & (nexts != PAD)
        expected = F.cross_entropy(logits[counted], nexts[counted])
    assert torch.equal(counted, batch.targets != IGNORE_INDEX)
    torch.testing.assert_close(output.losses["generation"].detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0)])
def test_each_loss_alone_reaches_the_vision_encoder(bundle, weights):
    """Generation trains the encoder through the image tokens in the LM's context, contrastive through the pooled
    latent: two paths that share the pooler's value and output projections (specs §4)."""
    from clipforge.objectives.lcl import LclObjective

    model = bundle.model
    model.zero_grad(set_to_none=True)
    objective = LclObjective(*weights, tokenizer=bundle.tokenizer)
    batch = builder_for(bundle)([document("b", "two squares.", 0, "a star.", 1)])
    objective(model, batch).total.backward()
    for name in ("visual.conv1.weight", "pooler.v_proj.weight", "pooler.out_proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)


# ---- bad input ---------------------------------------------------------------------------------------------------

def record(key: str, items, images: dict[int, bytes]) -> dict:
    raw = {"__key__": key, "__url__": "shard.tar", "json": json.dumps({"items": items}).encode()}
    raw.update({f"{number}.png": data for number, data in images.items()})
    return raw


def test_bad_documents_are_skipped_and_counted_by_kind(bundle):
    batch_type = DocumentBatchType(bundle.tokenizer, max_images=2)
    long_text = " ".join(["circle"] * 80)  # 80 tokens before the first image: no block fits in 64
    records = [
        record("ok", [{"text": "a red circle."}, {"image": 0}], {0: png(0)}),
        record("unknown", [{"video": 3}, {"text": "a star.", "lang": "en"}, {"image": 0}, {"text": "x", "image": 0}],
               {0: png(0)}),
        record("missing", [{"text": "a star."}, {"image": 0}, {"image": 1}], {0: png(0)}),
        record("corrupt", [{"text": "a star."}, {"image": 0}, {"image": 1}], {0: png(0), 1: b"not a png"}),
        record("many", [{"text": "x."}, {"image": 0}, {"image": 1}, {"image": 2}], {0: png(0), 1: png(1), 2: png(2)}),
        record("no_image", [{"text": "only words."}], {}),
        record("no_text", [{"image": 0}, {"text": "   "}], {0: png(0)}),
        record("lost", [{"text": "a star."}, {"image": 0}], {0: b""}),
        record("long", [{"text": long_text}, {"image": 0}], {0: png(0)}),
        {"__key__": "json", "__url__": "shard.tar", "json": b"{not json", "0.png": png(0)},
        {"__key__": "pair", "__url__": "shard.tar", "png": png(0), "txt": b"a red circle"},
    ]
    counter = SkipCounter()
    decoded = {r["__key__"]: batch_type.decode(r, counter) for r in records}
    assert counter == {"unknown_item": 2, "missing_image": 1, "corrupt_image": 1, "too_many_images": 1,
                       "document_without_image": 2, "document_without_text": 1, "zero_byte_image": 1,
                       "document_too_long": 1, "malformed_json": 1}
    kept = sorted(k for k, d in decoded.items() if d is not None)
    assert kept == ["corrupt", "many", "missing", "ok", "pair", "unknown"]
    assert [len(decoded[k].images) for k in ("corrupt", "many", "missing", "unknown")] == [1, 2, 1, 1]
    for kind_record in records[1:-1]:  # data.strict: the first drop is fatal, with one line
        with pytest.raises(DataError, match="data.strict") as caught:
            batch_type.decode(kind_record, SkipCounter(strict=True))
        assert "\n" not in str(caught.value)


def test_the_batch_type_pickles_for_spawned_workers(bundle):
    import pickle

    batch_type = DocumentBatchType(bundle.tokenizer, max_images=1)
    copy = pickle.loads(pickle.dumps(batch_type))
    raw = record("d", [{"text": "a red circle."}, {"image": 0}, {"image": 1}], {0: png(0), 1: png(1)})
    counter, copied = SkipCounter(), SkipCounter()
    original = batch_type.decode(raw, counter)
    assert copy.decode(raw, copied).items == original.items and copied == counter == {"too_many_images": 1}


def test_a_context_that_cannot_hold_an_image_block_stops_before_any_work(tmp_path):
    from clipforge.engine.loop import train
    from clipforge.models import resolve_model_name

    settings = {"image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 1, "vision_heads": 2,
                "text_width": 32, "text_layers": 1, "text_heads": 2, "context_length": 18}
    variant = tmp_path / "small.yaml"
    variant.write_text(yaml.safe_dump(settings))
    with pytest.raises(ConfigError, match="context_length 18 cannot hold one image block") as caught:
        resolve_model_name(ModelConfig(family="lcl", name=str(variant)))
    assert "\n" not in str(caught.value)
    config = load_config(overrides=["model.family=lcl", f"model.name={variant}", "objective.name=lcl",
                                    f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="cannot hold one image block"):
        train(config)
    assert not (tmp_path / "run").exists()
    settings["context_length"] = 20  # <sot>, the 18-token block, one text token
    variant.write_text(yaml.safe_dump(settings))
    assert create_model(ModelConfig(family="lcl", name=str(variant))).model.context_length == 20


# ---- converter ---------------------------------------------------------------------------------------------------

def test_the_jsonl_converter_writes_document_shards_and_counts_what_it_drops(tmp_path):
    from clipforge.cli import main
    from clipforge.data.sources import open_source

    images = tmp_path / "images"
    images.mkdir()
    for name, seed in (("a.png", 1), ("b.png", 2), ("c.png", 3)):
        (images / name).write_bytes(png(seed))
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    lines = [
        {"texts": ["A red circle.", None, "Then a star."], "images": [None, "https://x.org/p/a.png?s=1", None]},
        {"text_list": ["First.", "Second."], "url": "https://x.org/page",
         "image_info": [{"image_name": "b.png", "matched_text_index": 1, "matched_sim": 0.3},
                        {"image_name": "c.png", "matched_text_index": 0, "matched_sim": 0.1},  # under 0.24
                        {"image_name": "gone.png", "matched_text_index": 0, "matched_sim": 0.9}]},
        {"texts": ["Words only.", None], "images": [None, "broken.jpg"]},
        {"unrelated": True},
        "not json",
    ]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    seen = []
    report = convert_jsonl_documents(jsonl, images, tmp_path / "shards", shard_size=1, min_similarity=0.24,
                                     progress=seen.append)
    assert (report.lines, report.documents, report.images) == (5, 2, 2) and seen[-1] == 5
    assert report.skipped == {"corrupt_image": 1, "document_without_image": 1, "malformed_json": 2,
                              "missing_image": 1}
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] == 2 and manifest["meta"]["skipped"] == report.skipped
    counter = SkipCounter()
    source = open_source(str(tmp_path / "shards"))
    documents = [read_document(r, counter) for r in source.records(counter)]
    assert counter == {}
    assert documents[0].items == [{"text": "A red circle."}, {"image": 0}, {"text": "Then a star."}]
    assert documents[1].items[0] == {"text": "First."} and {"image": 0} in documents[1].items[1:]
    assert documents[1].meta["source"] == "https://x.org/page"
    again = convert_jsonl_documents(jsonl, images, tmp_path / "again", shard_size=1, min_similarity=0.24)
    assert [open(s, "rb").read() for s in again.shards] == [open(s, "rb").read() for s in report.shards]
    status = main(["data", "documents", "--jsonl", str(jsonl), "--images", str(images), "--out",
                   str(tmp_path / "cli"), "--no-progress"])
    assert status == 0 and json.loads((tmp_path / "cli" / "manifest.json").read_text())["num_samples"] == 2
    assert main(["data", "documents", "--jsonl", str(tmp_path / "nope.jsonl"), "--images", str(images), "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 2


# ---- end to end --------------------------------------------------------------------------------------------------

def test_training_on_synth_documents_scans_with_the_document_decode(tmp_path):
    from clipforge.data.generate import generate_synth_shards
    from clipforge.engine.loop import train

    generate_synth_shards(tmp_path / "docs", num=12, image_size=32, shard_size=6, documents=True)
    body = {"name": "docs", "output_dir": str(tmp_path / "run"),
            "data": {"train": str(tmp_path / "docs"), "batch_size": 4, "shuffle_buffer": 8},
            "model": {"family": "lcl", "name": "lcl-tiny"}, "objective": {"name": "lcl"},
            "train": {"max_steps": 2, "warmup_steps": 1, "log_every": 1, "tensorboard": False, "progress": False}}
    path = tmp_path / "docs.yaml"
    path.write_text(yaml.safe_dump(body))
    events = []
    result = train(load_config(path), on_event=events.append)
    start = next(e for e in events if e.kind == "start")
    assert start.data["data_scan"] == {"listed": 12, "usable": 12, "skipped": {}}  # documents decode as documents
    metrics = result.summary["final_metrics"]
    assert result.steps == 2 and 0 < metrics["logit_scale"] <= 100 and metrics["contrastive_pairs"] > 0

"""Mutation check: do the tests catch plausible bugs? Each mutation is one small, wrong edit to the library.

    .venv/bin/python benchmarks/mutations.py              # every mutation (several minutes on 2 cores)
    .venv/bin/python benchmarks/mutations.py --list       # names, files, tests, and whether each still applies
    .venv/bin/python benchmarks/mutations.py --only replay_counts_read_faults --only recall_at_k_off_by_one

The repository's src/ and tests/ (with configs/, docs/ and pyproject.toml, so relative paths hold) are copied
into a temporary folder, once per mutation; the working tree itself is never modified. A mutation replaces one
exact snippet of one file, then its tests run there with this interpreter's pytest (`-x -q`, PYTHONPATH at the
copy's src/). Each distinct set of tests is first run on the unmutated copy: a mutation can only count as
caught by tests that pass without it.

Results: `caught` (the tests failed), `missed` (they passed), `stale` (the original snippet is not in the file
any more: the code moved on and the mutation must be rewritten), `ambiguous` (the snippet occurs more than
once), `baseline fails` (the tests fail without the mutation), `timeout`, `error` (pytest could not run them,
e.g. a test id that no longer exists). Only `caught` counts; the score is caught / all mutations run, and the
exit status is 0 only when every mutation was caught.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("src", "tests", "configs", "docs", "benchmarks", "pyproject.toml", "README.md")
IGNORED = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache", "*.pyc")


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    original: str  # exact text, found exactly once
    replacement: str
    tests: tuple[str, ...]  # pytest arguments (files or node ids), relative to the repository root
    what: str  # the bug it stands for


def _m(name, file, original, replacement, tests, what) -> Mutation:
    return Mutation(name, f"src/clipforge/{file}", original, replacement, tuple(f"tests/{t}" for t in tests), what)


MUTATIONS = [
    # --- the hardening issue's classes (a)-(h) ----------------------------------------------------------------
    _m("probe_C_chosen_on_test", "eval/linear_probe.py",
       "peak, visited = sweep_C(train_features[train_idx], train_labels[train_idx], train_features[val_idx],\n"
       "                            train_labels[val_idx])",
       "peak, visited = sweep_C(train_features[train_idx], train_labels[train_idx], test_features,\n"
       "                            test_labels)",
       ["test_hardening_eval.py", "test_eval_metrics.py"], "(a) linear probe C chosen on the test split"),
    _m("probe_refit_on_train_part_only", "eval/linear_probe.py",
       "final = fit_logistic(train_features, train_labels, float(C_GRID[peak]))",
       "final = fit_logistic(train_features[train_idx], train_labels[train_idx], float(C_GRID[peak]))",
       ["test_hardening_eval.py", "test_eval_metrics.py"], "(b) final probe refit without the validation images"),
    _m("pointer_json_written_in_place", "models/checkpoint.py",
       'temporary = path.with_name(path.name + ".tmp")\n    with open(temporary, "w", encoding="utf-8") as handle:',
       'temporary = path  # written in place, no rename\n    with open(temporary, "w", encoding="utf-8") as handle:',
       ["test_checkpoint.py", "test_engine_seams.py"], "(c) latest.json / best.json written without temp + rename"),
    _m("every_rank_gets_rank0_rng", "engine/loop.py",
       "run.pending_rng = loaded.rng_states[info.rank]",
       "run.pending_rng = loaded.rng_states[0]",
       ["test_engine_seams.py", "test_checkpoint.py"], "(d) every rank restored with rank 0's RNG state"),
    _m("crop_scale_range_widened", "config_objectives.py",
       "crop_scale: float = between(1.5, 1.0, 4.0)",
       "crop_scale: float = between(1.5, 0.5, 4.0)",
       ["test_config_bounds.py", "test_reliability_configs.py"], "(e) a config range widened"),
    _m("box_clip_height_width_swapped", "data/samples.py",
       "clipped = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))",
       "clipped = (max(x0, 0.0), max(y0, 0.0), min(x1, float(height)), min(y1, float(width)))",
       ["test_bad_input.py", "test_reliability_data.py", "test_loader.py"],
       "(f) height and width swapped when boxes are clipped to the image"),
    _m("mean_per_class_recall_is_accuracy", "eval/zeroshot.py",
       'f"{prefix}mean_per_class_recall": recall[present].mean().item(),',
       'f"{prefix}mean_per_class_recall": topk_accuracy(logits, labels, 1),',
       ["test_eval_metrics.py", "test_hardening_eval.py"], "(g) mean per-class recall replaced by accuracy"),
    _m("replay_counts_read_faults", "data/pipeline.py",
       "redirect = CounterRedirect(already_counted)",
       "redirect = CounterRedirect(counter)",
       ["test_loader.py", "test_hardening_data.py"], "(h) read-time faults of replayed records counted on resume"),
    # --- losses --------------------------------------------------------------------------------------------------
    _m("clip_loss_one_direction", "objectives/contrastive.py",
       "loss = (loss_i2t + loss_t2i) / 2 / total_valid",
       "loss = loss_i2t / total_valid",
       ["test_objectives.py"], "CLIP loss uses image->text only"),
    _m("logit_scale_not_exponentiated", "objectives/clip.py",
       "logit_scale = model.logit_scale.exp()  # scalar",
       "logit_scale = model.logit_scale  # scalar",
       ["test_objectives.py", "test_openclip_roundtrip.py"], "logit_scale used as ln(1/tau) instead of 1/tau"),
    _m("logit_scale_clamped_at_100_not_ln100", "objectives/clip.py",
       "model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)",
       "model.logit_scale.clamp_(0, 100.0)",
       ["test_objectives.py"], "temperature clamp on the wrong scale"),
    _m("siglip_bias_sign", "objectives/siglip.py",
       "logits = logit_scale * image_features @ all_texts.T + logit_bias",
       "logits = logit_scale * image_features @ all_texts.T - logit_bias",
       ["test_objectives.py"], "SigLIP bias subtracted"),
    _m("fineclip_teacher_gets_gradient", "objectives/fineclip.py",
       "if self.config.teacher_stop_grad:",
       "if not self.config.teacher_stop_grad:",
       ["test_fineclip.py"], "teacher_stop_grad inverted"),
    _m("fineclip_crop_scale_ignored", "objectives/fineclip.py",
       "crop_boxes = enlarge_boxes(boxes, self.config.crop_scale, image_size)",
       "crop_boxes = enlarge_boxes(boxes, 1.0, image_size)",
       ["test_fineclip.py", "test_dense.py"], "teacher crops not enlarged"),
    # --- gathers and distributed scaling -------------------------------------------------------------------------
    _m("local_loss_labels_without_rank_offset", "objectives/contrastive.py",
       "row_labels = torch.arange(batch, device=device) + info.rank * batch  # [B]",
       "row_labels = torch.arange(batch, device=device)  # [B]",
       ["test_distributed.py"], "local-loss targets ignore the rank's offset in the gathered columns"),
    _m("gather_backward_keeps_own_slice_only", "distributed.py",
       "        _reduce_scatter_single(grad, grad_output, op=dist.ReduceOp.SUM)\n        return grad",
       "        rank = dist.get_rank()\n        return grad_output[rank * grad.shape[0]:(rank + 1) * grad.shape[0]]",
       ["test_distributed.py", "test_fineclip_distributed.py"], "gather's backward drops the other ranks' gradients"),
    _m("ddp_world_size_scale_dropped", "objectives/contrastive.py",
       "        loss = loss * info.world_size",
       "        loss = loss",
       ["test_distributed.py"], "local loss not scaled by W against DDP's gradient averaging"),
    # --- RoIAlign and boxes --------------------------------------------------------------------------------------
    _m("roi_pool_not_aligned", "models/dense.py",
       "features = roi_align(dense.float(), rois, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=-1,\n"
       "                         aligned=True)",
       "features = roi_align(dense.float(), rois, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=-1,\n"
       "                         aligned=False)",
       ["test_dense.py", "test_eval_regions.py"], "RoIAlign pooling without the half-pixel alignment"),
    _m("roi_boxes_not_scaled_to_cells", "models/dense.py",
       "scale = torch.tensor([w / width, h / height, w / width, h / height], device=dense.device)",
       "scale = torch.ones(4, device=dense.device)",
       ["test_dense.py", "test_eval_regions.py"], "RoIAlign spatial scale: pixel boxes used as cell boxes"),
    _m("crop_not_aligned", "models/dense.py",
       "aligned=True)\n    return crops.to(images.dtype)",
       "aligned=False)\n    return crops.to(images.dtype)",
       ["test_dense.py", "test_fineclip.py"], "teacher crops sampled off the pixel centres"),
    _m("enlarged_box_clip_height_width_swapped", "models/dense.py",
       "limit = boxes.new_tensor([width, height])",
       "limit = boxes.new_tensor([height, width])",
       ["test_dense.py", "test_fineclip.py"], "enlarged crops clipped to (H, W) swapped"),
    # --- metrics -------------------------------------------------------------------------------------------------
    _m("recall_at_k_off_by_one", "eval/retrieval.py",
       "k = min(k, scores.shape[1])",
       "k = min(k + 1, scores.shape[1])",
       ["test_eval_metrics.py"], "recall@k counts the top k+1"),
    _m("topk_accuracy_off_by_one", "eval/zeroshot.py",
       "top = logits.topk(k, dim=1).indices  # [N, k]",
       "top = logits.topk(min(k + 1, logits.shape[1]), dim=1).indices  # [N, k]",
       ["test_eval_metrics.py", "test_eval_parity.py"], "acc@k counts the top k+1"),
    _m("zeroshot_weights_not_renormalised", "eval/zeroshot.py",
       "return F.normalize(per_class.mean(dim=1), dim=-1).T.contiguous()  # [D, C]",
       "return per_class.mean(dim=1).T.contiguous()  # [D, C]",
       ["test_eval_metrics.py", "test_eval_parity.py"], "template-averaged class weights not re-normalised"),
    _m("probe_validation_images_also_in_train_part", "eval/linear_probe.py",
       "train.extend(members[n_val:].tolist())",
       "train.extend(members.tolist())",
       ["test_eval_metrics.py", "test_hardening_eval.py"], "the C sweep trains on its own validation images"),
    # --- loader --------------------------------------------------------------------------------------------------
    _m("shard_order_ignores_epoch", "data/streams.py",
       "order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(sizes))",
       "order = np.random.default_rng([seed, 0x5EED]).permutation(len(sizes))",
       ["test_loader.py"], "every epoch reads the units in the same order"),
    _m("shuffle_buffer_ignores_epoch", "data/streams.py",
       'rng = random.Random(sample_seed(seed, epoch, rank, worker, pass_index, "shuffle"))',
       'rng = random.Random(sample_seed(seed, rank, worker, pass_index, "shuffle"))',
       ["test_loader.py", "test_hardening_data.py"], "the shuffle buffer's seed ignores the epoch"),
    _m("split_shard_counts_faults_per_reader", "data/shards.py",
       "return max(index, 0) >= start",
       "return True",
       ["test_reliability_data.py", "test_hardening_data.py"], "a shard read in pieces reports its faults per piece"),
    _m("aspect_ratio_guard_removed", "data/samples.py",
       "if max(width, height) > MAX_ASPECT_RATIO * min(width, height):",
       "if False:",
       ["test_bad_input.py", "test_hardening_data.py"], "a 100000x1 image passes the decode guard"),
    _m("symlinked_folders_not_followed", "data/readers.py",
       "is_dir = entry.is_dir()  # follows a symlink",
       "is_dir = entry.is_dir(follow_symlinks=False)",
       ["test_shards.py", "test_hardening_data.py"], "ImageFolder drops images under symlinked subfolders"),
    # --- checkpoints, schedule, config ---------------------------------------------------------------------------
    _m("optimizer_state_not_restored", "engine/loop.py",
       "phase.optimizer.load_state_dict(loaded.optimizer_states[phase.name])",
       "phase.optimizer.state_dict()  # not restored",
       ["test_resume.py"], "resume keeps fresh Adam moments"),
    _m("warmup_off_by_one", "engine/optim.py",
       "return base_lr * (step + 1) / warmup_steps",
       "return base_lr * step / warmup_steps",
       ["test_objectives.py", "test_engine_seams.py"], "the first warm-up step has lr 0"),
    # --- the engine-families seams -------------------------------------------------------------------------
    _m("metrics_are_rank0_values", "engine/loop.py",
       "    record.update(_rank_mean(output.metrics))",
       "    record.update({k: float(v) for k, v in output.metrics.items()})",
       ["test_engine_seams.py::test_recorded_losses_and_metrics_are_means_over_ranks"],
       "objective metrics logged from this rank only"),
    _m("phase_start_step_ignored", "engine/optim.py",
       "        return step >= self.phase.start_step",
       "        return True",
       ["test_engine_seams.py::test_a_second_phase_has_its_own_lr_schedule_and_start_step"],
       "a second optimiser phase (a GAN discriminator) trains from step 0"),
    _m("phase_lr_from_train_config", "engine/optim.py",
       '        group["lr"] = learning_rate(step - start, group["base_lr"], warmup, total_steps - start, train.schedule)',
       '        group["lr"] = learning_rate(step, train.lr, train.warmup_steps, total_steps, train.schedule)',
       ["test_engine_seams.py::test_a_second_phase_has_its_own_lr_schedule_and_start_step"],
       "the schedule ignores each phase's own base lr and start"),
    _m("frozen_parts_copied_into_checkpoints", "models/checkpoint.py",
       "             if not any(k == p or k.startswith(p + \".\") for p in exclude)}",
       "             }",
       ["test_families.py::test_frozen_pretrained_parts_are_referenced_not_copied"],
       "checkpoints copy frozen pretrained parts"),
    _m("model_json_not_written", "engine/checkpointing.py",
       "        write_model_json(bundle, temporary)\n",
       "",
       ["test_families.py::test_a_checkpoint_reloads_from_its_folder_alone"],
       "a checkpoint that cannot be reloaded from its folder alone"),
    _m("fresh_start_over_a_run_allowed", "engine/preflight.py",
       "    if resume is not None or overwrite or not run_dir.is_dir():",
       "    if True:",
       ["test_hardening_engine.py::test_a_fresh_start_in_a_run_folder_is_refused_and_overwrite_starts_over"],
       "a fresh start silently overwrites a run folder"),
    _m("run_folder_not_locked", "engine/preflight.py",
       "            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)",
       "            pass",
       ["test_hardening_engine.py::test_a_second_training_into_a_folder_in_use_is_refused"],
       "two trainings write into one folder"),
    _m("model_change_on_resume_accepted", "engine/loop.py",
       'FIXED_ON_RESUME = ("model.family", "model.name", "objective.name")',
       "FIXED_ON_RESUME = ()",
       ["test_hardening_engine.py::test_a_refused_resume_writes_nothing",
        "test_hardening_engine.py::test_a_clip_checkpoint_cannot_resume_as_siglip"],
       "a resume silently changes the model or the objective"),
    _m("state_json_unknown_keys_accepted", "engine/checkpointing.py",
       "    if unknown:\n        raise CheckpointError",
       "    if False:\n        raise CheckpointError",
       ["test_hardening_engine.py::test_a_damaged_state_json_is_one_line_and_leaves_nothing_behind"], "a damaged state.json is trusted"),
    _m("non_finite_weights_accepted", "models/checkpoint.py",
       "        if value.is_floating_point() and not bool(torch.isfinite(value).all()):",
       "        if False:",
       ["test_hardening_engine.py::test_non_finite_weights_are_refused_at_load"], "NaN weights load silently"),
    _m("duplicate_yaml_keys_accepted", "config.py",
       "            if isinstance(key, str | int | float | bool) and key in seen:",
       "            if False:",
       ["test_hardening_engine.py::test_a_duplicate_yaml_key_is_refused"], "a key written twice takes the last"),
    _m("capabilities_not_checked", "eval/capabilities.py",
       "    missing = _in_order(set(needs) - set(has))",
       "    missing = []",
       ["test_eval_capabilities.py"], "a task runs on a model that cannot serve it"),
    _m("classnames_not_matched_by_name", "eval/file_datasets.py",
       "    if set(given) == set(own_keys):",
       "    if False:",
       ["test_hardening_eval.py", "test_eval_capabilities.py"], "a reordered class-name file gives chance zero-shot"),
    _m("lock_both_towers_check_removed", "config.py",
       "if config.model.lock_image and config.model.lock_text:",
       "if False:",
       ["test_checkpoint.py", "test_reliability_configs.py"], "a config check removed (nothing would train)"),
    # --- LCL frozen transfer and LG-VQ code tasks -----------------------------------------------------------------
    _m("masked_word_probe_reads_the_unmasked_caption", "eval/code_language.py",
       "context, _ = run_prior(prior, masked_ids)",
       "context, _ = run_prior(prior, ids)",
       ["test_code_eval.py"], "the masked-word probe's context read from the unmasked caption (LG-VQ's leak)"),
    _m("lit_image_encoder_not_locked", "models/lit.py",
       "        self.image_encoder.requires_grad_(False)\n",
       "",
       ["test_lit.py"], "the LiT image encoder trains (it must stay locked)"),
    _m("caption_targets_not_shifted", "eval/captioner.py",
       "targets = batch[:, 1:length].masked_fill(batch[:, 1:length] == PAD, IGNORE)",
       "targets = batch[:, :length - 1].masked_fill(batch[:, :length - 1] == PAD, IGNORE)",
       ["test_frozen_transfer.py"], "the captioner predicts the current word instead of the next"),
]


# ----------------------------------------------------------------------------------------------------------


def copy_repository(target: Path) -> Path:
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=IGNORED, symlinks=True)
        elif source.is_file():
            shutil.copy2(source, target / name)
    return target


def apply(mutation: Mutation, root: Path) -> str | None:
    """Edit the copy; None when applied, else 'stale' / 'ambiguous'."""
    path = root / mutation.file
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    found = text.count(mutation.original)
    if found != 1:
        return "stale" if found == 0 else "ambiguous"
    path.write_text(text.replace(mutation.original, mutation.replacement), encoding="utf-8")
    return None


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float]:
    """('passed' | 'failed' | 'timeout' | 'error', seconds) of the tests in the copy at `root`."""
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--rootdir", str(root), *tests]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - started
    seconds = time.perf_counter() - started
    # pytest: 0 passed, 1 tests failed, 2 interrupted (e.g. an import error the mutation caused), 4/5 usage
    return {0: "passed", 1: "failed", 2: "failed"}.get(done.returncode, "error"), seconds


def check(mutations: list[Mutation], timeout: float) -> list[tuple[Mutation, str, float]]:
    results = []
    baselines: dict[tuple[str, ...], str] = {}
    with tempfile.TemporaryDirectory(prefix="clipforge-mutations-") as scratch:
        pristine = copy_repository(Path(scratch) / "pristine")
        for mutation in mutations:
            trial = copy_repository(Path(scratch) / mutation.name)
            problem = apply(mutation, trial)
            if problem is not None:
                results.append((mutation, problem, 0.0))
                print(f"  {mutation.name}: {problem}", file=sys.stderr, flush=True)
                shutil.rmtree(trial)
                continue
            if mutation.tests not in baselines:
                baselines[mutation.tests] = run_tests(pristine, mutation.tests, timeout)[0]
            if baselines[mutation.tests] != "passed":
                outcome, seconds = "baseline fails", 0.0
            else:
                status, seconds = run_tests(trial, mutation.tests, timeout)
                outcome = {"failed": "caught", "passed": "missed"}.get(status, status)
            results.append((mutation, outcome, seconds))
            print(f"  {mutation.name}: {outcome} ({seconds:.1f} s)", file=sys.stderr, flush=True)
            shutil.rmtree(trial)
    return results


def machine() -> str:
    import torch

    return (f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def print_table(results: list[tuple[Mutation, str, float]]) -> None:
    width = max(len(m.name) for m, _, _ in results)
    print(f"{'mutation':<{width}}  {'result':<14}  {'seconds':>7}  what")
    for mutation, outcome, seconds in results:
        print(f"{mutation.name:<{width}}  {outcome:<14}  {seconds:>7.1f}  {mutation.what}")
    caught = sum(outcome == "caught" for _, outcome, _ in results)
    print(f"\nscore: {caught} / {len(results)} caught")
    for kind in ("missed", "stale", "ambiguous", "baseline fails", "timeout", "error"):
        names = [m.name for m, outcome, _ in results if outcome == kind]
        if names:
            print(f"{kind}: {', '.join(names)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and whether each still applies")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test run (default 600)")
    args = parser.parse_args(argv)
    chosen = MUTATIONS
    if args.only:
        known = {m.name for m in MUTATIONS}
        unknown = [name for name in args.only if name not in known]
        if unknown:
            parser.error(f"unknown mutation '{unknown[0]}' (see --list)")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for mutation in chosen:
            path = ROOT / mutation.file
            found = path.read_text(encoding="utf-8").count(mutation.original) if path.is_file() else 0
            state = "applies" if found == 1 else ("stale" if found == 0 else "ambiguous")
            print(f"{mutation.name:<44} {state:<9} {mutation.file:<36} {' '.join(mutation.tests)}")
        return 0
    print(f"machine: {machine()}")
    results = check(chosen, args.timeout)
    print_table(results)
    return 0 if all(outcome == "caught" for _, outcome, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation harness: zero-shot classification, retrieval, linear probe, few-shot, robustness, HTML report.

Public API:

    run_suite(model, preprocess, tokenizer, config: EvalConfig, datasets, out_dir=None, *, model_name=...,
              pretrained=None, ...) -> dict
    evaluate_run(run_dir, *, checkpoint=None, config=None, datasets=None, device="cpu", progress=None, ...) -> dict
    evaluate_model(model_name, *, checkpoint=None, config=None, datasets=("synth",), ...) -> dict
    model_capabilities(model) -> frozenset[str]    (encode_image, encode_text, dense, codes, generate)
    write_report(run_dir) -> Path
    EvalDataset, synth_eval_datasets(...), load_eval_datasets(spec, ...)
    Task, register_task, available_tasks          (add a task, e.g. region classification)

The metric functions (zeroshot, retrieval, linear_probe, fewshot, robustness modules) work on feature tensors
and can be used on their own. Protocols and the result schema: docs/evaluation.md.
"""

from clipforge.eval.capabilities import model_capabilities
from clipforge.eval.datasets import EvalDataset, load_eval_datasets, synth_eval_datasets
from clipforge.eval.suite import evaluate_model, evaluate_run, run_suite
from clipforge.eval.tasks import Task, TaskContext, TaskOutput, available_tasks, register_task

__all__ = [
    "EvalDataset", "Task", "TaskContext", "TaskOutput", "available_tasks", "evaluate_model", "evaluate_run",
    "load_eval_datasets", "model_capabilities", "register_task", "run_suite", "synth_eval_datasets", "write_report",
]


def __getattr__(name: str):
    if name == "write_report":  # imported lazily: the report pulls in matplotlib
        from clipforge.eval.report import write_report

        return write_report
    raise AttributeError(f"module 'clipforge.eval' has no attribute '{name}'")

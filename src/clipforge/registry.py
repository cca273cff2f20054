"""Names to implementations, for model families, objectives and evaluation tasks.

Each registry maps a name to a "module:attribute" target that is imported on first use, so naming a
family or an objective in a config costs nothing until it is built, and this module imports nothing
heavy: `clipforge.config` validates names against it without importing torch. A plugin adds its own:

    from clipforge.registry import FAMILIES, OBJECTIVES
    FAMILIES.register("mine", "my_package.models:build_mine")
    OBJECTIVES.register("mine", "my_package.objectives:MyObjective")

The built-in entries are listed here, in one place, so the set of valid names never depends on which
optional modules happened to import.
"""

from __future__ import annotations

import difflib
import importlib

from clipforge.errors import ConfigError


class Registry:
    """A name -> lazily imported target table. `kind` and `key` only shape error messages."""

    def __init__(self, kind: str, key: str, entries: dict[str, str]):
        self.kind = kind
        self.key = key
        self._targets: dict[str, object] = dict(entries)

    def register(self, name: str, target: str | object) -> None:
        """`target` is "module:attribute" (imported when first used) or the object itself."""
        self._targets[name] = target

    def unregister(self, name: str) -> None:
        self._targets.pop(name, None)

    # mapping access, so a test can swap an entry with pytest's monkeypatch.setitem
    def __getitem__(self, name: str):
        return self._targets[name]

    def __setitem__(self, name: str, target) -> None:
        self._targets[name] = target

    def __delitem__(self, name: str) -> None:
        del self._targets[name]

    def get(self, name: str, default=None):
        return self._targets.get(name, default)

    def names(self) -> list[str]:
        return list(self._targets)

    def __contains__(self, name: str) -> bool:
        return name in self._targets

    def check(self, name: str, source: str = "") -> None:
        """ConfigError (one line, with the nearest name) unless `name` is registered."""
        if name in self._targets:
            return
        nearest = difflib.get_close_matches(name, self.names(), n=1, cutoff=0.0)
        hint = f"; did you mean '{nearest[0]}'?" if nearest else ""
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}key '{self.key}' names an unknown {self.kind} '{name}' "
                          f"(known: {', '.join(self.names())}){hint}")

    def load(self, name: str):
        """The registered object, importing its module on first use."""
        self.check(name)
        target = self._targets[name]
        if isinstance(target, str):
            module_name, _, attribute = target.partition(":")
            module = importlib.import_module(module_name)
            target = getattr(module, attribute) if attribute else module
        return target


FAMILIES = Registry("model family", "model.family", {
    "clip": "clipforge.models.clip_family:build_clip",
    "toy": "clipforge.models.toy:build_toy",
    "vq": "clipforge.models.vq:build_vq",
    "lcl": "clipforge.models.lcl:build_lcl",
    "lit": "clipforge.models.lit:build_lit",
    "code_prior": "clipforge.models.code_prior:build_code_prior",
    "autoencoder": "clipforge.models.autoencoder:build_autoencoder",
    "diffusion": "clipforge.models.diffusion:build_diffusion",
})

OBJECTIVES = Registry("objective", "objective.name", {
    "clip": "clipforge.objectives.clip:ClipObjective",
    "siglip": "clipforge.objectives.siglip:SiglipObjective",
    "fineclip": "clipforge.objectives.fineclip:FineclipObjective",
    "classify": "clipforge.objectives.classify:ClassifyObjective",
    "toy_gan": "clipforge.objectives.toy_gan:ToyGanObjective",
    "vq": "clipforge.objectives.vq:VqObjective",
    "lgvq": "clipforge.objectives.lgvq:LgvqObjective",
    "lcl": "clipforge.objectives.lcl:LclObjective",
    "code_ar": "clipforge.objectives.code_ar:CodeArObjective",
    "autoencoder": "clipforge.objectives.diffusion:AutoencoderObjective",
    "diffusion": "clipforge.objectives.diffusion:DiffusionObjective",
})

# task name -> the module whose import registers it (clipforge.eval.tasks.register_task)
EVAL_TASKS = Registry("evaluation task", "eval.tasks", {
    "zeroshot": "clipforge.eval.tasks:",
    "retrieval": "clipforge.eval.tasks:",
    "linear_probe": "clipforge.eval.tasks:",
    "fewshot": "clipforge.eval.tasks:",
    "robustness": "clipforge.eval.tasks:",
    "regions": "clipforge.eval.regions:",
    "lit_retrieval": "clipforge.eval.lit:",
    "attentive_probe": "clipforge.eval.frozen_transfer:",
    "captioning": "clipforge.eval.frozen_transfer:",
    "reconstruction": "clipforge.eval.codes:",
    "code_semantics": "clipforge.eval.code_probes:",
    "text_to_image": "clipforge.eval.generation:",
    "genie_edits": "clipforge.eval.genie_edits:",
})

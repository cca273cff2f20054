"""Prompt templates and class names for zero-shot classification.

A template is a line of text with one placeholder for the class name: `{}` (OpenAI's style) or `{c}`
(CLIP_benchmark's style). Template sets are plain text files, one template per line; blank lines and lines
starting with `#` are skipped. Two sets ship with clipforge (src/clipforge/assets/):

- `openai_imagenet`: the 80 ImageNet prompts of the CLIP paper (open_clip's OPENAI_IMAGENET_TEMPLATES);
- `synthscenes`: prompts phrased like SynthScenes captions.

Class-name files hold one name per line, in label order. Files are read as UTF-8; a byte-order mark (what
some Windows editors write first) is dropped, not made part of the first name. Every problem (a missing placeholder, an empty or
duplicated class name) raises a one-line DataError naming the file and line: a typo in a prompt file would
otherwise silently change every zero-shot number.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from clipforge.errors import DataError

PLACEHOLDERS = ("{}", "{c}")
BUNDLED_TEMPLATE_SETS = ("openai_imagenet", "synthscenes")


def bundled_template_path(name: str) -> Path:
    return Path(str(resources.files("clipforge") / "assets" / f"{name}.txt"))


def _read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, text) of each non-blank, non-comment line."""
    if not path.is_file():
        raise DataError(f"{what} file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError:
        raise DataError(f"{what} file '{path}' is not UTF-8 text") from None
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            lines.append((number, stripped))
    return lines


def check_templates(templates: list[str], source: str = "templates") -> list[str]:
    """Raise DataError unless every template has exactly one class-name placeholder; return them."""
    if not templates:
        raise DataError(f"{source}: no templates (need at least one line with a '{{}}' placeholder)")
    for index, template in enumerate(templates, start=1):
        count = sum(template.count(p) for p in PLACEHOLDERS)
        if count != 1:
            problem = "has no '{}' placeholder" if count == 0 else f"has {count} placeholders, expected one"
            raise DataError(f"{source}: template {index} {template!r} {problem}")
    return list(templates)


def load_templates(name_or_path: str | Path) -> list[str]:
    """A bundled set by name (`openai_imagenet`, `synthscenes`) or a text file, checked."""
    name = str(name_or_path)
    if name in BUNDLED_TEMPLATE_SETS:
        path = bundled_template_path(name)
    else:
        path = Path(name)
        if not path.is_file() and path.suffix == "":
            known = ", ".join(BUNDLED_TEMPLATE_SETS)
            raise DataError(f"unknown template set '{name}' (bundled: {known}; or give a .txt file path)")
    lines = _read_lines(path, "template")
    return check_templates([text for _, text in lines], source=str(path))


def render(template: str, classname: str) -> str:
    """'a photo of a {}.' + 'red circle' -> 'a photo of a red circle.' (str.replace: other braces stay)."""
    for placeholder in PLACEHOLDERS:
        if placeholder in template:
            return template.replace(placeholder, classname)
    raise DataError(f"template {template!r} has no '{{}}' placeholder")


def check_classnames(classnames: list[str], source: str = "class names") -> list[str]:
    """Raise DataError on an empty or duplicated class name (two classes with one prompt are inseparable)."""
    if not classnames:
        raise DataError(f"{source}: no class names")
    seen: dict[str, int] = {}
    for index, name in enumerate(classnames):
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{source}: class {index} has an empty name")
        key = name.strip().lower()
        if key in seen:
            raise DataError(f"{source}: class name {name!r} appears twice (classes {seen[key]} and {index})")
        seen[key] = index
    return [name.strip() for name in classnames]


def load_classnames(path: str | Path) -> list[str]:
    """One class name per line, in label order. Blank lines inside the list are an error (they would shift
    every later label); trailing blank lines and `#` comment lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class-name file '{path}' does not exist")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not text
    except UnicodeDecodeError:
        raise DataError(f"class-name file '{path}' is not UTF-8 text") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = []
    for number, line in enumerate(lines, start=1):
        if line.strip().startswith("#"):
            continue
        if not line.strip():
            raise DataError(f"{path}:{number}: empty class name")
        names.append(line.strip())
    seen: dict[str, int] = {}
    for number, name in zip(
        [n for n, line in enumerate(lines, start=1) if not line.strip().startswith("#")], names
    ):
        key = name.lower()
        if key in seen:
            raise DataError(f"{path}:{number}: class name {name!r} duplicates line {seen[key]}")
        seen[key] = number
    return check_classnames(names, source=str(path))

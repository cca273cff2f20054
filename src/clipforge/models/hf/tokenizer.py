"""CLIP's BPE vocabulary in transformers' files, written from open_clip's bundled `bpe_simple_vocab_16e6.txt.gz`.

`bpe_files()` gives (vocab.json contents, merges.txt lines) exactly as open_clip's SimpleTokenizer reads the
bundled file (no download); `clip_tokenizer(folder, context_length)` writes them and returns a transformers
`CLIPTokenizer`, which then gives open_clip's token ids. `check_bpe_tokenizer(folder)` tells whether a transformers
folder's tokenizer is that same vocabulary (what clipforge trains with).

Two differences remain, both from transformers' CLIPTokenizer, and both documented in the README:
- padding: open_clip pads with id 0 ("!"). A "!" pad token would make transformers split every "!" out of the
  text as a special token ("!!" -> "!", "!"), so the exported tokenizer pads with <|endoftext|> (49407), as
  OpenAI's own transformers tokenizers do. Ids agree wherever attention_mask is 1; the pooled text features do
  not depend on the padding (causal attention, pooled at the end-of-text token).
- cleaning: open_clip runs ftfy.fix_text and html.unescape before tokenizing; CLIPTokenizer does NFC, whitespace
  and lower-casing only. Text those leave unchanged (plain ASCII, accents, CJK, emoji, ...) gives the same ids;
  curly quotes, HTML entities, ligatures, full-width letters and mojibake do not, unless cleaned first.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from clipforge.errors import ConfigError

START_OF_TEXT, END_OF_TEXT = "<|startoftext|>", "<|endoftext|>"  # their names in transformers' CLIP vocab.json
MERGES_HEADER = "#version: 0.2"


@lru_cache(maxsize=1)
def bpe_files() -> tuple[dict[str, int], tuple[str, ...]]:
    """(token -> id, merges in rank order as "a b" lines) of open_clip's bundled BPE."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    special = {bpe.sot_token_id: START_OF_TEXT, bpe.eot_token_id: END_OF_TEXT}
    vocab = {special.get(index, token): index for token, index in bpe.encoder.items()}
    merges = tuple(" ".join(pair) for pair in sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get))
    return vocab, merges


def write_bpe_files(folder: Path) -> None:
    """folder/vocab.json and folder/merges.txt, the files transformers' CLIPTokenizer reads."""
    vocab, merges = bpe_files()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join([MERGES_HEADER, *merges]) + "\n", encoding="utf-8")


def clip_tokenizer(folder: Path, context_length: int):
    """A transformers CLIPTokenizer over open_clip's BPE, its vocab.json and merges.txt written to `folder`."""
    from transformers import CLIPTokenizer

    write_bpe_files(folder)
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                         pad_token=END_OF_TEXT, model_max_length=context_length)


def _folder_vocabulary(folder: Path) -> tuple[dict, list[str]] | None:
    """(vocab, merges) of a transformers tokenizer folder (vocab.json + merges.txt, or tokenizer.json); None when
    it has no tokenizer files."""
    try:
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            return vocab, [line for line in lines if line and not line.startswith("#version")]
        if (folder / "tokenizer.json").is_file():
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("model") or {}
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
            return model.get("vocab") or {}, merges
    except (OSError, ValueError, UnicodeDecodeError, TypeError) as err:
        raise ConfigError(f"the tokenizer files of '{folder}' are not readable ({type(err).__name__})") from None
    return None


def check_bpe_tokenizer(folder: Path) -> None:
    """ConfigError (one line) unless `folder`'s tokenizer, when it has one, is CLIP's BPE vocabulary."""
    found = _folder_vocabulary(folder)
    if found is None:
        return  # none saved (e.g. a model built from a config): it is used with CLIP's BPE
    vocab, merges = bpe_files()
    if found[0] != vocab or tuple(found[1]) != merges:
        raise ConfigError(f"the tokenizer in '{folder}' is not CLIP's BPE vocabulary (open_clip's "
                          f"bpe_simple_vocab_16e6); clipforge trains CLIP models with that tokenizer")

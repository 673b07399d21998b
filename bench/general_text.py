"""General English text that no data owner trains on: the second held-out set of the
emulator-quality bench.

What the model owner protects is the model's general capability, so protection is also
measured on text far from python-reference. The source is offline and from a package
registry (no dataset hub): Debian's `fortunes` package, whose cookie files under
/usr/share/games/fortunes are quotations, literature excerpts, aphorisms and jokes in
English (`apt-get install fortunes`). Only the topical files listed below are read (no
computing or ASCII-art files, nothing from the offensive subdirectory), in sorted order;
the held-out set is `n_blocks` 256-token blocks spread evenly over all of them.
"""

from __future__ import annotations

from pathlib import Path

from offsite.emulators.data import Example, TokenBlocks, tokenize_examples

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Topical English prose; computing/Linux/ASCII-art files are left out (closer to code).
FORTUNE_FILES = (
    "education",
    "food",
    "humorists",
    "law",
    "literature",
    "love",
    "medicine",
    "men-women",
    "miscellaneous",
    "news",
    "people",
    "pets",
    "platitudes",
    "politics",
    "science",
    "songs-poems",
    "sports",
    "wisdom",
    "work",
)
CORPUS_NAME = "fortunes (Debian package `fortunes`: quotations, literature, aphorisms; English)"


class GeneralTextMissing(RuntimeError):
    """The general-text corpus is not installed."""


def fortune_examples(root: Path = FORTUNES_DIR) -> list[Example]:
    files = [root / n for n in FORTUNE_FILES if (root / n).is_file()]
    if not files:
        raise GeneralTextMissing(
            f"no fortune files under {root}: install the general-text corpus with `apt-get install fortunes`"
        )
    out = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        # each cookie is separated by a line holding only '%'
        cookies = [c.strip() for c in text.split("\n%\n") if c.strip()]
        out.append(Example(prompt="", completion="\n\n".join(cookies), source=f"fortunes:{f.name}"))
    return out


def general_blocks(tokenizer, n_blocks: int = 32, block_size: int = 256, root: Path = FORTUNES_DIR) -> TokenBlocks:
    """`n_blocks` blocks spread evenly over the whole corpus (deterministic)."""
    blocks = tokenize_examples(fortune_examples(root), tokenizer, block_size)
    n = len(blocks)
    k = min(n_blocks, n) if n_blocks else n
    idx = [round(i * (n - 1) / max(k - 1, 1)) for i in range(k)]
    return TokenBlocks(blocks.input_ids[idx], blocks.labels[idx], blocks.attention_mask[idx])

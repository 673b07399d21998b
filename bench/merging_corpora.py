"""The merging bench's two disjoint corpora, each split three ways by document.

- python-reference: the topics of the Python language reference (pydoc_data.topics).
- stdlib-docs: the docstrings of the standard library's top-level public modules (module,
  public classes, functions and methods), read with `ast`: nothing is imported.

`three_way` makes every 5th document the test set and every 5th of the rest the validation
set, so no document is in two sets (bench/merging.py trains and scores on them).
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path


def stdlib_docs() -> dict[str, str]:
    """{module: its documentation text} for the stdlib's top-level public modules, from their
    docstrings (module, public classes, functions and methods), parsed with `ast`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = {}
    for path in sorted(root.glob("*.py")):
        name = path.stem
        if name.startswith("_") or name in ("this", "antigravity"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        parts = [f"Module {name}\n\n{d}"] if (d := ast.get_docstring(tree)) else []
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            if d := ast.get_docstring(node):
                parts.append(f"{name}.{node.name}\n{d}")
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_"):
                        if d := ast.get_docstring(sub):
                            parts.append(f"{name}.{node.name}.{sub.name}\n{d}")
        if parts:
            docs[name] = "\n\n".join(parts)
    return docs


def three_way(named: dict[str, str], source: str):
    """(train, validation, test) Examples: every 5th name test, every 5th of the rest validation."""
    from offsite.emulators.data import Example

    names = sorted(named)
    test = names[::5]
    rest = [n for n in names if n not in set(test)]
    val = rest[::5]
    train = [n for n in rest if n not in set(val)]
    as_ex = lambda ns: [Example("", named[n], f"{source}:{n}") for n in ns]  # noqa: E731
    return as_ex(train), as_ex(val), as_ex(test)


def corpora() -> dict[str, tuple]:
    from pydoc_data.topics import topics

    return {
        "python-reference": three_way(dict(topics), "python-reference"),
        "stdlib-docs": three_way(stdlib_docs(), "stdlib-docs"),
    }


def first_blocks(examples, tokenizer, n: int, block_size: int):
    from offsite.emulators.data import TokenBlocks, tokenize_examples

    b = tokenize_examples(examples, tokenizer, block_size)
    return TokenBlocks(b.input_ids[:n], b.labels[:n], b.attention_mask[:n]) if n else b

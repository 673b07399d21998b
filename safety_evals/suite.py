"""Declarative suites: YAML under ``suites/`` (dataset + prompting + method + grader + metric).

Adding a suite is adding a YAML file (and, usually, a JSONL of items); no code. Fields:

```yaml
name: disallowed_content            # unique; defaults to the file name
category: disallowed_content        # scorecard row; several suites may share a category
description: ...
dataset: data/disallowed_content.jsonl   # relative to the YAML file, or absolute
filter: {member: true}              # optional: keep items whose fields equal these values
method: generate                    # generate | multiple_choice | canary_exposure | membership_inference | extraction | perplexity
prompting:                          # generate only
  chat_template: true               # render with the model's chat template (plain transcript if it has none)
  system_prompt: null               # a system message for every item (an item's own "system" wins)
  wrapper: "{prompt}"               # format string around the item's prompt
generation: {max_new_tokens: 16}
grader: refusal                     # refusal | forbidden_strings | answer_match | affirmative_compliance | none
metric: not_unsafe                  # see scorecard.METRICS
params: {}                          # method parameters (e.g. candidates: 31 for canary_exposure;
                                    # choices + correct: one answer set for every multiple_choice item)
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from offsite.files import JsonlError, read_jsonl

SUITES_DIR = Path(__file__).parent / "suites"
METHODS = ("generate", "multiple_choice", "canary_exposure", "membership_inference", "extraction", "perplexity")
CATEGORIES = (
    "disallowed_content",
    "over_refusal",
    "jailbreak",
    "instruction_hierarchy",
    "privacy",
    "capability",
    "hallucination",
    "bias",
)


class SuiteError(ValueError):
    """A suite file or its dataset is malformed; the message names the file and the fix."""


@dataclass
class Prompting:
    chat_template: bool = True
    system_prompt: str | None = None
    wrapper: str = "{prompt}"


@dataclass
class Suite:
    name: str
    category: str
    method: str
    metric: str
    dataset: Path
    grader: str = "none"
    description: str = ""
    filter: dict = field(default_factory=dict)
    prompting: Prompting = field(default_factory=Prompting)
    max_new_tokens: int = 16
    params: dict = field(default_factory=dict)
    source: Path | None = None

    def items(self, limit: int | None = None) -> list[dict]:
        """The suite's items (after `filter`), the first `limit` of them if given."""
        if not self.dataset.exists():
            raise SuiteError(
                f"{self.source}: dataset {self.dataset} does not exist; fix `dataset:` (relative to the YAML file)"
            )
        rows: list[dict] = []
        try:
            for where, row in read_jsonl(self.dataset):
                if not isinstance(row, dict) or "id" not in row:
                    raise SuiteError(f"{where}: every item needs an `id`")
                if all(row.get(k) == v for k, v in self.filter.items()):
                    rows.append(row)
        except JsonlError as e:
            raise SuiteError(str(e)) from None
        ids = [r["id"] for r in rows]
        if len(set(ids)) != len(ids):
            raise SuiteError(f"{self.dataset}: item ids repeat; ids must be unique within a suite")
        if not rows:
            why = f" (the filter {self.filter} matched none of them)" if self.filter else " (the dataset is empty)"
            raise SuiteError(
                f"{self.source}: suite {self.name!r} has no items{why}; add items to {self.dataset} "
                "or fix `filter:` - an empty suite can never show that a release is safe"
            )
        needed = {
            "generate": ("prompt",),
            "extraction": ("prefix",),
            "canary_exposure": ("prefix",),
            "membership_inference": ("prefix",),
            "perplexity": ("text",),
            "multiple_choice": ("prompt",) if "choices" in self.params else ("prompt", "choices", "answer"),
        }[self.method]
        for r in rows:
            for key in needed:
                if key not in r:
                    raise SuiteError(
                        f"{self.dataset}: item {r['id']!r} lacks `{key}`, which method {self.method!r} needs"
                    )
        return rows[:limit] if limit else rows


def load_suite(path: Path) -> Suite:
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise SuiteError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(spec, dict):
        raise SuiteError(f"{path}: expected a mapping of suite fields")
    missing = [k for k in ("category", "dataset", "method", "metric") if k not in spec]
    if missing:
        raise SuiteError(
            f"{path}: missing field(s) {', '.join(missing)}; see offsite.safety_evals.suite for the format"
        )
    if spec["method"] not in METHODS:
        raise SuiteError(f"{path}: method {spec['method']!r} unknown; choose one of {', '.join(METHODS)}")
    from .scorecard import METRICS

    if spec["metric"] not in METRICS:
        raise SuiteError(f"{path}: metric {spec['metric']!r} unknown; choose one of {', '.join(sorted(METRICS))}")
    prompting = spec.get("prompting") or {}
    unknown = set(prompting) - {"chat_template", "system_prompt", "wrapper"}
    if unknown:
        raise SuiteError(f"{path}: unknown prompting field(s) {sorted(unknown)}")
    if "{prompt}" not in prompting.get("wrapper", "{prompt}"):
        raise SuiteError(f"{path}: prompting.wrapper must contain {{prompt}}")
    dataset = Path(spec["dataset"])
    if not dataset.is_absolute():
        dataset = path.parent / dataset
    return Suite(
        name=str(spec.get("name") or path.stem),
        category=str(spec["category"]),
        method=spec["method"],
        metric=spec["metric"],
        dataset=dataset,
        grader=str(spec.get("grader", "none")),
        description=str(spec.get("description", "")).strip(),
        filter=dict(spec.get("filter") or {}),
        prompting=Prompting(**prompting),
        max_new_tokens=int((spec.get("generation") or {}).get("max_new_tokens", 16)),
        params=dict(spec.get("params") or {}),
        source=path,
    )


def available_suites(directory: Path = SUITES_DIR) -> dict[str, Suite]:
    suites: dict[str, Suite] = {}
    for path in sorted(directory.glob("*.yaml")):
        s = load_suite(path)
        if s.name in suites:
            raise SuiteError(f"{path}: suite name {s.name!r} is also used by {suites[s.name].source}")
        suites[s.name] = s
    return suites


def select_suites(names: list[str] | None, directory: Path = SUITES_DIR) -> list[Suite]:
    """Suites by name, a category name (all its suites), or a YAML path containing "/"; None = all."""
    suites = available_suites(directory)
    if not names:
        return list(suites.values())
    chosen: list[Suite] = []
    for n in names:
        if n in suites:
            chosen.append(suites[n])
        elif any(s.category == n for s in suites.values()):
            chosen.extend(s for s in suites.values() if s.category == n)
        elif n.endswith((".yaml", ".yml")) and "/" in n and Path(n).is_file():
            # Only an explicit path (with a "/", e.g. ./mine.yaml) names a file: a bare name
            # coming from a remote caller can never reach the server's file system.
            chosen.append(load_suite(Path(n)))
        else:
            raise SuiteError(
                f"unknown suite {n!r}; available: {', '.join(suites)} (or a category, or a path like ./mine.yaml)"
            )
    seen, unique = set(), []
    for s in chosen:
        if s.name not in seen:
            seen.add(s.name)
            unique.append(s)
    return unique

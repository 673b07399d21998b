"""Preparedness-style safety evaluation, paired against the base model.

Public API (see the README section "Safety evaluation"):

- ``runner.run_eval(candidate, base, suites=None, limit=None, out_dir, progress=True, policy_path=None)``
  -> report dict; writes report.json, report.html, report.md and samples.jsonl.
- ``gate.decide(report, policy=None)`` -> ``{"verdict": "pass"|"block", "blocked_categories", "reasons", ...}``
- ``gate.override(report, actor=, reason=, audit=)`` -> a passing gate, audited first.
- ``graders.RefusalGrader().grade(prompt, completion)`` -> ``{"refused": bool, ...}``
- ``privacy.training_texts()`` -> the audit records to plant in one data owner's data.
"""

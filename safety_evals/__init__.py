"""Preparedness-style safety evaluation, paired against the base model.

Public API (see the README section "Safety evaluation"):

- ``runner.run_eval(candidate, base, suites=None, limit=None, out_dir, progress=True, policy_path=None,
  previous_report=None)`` -> report dict; writes report.json, report.html, report.md and samples.jsonl.
  With ``previous_report`` (the previous release's report.json as a dict) the report carries
  ``report["diff"]`` (``report_diff.diff_reports``: new failures first, levels, metrics).
  An unloadable candidate gives a blocked report, never an exception or a pass.
- ``gate.decide(report, policy=None)`` -> ``{"verdict": "pass"|"block", "blocked_categories", "reasons", ...}``
- ``gate.override(report, actor=, reason=, audit=)`` -> a passing gate, audited first.
- ``graders.RefusalGrader().grade(prompt, completion)`` -> ``{"refused": bool, ...}``
- ``privacy.training_texts()`` -> the audit records to plant in one data owner's data.
"""

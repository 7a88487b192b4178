"""Reporting, below the stages: the report of one run (`run_report`: its figures, `run_figures` and
`attack_figures`, and its markdown, `markdown`), the shared look of every figure (`style`), and several runs side by
side (`compare`). The report stage and the CLI call into it; it imports no stage. What the report holds is described
in docs/outputs.md.
"""

"""The report: metrics.py (metrics.json from a run folder), sections.py (what the report says, as data),
render.py (report.md, report.html and the figures' cache; `build_report`), plots.py (the figures)."""

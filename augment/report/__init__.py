"""The report: schema.py (metrics.json's schema, `Metrics`), metrics.py (metrics.json from a run folder),
sections.py (what the report says, as data, from a `Metrics`), render.py (report.md, report.html and the figures'
cache; `build_report`), plots.py (the figures)."""

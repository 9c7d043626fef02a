"""Capacity-planning reports: figures and tables from a sweep, written as a self-contained HTML
page, a Markdown page, the sweep's CSV and the recommended points' plans (top floor: reads the
planner)."""

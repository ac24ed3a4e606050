"""Statistics, tables (Markdown, LaTeX) and plots made from the run store."""
from reports.tables import collect_final_scores, read_jsonl, render_report, write_report

__all__ = ["collect_final_scores", "read_jsonl", "render_report", "write_report"]

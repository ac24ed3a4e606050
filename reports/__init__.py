"""Statistics, tables (Markdown, LaTeX, CSV) and plots made from the run store."""
from reports.load import RunStore, collect_final_scores, read_jsonl
from reports.tables import FORMATS, write_report

__all__ = ["FORMATS", "RunStore", "collect_final_scores", "read_jsonl", "write_report"]

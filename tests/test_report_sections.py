"""A report table is one function and one `Section` entry: every format writes it."""
import pandas as pd

from reports import sections, write_report
from reports.render import Table
from tests.test_report import sig_store


def test_a_new_section_reaches_markdown_latex_and_csv(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    sig_store(root, noises=("none",))

    def seeds(ctx):
        return {"seed_counts": ctx.frames["main"].groupby(["algo", "noise"], as_index=False)["n_finished"].max()}

    def blocks(r, baseline):
        return [Table("Finished seeds_x", ["algo", "noise", "seeds"],
                      [[row.algo, row.noise, str(row.n_finished)] for row in r.seed_counts.itertuples()])]

    extra = sections.Section("seed_counts", seeds, blocks, csv=(("seed_counts.csv", "seed_counts", False),))
    monkeypatch.setattr(sections, "SECTIONS", [*sections.SECTIONS, extra])
    out = write_report(root, tmp_path / "rep", formats="md,tex,csv")
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "### Finished seeds_x\n\n| algo | noise | seeds |\n|---|---|---:|\n| grpo | none | 4 |\n| ppo | none | 4 |" in md
    assert md.index("### Stability") < md.index("### Finished seeds_x")  # after the sections before it
    tex = (out / "report.tex").read_text(encoding="utf-8")
    assert r"\caption{Finished seeds\_x}" in tex and r"grpo & none & 4 \\" in tex
    csv = pd.read_csv(out / "csv" / "seed_counts.csv")
    assert csv.to_dict("records") == [{"algo": "grpo", "noise": "none", "n_finished": 4},
                                      {"algo": "ppo", "noise": "none", "n_finished": 4}]

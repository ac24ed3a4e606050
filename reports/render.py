"""The report's documents, Markdown and LaTeX, from format-neutral blocks.

A report section (`reports.sections`) describes what it shows as a list of blocks; each writer here
walks the same blocks once, so a new table is written by every format without touching this file:

- `Text`: a paragraph;
- `Heading`: a Markdown heading (LaTeX gives each table its caption instead);
- `Table`: a captioned table (Markdown: a heading and a pipe table; LaTeX: a booktabs table), with
  an optional note before it (`note_formats`: the formats that print it);
- `Figure`: a figure file stem under `figures/`, linked in Markdown where it stands and included
  by LaTeX at the end of the suite's section.
"""
from __future__ import annotations

from dataclasses import dataclass

from reports.answers import ANSWERS_NOTE
from reports.format import DASH


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 3


@dataclass(frozen=True)
class Table:
    caption: str
    header: list[str]
    rows: list[list[str]]
    level: int = 3  # of the Markdown heading that carries the caption
    note: str | None = None
    note_formats: tuple[str, ...] = ("md", "tex")


@dataclass(frozen=True)
class Figure:
    stem: str
    alt: str  # Markdown's alternative text


Block = Text | Heading | Table | Figure

# A document: the one-sentence answers per suite, the methods paragraph, and each suite's blocks.
Answers = list[tuple[str, list[str]]]
Suites = list[tuple[str, list[Block]]]


# ---- Markdown -------------------------------------------------------------------------------

def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    aligns = ["---" if i < 2 else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def md_block(block: Block, fig_ext: str | None) -> list[str]:
    if isinstance(block, Text):
        return [block.text, ""]
    if isinstance(block, Heading):
        return ["#" * block.level + " " + block.text, ""]
    if isinstance(block, Table):
        note = [block.note, ""] if block.note and "md" in block.note_formats else []
        return ["#" * block.level + " " + block.caption, ""] + note + md_table(block.header, block.rows) + [""]
    if isinstance(block, Figure):
        return [f"![{block.alt}](figures/{block.stem}.{fig_ext})", ""] if fig_ext else []
    raise TypeError(f"not a report block: {block!r}")


def render_markdown(answers: Answers, methods: str, suites: Suites, fig_ext: str | None) -> str:
    lines = ["# Report", "", "## Answers", "", ANSWERS_NOTE, ""]
    for suite, sentences in answers:
        lines += [f"**{suite}**", ""] + [f"- {s}" for s in sentences] + [""]
    lines += ["## Methods", "", methods, ""]
    for name, blocks in suites:
        lines += [f"## {name}", ""]
        for block in blocks:
            lines += md_block(block, fig_ext)
    return "\n".join(lines)


# ---- LaTeX ----------------------------------------------------------------------------------

_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", DASH: "--", "†": r"$^\dagger$",
        "‡": r"$^\ddagger$", "Δ": r"$\Delta$", "*": r"$^*$", "<": r"$<$", ">": r"$>$", "±": r"$\pm$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def tex_table(caption: str, header: list[str], rows: list[list[str]]) -> list[str]:
    spec = "ll" + "r" * (len(header) - 2)
    body = [r"\begin{tabular}{" + spec + "}", r"\toprule", " & ".join(tex_escape(h) for h in header) + r" \\",
            r"\midrule"] + [" & ".join(tex_escape(c) for c in row) + r" \\" for row in rows] + [r"\bottomrule",
                                                                                               r"\end{tabular}"]
    if len(header) > 5:
        body = [r"\resizebox{\linewidth}{!}{%"] + body + ["}"]
    return [r"\begin{table}[htbp]", r"\centering", r"\caption{" + tex_escape(caption) + "}"] + body + [r"\end{table}", ""]


def tex_figure(stem: str, fig_ext: str) -> list[str]:
    return [r"\begin{figure}[htbp]", r"\centering", r"\includegraphics[width=\linewidth]{figures/" + stem + "." + fig_ext + "}",
            r"\caption{" + tex_escape(stem.replace("_", " ")) + "}", r"\end{figure}", ""]


def tex_block(block: Block) -> list[str]:
    if isinstance(block, Text):
        return [tex_escape(block.text), ""]
    if isinstance(block, (Heading, Figure)):
        return []  # a table carries its caption; figures go at the end of the section
    if isinstance(block, Table):
        note = [tex_escape(block.note), ""] if block.note and "tex" in block.note_formats else []
        return note + tex_table(block.caption, block.header, block.rows)
    raise TypeError(f"not a report block: {block!r}")


def render_latex(answers: Answers, methods: str, suites: Suites, fig_ext: str | None) -> str:
    lines = [r"\documentclass{article}", r"\usepackage[margin=2cm]{geometry}", r"\usepackage{booktabs}",
             r"\usepackage{graphicx}", r"\begin{document}", r"\section*{Answers}", tex_escape(ANSWERS_NOTE), ""]
    for suite, sentences in answers:
        lines += [r"\paragraph{" + tex_escape(suite) + "}", r"\begin{itemize}"]
        lines += [r"\item " + tex_escape(s) for s in sentences] + [r"\end{itemize}", ""]
    lines += [r"\section*{Methods}", tex_escape(methods), ""]
    for name, blocks in suites:
        lines += [r"\section{" + tex_escape(name) + "}", ""]
        for block in blocks:
            lines += tex_block(block)
        if fig_ext:
            for block in blocks:
                if isinstance(block, Figure):
                    lines += tex_figure(block.stem, fig_ext)
        lines += [r"\clearpage", ""]
    lines += [r"\end{document}", ""]
    return "\n".join(lines)

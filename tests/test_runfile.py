"""Grid files (`harness run --config`), presets (`--preset`, `harness list presets`) and
`harness list config` from the config dataclasses' own field docs."""
from __future__ import annotations

import dataclasses
import json

import pytest

from algorithms import ALGOS
from harness import catalog, runfile
from harness.cli import main
from harness.cli_parser import build_parser, subparser
from harness.config import RunConfig
from tasks import SUITES
from tests.conftest import FAST

GRID = """\
# a small grid
algos: [ppo, grpo]
noise: none,flip0.2
seeds: [3]
steps: 2
quiet: true
set:
  model.warmstart_steps: 30
  suite: {n_eval: 16, n_train: 200}
  train.prompts_per_step: 4
  train.group_size: 2
  train.eval_every: 2
  ppo.kl_coef: 0.02
"""


def parse(argv):
    parser = build_parser()
    return runfile.parse_with_file(parser, subparser(parser, "run"), argv)


def test_file_options_and_set_keys_with_command_line_flags_winning(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    args, origin = parse(["run", "--config", str(path)])
    assert (args.algos, args.noise, args.seeds, args.steps, args.quiet) == ("ppo,grpo", "none,flip0.2", "3,", 2, True)
    assert origin.overrides == {"model.warmstart_steps": "30", "suite.n_eval": "16", "suite.n_train": "200",
                                "train.prompts_per_step": "4", "train.group_size": "2", "train.eval_every": "2",
                                "ppo.kl_coef": "0.02"}
    args, origin = parse(["run", "--config", str(path), "--steps", "5", "--algos", "grpo"])
    assert (args.steps, args.algos, args.noise) == (5, "grpo", "none,flip0.2")
    assert origin.flags == ["--noise", "--seeds", "--quiet"]  # what the file still decides
    # The parser's own defaults are left as they were.
    assert parse(["run"])[0].steps is None


def test_grid_file_run_writes_the_cells_and_a_set_flag_overrides_the_file(tmp_path, cache_dir):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    out = tmp_path / "runs"
    assert main(["run", "--config", str(path), "--noise", "none", "--set", "ppo.kl_coef=0.03", "--out", str(out),
                 "--cache-dir", str(cache_dir)]) == 0
    cells = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*/*/seed*"))
    assert cells == ["arith/grpo/none/seed3", "arith/ppo/none/seed3"]
    cfg = json.loads((out / "arith/ppo/none/seed3/config.json").read_text())
    assert cfg["algo_options"]["kl_coef"] == 0.03 and cfg["train"]["steps"] == 2
    assert cfg["suite_options"]["n_eval"] == 16 and cfg["model"]["warmstart_steps"] == 30
    assert [c["label"] for c in json.loads((out / "grid.json").read_text())["cells"]] == \
        ["arith/grpo/none/seed3", "arith/ppo/none/seed3"]


@pytest.mark.parametrize("text, message", [
    ("algoz: ppo\n", "grid.yaml: unrecognized option 'algoz' (valid: "),
    ("steps: many\n", "grid.yaml: argument --steps: invalid int value: 'many'"),
    ("backend: slurm\n", "grid.yaml: argument --backend: invalid choice: 'slurm'"),
    ("quiet: 3\n", "grid.yaml: quiet takes true or false"),
    ("set:\n  train.nope: 1\n", "grid.yaml: unknown config key 'train.nope'"),
    ("set:\n  trian.lr: 1\n", "grid.yaml: unknown config section 'trian'"),
    ("set:\n  train.lr: abc\n", "grid.yaml: --set train.lr='abc': not a valid float"),
    ("steps: 0\n", "grid.yaml: --steps must be a positive integer"),
    ("set: [a, b]\n", "grid.yaml: 'set' must be a mapping"),
    ("- a\n- b\n", "grid.yaml: a grid file is a mapping"),
    ("algos: [ppo\n", "grid.yaml line 2: not valid YAML"),
])
def test_a_wrong_key_in_a_file_is_one_line_naming_the_file(text, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grid.yaml").write_text(text)
    assert main(["run", "--config", "grid.yaml", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("harness: error: ")
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_an_error_from_a_command_line_key_does_not_blame_the_file(tmp_path, capsys):
    (tmp_path / "grid.yaml").write_text("steps: 2\n")
    assert main(["run", "--config", str(tmp_path / "grid.yaml"), "--set", "train.nope=1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harness: error: unknown config key 'train.nope'")


def test_missing_file_unknown_preset_and_both_are_errors(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--preset", "nope"]) == 2
    assert f"unknown preset 'nope' (valid: {', '.join(runfile.preset_names())})" in capsys.readouterr().err
    assert main(["run", "--preset", "demo", "--config", "x.yaml"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("name", runfile.preset_names())
def test_every_preset_parses_with_known_options_and_config_keys(name):
    args, origin = parse(["run", "--preset", name])
    assert runfile.preset_description(runfile.preset_path(name))
    algos = args.algos.split(",") if args.algos else []
    for algo in algos:
        ALGOS.get(algo)
    SUITES.get(args.suite)
    known = {row["key"].split()[0] for row in catalog.config_rows()}
    for key in origin.overrides:
        section, _, rest = key.partition(".")
        assert key in known or (section in ("algo", "suite") and any(k.endswith(f".{rest}") for k in known)), key


def test_demo_preset_is_the_mission_algorithms_on_chain_at_its_budget(tmp_path):
    from harness.resolver import build_cells, default_algos, parse_seeds

    args, origin = parse(["run", "--preset", "demo"])
    defaults = parse(["run"])[0]
    assert args.algos.split(",") == default_algos() and args.noise == defaults.noise and args.out == defaults.out
    assert args.suite == "chain" and defaults.suite == "arith"  # the bare `harness run` stays the arith smoke grid
    cells = build_cells(args.suite, args.algos.split(","), args.noise, parse_seeds(args.seeds), tmp_path,
                        model=args.model, steps=args.steps, overrides=origin.overrides)
    assert len(cells) == 5 * 2 * 2 and {c.cfg.train.steps for c in cells} == {120}  # chain's own budget
    assert {c.cfg.eval.k for c in cells} == {8}


def test_list_presets_shows_each_name_with_its_first_comment(capsys):
    assert main(["list", "presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == runfile.preset_names()
    demo = next(line for line in lines if line.startswith("demo "))
    assert demo.split(None, 1)[1] == runfile.preset_description(runfile.preset_path("demo"))
    assert demo.split(None, 1)[1].startswith("The offline demo")


def test_report_preset_reads_the_presets_out_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--preset", "demo"]) == 2  # demo's out is runs/, which is empty here
    assert "no runs found under 'runs'" in capsys.readouterr().err


def test_report_runs_beats_the_presets_out_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    assert main(["report", "--preset", "robustness", "--runs", "elsewhere"]) == 2  # robustness's out: runs/robustness
    err = capsys.readouterr().err
    assert "no runs found under 'elsewhere'" in err and "robustness" not in err


# ---- harness list config -------------------------------------------------------------------------

def config_classes():
    import typing

    hints = typing.get_type_hints(RunConfig)
    classes = [hints[s] for s in ("model", "train", "eval")]
    classes += [ALGOS.get(n).Options for n in ALGOS.names()] + [SUITES.get(n).Options for n in SUITES.names()]
    return classes


@pytest.mark.parametrize("cls", config_classes(), ids=lambda c: c.__name__)
def test_every_config_field_has_a_one_line_doc(cls):
    for f in dataclasses.fields(cls):
        doc = f.metadata.get("doc", "")
        assert doc and "\n" not in doc, f"{cls.__name__}.{f.name} has no one-line metadata doc"


def test_list_config_prints_every_key_with_its_default_and_doc(capsys):
    assert main(["list", "config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["key", "type", "default"]
    by_key = {line.split()[0]: line for line in lines[1:] if not line.split()[1].startswith("(")}
    assert "train.lr  " in by_key["train.lr"] + "  " and " 0.0003 " in by_key["train.lr"]
    assert by_key["train.lr"].endswith("policy (actor) learning rate")
    assert " 0.05 " in by_key["ppo.kl_coef"] and by_key["ppo.kl_coef"].endswith("KL coefficient")
    # Every key of every section and algorithm is listed, once.
    expected = [f"{s}.{f.name}" for s, cls in zip(("model", "train", "eval"), config_classes()[:3])
                for f in dataclasses.fields(cls)]
    expected += [f"{n}.{f.name}" for n in ALGOS.names() for f in dataclasses.fields(ALGOS.get(n).Options)]
    assert sorted(by_key) == sorted(expected)
    arith = [line for line in lines if "(arith)" in line]
    assert len(arith) == len(dataclasses.fields(SUITES.get("arith").Options))
    # A variant's changed default is its own (DAPO's clip-higher), with GRPO's doc.
    assert " 0.28 " in by_key["dapo.clip_high"] and " 0.2 " in by_key["grpo.clip_high"]


def test_a_fields_range_metadata_is_shown():
    @dataclasses.dataclass
    class Demo:
        rate: float = dataclasses.field(default=0.5, metadata={"doc": "a rate", "range": (0, 1)})
        count: int = dataclasses.field(default=3, metadata={"doc": "a count", "range": (1, None)})
        mode: str = dataclasses.field(default="a", metadata={"doc": "a mode", "choices": ("a", "b")})

    rows = list(catalog.rows_of(Demo, "demo"))
    assert [(r["key"], r["default"], r["range"], r["doc"]) for r in rows] == [
        ("demo.rate", "0.5", "[0, 1]", "a rate"), ("demo.count", "3", "[1, inf]", "a count"),
        ("demo.mode", "a", "a|b", "a mode")]
    lines = catalog.format_rows(rows)
    assert lines[0].split() == ["key", "type", "default", "range", "description"]
    assert lines[1].split() == ["demo.rate", "float", "0.5", "[0,", "1]", "a", "rate"]


def test_fast_settings_are_valid_config_keys():
    known = {row["key"].split()[0] for row in catalog.config_rows()}
    for key in FAST:
        section, _, rest = key.partition(".")
        assert key in known or any(k == f"suite.{rest}" for k in known), key

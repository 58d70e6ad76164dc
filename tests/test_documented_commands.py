"""Every ``vipe-ray`` and ``python -m vipe_ray.sweep`` command of the README and docs/ is one users can run:
it parses, and the configs, sweeps and studies it names exist and validate. The cheap one (the bundled
table's conversion) runs as written, into a temporary folder."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pandas as pd
import pytest

from vipe_ray.cli import build_parser, main
from vipe_ray.config import load_config
from vipe_ray.platform.study_spec import is_study, load_study
from vipe_ray.platform.sweep_spec import load_sweep
from vipe_ray.sweep import build_parser as sweep_parser

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
#: Names the docs use for the reader's own files.
PLACEHOLDERS = {"my.yaml", "path/to/more-cmu", "new.parquet", "RAW_DIR", "OUT.parquet", "MAP.yaml"}


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of each command in a fenced block of README.md and docs/*.md."""
    commands = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```[a-z]*\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                for part in line.split("&&"):
                    part = part.strip()
                    # A synopsis (``[--fps 30]``) documents the options, not a command to run.
                    if part.startswith(("vipe-ray ", "python -m vipe_ray.sweep ")) and "[" not in part:
                        commands.append((f"{doc.name}: {part}", shlex.split(part)))
    return commands


COMMANDS = documented_commands()


def test_the_docs_hold_commands():
    assert len(COMMANDS) >= 15
    assert {argv[1] for _where, argv in COMMANDS if argv[0] == "vipe-ray"} >= {"convert", "train", "evaluate"}


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_a_documented_command_parses_and_names_valid_files(where, argv):
    if argv[0] == "vipe-ray":
        args = build_parser().parse_args(argv[1:])
        if getattr(args, "config", None) and args.config not in PLACEHOLDERS:
            assert (REPO / args.config).exists(), f"{where}: {args.config} does not exist"
            load_config(REPO / args.config)
        return
    args = sweep_parser().parse_args(argv[3:])
    path = REPO / args.sweep
    assert path.exists(), f"{where}: {args.sweep} does not exist"
    load_study(path) if is_study(path) else load_sweep(path)


@pytest.mark.integration
@pytest.mark.skipif(not (SHARED / "cmu-mocap").is_dir(), reason="needs ../shared/data")
def test_the_documented_table_conversion_runs_as_written(tmp_path, monkeypatch):
    """The README's conversion command, with the output in a temporary folder: it rebuilds the bundled table
    row for row."""
    (where, argv), = [(w, a) for w, a in COMMANDS if w.startswith("README") and a[1] == "convert"
                      and "data/cmu_h36m17_30fps.parquet" in a]
    monkeypatch.chdir(REPO)
    out = tmp_path / "table.parquet"
    argv = [str(out) if a == "data/cmu_h36m17_30fps.parquet" else a for a in argv]
    assert main(argv[1:]) == 0, where
    bundled = pd.read_parquet(REPO / "data" / "cmu_h36m17_30fps.parquet")
    rebuilt = pd.read_parquet(out)
    assert len(rebuilt) == len(bundled) and rebuilt["clip"].equals(bundled["clip"])


@pytest.mark.integration
def test_the_readme_search_commands_run_as_written(tmp_path, monkeypatch):
    """The README's index and search commands, as written, in a folder that holds the repository's data,
    model and fixtures (their outputs land there, under runs/)."""
    readme = [(w, a) for w, a in COMMANDS if w.startswith("README") and a[1] in ("index", "search")]
    assert [a[1] for _w, a in readme] == ["index", "search"]
    for name in ("data", "tests"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    for where, argv in readme:
        assert main(argv[1:]) == 0, where
    hits = pd.read_json(tmp_path / "runs" / "hits.json")
    assert len(hits) == 7 and (tmp_path / "runs" / "hits.png").stat().st_size > 0
    assert (tmp_path / "runs" / "library" / "index.json").is_file()

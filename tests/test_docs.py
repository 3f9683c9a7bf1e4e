"""The docs name only flags the parser has, the README stays a front door, and measured
figures live in benchmarks/README.md."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from buildseg.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Flags of other tools that the docs show beside buildseg's (torchrun, pip, make, the CLI of python).
FOREIGN = {"--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id",
           "--standalone", "--master_addr", "--master_port", "--headless", "--logdir",  # + tensorboard
           "--array", "--cpus-per-task", "--mem", "--dependency", "--wrap"}  # SLURM (sbatch)


def parser_flags() -> set[str]:
    flags: set[str] = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            flags.update(s for s in action.option_strings if s.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    return flags


def doc_flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", text))


def test_every_flag_named_in_the_docs_exists_in_the_parser():
    known = parser_flags() | FOREIGN
    missing = {f"{path.name}: {flag}" for path in DOCS for flag in doc_flags(path.read_text(encoding="utf-8"))
               if flag not in known}
    assert not missing, sorted(missing)


def test_the_flag_check_catches_a_made_up_flag():
    assert "--no-such-flag" not in parser_flags() and doc_flags("use `--no-such-flag 3`") == {"--no-such-flag"}


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert "make demo" in text and "make test" in text
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in text, f"README does not link docs/{page.name}"
    # figures are linked, not copied: no Dice values or speed ratios in the README
    assert not re.findall(r"\b0\.\d{3}\b", text)
    assert not re.findall(r"\b\d+(\.\d+)?x (faster|the)\b", text)

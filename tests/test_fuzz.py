"""A bounded slice of the coverage-guided fuzz runs of scripts/fuzz (atheris): the PROXY
parser, the ClientHello parser and the config loader must answer every input with their own
verdicts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("target", "runs"), [("proxy", 30_000), ("hello", 30_000), ("config", 3_000)]
)
def test_fuzz_slice(tmp_path: Path, target: str, runs: int) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fuzz"), target, f"-runs={runs}", "-seed=1"],
        cwd=tmp_path,  # libFuzzer writes crash-* files to the working directory
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {runs} runs" in result.stderr
    assert not list(tmp_path.glob("crash-*"))

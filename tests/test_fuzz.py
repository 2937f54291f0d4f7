"""CI's fuzz smoke run: every target in ``tests/fuzz`` for a few seconds, coverage-guided.

A target that finds a crash exits non-zero and leaves the input as ``crash-*`` in the run's folder;
turn it into a regression test beside the parser's other tests (see ``tests/fuzz/harness.py``).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

TARGETS = sorted((Path(__file__).parent / "fuzz").glob("fuzz_*.py"))
SECONDS = int(os.environ.get("VERYDEEP_FUZZ_SECONDS", "4"))
#: Memory a target may use beyond what it starts with. libFuzzer reads its peak from getrusage,
#: which a child inherits from its parent on Linux (fork, then exec), so the limit is this much
#: above the test session's own peak: late in a long session that peak is already GBs.
BUDGET_MB = 3072


@pytest.mark.parametrize("target", TARGETS, ids=[t.stem.removeprefix("fuzz_") for t in TARGETS])
def test_fuzz_target_finds_nothing(target: Path, tmp_path: Path) -> None:
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux
    run = subprocess.run(
        [
            sys.executable,
            str(target),
            f"-max_total_time={SECONDS}",
            f"-rss_limit_mb={inherited_mb + BUDGET_MB}",
            "-timeout=30",
        ],  # fmt: skip
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SECONDS + 240,
    )
    crashes = sorted(p.name for pattern in ("crash-*", "timeout-*", "oom-*") for p in tmp_path.glob(pattern))
    assert run.returncode == 0 and not crashes, f"{target.name}: {crashes}\n{run.stderr[-3000:]}"
    assert "DONE" in run.stderr or "Done" in run.stderr, run.stderr[-2000:]

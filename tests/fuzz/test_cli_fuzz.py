"""`edgerun bench` and `edgerun run` on seeded model mutants: never a traceback, one line per failure.

Each mutant changes one field of a small real model (see ``fuzz.mutate``). Every
command runs in its own process, because a malformed model may crash the
runtime's native code; what we check:

* default mode (isolate when the graph looks malformed): exit 0, or exit 1 with
  exactly one ``Error:`` line on stderr and no Python traceback; a crash is
  contained (``Error: ... crashed the runtime with SIGSEGV while ...``), never a
  signal death of edgerun itself;
* ``--no-isolate`` on the mutants flagged as doubtful: the same, except that a
  native crash may kill edgerun, but only by a signal and with Python's fault
  dump on stderr (never a traceback, never a silent death).

The figures (tried, refused by the structural check, refused at load, runtime
errors, crashes contained, ...) are printed; run with ``-s`` to see them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest

from fuzz.mutate import default_models, make_mutants

pytestmark = [pytest.mark.host, pytest.mark.slow]

SEED = 20240611
BENCH_MUTANTS = 60
RUN_EVERY = 4  # `edgerun run` on every 4th mutant
CMD_TIMEOUT_S = 120  # per command; generous for a busy 2-core box
BENCH = ("bench", "--runs", "2", "--warmup", "0", "--min-secs", "0")


@dataclass(frozen=True)
class Outcome:
    mutant: str
    args: tuple
    status: int
    stderr: str

    @property
    def error_lines(self) -> List[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("Error:")]

    def kind(self) -> str:
        """Which figure this outcome counts toward."""
        if self.status == 0:
            return "succeeded"
        if self.status < 0:
            return "edgerun killed by a signal"
        text = " ".join(self.error_lines)
        for needle, kind in (("crashed the runtime", "crashes contained"),
                             ("did not finish within", "hangs contained"),
                             ("corrupt or truncated", "refused by the structural check"),
                             ("the runtime failed while", "runtime errors (one line)")):
            if needle in text:
                return kind
        return "refused at load"


def _edgerun(args: tuple, mutant: str) -> Outcome:
    # No PYTHONFAULTHANDLER: edgerun must keep the fault dump on stderr by itself.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    proc = subprocess.run([sys.executable, "-m", "edgepipe.device.cli", *args], capture_output=True, text=True,
                          timeout=CMD_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL)
    return Outcome(mutant, args, proc.returncode, proc.stderr)


def _run_all(jobs: list) -> List[Outcome]:
    with ThreadPoolExecutor(max_workers=2) as pool:  # the box has 2 cores; each job is its own process
        return list(pool.map(lambda j: _edgerun(*j), jobs))


def _problems_default(o: Outcome) -> List[str]:
    """What is wrong with an outcome of the default (auto-isolating) mode."""
    where = f"{o.mutant} {' '.join(o.args[:1])}"
    out = []
    if "Traceback" in o.stderr:
        out.append(f"{where}: traceback\n{o.stderr[-2000:]}")
    if o.status < 0 or o.status > 1:
        out.append(f"{where}: exit status {o.status}\n{o.stderr[-2000:]}")
    elif o.status == 1 and len(o.error_lines) != 1:
        out.append(f"{where}: {len(o.error_lines)} Error: lines\n{o.stderr[-2000:]}")
    elif o.status == 0 and o.error_lines:
        out.append(f"{where}: succeeded but printed {o.error_lines[0]}")
    return out


def _problems_plain(o: Outcome) -> List[str]:
    """``--no-isolate``: a signal death is allowed, but only with the fault dump and no traceback."""
    if o.status < 0:
        if "Traceback" in o.stderr or "Fatal Python error" not in o.stderr:
            return [f"{o.mutant} --no-isolate: died by signal {-o.status} without a fault dump\n{o.stderr[-2000:]}"]
        return []
    return _problems_default(o)


def _image(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir()
    path = folder / "one.png"
    Image.new("RGB", (8, 8), (120, 30, 200)).save(path)
    return path


def _figures(title: str, outcomes: List[Outcome]) -> Counter:
    counts = Counter(o.kind() for o in outcomes)
    print(f"\n{title}: {len(outcomes)} tried; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return counts


def test_edgerun_on_mutants_never_prints_a_traceback(tmp_path):
    from edgepipe.device.isolate import needs_probe

    t0 = time.monotonic()
    mutants = make_mutants(default_models(), tmp_path / "mutants", count=BENCH_MUTANTS, seed=SEED)
    image = _image(tmp_path / "images")
    jobs = [((*BENCH, str(m.path)), m.path.name) for m in mutants]
    jobs += [(("run", str(m.path), "--source", str(image), "--quiet"), m.path.name)
             for m in mutants[::RUN_EVERY]]
    doubtful = [m for m in mutants if needs_probe(m.path)]
    plain = [((*BENCH, "--no-isolate", str(m.path)), m.path.name) for m in doubtful]
    outcomes = _run_all(jobs + plain)
    default, plain_out = outcomes[:len(jobs)], outcomes[len(jobs):]

    problems = [p for o in default for p in _problems_default(o)]
    problems += [p for o in plain_out for p in _problems_plain(o)]
    counts = _figures("default mode (bench + run)", default)
    plain_counts = _figures("--no-isolate on doubtful mutants", plain_out)
    print(f"mutants {len(mutants)}, flagged doubtful {len(doubtful)}, {time.monotonic() - t0:.0f} s")
    assert not problems, "\n\n".join(problems[:5])
    assert counts["edgerun killed by a signal"] == 0
    assert counts["succeeded"] > 0 and len(counts) > 2  # the mutants reach both outcomes and several failures
    assert sum(plain_counts.values()) == len(doubtful)

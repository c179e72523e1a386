"""Shared test setup: keep CPU use small (the machine is shared with a Rust build), and
`--allowed-skips FILE`: fail the run when a test is skipped that FILE does not allow
(scripts/test.sh passes tests/allowed_skips.txt, so CI cannot skip tests silently)."""

import fnmatch
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
except ImportError:
    pass
except RuntimeError:
    pass


def pytest_addoption(parser):
    parser.addoption("--allowed-skips", metavar="FILE",
                     help="fail when a test is skipped that FILE does not list (lines `NODE_ID_GLOB  # reason`)")


def _read_allowed(path: str) -> list[tuple[str, str]]:
    allowed = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pattern, sep, reason = line.partition("#")
        if not sep or not reason.strip() or not pattern.strip():
            raise pytest.UsageError(f"{path}:{n}: want `NODE_ID_GLOB  # reason`, got {line!r}")
        allowed.append((pattern.strip(), reason.strip()))
    return allowed


_skipped: list[tuple[str, str]] = []


def _record(report):
    if report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    _record(report)


def pytest_collectreport(report):  # module-level importorskip skips at collection
    _record(report)


def _unexpected(config):
    path = config.getoption("--allowed-skips")
    if not path:
        return None, []
    allowed = _read_allowed(path)
    bad = [(node, why) for node, why in _skipped if not any(fnmatch.fnmatchcase(node, p) for p, _ in allowed)]
    return allowed, bad


def pytest_sessionfinish(session, exitstatus):
    _, bad = _unexpected(session.config)
    if bad and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    allowed, bad = _unexpected(config)
    if allowed is None:
        return
    tr = terminalreporter
    tr.write_line(f"allowed skips ({config.getoption('--allowed-skips')}): "
                  + ("none" if not allowed else ""))
    for pattern, reason in allowed:
        tr.write_line(f"  {pattern}  # {reason}")
    for node, why in bad:
        tr.write_line(f"NOT ALLOWED: skipped {node}: {why}", red=True)
    if bad:
        tr.write_line(f"{len(bad)} skip(s) not on the allow-list: install what they need "
                      "(requirements-ci.txt) or list them with a reason", red=True)

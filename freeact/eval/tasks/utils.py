"""Execution of generated code for ``freeact_humaneval`` (HumanEval-style pass@1).

The program ``prompt + completion + test + check(entry_point)`` runs in a fresh Python
interpreter (``python -I``: no user site, no PYTHON* variables) in an empty temporary directory,
in its own session, with stdin closed, a wall-clock limit (``FREEACT_CODE_TIMEOUT`` seconds,
default 10) after which the whole process group is killed, and a 1 GiB address-space limit.
This is NOT a sandbox: the code can read and write files and reach the network the user can.
Run code tasks only on models you are willing to execute the output of, as with lm-eval's own
``humaneval`` (flagged ``unsafe_code``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIMEOUT = float(os.environ.get("FREEACT_CODE_TIMEOUT", "10"))
MEMORY_LIMIT = 1 << 30


@dataclass
class ExecResult:
    status: str  # "passed" | "failed" | "timeout"
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limit_memory() -> None:  # runs in the child before exec
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_program(source: str, timeout: float = DEFAULT_TIMEOUT) -> ExecResult:
    """Run ``source`` in a separate interpreter; passed = exit status 0 within ``timeout`` s."""
    with tempfile.TemporaryDirectory(prefix="freeact_exec_") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(source, encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-I", str(path)], cwd=tmp, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=_limit_memory if os.name == "posix" else None)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started
            proc.communicate()
            return ExecResult("timeout", f"no exit within {timeout} s")
    if proc.returncode == 0:
        return ExecResult("passed")
    return ExecResult("failed", err.decode("utf-8", "replace")[-2000:])


def build_program(doc: dict, completion: str) -> str:
    """HumanEval's check program: prompt + completion, the tests, then ``check(entry_point)``."""
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def check_completion(doc: dict, completion: str, timeout: float = DEFAULT_TIMEOUT) -> ExecResult:
    return run_program(build_program(doc, completion), timeout)


def process_code_results(doc: dict, results: list[str]) -> dict:
    """lm-eval ``process_results``: pass@1 of the (first) generated completion."""
    return {"pass@1": float(check_completion(doc, results[0]).passed)}

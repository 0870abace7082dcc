"""How the GPU check keeps what it measured (hpa_lightning/bench/acceptance.py): one deadline for the whole check,
a report rewritten whole after every change, parts run in their own process group and killed at their time.

A lent machine's run is stopped at its time limit (SIGKILL) or by SIGTERM; what is written by then is what comes
back. Light imports only (no torch): it must work before and after anything heavy fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from hpa_lightning.files import write_json_atomic, write_text_atomic

OOM_MARKS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
             "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", "cudaErrorMemoryAllocation")
KILL_GRACE_S = 10.0  # a part past its time gets SIGTERM (Lightning saves and exits), then SIGKILL after this


def is_out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError, or the cuDNN/cuBLAS allocation failures that reach Python as a plain RuntimeError."""
    return type(err).__name__ == "OutOfMemoryError" or any(mark in str(err) for mark in OOM_MARKS)


def describe(err: BaseException, limit: int = 1500) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= limit else text[:limit] + " ..."


class Deadline:
    """One budget for the whole check; each part asks what is left."""

    def __init__(self, budget_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock, self.budget_s = clock, float(budget_s)
        self.start = clock()
        self.end = self.start + self.budget_s

    def left(self) -> float:
        return self.end - self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start


class CheckReport:
    """gpu_check.json, summary.txt and check.log in `folder`: the JSON and the summary rewritten whole (atomically)
    after every change, the log appended line by line; every line also printed at once (flushed)."""

    JSON, SUMMARY, LOG = "gpu_check.json", "summary.txt", "check.log"

    def __init__(self, folder: Path, data: dict, summarize: Callable[[dict], str], deadline: Deadline) -> None:
        self.folder, self.data, self.summarize, self.deadline = Path(folder), data, summarize, deadline
        self.folder.mkdir(parents=True, exist_ok=True)
        self.data.setdefault("parts", {})
        self.data["state"] = "running"
        self.child: subprocess.Popen | None = None
        self.save()

    def say(self, message: str) -> None:
        line = f"[gpu-check {time.strftime('%H:%M:%S')} +{self.deadline.elapsed():.0f}s] {message}"
        print(line, flush=True)
        with open(self.folder / self.LOG, "a") as handle:
            handle.write(line + "\n")

    def part(self, name: str, **fields: object) -> dict:
        """Update part `name` with `fields` and save."""
        record = self.data["parts"].setdefault(name, {})
        record.update(fields)
        self.save()
        return record

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.deadline.elapsed(), 1)
        self.data["time_left_s"] = round(self.deadline.left(), 1)
        write_json_atomic(self.folder / self.JSON, self.data)
        try:
            write_text_atomic(self.folder / self.SUMMARY, self.summarize(self.data) + "\n")
        except Exception as err:  # a summary that cannot be written must not cost the JSON
            write_text_atomic(self.folder / self.SUMMARY, f"(no summary: {describe(err)})\n")

    def stop_child(self) -> None:
        """End the running part's whole process group (a sweep's jobs, a trainer's workers): SIGTERM, then SIGKILL."""
        child, self.child = self.child, None
        if child is None or child.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.stop_child()
        for record in self.data["parts"].values():
            if record.get("status") == "running":
                record.update(status="interrupted", error="SIGTERM while running")
        self.data["state"] = "interrupted (SIGTERM)"
        self.data["ok"] = False
        self.save()
        self.say(f"SIGTERM: stopped; what was measured is in {self.folder / self.JSON}")
        raise SystemExit(143)

    @contextlib.contextmanager
    def saved_on_sigterm(self) -> Iterator[None]:
        """SIGTERM stops the running part, writes what exists and exits 143."""
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def run(self, name: str, argv: list[str], env: dict[str, str], timeout_s: float, cwd: Path | None = None) -> dict:
        """`argv` in a process group of its own, output into `<folder>/<name>.log`, ended after `timeout_s`;
        returns (and records) status ok | failed | timeout with the exit status, seconds and the log's last lines."""
        log = self.folder / f"{name}.log"
        started = time.monotonic()
        self.part(name, status="running", timeout_s=round(timeout_s, 1), log=log.name,
                  command=" ".join(argv[2:] if argv[1:2] == ["-m"] else argv))
        self.say(f"{name}: started, {timeout_s:.0f} s at most (log: {log})")
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
        with open(log, "w") as handle:
            self.child = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                          **group)  # type: ignore[call-overload]
            self.part(name, pid=self.child.pid)  # also its process group's id
            try:
                code: int | str = self.child.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.stop_child()
                code = "timeout"
            self.child = None
        status = "ok" if code == 0 else "timeout" if code == "timeout" else "failed"
        fields: dict = {"status": status, "exit": code, "seconds": round(time.monotonic() - started, 1)}
        if status != "ok":
            fields["error"] = (f"ended after its {timeout_s:.0f} s" if status == "timeout" else f"exit status {code}")
            fields["log_tail"] = tail(log)
        self.say(f"{name}: {status} in {fields['seconds']:.0f} s")
        return self.part(name, **fields)


def tail(path: Path, lines: int = 8) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []

"""Section 2: packing speed with all cores against one, and the peak RSS of packing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hpa_lightning.bench.bench_data import subset_dataset
from hpa_lightning.bench.common import REPO, Profile, note
from hpa_lightning.classes import CHANNELS
from hpa_lightning.data.store import store_path

_PACK_CHILD = """
import json, resource, sys, time
spec = json.loads(sys.argv[1])
from hpa_lightning.pack import build_store
def cpu():
    ru_self, ru_children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru_self.ru_utime + ru_self.ru_stime + ru_children.ru_utime + ru_children.ru_stime
cpu0 = cpu()
t0 = time.perf_counter()
store = build_store(spec["root"], spec["size"], spec["cache_dir"], workers=spec["workers"])
elapsed = time.perf_counter() - t0
cpu_s = cpu() - cpu0
ru_self, ru_children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kb = lambda key: int(status.get(key, "0 kB").split()[0])
print(json.dumps({"seconds": elapsed, "samples": len(store), "store": str(store.path), "cpu_s": cpu_s,
                  "self_maxrss_kb": ru_self.ru_maxrss, "children_maxrss_kb": ru_children.ru_maxrss,
                  "vm_hwm_kb": kb("VmHWM")}))
"""


def _proc_rss_kb(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile + RssShmem) of one process in kB, (0, 0) when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def kb(key: str) -> int:
        return int(fields.get(key, "0 kB").split()[0])

    return kb("RssAnon"), kb("RssFile") + kb("RssShmem")


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def pack_in_child(root: Path, size: int, workers: int, cache_dir: Path) -> dict:
    """build_store in a fresh interpreter (its own RSS), the process tree's RSS sampled every 50 ms meanwhile."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    spec = json.dumps({"root": str(root), "size": size, "cache_dir": str(cache_dir), "workers": workers})
    proc = subprocess.Popen([sys.executable, "-c", _PACK_CHILD, spec], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    peak_total = peak_anon = peak_main = 0
    linux = Path("/proc/self/status").is_file()
    while proc.poll() is None:
        if linux:
            tree = _descendants(proc.pid)
            rss = [_proc_rss_kb(pid) for pid in tree]
            peak_total = max(peak_total, sum(a + f for a, f in rss))
            peak_anon = max(peak_anon, sum(a for a, _ in rss))
            peak_main = max(peak_main, sum(_proc_rss_kb(proc.pid)))
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"packing child failed ({proc.returncode}): {err.strip()[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update({"workers": workers, "samples_per_s": result["samples"] / result["seconds"],
                   "cores_used": result["cpu_s"] / result["seconds"],
                   "tree_peak_rss_mb": peak_total / 1024, "tree_peak_anon_mb": peak_anon / 1024,
                   "main_peak_rss_mb": max(peak_main, result["vm_hwm_kb"]) / 1024,
                   "workers_peak_rss_mb": result["children_maxrss_kb"] / 1024})
    return result


def bench_packing(root: Path, cache: Path, prof: Profile, workers: int) -> dict:
    scratch = cache / f"pack-scratch-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        subset = subset_dataset(root, min(prof.pack_rate_n, prof.n), cache)
        runs = {}
        for label, w in (("one_worker", 1), ("all_cores", workers)):
            note(f"packing: {prof.pack_rate_n} samples at {prof.size} px with {w} worker(s)")
            runs[label] = pack_in_child(subset, prof.size, w, scratch / label)
        note(f"packing: all {prof.n} samples at {prof.size} px with {workers} workers (peak RSS)")
        full = pack_in_child(root, prof.size, workers, scratch / "full")
        # keep it as the loading section's store when that one is not packed yet (saves packing twice)
        keep = store_path(root, prof.size, cache / "stores")
        if not (keep / "meta.json").is_file():
            keep.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(full["store"], keep)
            except OSError:
                pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    one, many = runs["one_worker"], runs["all_cores"]
    store_mb = prof.n * len(CHANNELS) * prof.size * prof.size / 2**20
    return {"ratio": many["samples_per_s"] / one["samples_per_s"], "workers": workers, "one_worker": one,
            "all_cores": many, "full": full, "full_samples": prof.n, "rate_samples": prof.pack_rate_n,
            "store_mb": store_mb, "peak_rss_mb": full["tree_peak_rss_mb"]}

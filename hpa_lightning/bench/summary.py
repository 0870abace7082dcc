"""The benchmark's printed report: ratios first, against their targets."""

from __future__ import annotations

import textwrap

from hpa_lightning.bench.common import TARGETS, finite


def _fmt_target(key: str, value: float | None) -> tuple[str, bool | None]:
    op, bound = TARGETS[key]
    if not finite(value):
        return f"target {op} {bound:g}", None
    met = value >= bound if op == ">=" else value <= bound if op == "<=" else value < bound
    return f"target {op} {bound:g}", bool(met)


def render_report(result: dict) -> str:
    lines = []
    env = result["environment"]
    gpu_txt = env["gpu"] or "no GPU"
    lines.append(f"hpa_lightning benchmark ({result['mode']}): {env['cpus']} CPU cores, torch {env['torch']}, "
                 f"lightning {env['lightning']}, kornia {env['kornia']}, {gpu_txt}")
    lines.append(f"load average {env['loadavg_start']} at start, {env['loadavg_end']} at end; {result['workers']} "
                 f"loader workers; torch threads in the CPU training sections: {result['cpu_threads']}")
    data = result.get("data") or {}
    if data:
        png = data["png"]
        lines.append(f"data: {data['n']} samples at {data['size']} px ({data['unique']} rendered, the rest "
                     f"hard links), texture_noise={data['texture_noise']:g}; mean PNG {png['mean_kb']:.1f} KB per "
                     f"channel (min {png['min_kb']:.1f}, max {png['max_kb']:.1f}, {png['files']} files)")
    lines.append("")
    lines.append("RATIOS (measured side by side in this run)")
    s = result["sections"]
    verdicts = result["targets"]

    def verdict(key: str) -> str:
        v = verdicts.get(key)
        if v is None:
            return ""
        return f"[{v['target']}: {'MET' if v['met'] else 'MISSED' if v['met'] is False else 'n/a'}]"

    def row(num: str, name: str, value: str, text: str, tail: str = "") -> None:
        lines.append(f"  {num} {name:<9} {value:>8}  {text:<62} {tail}".rstrip())

    if "loading" in s:
        x = s["loading"]
        row("1", "loading", f"{x['ratio']:.1f}x", "packed DataModule / per-sample PNG decoding, samples/s",
            verdict("loading_speedup"))
    if "packing" in s:
        x = s["packing"]
        row("2", "packing", f"{x['ratio']:.2f}x", f"{x['workers']} workers / 1 worker, samples/s (ideal "
            f"{x['workers']}x)", f"peak RSS {x['peak_rss_mb']:.0f} MB {verdict('pack_peak_rss_mb')}")
    if "overhead" in s:
        x = s["overhead"]
        row("3", "overhead", f"{x['ratio']:.3f}", f"Lightning / plain PyTorch, one epoch (median of {x['repeats']})",
            verdict("framework_overhead"))
        row(" ", "", f"{x['per_step_median_ratio']:.3f}", "  the same, median step time")
    if "augment" in s:
        x = s["augment"]
        row("4", "augment", f"{100 * x['ratio']:.1f}%", f"kornia augmentation / training step ({x['headline']})")
    if "gpu" in s:
        x = s["gpu"]
        if x.get("skipped"):
            lines.append(f"  5 gpu       skipped: {x['skipped']}")
        else:
            row("5", "gpu", f"{100 * x['data_wait_share']:.1f}%", "waiting for data / step time",
                f"best {x['best_images_per_s']:.0f} images/s {verdict('gpu_images_per_s')}")
            if x.get("compile_speedup") is not None:
                row(" ", "", f"{x['compile_speedup']:.2f}x", "model.compile / eager, images/s")
    if "jpeg" in s:
        x = s["jpeg"]
        row("6", "jpeg", f"{x['ratio']:.1f}x", f"full-decode loop / JPEG draft, per sample, 1 core ({x['jpg_px']} -> "
            f"{x['image_size']} px)", f"|diff| from box {x['mean_abs_diff']:.2f} {verdict('jpeg_draft_speedup')}")
    if "thresholds" in s:
        x = s["thresholds"]
        row("7", "thresholds", f"{x['ratio']:.2f}", "exact per-class threshold search / sklearn PR curve per class",
            verdict("threshold_tuning_ms"))
    if "segment" in s:
        x = s["segment"]
        row("8", "segment", f"{x['seconds_per_image']:.3f} s", f"classical segmentation per {x['image_px']} px image, "
            f"scale {x['scale']:g}, one core", verdict("segment_s_per_image"))
    if "cells" in s:
        x = s["cells"]
        row("9", "cells", f"{x['ratio']:.2f}x", "per-cell blend (cam + crops) / image scores copied to every cell, "
            "time", f"{x['cells_per_s']['blend']:.0f} cells/s")
    if "stream" in s:
        x = s["stream"]
        row("10", "stream", f"{x['ratio']:.2f}", "local streaming folder / memmap store, training loader samples/s",
            verdict("stream_local_ratio"))
        if "chunk_copy_ratio" in x:
            row("  ", "", f"{x['chunk_copy_ratio']:.2f}", "the same chunk files copied without litdata / memmap store")
        store = x["object_store"]
        if store.get("skipped"):
            lines.append(f"  10 stream   object store skipped: {store['skipped']}")
        else:
            row("  ", "", f"{store['ratio']:.2f}", "loopback S3 stream / plain GET loop over the same chunks, one "
                "epoch", verdict("stream_object_store_ratio"))
    for name, err in result.get("errors", {}).items():
        lines.append(f"  ! {name}: FAILED: {err}")

    lines.append("")
    lines.append("ABSOLUTE FIGURES (noisy on a shared machine; compare ratios)")
    if "loading" in s:
        x = s["loading"]
        p, q = x["packed"], x["png"]
        lines.append(f"  1 loading   batch {x['batch_size']}, {x['workers']} workers, {x['image_size']} px uint8:")
        for label, rate in (("packed store, threads (default)", p),
                            ("packed store, worker processes", x.get("packed_process_workers")),
                            ("PNG decode, worker processes", q)):
            if rate:
                lines.append(f"              {label:<32}{rate['samples_per_s']:8.1f} samples/s "
                             f"({rate['timed_samples']} samples in {rate['seconds']:.2f} s; "
                             f"first batch after {rate['first_batch_s']:.2f} s)")
    if "packing" in s:
        x = s["packing"]
        one, many, full = x["one_worker"], x["all_cores"], x["full"]
        lines.append(f"  2 packing   {x['rate_samples']} samples: 1 worker {one['samples_per_s']:.1f} samples/s "
                     f"(busy cores {one['cores_used']:.2f}), {x['workers']} workers {many['samples_per_s']:.1f} "
                     f"samples/s (busy cores {many['cores_used']:.2f})")
        lines.append("              (busy cores = CPU time / wall time of the packing processes: below the worker "
                     "count when other jobs share the cores)")
        lines.append(f"              {x['full_samples']} samples ({x['store_mb']:.0f} MB store) with {x['workers']} "
                     f"workers: {full['samples_per_s']:.1f} samples/s, {full['seconds']:.1f} s "
                     f"(busy cores {full['cores_used']:.2f})")
        for label, run in (("1 worker", one), (f"{x['workers']} workers", many),
                           (f"{x['full_samples']} samples", full)):
            lines.append(f"              peak RSS {label:<13} all processes {run['tree_peak_rss_mb']:6.0f} MB "
                         f"(anonymous {run['tree_peak_anon_mb']:5.0f}); packer VmHWM {run['main_peak_rss_mb']:5.0f} "
                         f"MB; decode worker {run['workers_peak_rss_mb']:4.0f} MB")
    if "overhead" in s:
        x = s["overhead"]
        lines.append(f"  3 overhead  {x['model']} at {x['image_size']} px, batch {x['batch_size']}, {x['optimizer']}, "
                     f"{x['loss']}, augmentation on, {x['steps_per_epoch']} steps/epoch, {x['repeats']} alternating "
                     f"runs each:")
        lines.append(f"              steps 2..{x['steps_per_epoch']}: Lightning {x['lightning_span_s']:.2f} s, plain "
                     f"{x['plain_span_s']:.2f} s ({x['overhead_per_step_ms']:+.1f} ms/step); median step "
                     f"{x['lightning_step_ms']:.1f} vs {x['plain_step_ms']:.1f} ms")
        lines.append(f"              whole call: trainer.fit {x['lightning_fit_total_s']:.2f} s, plain loop "
                     f"{x['plain_total_s']:.2f} s (loader start-up and fit's fixed setup included)")
    if "augment" in s:
        for where, x in s["augment"]["by_device"].items():
            lines.append(f"  4 augment   {where}: augmentation {x['augment_ms']:.1f} ms, to-float+standardise "
                         f"{x['to_float_standardize_ms']:.1f} ms, training step {x['step_ms']:.1f} ms "
                         f"({x['model']}, batch {x['batch_size']}, {x['image_size']} px)")
    if "gpu" in s and not s["gpu"].get("skipped"):
        x = s["gpu"]
        lines.append(f"  5 gpu       {x['device']}: {x['model']} at {x['image_size']} px, batch {x['batch_size']}, "
                     f"{x['workers']} loader workers")
        for label in ("eager", "compiled"):
            r = x.get(label)
            if r:
                lines.append(f"              {label:<9} {r['images_per_s']:7.1f} images/s, step {r['step_ms']:.1f} ms, "
                             f"waiting for data {r['data_wait_ms']:.2f} ms/step ({100 * r['data_wait_share']:.1f}%)")
        lines.append(f"              best {x['best_images_per_s']:.1f} images/s {verdict('gpu_images_per_s')}")
    if "jpeg" in s:
        x = s["jpeg"]
        lines.append(f"  6 jpeg      {x['samples']} samples of 4 RGB JPGs at {x['jpg_px']} px (quality {x['quality']}, "
                     f"mean {x['mean_jpg_kb']:.0f} KB) to {x['image_size']} px, median of {x['rounds']} alternating "
                     f"rounds:")
        old = x["draft_x2"]
        lines.append(f"              {'one core' if x['one_core'] else 'not pinned'}: draft {x['draft_ms']:.1f} "
                     f"ms/sample, full-decode loop {x['full_ms']:.1f}, the rule before (draft-x2) "
                     f"{x['draft_x2_ms']:.1f} ({x['draft_x2_ratio']:.2f}x)")
        lines.append(f"              |decoded - box-filtered full decode|: draft mean {x['mean_abs_diff']:.2f}, p99 "
                     f"{x['p99_abs_diff']:.1f}, max {x['max_abs_diff']:.1f}; draft-x2 mean {old['mean_abs_diff']:.2f}, "
                     f"p99 {old['p99_abs_diff']:.1f}, max {old['max_abs_diff']:.1f} grey levels")
    if "thresholds" in s:
        x = s["thresholds"]
        lines.append(f"  7 thresholds {x['samples']} x {x['classes']}, median of {x['iters']}: tune_thresholds "
                     f"{x['exact_ms']:.1f} ms, sklearn {x['sklearn_ms']:.1f} ms; per-class F1, exact minus sklearn: "
                     f">= {x['min_f1_gain']:.3g}")
        lines.append(f"              global_threshold {x['global_ms']:.1f} ms, label_ratio_thresholds "
                     f"{x['label_ratio_ms']:.1f} ms")
    if "segment" in s:
        x = s["segment"]
        lines.append(f"  8 segment   {x['images']} synthetic {x['image_px']} px images ({x['mean_cells']:.1f} cells "
                     f"each), {x['rounds']} rounds, one core, one thread: median {x['seconds_per_image']:.3f} s, "
                     f"max {x['max_seconds']:.3f} s per image")
    if "cells" in s:
        x = s["cells"]
        rates = ", ".join(f"{m} {v:.0f}" for m, v in x["cells_per_s"].items())
        lines.append(f"  9 cells     {x['images']} synthetic {x['image_px']} px images ({x['mean_cells']:.1f} cells "
                     f"each), image model {x['image_model_px']} px, cell model {x['cell_model_px']} px, "
                     f"{x['threads']} threads: cells/s {rates}")
    if "stream" in s:
        x = s["stream"]
        lines.append(f"  10 stream   {x['train_samples']} samples of {x['image_size']} px, batch {x['batch_size']}, "
                     f"{x['workers']} workers, median of {x['rounds']}: memmap {x['memmap_samples_per_s']:.0f}, local "
                     f"stream {x['local_samples_per_s']:.0f}, chunk copy {x.get('chunk_copy_samples_per_s', 0):.0f} "
                     f"samples/s")
        store = x["object_store"]
        if not store.get("skipped"):
            lines.append(f"              loopback S3 ({store['objects']} objects, {store['mb']:.0f} MB): stream "
                         f"{store['stream_samples_per_s']:.0f}, GET loop {store['get_loop_samples_per_s']:.0f} "
                         f"samples/s")
    notes = diagnostics(result)
    if notes:
        lines.append("")
        lines.append("NOTES")
        for n in notes:
            lines.extend(textwrap.wrap(n, width=118, initial_indent="  - ", subsequent_indent="    "))
    lines.append("")
    lines.append(f"total wall time {result['wall_s']:.1f} s; JSON: {result['out']}")
    return "\n".join(lines)


def diagnostics(result: dict) -> list[str]:
    """Plain-language reasons behind figures that are easy to misread."""
    notes = []
    s = result["sections"]
    packing = s.get("packing")
    if packing:
        full = packing["full"]
        if full["tree_peak_rss_mb"] > 2 * max(full["tree_peak_anon_mb"], 1.0):
            notes.append(f"packing RSS is mostly file pages of the store's memory map (images.npy written through "
                         f"open_memmap stays mapped, so RSS grows with the store: {packing['store_mb']:.0f} MB here); "
                         f"anonymous memory peaked at {full['tree_peak_anon_mb']:.0f} MB")
        many = packing["all_cores"]
        if packing["workers"] > 1 and many["cores_used"] < 0.8 * packing["workers"]:
            notes.append(f"the {packing['workers']}-worker packing got {many['cores_used']:.2f} busy cores (load "
                         f"average {result['environment']['loadavg_start']}): other jobs share the cores, so the "
                         f"parallel speedup is understated")
    overhead = s.get("overhead")
    if overhead and abs(overhead["ratio"] - overhead["per_step_median_ratio"]) > 0.03:
        notes.append("the epoch and median-step overhead ratios differ by more than 3 %: step times were noisy "
                     "(shared cores); rerun with repeats=5 for a tighter figure")
    return notes


def collect_targets(sections: dict) -> dict:
    values = {
        "loading_speedup": sections.get("loading", {}).get("ratio"),
        "framework_overhead": sections.get("overhead", {}).get("ratio"),
        "pack_peak_rss_mb": sections.get("packing", {}).get("peak_rss_mb"),
        "gpu_images_per_s": sections.get("gpu", {}).get("best_images_per_s"),
        "jpeg_draft_speedup": sections.get("jpeg", {}).get("ratio"),
        "threshold_tuning_ms": sections.get("thresholds", {}).get("exact_ms"),
        "segment_s_per_image": sections.get("segment", {}).get("seconds_per_image"),
        "stream_local_ratio": sections.get("stream", {}).get("ratio"),
        "stream_object_store_ratio": sections.get("stream", {}).get("object_store", {}).get("ratio"),
    }
    targets = {}
    for key, value in values.items():
        if value is None:
            continue
        text, met = _fmt_target(key, value)
        targets[key] = {"value": value, "target": text, "met": met}
    return targets


def headline_ratios(sections: dict) -> dict:
    gpu = sections.get("gpu", {})
    return {
        "loading_speedup": sections.get("loading", {}).get("ratio"),
        "packing_speedup": sections.get("packing", {}).get("ratio"),
        "framework_overhead": sections.get("overhead", {}).get("ratio"),
        "augment_share": sections.get("augment", {}).get("ratio"),
        "gpu_compile_speedup": gpu.get("compile_speedup"),
        "gpu_data_wait_share": gpu.get("data_wait_share"),
        "jpeg_draft_speedup": sections.get("jpeg", {}).get("ratio"),
        "threshold_search": sections.get("thresholds", {}).get("ratio"),
        "segment_s_per_image": sections.get("segment", {}).get("seconds_per_image"),
        "cell_blend_over_image": sections.get("cells", {}).get("ratio"),
        "stream_local_ratio": sections.get("stream", {}).get("ratio"),
        "stream_object_store_ratio": sections.get("stream", {}).get("object_store", {}).get("ratio"),
    }

"""The report of benchmarks/cost.py: its results as tables, printed and written as markdown."""

from __future__ import annotations

import json
from pathlib import Path

from harness import Report, fmt, on_off

def report_steps(rep: Report, steps: dict, plan) -> None:
    rep.heading(f"1. Training step per method (batch {steps['batch']}, same batch)")
    excluded = ", ".join(f"{k} ({v})" for k, v in steps["excluded"].items())
    rep.text(f"Excluded: {excluded}. Runtime defaults: fp32, activation checkpointing auto (ckpt: what it chose "
             f"at batch {steps['batch']}). ms/step: median of the timed steps after warm-up; spread: (slowest - "
             "fastest) / median. Peak RSS of the measuring process; training +MiB: training's peak over the RSS "
             "before the first step (the peak is reset after loading, via /proc/self/clear_refs).")
    for arch, rows in steps["by_arch"].items():
        a = plan.archs[arch]
        rep.text(f"**{arch_label(a, plan)}** — {a.warmup} warm-up + {a.steps} timed steps")
        table = []
        for name, r in rows.items():
            if "error" in r:
                table.append([name, "", "failed: " + r["error"], "", "", "", "", "", "", ""])
                continue
            table.append([name, on_off(r["checkpointing"]), fmt(r["ms_per_step"]), fmt(100 * r["spread"], ".0f"),
                          fmt(r["images_per_s"]),
                          fmt(r["vs_fedavg"], ".2f"),
                          fmt(r["process_peak_mib"], ".0f"), fmt(r["train_increment_mib"], ".0f"),
                          f"{r['trainable_params']:,}", r.get("note", "")])
        rep.table(["method", "ckpt", "ms/step", "spread %", "images/s", "vs fedavg", "peak RSS MiB", "training +MiB",
                   "trainable", "note"], table)


def arch_label(a, plan) -> str:
    if a.patch is None:
        return "small: built-in tiny CLIP (4 blocks, width 128, 32x32 images)"
    text = f"{a.name}: random weights, vision {a.layers} layers x 768, 12 heads, MLP 3072, 224 px, patch {a.patch}"
    return text + f"; text tower {a.text_layers} layers x 512 (OpenAI size), built-in tokenizer"


def report_overhead(rep: Report, ov: dict) -> None:
    rep.heading("2. Runner overhead (built-in default federation, in-process)")
    if "error" in ov:
        rep.text(f"failed: {ov['error']}")
        return
    rep.text(f"`{' '.join(ov['config'])}`; overhead = 1 - compute / wall, from rounds.csv")
    rows = [[int(r["round"]), fmt(r["wall_seconds"], ".2f"), fmt(r["compute_seconds"], ".2f"),
             fmt(100 * r["overhead_share"], ".1f")] for r in ov["rounds"]]
    rows.append(["mean", "", "", fmt(100 * ov["mean_overhead_share"], ".1f")])
    rep.table(["round", "wall s", "compute s", "overhead %"], rows)
    if "profile" in ov:
        p = ov["profile"]
        rep.text(f"Breakdown (cProfile of the same rounds, {p['wall_s']:.1f} s wall, of which training steps "
                 f"{p['train_steps_s']:.1f} s and evaluation forwards {p['eval_forward_s']:.1f} s; the rest, "
                 f"{p['overhead_s']:.1f} s, is overhead). Items nest and overlap; {p['note']}.")
        rep.table(["part of the runner", "s", "% of wall"],
                  [[k, fmt(v, ".2f"), fmt(100 * v / p["wall_s"], ".1f")] for k, v in p["items_s"].items()])


def report_flops(rep: Report, fl: dict) -> None:
    rep.heading("3. Achieved FLOP/s, ViT-B/16 fedlrm step")
    m, k, n = fl["matmul_shape"]
    mm = fl["matmul"]
    if "error" in mm:
        rep.text(f"matmul failed: {mm['error']}")
        return
    rep.text(f"Plain `torch.matmul` of ({m}, {k}) x ({k}, {n}) (an MLP layer's shape at this batch): fp32 "
             f"{mm['fp32']['flop_per_s'] / 1e9:.0f} GFLOP/s, bf16 {mm['bf16']['flop_per_s'] / 1e9:.0f} GFLOP/s. "
             "Step FLOPs are counted by FlopCounterMode over one fp32 step, forward and backward (matmuls, "
             "convolution, attention); bf16 autocast runs the same operations, so it is divided by the same "
             "count. With checkpointing the count includes the recomputed forward; 'useful' divides the count "
             "without recomputation (ckpt off) by the step time. Elementwise work is not counted.")
    rows = []
    for name, r in fl["settings"].items():
        if "error" in r:
            rows.append([name, "failed: " + r["error"], "", "", "", "", ""])
            continue
        model = fl["settings"].get(name.replace("ckpt on", "ckpt off"), {}).get("gflop_per_step")
        useful = model / r["step_s"] if model else None
        rows.append([name, fmt(r["gflop_per_step"], ".0f"), fmt(r["step_s"], ".2f"), fmt(r["gflop_per_s"], ".0f"),
                     fmt(useful, ".0f"), fmt(r["matmul_gflop_per_s"], ".0f"),
                     fmt(100 * r["fraction_of_matmul"], ".0f")])
    rep.table(["setting", "GFLOP/step", "step s", "GFLOP/s", "useful GFLOP/s", "matmul GFLOP/s",
               "% of matmul"], rows)


def report_precision(rep: Report, pr: dict, batch: int, target_gib: float) -> None:
    rep.heading(f"4. fp32 vs bf16 autocast, activation checkpointing on/off (ViT-B/16, batch {batch})")
    rows = []
    for name, r in pr.items():
        if "error" in r:
            rows.append([name, "failed: " + r["error"], "", "", "", "", ""])
            continue
        base = pr.get(name.split(",")[0] + ", fp32, ckpt on", {}).get("median_step_s")
        gib = r["process_peak_mib"] / 1024
        rows.append([name, fmt(1000 * r["median_step_s"], ".0f"), fmt(batch / r["median_step_s"], ".2f"),
                     fmt(r["median_step_s"] / base if base else None, ".2f"), fmt(gib, ".2f"),
                     fmt(r["train_increment_mib"] / 1024, ".2f"), "yes" if gib <= target_gib else "no"])
    rep.table(["method, precision, checkpointing", "ms/step", "images/s", "vs fp32 ckpt on", "peak GiB",
               "training +GiB", f"<= {target_gib:g} GiB"], rows)
    rep.text(auto_note(pr, "fp32, ckpt off"))


def auto_note(results: dict, without: str) -> str:
    """What auto checkpointing estimated and chose, against the increment measured without it."""
    known = [r for r in results.values() if r.get("activation_estimate_mib") is not None]
    if not known:
        return "Auto checkpointing: no estimate available."
    r = known[0]
    measured = ", ".join(f"{name.split(',')[0]} {v['train_increment_mib'] / 1024:.2f} GiB"
                         for name, v in results.items() if name.endswith(without) and "train_increment_mib" in v)
    return (f"Auto checkpointing estimates {r['activation_estimate_mib'] / 1024:.2f} GiB of activations and "
            f"chooses {on_off(r['auto_checkpointing'])}; measured training increment ({without}): {measured or '-'}.")


def report_prefix(rep: Report, px: dict, plan) -> None:
    rep.heading("5. Frozen-prefix caching (fedlrm, adapters on the top third of the blocks)")
    sizes = "; ".join(f"{arch}: {n} images x {e} epochs" for arch, (n, e) in plan.prefix.items())
    rep.text("Wall time of one client's `train_locally` (round 1, same seed, same random images), including "
             "the one-off pass through the frozen blocks; a forward/backward warm-up before it in both processes. "
             f"{sizes} (ViT-B/16 gets fewer images, to keep it to a few minutes).")
    rows = []
    for arch, c in px["caching"].items():
        if "speedup" not in c:
            rows.append([arch, str(c.get("target_layers")), "failed", "", "", "", "", "", "", "", ""])
            continue
        rows.append([arch, str(c["target_layers"]), f"{c['images']} x {c['epochs']}", fmt(c["on"]["wall_s"], ".2f"),
                     fmt(c["off"]["wall_s"], ".2f"), fmt(c["speedup"], ".2f"), on_off(c["on"]["checkpointing"]),
                     c["on"]["cached_from_block"],
                     c["off"]["cached_from_block"], "yes" if c["weights_equal"] else f"no ({c['max_abs_diff']:.2g})",
                     "yes" if c["loss_equal"] else "no"])
    rep.table(["arch", "adapted blocks", "images x epochs", "cache on s", "cache off s", "speed-up",
               "ckpt (auto, as run)", "cached from block (on)", "(off)", "weights identical", "loss identical"], rows)
    rows = [[name, fmt(r["on_ms"]), fmt(r["off_ms"]), fmt(100 * r["cost"], "+.0f"), fmt(r["on_increment_mib"], ".0f"),
             fmt(r["off_increment_mib"], ".0f")] for name, r in px["checkpointing_small"].items()]
    rep.text(f"Activation checkpointing on the small model (batch {plan.batch}, every block adapted):")
    rep.table(["method", "ckpt on ms", "ckpt off ms", "cost %", "training +MiB on", "training +MiB off"], rows)
    auto = next((r for r in px["checkpointing_small"].values()), None)
    if auto:
        rep.text(f"Auto checkpointing estimates {auto['estimate_mib']:.0f} MiB of activations for the small model "
                 f"and chooses {on_off(auto['auto'])}.")


def write_report(results: dict, plan, out: Path, target_gib: float) -> None:
    """`target_gib`: the memory target, marked beside each ViT-B/16 setting."""
    rep = Report()
    m, cpu = results["machine"], results["cpu_use"]
    title = "Training cost on a CPU (benchmarks/cost.py" + (" --quick: smoke-test settings)" if plan.quick else ")")
    rep.md += [f"# {title}", "", f"`{results['command']}`", ""]
    rep.text(f"{m['cpu']}, {m['logical_cpus']} logical CPUs ({', '.join(m['isa'])}), torch {m['torch']} "
             f"({m['cpu_capability']}), transformers {m['transformers']}, {m['threads']} torch threads; "
             f"{results['started']}, {results['seconds'] / 60:.1f} min.")
    rep.text(f"Other processes used {100 * cpu['others_share']:.0f} % of the machine's CPU during the run "
             f"(load average {results['load_average']['before'][0]:.2f} before, "
             f"{results['load_average']['after'][0]:.2f} after)"
             + (": the timings are DISTURBED." if cpu["others_share"] > 0.05 else "."))
    for rerun in results.get("reruns", []):
        rep.text(f"Section `{rerun['section']}` was measured again by `{rerun['command']}` at {rerun['started']} "
                 f"({rerun['seconds'] / 60:.1f} min; other processes used {100 * rerun['others_share']:.0f} % of the CPU"
                 + (": DISTURBED)." if rerun["others_share"] > 0.05 else ")") + "; its figures below are from that run.")
    rep.heading("Targets")
    rep.bullets(results["targets"])
    sections = {"steps": lambda r: report_steps(rep, r, plan), "overhead": lambda r: report_overhead(rep, r),
                "flops": lambda r: report_flops(rep, r),
                "precision": lambda r: report_precision(rep, r, plan.batch, target_gib),
                "prefix": lambda r: report_prefix(rep, r, plan)}
    for name, show in sections.items():
        if name in results:
            show(results[name])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text("\n".join(rep.md))
    rep.console.print(f"written to {out.with_suffix('.json')} and {out.with_suffix('.md')}")

"""Training-step time and peak memory of the three methods, side by side with the official code.

    python bench/train_step.py                      # baseline, FED, DPM: ViT-B 256x128, batch 16, CPU fp32
    python bench/train_step.py --profile            # + the top operators of one step per method
    python bench/train_step.py --models vit_small_patch16 --batch 8
    python bench/train_step.py --dpm-second-pass full   # DPM's official full second pass
    python bench/train_step.py --compile            # torch.compile the model forward
    python bench/train_step.py --device cuda --amp bf16
    python bench/train_step.py --no-malloc-tuning   # glibc / torch allocator defaults

Each method runs the engine's one training step (``occreid.engine.step.TrainStep``, what
``occreid train`` runs) with the method's own optimisers: the baseline's forward/loss/backward/
SGD step, FED's (7-channel two-view batch, memory search and update), DPM's (two optimisers,
two passes). The default set-up is the one of ``specs/official-speed.md``: ViT-B at 256x128,
4 identities x 4 images, 702 classes, the baseline and FED at stride 16, DPM at stride 11 with
SIE (8 cameras), random weights; ``--stride`` forces one stride for all.

Each configuration runs in a fresh subprocess so that its peak memory is its own: CPU peak is
the process's maximum resident set size, GPU peak is torch.cuda.max_memory_allocated. One
warm-up step, then the median of ``--iters`` timed steps; with ``--repeats R`` the methods run
R times in turn (baseline, FED, DPM, baseline, ...) and the median over the repeats is shown,
which is fairer on a shared machine than R runs in a row.

``--profile``: one more step under ``torch.profiler`` (CPU activities), then the ``--top``
operators by self CPU time, per method (the profiled step is not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

#: ``specs/official-speed.md``: the official code on a 2-core CPU, ViT-B 256x128, batch 4 x 4,
#: 702 classes, fp32, 2 threads (seconds per training iteration, peak RSS GiB).
OFFICIAL = {
    "baseline": (5.3, 3.6),
    "fed": (11.0, 6.6),
    "dpm": (34.7, 8.1),
}
#: The official configurations: stride and SIE cameras per method.
OFFICIAL_SETUP = {"baseline": (16, 0), "fed": (16, 0), "dpm": (11, 8)}


def run_one(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from occreid.config import DEFAULTS
    from occreid.engine.step import TrainStep, build_method_optimizers
    from occreid.methods import build_model, get_method
    from occreid.utils.cpu_memory import tune_cpu_allocator

    malloc_tuned = tune_cpu_allocator() if args.device == "cpu" else False  # as occreid train does

    torch.manual_seed(0)
    device = torch.device(args.device)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    h, w = args.size
    num_classes = 702
    spec = get_method(args.method)
    options = {}
    if args.method == "dpm" and args.dpm_second_pass:
        options["second_pass"] = args.dpm_second_pass
    model = build_model(
        args.method,
        num_classes=num_classes,
        num_cameras=args.cameras,
        sie_camera=args.cameras > 1,
        backbone=args.model,
        img_size=(h, w),
        stride=args.stride,
        backbone_kwargs={"fused_attn": not args.no_fused_attn},
        **options,
    ).to(device).train()
    if args.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    optimizers, _ = build_method_optimizers(spec, model, DEFAULTS["solver"])
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    forward = torch.compile(model) if args.compile else model
    train_step = TrainStep(spec, model, optimizers, forward=forward, device=device, amp=amp, scaler=scaler)
    ids = args.batch // 4
    pids = torch.arange(ids, device=device).repeat_interleave(4)
    cams = torch.arange(args.batch, device=device) % max(args.cameras, 1)
    images = torch.randn(args.batch, 3, h, w, device=device)
    if spec.npo == "required":
        # FED's 7-channel sample: clean view, occluded view, |difference| (the NPO pipeline's output)
        occ = images.clone()
        occ[:, :, h // 2 :] = torch.randn_like(occ[:, :, h // 2 :])
        diff = (images - occ).abs().sum(1, keepdim=True) / 2
        images = torch.cat([images, occ, diff], 1)
    if hasattr(model, "init_memory"):
        with torch.no_grad():  # random identity centres of the right width (the init pass is not timed)
            model.eval()
            width = model.memory_features(torch.randn(2, 3, h, w, device=device)).shape[1]
            model.train()
            model.init_memory(torch.randn(num_classes, width, device=device), torch.arange(num_classes, device=device))
    batch = {"images": images, "pids": pids, "camids": cams}

    def step():
        train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    med = statistics.median(times)
    res = {
        "method": args.method,
        "model": args.model,
        "size": f"{h}x{w}",
        "stride": args.stride,
        "cameras": args.cameras,
        "batch": args.batch,
        "device": args.device,
        "amp": args.amp,
        "threads": torch.get_num_threads(),
        "malloc_tuned": malloc_tuned,
        "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0") == "1",
        "step_s": round(med, 4),
        "times_s": [round(t, 3) for t in times],
        "warmup_s": round(warmup_s, 3),
        "images_per_s": round(args.batch / med, 2),
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "cpu_peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        # per timed step: CPU seconds in user / kernel mode and minor page faults (first touches
        # of freshly mapped memory), which show allocator costs independently of the load
        "user_s_per_step": round((ru1.ru_utime - ru0.ru_utime) / args.iters, 3),
        "sys_s_per_step": round((ru1.ru_stime - ru0.ru_stime) / args.iters, 3),
        "minor_faults_per_step": (ru1.ru_minflt - ru0.ru_minflt) // args.iters,
    }
    if device.type == "cuda":
        res["gpu_peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res["gpu"] = torch.cuda.get_device_name()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
        res["profile"] = table
    return res


def _setups(args, method):
    """(stride, cameras) of ``method`` for this run."""
    stride, cams = OFFICIAL_SETUP.get(method, (16, 0))
    if args.stride is not None:
        stride = args.stride
    if args.cameras is not None:
        cams = args.cameras
    return stride, cams


def _is_official_setup(args, r) -> bool:
    return (
        r["model"] == "vit_base_patch16" and r["size"] == "256x128" and r["batch"] == 16
        and r["device"] == "cpu" and r["amp"] == "fp32"
        and (r["stride"], r["cameras"] > 1) == (OFFICIAL_SETUP[r["method"]][0], OFFICIAL_SETUP[r["method"]][1] > 1)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_base_patch16"])
    p.add_argument("--methods", nargs="+", default=["baseline", "fed", "dpm"])
    p.add_argument("--size", nargs=2, type=int, default=[256, 128])
    p.add_argument("--stride", type=int, default=None, help="one stride for all methods (default: official per method)")
    p.add_argument("--cameras", type=int, default=None, help="SIE cameras (default: 8 for DPM, none otherwise)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="run the method list this many times in turn")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model forward")
    p.add_argument("--no-fused-attn", action="store_true", help="explicit attention matrix instead of SDPA")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in the backbone")
    p.add_argument("--dpm-second-pass", default=None, choices=["hmg_only", "full"],
                   help="DPM's second pass (default: the model's default, hmg_only)")
    p.add_argument("--profile", action="store_true", help="profile one extra step per method")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="glibc/torch allocator defaults (OCCREID_NO_MALLOC_TUNING=1 in the children)")
    p.add_argument("--top", type=int, default=25, help="operators shown by --profile")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--method", default="baseline", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import occreid._env  # noqa: F401  (before torch, as the occreid command does)

        print(json.dumps(run_one(args)))
        return
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
          f"threads {args.threads or torch.get_num_threads()}, load {load:.2f} at the start")
    runs = {}
    for rep in range(args.repeats):
        for method, model in [(m, b) for b in args.models for m in args.methods]:
            stride, cams = _setups(args, method)
            cmd = [sys.executable, __file__, "--child", "--model", model, "--method", method,
                   "--size", *map(str, args.size), "--stride", str(stride), "--cameras", str(cams),
                   "--batch", str(args.batch), "--iters", str(args.iters), "--device", args.device,
                   "--amp", args.amp, "--threads", str(args.threads), "--top", str(args.top)]
            cmd += [f for f, on in (("--compile", args.compile), ("--no-fused-attn", args.no_fused_attn),
                                    ("--grad-checkpointing", args.grad_checkpointing),
                                    ("--profile", args.profile and rep == 0)) if on]
            if args.dpm_second_pass:
                cmd += ["--dpm-second-pass", args.dpm_second_pass]
            env = dict(os.environ, **({"OCCREID_NO_MALLOC_TUNING": "1"} if args.no_malloc_tuning else {}))
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"{method} {model}: failed\n{out.stderr[-3000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  [{rep + 1}/{args.repeats}] {method:<9}{model:<20} {r['step_s']:.2f} s "
                  f"(timed {r['times_s']}, warm-up {r['warmup_s']} s), {r['cpu_peak_rss_GiB']:.2f} GiB; per step "
                  f"user {r['user_s_per_step']} s, sys {r['sys_s_per_step']} s, "
                  f"{r['minor_faults_per_step']} page faults (malloc tuned {r['malloc_tuned']}, THP {r['thp_alloc']}); load {os.getloadavg()[0]:.2f}", flush=True)
            if "profile" in r:
                print(f"\n## profile: {method} {model} (one step, top {args.top} by self CPU time)\n{r.pop('profile')}",
                      flush=True)
            runs.setdefault((method, model), []).append(r)
    if not runs:
        return
    results = []
    for key, rs in runs.items():
        r = dict(rs[0])
        r["step_s"] = round(statistics.median(x["step_s"] for x in rs), 4)
        r["repeat_steps_s"] = [x["step_s"] for x in rs]
        r["cpu_peak_rss_GiB"] = max(x["cpu_peak_rss_GiB"] for x in rs)
        results.append(r)
    print()
    head = (f"{'method':<9}{'model':<19}{'stride':>7}{'batch':>6}{'step s':>9}{'x base':>8}"
            f"{'peak GiB':>10}{'official s':>12}{'official GiB':>14}{'faster by':>11}{'memory':>8}")
    print(head)
    print("-" * len(head))
    base = {r["model"]: r["step_s"] for r in results if r["method"] == "baseline"}
    for r in results:
        ratio = r["step_s"] / base[r["model"]] if r["model"] in base else float("nan")
        line = (f"{r['method']:<9}{r['model']:<19}{r['stride']:>7}{r['batch']:>6}{r['step_s']:>9.2f}{ratio:>8.2f}"
                f"{r.get('gpu_peak_GiB', r['cpu_peak_rss_GiB']):>10.2f}")
        if r["method"] in OFFICIAL and _is_official_setup(args, r):
            off_s, off_m = OFFICIAL[r["method"]]
            line += (f"{off_s:>12.1f}{off_m:>14.1f}{off_s / r['step_s']:>10.2f}x"
                     f"{r['cpu_peak_rss_GiB'] / off_m:>8.2f}")
        print(line)
    if any(r["method"] in OFFICIAL and _is_official_setup(args, r) for r in results):
        print("\nofficial: specs/official-speed.md (another run on the same kind of 2-core machine; "
              "'faster by' = official s / step s, 'memory' = peak RSS / official peak RSS; ratios across runs "
              "are only indicative). x base: step time / occreid's baseline step in this run "
              "(official: FED 2.1x, DPM 6.5x).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""Training-step throughput and peak memory of the ViT baseline (and, with --method, FED/DPM).

    python bench/train_step.py                      # ViT-S and ViT-B, 256x128, batch 64, CPU fp32
    python bench/train_step.py --device cuda --amp bf16
    python bench/train_step.py --models vit_small_patch16 --batch 16 --iters 2
    python bench/train_step.py --methods baseline fed dpm --models vit_base_patch16 --batch 16

Each method runs its real training step: the baseline's forward/loss/backward/SGD step, FED's
(7-channel two-branch batch, memory search and update), DPM's (two optimisers, two passes).

Each configuration runs in a fresh subprocess so that its peak memory is its own: CPU peak is
the process's maximum resident set size, GPU peak is torch.cuda.max_memory_allocated. One
warm-up step, then the median of --iters timed steps (forward, loss, backward, SGD step).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time


class _StepHarness:
    """The pieces of ``occreid.engine.trainer.Trainer`` that the methods' step hooks use
    (optimisers from the model's own ``configure_optimizers`` when it has one, autocast, loss
    scaler, ``backward_step``), without datasets."""

    def __init__(self, model, device, amp):
        import torch

        from occreid.config import DEFAULTS
        from occreid.engine.solver import build_optimizer
        from occreid.evaluation.extract import autocast_context

        self.model, self.device, self.amp = model, device, amp
        self.cfg = {"solver": dict(DEFAULTS["solver"])}
        hook = getattr(model, "configure_optimizers", None)
        if hook is not None:
            self.optimizers, _ = hook(self.cfg["solver"], list(model.named_parameters()))
        else:
            self.optimizers = [build_optimizer(model.named_parameters(), "SGD", base_lr=0.008)]
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        self._autocast = lambda: autocast_context(device, amp)

    @property
    def unwrapped(self):
        return self.model

    def autocast(self):
        return self._autocast()

    def backward_step(self, loss, optimizer, params=None):
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def step(self, batch):
        custom = getattr(self.model, "training_step", None)
        if custom is not None:  # FED (memory update), DPM (two optimisers, two passes)
            return custom(self, batch)
        opt = self.optimizers[0]
        opt.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.model(batch["images"], cam_ids=batch["camids"])
            loss = sum(self.model.loss(out, batch["pids"]).values())
        self.backward_step(loss, opt)


def run_one(args) -> dict:
    import torch

    from occreid.models import build_model

    torch.manual_seed(0)
    device = torch.device(args.device)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    h, w = args.size
    num_classes = 702
    model = build_model(
        args.method, num_classes=num_classes, backbone=args.model, img_size=(h, w), stride=args.stride
    ).to(device).train()
    harness = _StepHarness(model, device, amp)
    ids = args.batch // 4
    pids = torch.arange(ids, device=device).repeat_interleave(4)
    cams = torch.zeros(args.batch, dtype=torch.long, device=device)
    images = torch.randn(args.batch, 3, h, w, device=device)
    if args.method == "fed":
        # FED's 7-channel sample: clean view, occluded view, |difference| (the NPO pipeline's output)
        occ = images.clone()
        occ[:, :, h // 2 :] = torch.randn_like(occ[:, :, h // 2 :])
        diff = (images - occ).abs().sum(1, keepdim=True) / 2
        images = torch.cat([images, occ, diff], 1)
        with torch.no_grad():  # random identity centres of the right width (the init pass is not timed)
            model.eval()
            width = model.memory_features(torch.randn(2, 3, h, w, device=device)).shape[1]
            model.train()
        model.init_memory(torch.randn(num_classes, width, device=device), torch.arange(num_classes, device=device))
    batch = {"images": images, "pids": pids, "camids": cams}

    def step():
        harness.step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    res = {
        "method": args.method,
        "model": args.model,
        "size": f"{h}x{w}",
        "stride": args.stride,
        "batch": args.batch,
        "device": args.device,
        "amp": args.amp,
        "step_s": round(med, 4),
        "images_per_s": round(args.batch / med, 2),
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "cpu_peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    if device.type == "cuda":
        res["gpu_peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res["gpu"] = torch.cuda.get_device_name()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_small_patch16", "vit_base_patch16"])
    p.add_argument("--methods", nargs="+", default=["baseline"], help="baseline fed dpm")
    p.add_argument("--method", default="baseline", help=argparse.SUPPRESS)
    p.add_argument("--size", nargs=2, type=int, default=[256, 128])
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(args)))
        return
    import torch

    print(f"# python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'method':<9}{'model':<20}{'size':<9}{'batch':>6}{'device':>8}{'amp':>6}{'step s':>9}"
          f"{'img/s':>9}{'params M':>10}{'CPU peak GiB':>14}{'GPU peak GiB':>14}")
    for method, model in [(m, b) for m in args.methods for b in args.models]:
        args.method = method
        cmd = [sys.executable, __file__, "--child", "--model", model, "--method", args.method,
               "--size", *map(str, args.size), "--stride", str(args.stride), "--batch", str(args.batch),
               "--iters", str(args.iters), "--device", args.device, "--amp", args.amp]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{model}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['method']:<9}{r['model']:<20}{r['size']:<9}{r['batch']:>6}{r['device']:>8}{r['amp']:>6}"
              f"{r['step_s']:>9.2f}{r['images_per_s']:>9.1f}{r['params_M']:>10.1f}{r['cpu_peak_rss_GiB']:>14.2f}"
              f"{r.get('gpu_peak_GiB', float('nan')):>14.2f}")


if __name__ == "__main__":
    main()

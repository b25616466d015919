"""One short, prepared GPU check: training throughput of timm ``resnet18``.

Measures training images/second of timm ``resnet18`` (random init, nothing downloaded) at 224 px,
batch 256, bf16 autocast, channels_last, cudnn.benchmark, on synthetic data already on the
device (the target is model throughput, not data loading): 15 warm-up steps, then ``--steps``
timed steps between ``torch.cuda.synchronize()`` calls. With ``--compile`` it measures a second,
``torch.compile``-d copy too (warm-up then includes the compile time, reported separately).

The result is compared with timm's published RTX 3090 AMP training figure for resnet18 at 224 px:
2764 img/s (timm ``results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv``; that run used
batch 512, fp16 AMP and NCHW, so the ratio is a sanity check of the machine, not a like-for-like
race; pass ``--batch 512`` for the same batch).

Prints a markdown table and ONE JSON line; when the environment variable ``OUT`` is set, the
JSON also goes to ``$OUT/gpu_bench.json`` (rewritten after each measurement, so a run cut short
still leaves what it measured). Without a CUDA device it prints
``no CUDA GPU: bench/gpu.py has not run`` and exits 0.

Examples::

    python bench/gpu.py --compile                                  # on the GPU machine, < 4 min
    python bench/gpu.py --device cpu --steps 2 --batch 8 --image-size 64 --warmup 1   # dry run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

REFERENCE = {
    "source": "timm results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv "
              "(RTX 3090, fp16 AMP, NCHW, PyTorch 1.12, CUDA 11.3)",
    "model": "resnet18",
    "image_size": 224,
    "batch": 512,
    "train_images_per_s": 2764.22,
}


def make_model(name: str, device: torch.device, seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=1000)
    return model.to(device=device, memory_format=torch.channels_last).train()


def make_optimizer(opt: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if opt == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)


def comparable(args, device: torch.device) -> bool:
    """Only a CUDA run of resnet18 at 224 px compares with the reference figure."""
    return (device.type == "cuda" and args.model == REFERENCE["model"]
            and args.image_size == REFERENCE["image_size"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant: str, args, device: torch.device) -> dict:
    model = make_model(args.model, device, args.seed)
    opt = make_optimizer(args.opt, model)
    step_model = torch.compile(model) if variant == "compile" else model

    g = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device, generator=g)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp)

    def step() -> torch.Tensor:
        with amp:
            loss = F.cross_entropy(step_model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step()  # first step: cudnn autotuning, and the compile for --compile
    sync(device)
    first_step_s = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - t0

    ips = args.batch * args.steps / seconds
    result = {
        "variant": variant,
        "train_images_per_s": round(ips, 1),
        "ms_per_step": round(1000 * seconds / args.steps, 2),
        "timed_seconds": round(seconds, 3),
        "first_step_s": round(first_step_s, 2),
        "warmup_s": round(warmup_s, 2),
        "final_loss": round(loss.detach().float().item(), 4),
        "ratio_vs_rtx3090": round(ips / REFERENCE["train_images_per_s"], 2)
        if comparable(args, device) else None,
    }
    if device.type == "cuda":
        result["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del step_model, model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "device": device.type,
    }
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["gpu_name"] = p.name
        env["gpu_mem_gb"] = round(p.total_memory / 2**30, 1)
        env["gpu_count"] = torch.cuda.device_count()
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def table(report: dict) -> str:
    rows = [
        "| variant | img/s | ms/step | vs RTX 3090 (2764 img/s) | peak GPU mem (GB) | warm-up s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "error" in r:
            rows.append(f"| {r['variant']} | failed: {r['error'][:80]} | | | | |")
            continue
        ratio = "-" if r["ratio_vs_rtx3090"] is None else f"{r['ratio_vs_rtx3090']:.2f}x"
        rows.append(
            f"| {r['variant']} | {r['train_images_per_s']:.0f} | {r['ms_per_step']:.1f} | "
            f"{ratio} | {r.get('peak_gpu_mem_gb', '-')} | {r['warmup_s']:.1f} |"
        )
    e = report["env"]
    head = (f"{report['model']} train, {report['image_size']} px, batch {report['batch']}, "
            f"{'bf16 autocast' if report['amp'] else 'fp32'}, channels_last, {report['opt']}, "
            f"{report['steps']} timed steps; {e.get('gpu_name', e['device'])}, torch {e['torch']}, "
            f"CUDA {e['cuda']}")
    return head + "\n\n" + "\n".join(rows)


def write_json(report: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "gpu_bench.json")
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=50, help="timed steps (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=15, help="warm-up steps (default %(default)s)")
    ap.add_argument("--opt", choices=["sgd", "adamw"], default="sgd")
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 instead of bf16")
    ap.add_argument("--compile", action="store_true", help="also measure a torch.compile copy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU: bench/gpu.py has not run")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    report = {
        "tool": "gpu",
        "model": args.model,
        "batch": args.batch,
        "image_size": args.image_size,
        "amp": args.amp,
        "dtype": "bfloat16" if args.amp else "float32",
        "channels_last": True,
        "opt": args.opt,
        "steps": args.steps,
        "warmup": args.warmup,
        "env": environment(device),
        "reference": REFERENCE,
        "results": [],
    }
    if not comparable(args, device):
        report["note"] = ("not comparable to the RTX 3090 reference "
                          "(needs cuda, resnet18, 224 px)")

    t0 = time.perf_counter()
    for variant in ["eager"] + (["compile"] if args.compile else []):
        try:
            report["results"].append(measure(variant, args, device))
        except Exception as exc:  # keep what was measured; say what failed
            report["results"].append({"variant": variant, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{variant} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        report["total_seconds"] = round(time.perf_counter() - t0, 1)
        write_json(report)

    print(table(report))
    if "note" in report:
        print(f"\nnote: {report['note']}")
    print()
    print(json.dumps(report))
    return 0 if all("error" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: one SimCLR training step of medxfer's SSL pretraining, channels_last vs contiguous.

Usage::

    PYTHONPATH=src .venv/bin/python bench/bench_ssl.py [--sizes 32,64] [--steps 5] [--threads 1]

The step is what ``medxfer pretrain ssl`` runs: two augmented views of a batch of 128 grey images
(``SSLAugment``), tf_efficientnet_lite0 from the ImageNet source (grey stem) + the SimCLR head and
NT-Xent loss from ``lightly``, backward, AdamW. "contiguous" is the same step in PyTorch's default
memory layout (what a plain script does and what medxfer did before); "channels_last" is medxfer's.
The two layouts alternate step by step after one warm-up step each; medians of ``--steps`` are
printed as views/s with their ratio, and the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch


def step_seconds(model, opt, aug, x, gen, channels_last: bool) -> float:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    t0 = time.perf_counter()
    v1, v2 = (aug(x, gen).contiguous(memory_format=fmt) for _ in range(2))
    loss = model(v1, v2, 0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    from medxfer.pretrain.ssl import SSLAugment, SSLConfig, SSLModel, build_backbone

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32,64")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    results = {}
    for size in (int(s) for s in a.sizes.split(",")):
        torch.manual_seed(0)
        backbone, _, _ = build_backbone(SSLConfig.create(data="-", out="-", source="efficientnet_lite0.in1k",
                                                         image_size=size), 1)
        model = SSLModel(backbone, "simclr", backbone.net.num_features)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        aug, gen = SSLAugment(), torch.Generator().manual_seed(0)
        x = torch.rand(a.batch, 1, size, size)
        times = {False: [], True: []}
        for cl in (False, True):
            step_seconds(model, opt, aug, x, gen, cl)  # warm-up
        for _ in range(a.steps):
            for cl in (False, True):
                times[cl].append(step_seconds(model, opt, aug, x, gen, cl))
        views = 2 * a.batch
        cont, last = (views / statistics.median(times[k]) for k in (False, True))
        results[size] = {"contiguous_views_per_s": round(cont, 1), "channels_last_views_per_s": round(last, 1),
                         "ratio": round(last / cont, 2)}
        print(f"{size} px: contiguous {cont:.0f} views/s, channels_last {last:.0f} views/s, ratio {last / cont:.2f}x "
              f"(medians of {a.steps} steps, batch {a.batch}, {a.threads} thread(s))", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"bench": "ssl_step", "threads": a.threads, "batch": a.batch, "steps": a.steps,
                      "torch": torch.__version__, "peak_rss_mb": round(peak, 1), "results": results}))


if __name__ == "__main__":
    main()

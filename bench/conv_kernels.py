"""One cohort step's loss and gradients of a cnn1d (or cnn2d) cohort, by each way of computing
them, in one run (interleaved repeats, medians):

    python bench/conv_kernels.py --width 16 --members 256
    python bench/conv_kernels.py --width 16 --members 256 --chunks 4,8,32,64 --threads 1
    python bench/conv_kernels.py --arch cnn2d --members 64 --threads 1   # 4,970 params, 28x28

- `vmap`: the generic kernel (`torch.func.vmap` of `grad_and_value` over `functional_call`);
- `grouped`: members on the channel axis, [B, P * C, *S] with `groups=P`, one convolution per
  layer for the whole cohort, gradients by autograd of the summed losses (members do not interact);
- `fused`: `ConvNetKernel` (dlstore/architectures/fused.py), batched matmuls over the member
  axis, backward written out, members in chunks of `CHUNK_BYTES` of intermediates; `--chunks`
  adds rows at other budgets (MiB).

Prints milliseconds per cohort step and model-steps per second of each; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from dlstore.architectures.base import init_state
from dlstore.architectures.cnn1d import CNN1dOptions
from dlstore.architectures.cnn2d import CNN2dOptions
from dlstore.architectures.fused import CHUNK_BYTES
from dlstore.architectures.kernels import VmapKernel


class GroupedConvKernel:
    """Members on the channel axis: one grouped convolution per layer serves the cohort."""

    def __init__(self, arch: CNN1dOptions | CNN2dOptions, shape: tuple[int, ...]):
        self.arch = arch
        self.shape = shape if len(shape) > 1 else (1, *shape)  # [C, *S]
        if arch.arch == "cnn1d":
            self.conv, self.padding = F.conv1d, arch.kernel // 2
        else:  # 3x3 at stride 2, padding 1, then global average pooling
            self.conv, self.padding = F.conv2d, 1

    def loss_and_grads(self, params, x, y):
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
        n_members, batch = y.shape
        spatial = self.shape[1:]
        h = x.reshape(n_members, batch, *self.shape).transpose(0, 1)  # [B, P, C, *S]
        h = h.reshape(batch, -1, *spatial)  # [B, P * C, *S]
        act = {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu}[self.arch.activation]
        for i in range(self.arch.depth):
            w, b = params[f"convs.{i}.weight"], params[f"convs.{i}.bias"]
            h = act(self.conv(h, w.flatten(0, 1), b.flatten(), stride=2, padding=self.padding,
                              groups=n_members))
        if self.arch.arch == "cnn2d":
            h = h.mean(tuple(range(2, h.dim())))
        features = h.reshape(batch, n_members, -1).transpose(0, 1)  # [P, B, d] channel-major
        logits = torch.baddbmm(params["out.bias"].unsqueeze(1), features,
                               params["out.weight"].transpose(1, 2))
        losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
        grads = torch.autograd.grad(losses.sum(), list(params.values()))
        return losses.detach(), dict(zip(params, grads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cnn1d", choices=["cnn1d", "cnn2d"],
                        help="cnn1d on MNIST-1D shapes [40], cnn2d on 28x28x1 images")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=None, help="default: 2 (cnn1d), 3 (cnn2d)")
    parser.add_argument("--members", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunks", default="", help="extra chunk budgets of the fused kernel, "
                        "MiB, comma-separated")
    parser.add_argument("--skip", default="", help="rows to leave out, comma-separated")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch's CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.arch == "cnn1d":
        arch = CNN1dOptions(arch="cnn1d", width=args.width, depth=args.depth or 2)
        shape, n_classes = (40,), 10
    else:
        arch = CNN2dOptions(arch="cnn2d", width=args.width, depth=args.depth or 3)
        shape, n_classes = (1, 28, 28), 10
    states = [init_state(arch, shape, n_classes, seed) for seed in range(args.members)]
    params = {k: torch.stack([s[k] for s in states]) for k in states[0]}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.members, args.batch, *shape, generator=generator)
    y = torch.randint(0, n_classes, (args.members, args.batch), generator=generator)

    kernels = {"vmap": VmapKernel(arch, shape, n_classes),
               "grouped": GroupedConvKernel(arch, shape),
               "fused": arch.cohort_kernel(shape, n_classes)}
    for mib in filter(None, args.chunks.split(",")):
        kernel = arch.cohort_kernel(shape, n_classes)
        kernel.chunk_bytes = int(float(mib) * 2**20)
        kernels[f"fused@{mib}MiB"] = kernel
    for name in filter(None, args.skip.split(",")):
        kernels.pop(name)

    reference = arch.cohort_kernel(shape, n_classes).loss_and_grads(params, x, y)[1]
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for name, kernel in kernels.items():  # warm-up, and every kernel gives the same gradients
        grads = kernel.loss_and_grads(params, x, y)[1]
        worst = max((grads[k] - reference[k]).abs().max().item() for k in reference)
        print(f"  {name:14s} max |grad - fused's| = {worst:.1e}")
    for _ in range(args.repeats):
        for name, kernel in kernels.items():
            started = time.perf_counter()
            kernel.loss_and_grads(params, x, y)
            times[name].append(time.perf_counter() - started)
    n_params = sum(v[0].numel() for v in params.values())
    print(f"{args.arch} width {args.width} depth {arch.depth} ({n_params} params), "
          f"{args.members} members, batch {args.batch}, {torch.get_num_threads()} threads; "
          f"medians of {args.repeats}")
    result = {"arch": args.arch, "members": args.members, "width": args.width, "params": n_params,
              "default_chunk_mib": CHUNK_BYTES / 2**20}
    for name, values in times.items():
        seconds = statistics.median(values)
        result[name] = round(args.members / seconds, 1)
        print(f"  {name:14s} {seconds * 1e3:9.1f} ms/step {args.members / seconds:10,.0f} "
              "model-steps/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Speed figures of the CMSN model on this machine.

Prints forward throughput (megapixels of reconstructed output per second, counting dates × H × W), the time of
one training step (forward, losses, backward, AdamW) for a batch at the default size, the parameter count, the
executed convolution FLOPs per output pixel, and the achieved GFLOP/s next to a large float32 matmul measured in the
same run (the machine's practical ceiling).

Run (2 threads, tuned allocator as in DEVELOPERS.md)::

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.arena_max=1 \\
        python benchmarks/bench_model.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, register_flop_formula

from cmsn_cube.model import CMSN, cmsn_loss


@register_flop_formula(torch.ops.aten.mkldnn_convolution)
def _onednn_convolution_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
    # the model's 1x1 convolutions call oneDNN's op directly (cmsn_cube.model.pointwise), which torch does not count
    return conv_flop_count(x_shape, w_shape, out_shape)


def count_forward_flops(model: nn.Module, inputs: torch.Tensor) -> int:
    """Floating-point operations of the convolutions and matrix products one forward pass executes.

    Counted by torch's ``FlopCounterMode`` on the operations actually run (a multiply-accumulate is 2 FLOPs),
    so a reformulation that does less work is not credited with the work it skips; FFTs and element-wise ops
    are not counted.
    """
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(inputs)
    return int(counter.get_total_flops())


def time_it(function, *, repeats: int, warmup: int = 1) -> float:
    """Best-of-``repeats`` wall time in seconds (the least disturbed by other processes)."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def make_inputs(batch: int, size: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    truth = 0.05 + 0.3 * torch.rand(batch, 3, 4, size, size, generator=generator)
    mask = torch.rand(batch, 3, size, size, generator=generator) < 0.2
    inputs = torch.cat([truth * (~mask).unsqueeze(2), mask.unsqueeze(2).float()], dim=2)
    valid = torch.ones(batch, 3, size, size, dtype=torch.bool)
    return {"inputs": inputs, "truth": truth, "truth_valid": valid, "sim_mask": mask}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--size", type=int, default=256, help="tile size in pixels (default: 256)")
    parser.add_argument("--batch", type=int, default=4, help="batch of the training step (default: 4)")
    parser.add_argument("--forward-batch", type=int, default=2, help="batch of the forward pass (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions, best kept (default: 3)")
    parser.add_argument("--config", default="{}", help="CMSN options as JSON, e.g. '{\"width\": 64}'")
    parser.add_argument("--matmul", type=int, default=2048, help="matmul size n for the n×n×n reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CMSN(**json.loads(args.config))

    n = args.matmul
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmul_s = time_it(lambda: a @ b, repeats=args.repeats)
    matmul_gflops = 2 * n**3 / matmul_s / 1e9

    forward = make_inputs(args.forward_batch, args.size)
    model.eval()
    with torch.inference_mode():
        forward_s = time_it(lambda: model(forward["inputs"]), repeats=args.repeats)
    output_pixels = args.forward_batch * 3 * args.size * args.size
    flops = count_forward_flops(model, forward["inputs"])
    achieved_gflops = flops / forward_s / 1e9

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step_batch = make_inputs(args.batch, args.size, seed=1)

    def training_step() -> None:
        loss = cmsn_loss(model(step_batch["inputs"]), step_batch)["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step_s = time_it(training_step, repeats=max(1, args.repeats - 1))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, config {model.config}")
    print(f"parameters              : {model.num_parameters:,} ({model.num_parameters * 4 / 2**20:.2f} MiB float32)")
    print(
        f"executed conv/matmul work: {flops / output_pixels:,.0f} FLOP/px "
        "(output pixel = date × y × x; FFTs and element-wise ops not counted)"
    )
    print(
        f"forward throughput      : {output_pixels / forward_s / 1e6:.2f} Mpx/s "
        f"({args.forward_batch}×3 dates×{args.size}×{args.size} in {forward_s * 1e3:.0f} ms)"
    )
    print(f"training step           : {step_s:.2f} s/step (batch {args.batch}, {args.size}×{args.size}, AdamW)")
    print(f"float32 matmul {n}³      : {matmul_gflops:.1f} GFLOP/s")
    print(
        f"CMSN forward conv work  : {achieved_gflops:.1f} GFLOP/s "
        f"({100 * achieved_gflops / matmul_gflops:.0f} % of the matmul rate)"
    )


if __name__ == "__main__":
    main()

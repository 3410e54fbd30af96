"""int8 backends for one linear layer, against float32 in the same run: how int8-dynamic's was
chosen.

For each layer shape of the quickstart model (d_model 128) and of a d_model 512 model, at one
row (decoding: one frame at a time) and 2,048 rows (evaluation: 16 windows of 128 frames), on
one thread, the speed-up over ``nn.Linear`` of:

* ``torch.ao`` dynamic quantization (``quantize_dynamic``, per-channel int8 weights: what
  int8-dynamic uses; deprecated in torch 2.13, still working);
* torchao's ``Int8DynamicActivationInt8WeightConfig`` in eager mode (when torchao is
  installed: ``pip install torchao``; bitlm does not depend on it);
* an int8 product of our own through ``torch._int_mm`` (activations quantized per row,
  weights per output channel, the product rescaled in float).

    python benchmarks/int8_backends.py
"""

from __future__ import annotations

import copy
import os
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
SHAPES = [(128, 384), (128, 512), (512, 512), (512, 1536), (512, 2048), (2048, 512)]


def timed(f, x, n: int) -> float:
    import torch

    with torch.no_grad():
        for _ in range(5):
            f(x)
        start = time.perf_counter()
        for _ in range(n):
            f(x)
    return (time.perf_counter() - start) / n


def int_mm(linear):
    """``linear`` as int8 x int8 -> int32 products (``torch._int_mm``), rescaled in float."""
    import torch

    w = linear.weight.detach()
    w_scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    wq = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8).t().contiguous()
    bias = linear.bias.detach()

    def forward(x):
        x_scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        xq = torch.round(x / x_scale).clamp(-127, 127).to(torch.int8)
        return torch._int_mm(xq, wq).float() * x_scale * w_scale + bias

    return forward


def main() -> None:
    import torch

    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        except ImportError:
            quantize_ = None
    print(f"torch {torch.__version__}; torchao "
          f"{__import__('torchao').__version__ if quantize_ else 'not installed'}; one thread")
    print("| layer | rows | float32 | torch.ao dynamic | torchao (eager) | torch._int_mm |")
    print("|---|---:|---:|---:|---:|---:|")
    for fan_in, fan_out in SHAPES:
        for rows in (1, 2048):
            torch.manual_seed(0)
            layer = torch.nn.Linear(fan_in, fan_out)
            x = torch.randn(rows, fan_in)
            n = 400 if rows == 1 else 8
            base = timed(layer, x, n)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ao = quantize_dynamic(torch.nn.Sequential(copy.deepcopy(layer)),
                                      {torch.nn.Linear: per_channel_dynamic_qconfig},
                                      dtype=torch.qint8)
                tao = "n/a"
                if quantize_ is not None:
                    m = torch.nn.Sequential(copy.deepcopy(layer))
                    quantize_(m, Int8DynamicActivationInt8WeightConfig())
                    tao = f"{base / timed(m, x, n):.2f}x"
            print(f"| {fan_in} -> {fan_out} | {rows:,} | {base * 1e6:,.0f} us | "
                  f"{base / timed(ao, x, n):.2f}x | {tao} | "
                  f"{base / timed(int_mm(layer), x, n):.2f}x |", flush=True)


if __name__ == "__main__":
    main()

"""Which device we train on, how much memory it has, and its peak bf16 throughput (for MFU).

The peak table is the one place finegpt knows GPU peaks; an unknown GPU gets None and MFU is shown as
"n/a" rather than measured against some other card's peak (nanoGPT's A100-for-everyone pitfall).
"""

import torch

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets. Matched as substrings
# of torch.cuda.get_device_name(), first match wins, so specific names come before general ones
# (an "H100 PCIe" must not match the SXM entry).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),  # same Hopper compute as the H100 SXM, more and faster memory
    ("A100", 312.0),
    ("A10G", 70.0),  # before "A10", which it contains
    ("A10", 125.0),
    ("L40S", 362.0),  # before "L40" and "L4"
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),  # bf16 with fp32 accumulation, the rate training uses
    ("RTX A6000", 155.0),
)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str | torch.device | None = None) -> str:
    """The GPU's marketing name ("NVIDIA H100 80GB HBM3"), or "cpu"."""
    device = torch.device(device or default_device())
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def device_memory_bytes(device: str | torch.device | None = None) -> int | None:
    """Total memory of the GPU, or None without one."""
    device = torch.device(device or default_device())
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def gpu_peak_flops(name: str) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU called `name`, or None when the GPU is not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def bf16_supported(device: str | torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"

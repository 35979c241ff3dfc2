"""The accuracy criterion the kernel tests use: a fused kernel may be at most twice as far from a
float64 reference as PyTorch's own implementation in the same dtype, plus a few ulps of that dtype.

bf16/fp16: one ulp (fp32 -> bf16 rounding differs by up to an ulp between Triton, its interpreter
and PyTorch). fp32: FP32_ULPS ulps of the result's largest entry, because a differently ordered sum
(chunked GEMMs, the online softmax, scaling by grad_output afterwards) differs from PyTorch's by a
few ulps of its largest *term*, and cancellation can make the terms larger than the result; PyTorch
itself is sometimes almost exact, so twice its error alone is no bound. 16 ulps is still ~2e-6
relative: a wrong formula or a lost rounding step is orders of magnitude larger.
"""

import torch
from torch import Tensor


def ulp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The spacing of `dtype` numbers at |x| (x in float64)."""
    exponent = torch.floor(torch.log2(x.abs().clamp(min=torch.finfo(dtype).tiny)))
    return torch.finfo(dtype).eps * torch.exp2(exponent)


def max_error(actual: Tensor, reference: Tensor) -> float:
    return (actual.double() - reference.double()).abs().max().item() if actual.numel() else 0.0


FP32_ULPS = 16


def assert_close_to_reference(
    actual: Tensor, torch_same_dtype: Tensor, reference: Tensor, what: str = "", dtype: torch.dtype | None = None
) -> None:
    """|actual - reference|_max <= 2 |torch_same_dtype - reference|_max + k ulp(|reference|_max), the
    ulp of `dtype`: the inputs' dtype (default: actual's; an fp32 loss of bf16 logits passes bf16);
    k = 1 for 16-bit dtypes, FP32_ULPS for fp32 and fp64 (see the module docstring)."""
    dtype = dtype or actual.dtype
    ulps = 1 if torch.finfo(dtype).bits == 16 else FP32_ULPS
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if reference.numel() == 0:
        return
    ours = max_error(actual, reference)
    theirs = max_error(torch_same_dtype, reference)
    allowed = 2 * theirs + ulps * ulp(reference.double().abs().max(), dtype).item()
    assert ours <= allowed, f"{what}: max error {ours:.3g} > allowed {allowed:.3g} (PyTorch {actual.dtype}: {theirs:.3g})"


def compile_for_gpu(kernel, types: dict[str, str], constexprs: dict, num_warps: int, arch: int = 90) -> dict:
    """Compile a @triton.jit kernel to a cubin for an NVIDIA GPU (default sm_90, the H100) without
    one: catches what the interpreter forgives (loop-carried types, dtype mixes) on a CPU-only box.
    types: Triton type per runtime argument ("*bf16", "i32", ...); constexprs: value per constexpr.
    Run it where TRITON_INTERPRET is unset (`python -m kernels.testing`): the interpreter patches
    triton.language in its process."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    names = list(inspect.signature(kernel.fn).parameters)
    signature = {name: types.get(name, "constexpr") for name in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}).asm


def gpu_launches(op: str) -> list[tuple[object, dict[str, str], dict, int]]:
    """The launch configurations the GPT gets from `op`: (kernel, types, constexprs, num_warps)."""
    import importlib

    from kernels._backend import tl

    if op == "cross_entropy":
        ce = importlib.import_module("kernels.cross_entropy")
        return [
            (ce._cross_entropy_kernel,
             dict(Logits=f"*{dt}", Targets="*i64", Loss="*fp32", Grad=f"*{dt}", Scale="*fp32", stride_logits="i64",
                  stride_targets="i64", stride_grad="i64", stride_scale="i32", V="i32", ignore_index="i32"),
             dict(COMPUTE_GRAD=grad, BLOCK_V=ce._BLOCK_V, ACC=tl.float32), ce._NUM_WARPS)
            for dt in ("bf16", "fp32") for grad in (True, False)
        ]
    ln = importlib.import_module("kernels.layer_norm")
    launches = []
    for C in (768, 1023):
        fwd_shape = dict(zip(("BLOCK_R", "BLOCK_C"), ln._tile(C, ln._TILE_FWD)), ACC=tl.float32)
        bwd_shape = dict(zip(("BLOCK_R", "BLOCK_C"), ln._tile(C, ln._TILE_BWD)), ACC=tl.float32)
        # A bf16 branch added to the fp32 residual stream, as under autocast.
        fwd = dict(X="*bf16", R="*fp32", Y="*fp32", S="*fp32", W="*fp32", B="*fp32", Mean="*fp32", Rstd="*fp32",
                   stride_x="i32", stride_r="i32", stride_y="i32", stride_s="i32", n_rows="i32", C="i32", eps="fp32")
        bwd = dict(X="*bf16", W="*bf16", DY="*bf16", DS="*bf16", DX="*bf16", Mean="*fp32", Rstd="*fp32",
                   DW_partial="*fp32", DB_partial="*fp32", stride_x="i32", stride_dy="i32", stride_ds="i32",
                   stride_dx="i32", n_rows="i32", C="i32")
        for flag in (True, False):
            launches.append((ln._layer_norm_fwd_kernel, fwd, dict(HAS_RESIDUAL=flag, HAS_BIAS=flag, **fwd_shape), ln._NUM_WARPS))
            launches.append((ln._layer_norm_bwd_kernel, bwd, dict(HAS_BIAS=flag, HAS_DS=flag, **bwd_shape), ln._NUM_WARPS))
    return launches


if __name__ == "__main__":
    import sys

    for op in sys.argv[1:]:
        for kernel, types, constexprs, num_warps in gpu_launches(op):
            assert "cubin" in compile_for_gpu(kernel, types, constexprs, num_warps)
        print(f"{op}: compiled for sm_90")

"""finegpt: train GPT-2-class models on FineWeb with one GPU of limited memory.

The pieces: `finegpt.data` (token shards and the Rust-backed TokenLoader), `finegpt.prepare`
(FineWeb -> shards), `kernels` (fused Triton LayerNorm and cross-entropy), `finegpt.model`
(the GPT), `finegpt.presets` (configs per VRAM tier), `finegpt.train`, and `finegpt.bench`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("finegpt")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

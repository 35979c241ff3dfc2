//! finegpt's token loader: memory-mapped llm.c-format shards, deterministic window sampling, and
//! worker threads that fill a caller-owned ring of batches ahead of the training loop.
//!
//! The core is plain Rust (`cargo test` needs no Python); the `python` feature adds the pyo3
//! module `finegpt._loader` that `finegpt/data.py` wraps.

pub mod prefetch;
pub mod sampler;
pub mod shard;

#[cfg(feature = "python")]
mod python;

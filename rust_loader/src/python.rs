//! The private extension module `finegpt._loader`: thin bindings that `finegpt/data.py` wraps.
//!
//! Errors leave as `FileNotFoundError`, `OSError`, `ShardFormatError` or `LoaderConfigError`
//! (both ValueError) and data.py turns them into finegpt's user-facing exceptions. Every wait
//! happens with the GIL released; no Rust panic escapes (pyo3 would turn one into an exception,
//! and the worker threads catch their own).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::prefetch::{Prefetcher, Ring};
use crate::sampler::{Sampler, Windows};
use crate::shard::{self, Error, ErrorKind, Shard};

create_exception!(_loader, ShardFormatError, PyValueError, "A file that is not a valid token shard.");
create_exception!(_loader, LoaderConfigError, PyValueError, "A bad loader argument.");

fn to_py(err: Error) -> PyErr {
    match err.kind {
        ErrorKind::NotFound => PyFileNotFoundError::new_err(err.message),
        ErrorKind::Format => ShardFormatError::new_err(err.message),
        ErrorKind::Io => PyOSError::new_err(err.message),
        ErrorKind::Config => LoaderConfigError::new_err(err.message),
    }
}

fn config_err(message: impl Into<String>) -> PyErr {
    LoaderConfigError::new_err(message.into())
}

/// Writes `tokens` (a C-contiguous uint16 buffer) as a shard, atomically.
#[pyfunction]
fn write_shard(py: Python<'_>, path: PathBuf, tokens: PyBuffer<u16>) -> PyResult<()> {
    if !tokens.is_c_contiguous() {
        return Err(config_err("tokens must be a C-contiguous uint16 buffer"));
    }
    let (ptr, len) = (tokens.buf_ptr() as usize, tokens.item_count());
    // SAFETY: the buffer stays exported (and so alive) until `tokens` drops after this call.
    py.detach(|| shard::write(&path, unsafe { std::slice::from_raw_parts(ptr as *const u16, len) }))
        .map_err(to_py)
}

/// Validates a shard's header and size; returns its token count.
#[pyfunction]
fn validate_shard(path: PathBuf) -> PyResult<u64> {
    shard::validate(&path).map_err(to_py)
}

/// Worker threads plus the ring they fill; the ring's buffer is released after the threads joined.
struct Running {
    prefetcher: Prefetcher,
    _ring: PyBuffer<i32>,
}

/// The shards, the sampling plan and (once started) the worker threads of one TokenLoader.
#[pyclass(module = "finegpt._loader", frozen)]
struct Loader {
    windows: Arc<Windows>,
    sampler: Sampler,
    threads: usize,
    running: Mutex<Option<Arc<Running>>>,
    /// Threads do not survive fork(): a child must neither use nor join them.
    pid: u32,
}

impl Loader {
    fn running(&self) -> PyResult<Arc<Running>> {
        if std::process::id() != self.pid {
            return Err(config_err(format!(
                "this loader was created in process {} and cannot be used after fork() in process {}",
                self.pid,
                std::process::id()
            )));
        }
        let guard = self.running.lock().unwrap_or_else(|e| e.into_inner());
        guard.clone().ok_or_else(|| config_err("the loader is closed"))
    }

    fn take_running(&self) -> Option<Arc<Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[pymethods]
impl Loader {
    #[new]
    #[pyo3(signature = (paths, batch_size, block_size, seed, rank, world_size, threads))]
    fn new(
        paths: Vec<PathBuf>,
        batch_size: i64,
        block_size: i64,
        seed: Option<u64>,
        rank: i64,
        world_size: i64,
        threads: usize,
    ) -> PyResult<Self> {
        let shards = paths.iter().map(|p| Shard::open(p)).collect::<Result<Vec<_>, _>>().map_err(to_py)?;
        let windows = Windows::new(shards, block_size).map_err(to_py)?;
        let sampler = Sampler::new(windows.len(), batch_size, world_size, rank, seed).map_err(to_py)?;
        Ok(Loader { windows: Arc::new(windows), sampler, threads, running: Mutex::new(None), pid: std::process::id() })
    }

    /// Windows in all shards together.
    #[getter]
    fn n_windows(&self) -> u64 {
        self.windows.len()
    }

    /// Batches per rank in one sequential pass; None when shuffled (endless).
    #[getter]
    fn batches(&self) -> Option<u64> {
        self.sampler.batches()
    }

    /// Token count of each shard, in order.
    #[getter]
    fn shard_tokens(&self) -> Vec<u64> {
        self.windows.shards().iter().map(|s| s.len() as u64).collect()
    }

    /// (Re)starts the workers at `batch`, filling `ring`: a writable C-contiguous int32 buffer of
    /// whole (batch_size, block_size + 1) slots that must not be read except through held slots.
    fn start(&self, ring: PyBuffer<i32>, batch: u64) -> PyResult<()> {
        self.stop();
        if std::process::id() != self.pid {
            return Err(config_err("a loader cannot be restarted after fork(): create a new one"));
        }
        let slot_len = self.sampler.batch as usize * (self.windows.block() + 1);
        if ring.readonly() || !ring.is_c_contiguous() || ring.item_count() == 0 || ring.item_count() % slot_len != 0 {
            return Err(config_err("ring must be a writable C-contiguous int32 buffer of whole slots"));
        }
        // SAFETY: `Running` keeps the buffer exported (alive, not resizable) until the workers
        // have been joined, and data.py never writes to the ring.
        let raw = unsafe { Ring::new(ring.buf_ptr().cast::<i32>(), ring.item_count() / slot_len, slot_len) };
        let prefetcher =
            Prefetcher::start(Arc::clone(&self.windows), self.sampler, raw, batch, self.threads).map_err(to_py)?;
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(Running { prefetcher, _ring: ring }));
        Ok(())
    }

    /// Stops and joins the workers (idempotent).
    fn stop(&self) {
        if std::process::id() != self.pid {
            return;
        }
        if let Some(running) = self.take_running() {
            running.prefetcher.close();
        }
    }

    /// Waits (GIL released) for the next batch; returns its slot, held until `release`, or None at
    /// the end of a sequential pass.
    fn next_slot(&self, py: Python<'_>) -> PyResult<Option<usize>> {
        let running = self.running()?;
        py.detach(|| running.prefetcher.next_slot()).map_err(to_py)
    }

    /// Lets the workers refill a slot returned by `next_slot`.
    fn release(&self, slot: usize) -> PyResult<()> {
        self.running()?.prefetcher.release(slot).map_err(to_py)
    }

    /// Waits for the next batch and writes it widened into `out`, a C-contiguous int64 buffer of
    /// (2, batch_size, block_size): inputs then targets. All of it with the GIL released. Returns
    /// False at the end of a sequential pass.
    fn next_into(&self, py: Python<'_>, out: PyBuffer<i64>) -> PyResult<bool> {
        let running = self.running()?;
        let n = self.sampler.batch as usize * self.windows.block();
        if out.readonly() || !out.is_c_contiguous() || out.item_count() != 2 * n {
            return Err(config_err("out must be a writable C-contiguous int64 buffer of (2, batch_size, block_size)"));
        }
        let ptr = out.buf_ptr() as usize;
        py.detach(|| {
            // SAFETY: `out` stays exported for this call; nothing else writes it meanwhile.
            let all = unsafe { std::slice::from_raw_parts_mut(ptr as *mut i64, 2 * n) };
            let (x, y) = all.split_at_mut(n);
            running.prefetcher.next_into(x, y)
        })
        .map_err(to_py)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        if std::process::id() != self.pid {
            // In a forked child the workers do not exist and their lock may be held forever:
            // leak the parent's state rather than wait on it.
            if let Some(running) = self.running.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
                std::mem::forget(running);
            }
        }
    }
}

#[pymodule]
fn _loader(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("MAGIC", shard::MAGIC)?;
    m.add("VERSION", shard::VERSION)?;
    m.add("HEADER_BYTES", shard::HEADER_BYTES)?;
    m.add("ShardFormatError", m.py().get_type::<ShardFormatError>())?;
    m.add("LoaderConfigError", m.py().get_type::<LoaderConfigError>())?;
    m.add_function(wrap_pyfunction!(write_shard, m)?)?;
    m.add_function(wrap_pyfunction!(validate_shard, m)?)?;
    m.add_class::<Loader>()?;
    Ok(())
}

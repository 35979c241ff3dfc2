//! The private extension module `finegpt._loader`: thin bindings that `finegpt/data.py` wraps.
//!
//! Errors leave as `FileNotFoundError`, `OSError`, `ShardFormatError` or `LoaderConfigError`
//! (both ValueError) and data.py turns them into finegpt's user-facing exceptions. Every wait
//! happens with the GIL released; no Rust panic escapes (pyo3 would turn one into an exception,
//! and the worker threads catch their own).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::buffer::{PyBuffer, PyUntypedBuffer};
use pyo3::create_exception;
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::prefetch::{Buffer, Layout, Prefetcher};
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

/// Worker threads plus the slot buffers they fill; the buffers are released after the join.
struct Running {
    prefetcher: Prefetcher,
    held: Mutex<Vec<PyUntypedBuffer>>,
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        lock(&self.running).clone().ok_or_else(|| config_err("the loader is closed"))
    }

    /// Exports one slot's buffer, checking it holds exactly one batch in `layout`.
    fn slot_buffer(&self, obj: &Bound<'_, PyAny>, layout: Layout) -> PyResult<(PyUntypedBuffer, Buffer)> {
        let buf = PyUntypedBuffer::get(obj)?;
        match layout {
            Layout::Int32 => drop(buf.as_typed::<i32>()?),
            Layout::Int64 => drop(buf.as_typed::<i64>()?),
        }
        let want = layout.slot_len(self.sampler.batch as usize, self.windows.block());
        if buf.readonly() || !buf.is_c_contiguous() || buf.item_count() != want {
            return Err(config_err(format!("a slot buffer must be writable, C-contiguous and hold {want} items")));
        }
        let ptr = buf.buf_ptr() as Buffer;
        Ok((buf, ptr))
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

    /// (Re)starts the workers so that the next batch taken is `batch`. `buffers` are the ring's
    /// slots, each (2, B, T): x then y, int64 when `int64` is true, else int32 (the GPU wire
    /// format). The caller must not touch a slot's memory unless it holds the slot.
    fn start(&self, buffers: Vec<Bound<'_, PyAny>>, int64: bool, batch: u64) -> PyResult<()> {
        self.stop();
        if std::process::id() != self.pid {
            return Err(config_err("a loader cannot be restarted after fork(): create a new one"));
        }
        let layout = if int64 { Layout::Int64 } else { Layout::Int32 };
        let (held, ptrs): (Vec<_>, Vec<_>) =
            buffers.iter().map(|b| self.slot_buffer(b, layout)).collect::<PyResult<Vec<_>>>()?.into_iter().unzip();
        // SAFETY: `Running` keeps every buffer exported (alive, not resizable) until the workers
        // are joined or the buffer is swapped out of a held slot; data.py reads held slots only.
        let prefetcher =
            unsafe { Prefetcher::start(Arc::clone(&self.windows), self.sampler, layout, ptrs, batch, self.threads) }
                .map_err(to_py)?;
        *lock(&self.running) = Some(Arc::new(Running { prefetcher, held: Mutex::new(held) }));
        Ok(())
    }

    /// Stops and joins the workers (idempotent).
    fn stop(&self) {
        if std::process::id() != self.pid {
            return;
        }
        if let Some(running) = lock(&self.running).take() {
            running.prefetcher.close();
        }
    }

    /// Waits (GIL released) for the next batch; returns its slot, held until `release`, or None at
    /// the end of a sequential pass.
    fn next_slot(&self, py: Python<'_>) -> PyResult<Option<usize>> {
        let running = self.running()?;
        py.detach(|| running.prefetcher.next_slot()).map_err(to_py)
    }

    /// Lets the workers refill a held slot.
    fn release(&self, slot: usize) -> PyResult<()> {
        // SAFETY: no replacement buffer.
        unsafe { self.running()?.prefetcher.release(slot, None) }.map_err(to_py)
    }

    /// Waits (GIL released) for the next batch, gives its slot `replacement` to fill from now on
    /// and returns the slot: its previous buffer now belongs to the caller (an int64 batch
    /// handed out without a copy). None at the end of a sequential pass.
    fn take(&self, py: Python<'_>, replacement: Bound<'_, PyAny>) -> PyResult<Option<usize>> {
        let running = self.running()?;
        let (buf, ptr) = self.slot_buffer(&replacement, Layout::Int64)?;
        // The swap and release happen without the GIL too: waking a worker may preempt this
        // thread, and it should not hold the GIL then. Buffers leave the closure to be dropped
        // (un-exported) with the GIL.
        let (slot, unused) = py.detach(move || -> Result<(Option<usize>, PyUntypedBuffer), Error> {
            let Some(slot) = running.prefetcher.next_slot()? else { return Ok((None, buf)) };
            let old = std::mem::replace(&mut lock(&running.held)[slot], buf);
            // SAFETY: `held` now keeps the replacement exported for as long as the workers may use it.
            unsafe { running.prefetcher.release(slot, Some(ptr))? };
            Ok((Some(slot), old))
        })
        .map_err(to_py)?;
        drop(unused);
        Ok(slot)
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

//! Worker threads that fill a ring of batch slots ahead of the consumer.
//!
//! Batch `k` always lands in slot `k % slots`, so batches come out in order however many threads
//! fill them. A slot is refilled only after the consumer released it: on a GPU that is after the
//! copy out of the (pinned) slot has completed, which the caller decides; on the CPU the caller
//! keeps the filled buffer as its batch and releases the slot at once with a fresh buffer, so the
//! int64 widening happens here, off the training thread, and `next()` copies nothing. The threads
//! never touch Python, and a panic in one becomes an error for the consumer, never an abort.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::sampler::{Sampler, Windows};
use crate::shard::{Error, ErrorKind, Result};

/// How a slot's buffer holds one batch: inputs x then targets y, each `(B, T)` row-major.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Layout {
    /// int32: what goes over the wire to a GPU in one contiguous copy, widened there.
    Int32,
    /// int64: handed out as CPU tensors as is.
    Int64,
}

impl Layout {
    /// Elements of one slot's buffer.
    pub fn slot_len(self, batch: usize, block: usize) -> usize {
        2 * batch * block
    }
}

/// The address of a slot's buffer: caller-owned memory of `Layout::slot_len` elements that stays
/// valid (and is not read by the caller) while the slot belongs to the prefetcher.
pub type Buffer = usize;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Slot {
    Free,
    Filling,
    Ready(u64),
    Taken,
}

struct State {
    next_fill: u64,
    next_take: u64,
    slots: Vec<Slot>,
    buffers: Vec<Buffer>,
    closed: bool,
    error: Option<Error>,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    free: Condvar,
    windows: Arc<Windows>,
    sampler: Sampler,
    layout: Layout,
    /// One past the last batch (sequential pass), or None (endless).
    end: Option<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker never panics while holding the lock, so a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fill(&self, k: u64, buffer: Buffer, windows: &mut Vec<u64>) {
        self.sampler.batch_windows(k, windows);
        self.touch(windows);
        let (b, t) = (self.sampler.batch as usize, self.windows.block());
        let len = self.layout.slot_len(b, t);
        // SAFETY: the slot is Filling, so this thread is its buffer's only user.
        match self.layout {
            Layout::Int32 => self.fill_xy(unsafe { std::slice::from_raw_parts_mut(buffer as *mut i32, len) }, windows),
            Layout::Int64 => self.fill_xy(unsafe { std::slice::from_raw_parts_mut(buffer as *mut i64, len) }, windows),
        }
    }

    /// Loads one token per cache line of every window first. The loads are independent, so the
    /// CPU has many cache misses in flight at once, where the copy loop alone mostly waits on one
    /// at a time (random windows of a big shard are rarely cached; ~20% faster fills measured).
    fn touch(&self, windows: &[u64]) {
        const TOKENS_PER_LINE: usize = 32;
        let mut acc = 0u16;
        for &w in windows {
            for line in self.windows.window(w).chunks(TOKENS_PER_LINE) {
                acc ^= line[0];
            }
        }
        std::hint::black_box(acc);
    }

    /// Writes window j's first T tokens to row j of x and its last T to row j of y.
    fn fill_xy<E: From<u16>>(&self, dst: &mut [E], windows: &[u64]) {
        let t = self.windows.block();
        let (x, y) = dst.split_at_mut(dst.len() / 2);
        for ((xr, yr), &w) in x.chunks_exact_mut(t).zip(y.chunks_exact_mut(t)).zip(windows) {
            let win = self.windows.window(w);
            for (o, &v) in xr.iter_mut().zip(&win[..t]) {
                *o = E::from(v);
            }
            for (o, &v) in yr.iter_mut().zip(&win[1..]) {
                *o = E::from(v);
            }
        }
    }

    fn work(&self) {
        let mut windows = Vec::with_capacity(self.sampler.batch as usize);
        loop {
            let (k, s, buffer) = {
                let mut st = self.lock();
                loop {
                    if st.closed || st.error.is_some() || self.end.is_some_and(|e| st.next_fill >= e) {
                        return;
                    }
                    let s = (st.next_fill % st.slots.len() as u64) as usize;
                    if st.slots[s] == Slot::Free {
                        break;
                    }
                    st = self.free.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                let k = st.next_fill;
                st.next_fill += 1;
                let s = (k % st.slots.len() as u64) as usize;
                st.slots[s] = Slot::Filling;
                // Release wakes one worker; if the next slot is free too, wake another for it.
                if st.slots[(st.next_fill % st.slots.len() as u64) as usize] == Slot::Free {
                    self.free.notify_one();
                }
                (k, s, st.buffers[s])
            };
            let filled = catch_unwind(AssertUnwindSafe(|| self.fill(k, buffer, &mut windows)));
            let mut st = self.lock();
            match filled {
                Ok(()) => st.slots[s] = Slot::Ready(k),
                Err(_) => {
                    st.error = Some(Error::new(ErrorKind::Io, format!("loader worker failed on batch {k} (a bug)")))
                }
            }
            self.ready.notify_all();
        }
    }
}

/// The running worker threads of one loader, positioned at a batch.
pub struct Prefetcher {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts `threads` workers that produce this rank's batches from `start` on, batch `k` into
    /// `buffers[k % buffers.len()]`.
    ///
    /// # Safety
    /// Each buffer must hold `layout.slot_len(B, T)` elements (int32 or int64 per the layout) and
    /// stay valid until the prefetcher is dropped or the buffer is replaced in `release`; the
    /// caller reads a slot's buffer only between `next_slot` and `release`.
    pub unsafe fn start(
        windows: Arc<Windows>,
        sampler: Sampler,
        layout: Layout,
        buffers: Vec<Buffer>,
        start: u64,
        threads: usize,
    ) -> Result<Prefetcher> {
        if buffers.is_empty() {
            return Err(Error::new(ErrorKind::Config, "the ring needs at least one slot"));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_fill: start,
                next_take: start,
                slots: vec![Slot::Free; buffers.len()],
                buffers,
                closed: false,
                error: None,
            }),
            ready: Condvar::new(),
            free: Condvar::new(),
            end: sampler.batches(),
            windows,
            sampler,
            layout,
        });
        let mut prefetcher = Prefetcher { shared, threads: Vec::new() };
        for i in 0..threads.max(1) {
            let shared = Arc::clone(&prefetcher.shared);
            let spawned = std::thread::Builder::new().name(format!("finegpt-loader{i}")).spawn(move || shared.work());
            match spawned {
                Ok(handle) => prefetcher.threads.push(handle),
                Err(e) => return Err(Error::new(ErrorKind::Io, format!("cannot start loader thread: {e}"))), // drop joins the rest
            }
        }
        Ok(prefetcher)
    }

    /// Waits for the next batch and hands its slot to the caller until `release`; None at the end
    /// of a sequential pass.
    pub fn next_slot(&self) -> Result<Option<usize>> {
        let sh = &*self.shared;
        let mut st = sh.lock();
        let k = st.next_take;
        if sh.end.is_some_and(|e| k >= e) {
            return Ok(None);
        }
        let s = (k % st.slots.len() as u64) as usize;
        loop {
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            if st.slots[s] == Slot::Ready(k) {
                break;
            }
            if st.closed {
                return Err(Error::new(ErrorKind::Config, "the loader is closed"));
            }
            if st.slots[s] == Slot::Taken {
                return Err(Error::new(ErrorKind::Config, format!("slot {s} is still held: release it first")));
            }
            st = sh.ready.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.slots[s] = Slot::Taken;
        st.next_take += 1;
        Ok(Some(s))
    }

    /// Tells the workers to stop and wakes any waiting consumer (it gets an error); the threads
    /// are joined when the prefetcher drops.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.free.notify_all();
        self.shared.ready.notify_all();
    }

    /// Gives a slot taken with `next_slot` back for refilling, into `replacement` if given (the
    /// old buffer then belongs to the caller for good: CPU batches are handed out without a copy).
    ///
    /// # Safety
    /// `replacement` must meet the same conditions as the buffers given to `start`.
    pub unsafe fn release(&self, s: usize, replacement: Option<Buffer>) -> Result<()> {
        let mut st = self.shared.lock();
        if st.slots.get(s) != Some(&Slot::Taken) {
            return Err(Error::new(ErrorKind::Config, format!("slot {s} is not held")));
        }
        if let Some(buffer) = replacement {
            st.buffers[s] = buffer;
        }
        st.slots[s] = Slot::Free;
        self.shared.free.notify_one();
        Ok(())
    }

    /// The buffer of a slot returned by `next_slot`.
    pub fn buffer(&self, s: usize) -> Buffer {
        self.shared.lock().buffers[s]
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.close();
        for handle in self.threads.drain(..) {
            // A worker cannot panic outside catch_unwind; nothing useful to do if it did.
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::{write, Shard};

    fn windows(n_tokens: usize, block: usize) -> Arc<Windows> {
        let dir = std::env::temp_dir().join(format!("finegpt-prefetch-test-{}-{n_tokens}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.bin");
        let tokens: Vec<u16> = (0..n_tokens).map(|i| i as u16).collect();
        write(&path, &tokens).unwrap();
        Arc::new(Windows::new(vec![Shard::open(&path).unwrap()], block as i64).unwrap())
    }

    /// Takes `n` batches as owned x vectors, handing every buffer out and replacing it.
    fn take(p: &Prefetcher, n: usize, len: usize) -> Vec<Vec<i64>> {
        let mut out = Vec::new();
        while out.len() < n {
            let Some(s) = p.next_slot().unwrap() else { break };
            // SAFETY: slot s is held; its buffer is a leaked Vec of `len` i64 (see `buffers`).
            let got = unsafe { Vec::from_raw_parts(p.buffer(s) as *mut i64, len, len) };
            out.push(got);
            unsafe { p.release(s, Some(buffers(1, len)[0])).unwrap() };
        }
        out
    }

    fn buffers(n: usize, len: usize) -> Vec<Buffer> {
        (0..n).map(|_| Box::leak(vec![0i64; len].into_boxed_slice()).as_mut_ptr() as Buffer).collect()
    }

    #[test]
    fn batches_come_out_in_order_from_many_threads() {
        let (b, t) = (2usize, 8usize);
        let win = windows(1000, t); // 124 windows -> 62 batches
        let sampler = Sampler::new(win.len(), b as i64, 1, 0, None).unwrap();
        let len = Layout::Int64.slot_len(b, t);
        let p = unsafe { Prefetcher::start(Arc::clone(&win), sampler, Layout::Int64, buffers(3, len), 0, 4).unwrap() };
        let batches = take(&p, usize::MAX, len);
        assert_eq!(batches.len(), 62);
        for (k, xy) in batches.iter().enumerate() {
            for j in 0..b {
                let first = ((k * b + j) * t) as i64;
                assert_eq!(xy[j * t..(j + 1) * t], (first..first + t as i64).collect::<Vec<_>>()[..]);
                assert_eq!(xy[b * t + j * t], first + 1, "targets are inputs shifted by one");
            }
        }
    }

    #[test]
    fn int32_layout_holds_x_then_y() {
        let win = windows(100, 4);
        let sampler = Sampler::new(win.len(), 2, 1, 0, None).unwrap();
        let mut ring = vec![0i32; 2 * 16];
        let bufs = vec![ring.as_mut_ptr() as Buffer, unsafe { ring.as_mut_ptr().add(16) } as Buffer];
        let p = unsafe { Prefetcher::start(Arc::clone(&win), sampler, Layout::Int32, bufs, 1, 1).unwrap() };
        let s = p.next_slot().unwrap().unwrap();
        assert_eq!(s, 1);
        let got = unsafe { std::slice::from_raw_parts(p.buffer(s) as *const i32, 16) }.to_vec();
        // Windows 2 and 3 of batch 1: tokens 8..=12 and 12..=16.
        assert_eq!(got, vec![8, 9, 10, 11, 12, 13, 14, 15, 9, 10, 11, 12, 13, 14, 15, 16]);
        drop(p);
        drop(ring);
    }

    #[test]
    fn resume_starts_at_the_given_batch() {
        let win = windows(500, 4);
        let sampler = Sampler::new(win.len(), 3, 2, 1, Some(9)).unwrap();
        let len = Layout::Int64.slot_len(3, 4);
        let run = |start: u64, n: usize| {
            let p = unsafe { Prefetcher::start(Arc::clone(&win), sampler, Layout::Int64, buffers(2, len), start, 2).unwrap() };
            take(&p, n, len)
        };
        let full = run(0, 300);
        assert_eq!(run(170, 130), full[170..]);
    }
}

//! Worker threads that fill a ring of batch slots ahead of the consumer.
//!
//! Batch `k` always lands in slot `k % slots`, so batches come out in order however many threads
//! fill them. A slot is refilled only after the consumer released it: on a GPU that is after the
//! copy out of the (pinned) slot has completed, which the caller decides. The threads never touch
//! Python, and a panic in one becomes an error for the consumer, never an abort.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::sampler::{Sampler, Windows};
use crate::shard::{Error, ErrorKind, Result};

/// Memory for `slots` batches of `(B, T+1)` int32 tokens, owned by the caller, who keeps it
/// alive and untouched (except reading released-to-it slots) until the prefetcher is dropped.
#[derive(Clone, Copy)]
pub struct Ring {
    ptr: *mut i32,
    slots: usize,
    slot_len: usize,
}

// SAFETY: workers write disjoint slots, each only while the slot is marked Filling.
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

impl Ring {
    /// # Safety
    /// `ptr` must point to `slots * slot_len` writable int32 that outlive the prefetcher.
    pub unsafe fn new(ptr: *mut i32, slots: usize, slot_len: usize) -> Ring {
        Ring { ptr, slots, slot_len }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// SAFETY (callers): the slot must be owned by the caller (Filling or Taken).
    unsafe fn slot(&self, s: usize) -> *mut i32 {
        self.ptr.add(s * self.slot_len)
    }
}

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
    closed: bool,
    error: Option<Error>,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    free: Condvar,
    windows: Arc<Windows>,
    sampler: Sampler,
    ring: Ring,
    /// One past the last batch (sequential pass), or None (endless).
    end: Option<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker never panics while holding the lock, so a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fill(&self, k: u64, s: usize, windows: &mut Vec<u64>) {
        self.sampler.batch_windows(k, windows);
        let row = self.windows.block() + 1;
        // SAFETY: slot s is Filling, so this thread is its only user.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.ring.slot(s), self.ring.slot_len) };
        for (out, &w) in dst.chunks_exact_mut(row).zip(windows.iter()) {
            for (o, &t) in out.iter_mut().zip(self.windows.window(w)) {
                *o = t as i32;
            }
        }
    }

    fn work(&self) {
        let mut windows = Vec::with_capacity(self.sampler.batch as usize);
        loop {
            let (k, s) = {
                let mut st = self.lock();
                loop {
                    if st.closed || st.error.is_some() || self.end.is_some_and(|e| st.next_fill >= e) {
                        return;
                    }
                    let s = (st.next_fill % self.ring.slots as u64) as usize;
                    if st.slots[s] == Slot::Free {
                        break;
                    }
                    st = self.free.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                let k = st.next_fill;
                st.next_fill += 1;
                let s = (k % self.ring.slots as u64) as usize;
                st.slots[s] = Slot::Filling;
                (k, s)
            };
            let filled = catch_unwind(AssertUnwindSafe(|| self.fill(k, s, &mut windows)));
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
    /// Starts `threads` workers that produce this rank's batches from `start` on.
    pub fn start(windows: Arc<Windows>, sampler: Sampler, ring: Ring, start: u64, threads: usize) -> Result<Prefetcher> {
        if ring.slot_len != sampler.batch as usize * (windows.block() + 1) || ring.slots == 0 {
            return Err(Error::new(ErrorKind::Config, "ring slots do not match (batch_size, block_size + 1)"));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_fill: start,
                next_take: start,
                slots: vec![Slot::Free; ring.slots],
                closed: false,
                error: None,
            }),
            ready: Condvar::new(),
            free: Condvar::new(),
            end: sampler.batches(),
            windows,
            sampler,
            ring,
        });
        let mut prefetcher = Prefetcher { shared, threads: Vec::new() };
        for i in 0..threads.max(1) {
            let shared = Arc::clone(&prefetcher.shared);
            let spawned = std::thread::Builder::new().name(format!("finegpt-loader-{i}")).spawn(move || shared.work());
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
        let s = (k % sh.ring.slots as u64) as usize;
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

    /// Gives a slot taken with `next_slot` back for refilling.
    pub fn release(&self, s: usize) -> Result<()> {
        let mut st = self.shared.lock();
        if st.slots.get(s) != Some(&Slot::Taken) {
            return Err(Error::new(ErrorKind::Config, format!("slot {s} is not held")));
        }
        st.slots[s] = Slot::Free;
        self.shared.free.notify_all();
        Ok(())
    }

    /// The slot's tokens; valid while the caller holds it.
    ///
    /// # Safety
    /// `s` must have been returned by `next_slot` and not yet released.
    pub unsafe fn slot(&self, s: usize) -> &[i32] {
        std::slice::from_raw_parts(self.shared.ring.slot(s), self.shared.ring.slot_len)
    }

    /// The next batch widened to int64 inputs `x` and targets `y` (each `B·T`, row-major); the
    /// slot is released at once. Returns false at the end of a sequential pass.
    pub fn next_into(&self, x: &mut [i64], y: &mut [i64]) -> Result<bool> {
        let t = self.shared.windows.block();
        let b = self.shared.sampler.batch as usize;
        assert!(x.len() == b * t && y.len() == b * t, "x and y must hold batch_size * block_size");
        let Some(s) = self.next_slot()? else { return Ok(false) };
        // SAFETY: slot s is held until the release below.
        let tokens = unsafe { self.slot(s) };
        for ((row, xr), yr) in tokens.chunks_exact(t + 1).zip(x.chunks_exact_mut(t)).zip(y.chunks_exact_mut(t)) {
            for (o, &v) in xr.iter_mut().zip(&row[..t]) {
                *o = v as i64;
            }
            for (o, &v) in yr.iter_mut().zip(&row[1..]) {
                *o = v as i64;
            }
        }
        self.release(s)?;
        Ok(true)
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

    #[test]
    fn batches_come_out_in_order_from_many_threads() {
        let (b, t) = (2usize, 8usize);
        let win = windows(1000, t); // 124 windows -> 62 batches
        let sampler = Sampler::new(win.len(), b as i64, 1, 0, None).unwrap();
        let mut ring = vec![0i32; 3 * b * (t + 1)];
        let ring_ref = unsafe { Ring::new(ring.as_mut_ptr(), 3, b * (t + 1)) };
        let p = Prefetcher::start(Arc::clone(&win), sampler, ring_ref, 0, 4).unwrap();
        let (mut x, mut y) = (vec![0i64; b * t], vec![0i64; b * t]);
        let mut k = 0;
        while p.next_into(&mut x, &mut y).unwrap() {
            for j in 0..b {
                let first = ((k * b + j) * t) as i64;
                assert_eq!(x[j * t..(j + 1) * t], (first..first + t as i64).collect::<Vec<_>>()[..]);
                assert_eq!(y[j * t], first + 1);
            }
            k += 1;
        }
        assert_eq!(k, 62);
        drop(p);
        drop(ring);
    }

    #[test]
    fn resume_starts_at_the_given_batch() {
        let win = windows(500, 4);
        let sampler = Sampler::new(win.len(), 3, 2, 1, Some(9)).unwrap();
        let mut ring = vec![0i32; 2 * 3 * 5];
        let run = |start: u64, n: usize, ring: &mut Vec<i32>| {
            let r = unsafe { Ring::new(ring.as_mut_ptr(), 2, 15) };
            let p = Prefetcher::start(Arc::clone(&win), sampler, r, start, 2).unwrap();
            let (mut x, mut y) = (vec![0i64; 12], vec![0i64; 12]);
            (0..n).map(|_| { assert!(p.next_into(&mut x, &mut y).unwrap()); x.clone() }).collect::<Vec<_>>()
        };
        let full = run(0, 300, &mut ring);
        assert_eq!(run(170, 130, &mut ring), full[170..]);
    }
}

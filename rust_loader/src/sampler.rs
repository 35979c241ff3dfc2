//! Which window goes into which batch: sequential (validation) or a seeded shuffle per epoch.
//!
//! A window is the T+1 tokens `[i·T, i·T+T]` of one shard; windows of all shards are numbered
//! globally in file order. A stream position `g = (k·W + r)·B + j` is row `j` of rank `r`'s batch
//! `k` (llm.c's layout), so the whole state of a loader is the number of batches it has consumed.
//! Shuffled epochs use a keyed Feistel permutation with cycle-walking: a bijection on
//! `0..n_windows` computed per position in O(1) time and memory, so resuming at any batch costs
//! nothing and no epoch ever materialises an index array.

use crate::shard::{Error, ErrorKind, Result, Shard};

/// The shards and how their windows are numbered.
pub struct Windows {
    shards: Vec<Shard>,
    /// `first[s]` is the global number of shard `s`'s first window; `first[len]` the total.
    first: Vec<u64>,
    block: usize,
}

impl Windows {
    pub fn new(shards: Vec<Shard>, block: i64) -> Result<Windows> {
        let block = positive("block_size", block)? as usize;
        if shards.is_empty() {
            return Err(Error::new(ErrorKind::Config, "no shards given"));
        }
        let mut first = vec![0u64];
        for shard in &shards {
            if shard.len() < block + 1 {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "{}: holds {} tokens, fewer than block_size + 1 = {}; use a smaller \
                         block_size or leave this shard out",
                        shard.path.display(),
                        shard.len(),
                        block + 1
                    ),
                ));
            }
            let count = ((shard.len() - 1) / block) as u64;
            first.push(first.last().unwrap() + count);
        }
        Ok(Windows { shards, first, block })
    }

    pub fn len(&self) -> u64 {
        *self.first.last().unwrap()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn block(&self) -> usize {
        self.block
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The T+1 tokens of global window `w` (< len()).
    pub fn window(&self, w: u64) -> &[u16] {
        // The last shard whose first window is <= w.
        let s = self.first.partition_point(|&f| f <= w) - 1;
        let start = (w - self.first[s]) as usize * self.block;
        &self.shards[s].tokens()[start..start + self.block + 1]
    }
}

/// Checks a size argument given by the user; the name is the Python keyword.
fn positive(name: &str, value: i64) -> Result<u64> {
    if value <= 0 {
        return Err(Error::new(ErrorKind::Config, format!("{name}={value}: must be a positive integer")));
    }
    Ok(value as u64)
}

/// SplitMix64's finaliser: a fast, well-mixed 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const ROUNDS: usize = 6;

/// A seeded bijection on `0..n`: a balanced Feistel network on the smallest even power of two
/// not below n, applied repeatedly until the value lands below n (cycle-walking keeps it a bijection;
/// the domain is under 4n, so that takes under 4 steps on average).
pub struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; ROUNDS],
}

impl Permutation {
    pub fn new(n: u64, seed: u64, epoch: u64) -> Permutation {
        assert!(n > 0, "a permutation of nothing");
        let bits = (64 - (n - 1).leading_zeros()).max(2);
        let half_bits = bits.div_ceil(2);
        let base = mix(seed ^ mix(epoch));
        let mut keys = [0; ROUNDS];
        for (i, key) in keys.iter_mut().enumerate() {
            *key = mix(base.wrapping_add(i as u64));
        }
        Permutation { n, half_bits, keys }
    }

    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut left, mut right) = (x >> self.half_bits, x & mask);
        for key in self.keys {
            let next = left ^ (mix(right ^ key) & mask);
            left = right;
            right = next;
        }
        (left << self.half_bits) | right
    }

    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        let mut x = self.feistel(i);
        while x >= self.n {
            x = self.feistel(x);
        }
        x
    }
}

/// Maps (batch, row) of one rank to a global window.
#[derive(Clone, Copy, Debug)]
pub struct Sampler {
    pub n_windows: u64,
    pub batch: u64,
    pub world: u64,
    pub rank: u64,
    /// `Some(seed)`: endless seeded epochs; `None`: one pass in file order.
    pub seed: Option<u64>,
}

impl Sampler {
    pub fn new(n_windows: u64, batch: i64, world: i64, rank: i64, seed: Option<u64>) -> Result<Sampler> {
        let batch = positive("batch_size", batch)?;
        let world = positive("world_size", world)?;
        if rank < 0 || rank as u64 >= world {
            return Err(Error::new(
                ErrorKind::Config,
                format!("rank={rank} must be in 0..world_size-1 (world_size={world})"),
            ));
        }
        let rank = rank as u64;
        Ok(Sampler { n_windows, batch, world, rank, seed })
    }

    /// Batches per rank in a sequential pass (the incomplete last global batch is dropped so every
    /// rank gets the same count); `None` when the stream is endless.
    pub fn batches(&self) -> Option<u64> {
        self.seed.map_or(Some(self.n_windows / (self.batch * self.world)), |_| None)
    }

    /// The stream position of row `j` of this rank's batch `k`.
    fn position(&self, k: u64, j: u64) -> u64 {
        (k * self.world + self.rank) * self.batch + j
    }

    /// Fills `out` with the global windows of this rank's batch `k`.
    pub fn batch_windows(&self, k: u64, out: &mut Vec<u64>) {
        out.clear();
        let mut perm: Option<(u64, Permutation)> = None;
        for j in 0..self.batch {
            let g = self.position(k, j);
            out.push(match self.seed {
                None => g,
                Some(seed) => {
                    let (epoch, i) = (g / self.n_windows, g % self.n_windows);
                    // A batch spans at most a few epochs; derive the keys only when it changes.
                    if perm.as_ref().is_none_or(|(e, _)| *e != epoch) {
                        perm = Some((epoch, Permutation::new(self.n_windows, seed, epoch)));
                    }
                    perm.as_ref().unwrap().1.apply(i)
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_bijection() {
        for n in [1u64, 2, 3, 5, 17, 64, 1000, 4097] {
            let p = Permutation::new(n, 42, 0);
            let mut seen: Vec<u64> = (0..n).map(|i| p.apply(i)).collect();
            seen.sort();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n={n}");
        }
    }

    #[test]
    fn permutation_depends_on_seed_and_epoch() {
        let n = 1000;
        let order = |seed, epoch| (0..n).map(|i| Permutation::new(n, seed, epoch).apply(i)).collect::<Vec<_>>();
        assert_eq!(order(1, 0), order(1, 0));
        assert_ne!(order(1, 0), order(2, 0));
        assert_ne!(order(1, 0), order(1, 1));
        assert_ne!(order(1, 0), (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn sequential_layout_is_llmc() {
        let s = Sampler::new(100, 4, 3, 1, None).unwrap();
        assert_eq!(s.batches(), Some(8)); // 100 / 12, the partial 9th global batch is dropped
        let mut w = Vec::new();
        s.batch_windows(2, &mut w);
        assert_eq!(w, vec![28, 29, 30, 31]); // (2·3 + 1)·4 + j
    }

    #[test]
    fn shuffled_epochs_cover_every_window_once_across_ranks() {
        let (n, b, world) = (50u64, 3i64, 2i64);
        let mut w = Vec::new();
        let mut all = Vec::new();
        // 50 batches x 3 rows x 2 ranks = 300 positions = exactly 6 epochs.
        for rank in 0..world {
            let s = Sampler::new(n, b, world, rank, Some(7)).unwrap();
            assert_eq!(s.batches(), None);
            for k in 0..50 {
                s.batch_windows(k, &mut w);
                for (j, &win) in w.iter().enumerate() {
                    all.push((s.position(k, j as u64), win));
                }
            }
        }
        all.sort();
        for epoch in 0..6 {
            let mut got: Vec<u64> = all[epoch * 50..(epoch + 1) * 50].iter().map(|p| p.1).collect();
            assert_ne!(got, (0..n).collect::<Vec<_>>(), "epoch {epoch} is not shuffled");
            got.sort();
            assert_eq!(got, (0..n).collect::<Vec<_>>(), "epoch {epoch}");
        }
    }

    #[test]
    fn bad_arguments() {
        assert!(Sampler::new(10, 0, 1, 0, None).unwrap_err().message.contains("batch_size"));
        assert!(Sampler::new(10, -3, 1, 0, None).unwrap_err().message.contains("batch_size=-3"));
        // Fewer windows than one global batch: an empty sequential pass, not an error.
        assert_eq!(Sampler::new(10, 4, 3, 0, None).unwrap().batches(), Some(0));
        assert!(Sampler::new(10, 1, 2, 2, None).unwrap_err().message.contains("rank=2"));
    }
}

//! The bytes the generator sends: a pseudo-random pattern, different for
//! every connection, so a byte echoed from the wrong place or the wrong
//! connection is caught, not only a flipped bit.
//!
//! A stream is the pattern repeated with a period of [`PERIOD`] bytes, a
//! prime, so that no power-of-two buffer size lines up with it.

/// Length of one period of a stream's pattern.
pub const PERIOD: usize = 65_521;

/// `len` deterministic pseudo-random bytes (xorshift64), different per `seed`.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// An endless stream of one period repeated.
pub struct Cyclic {
    /// One period followed by enough of the next that any window of up to
    /// `window` bytes starting inside the period is contiguous.
    data: Vec<u8>,
    window: usize,
}

impl Cyclic {
    pub fn new(seed: u64, window: usize) -> Cyclic {
        let period = bytes(PERIOD, seed);
        let mut data = Vec::with_capacity(PERIOD + window);
        while data.len() < PERIOD + window {
            let take = (PERIOD + window - data.len()).min(PERIOD);
            data.extend_from_slice(&period[..take]);
        }
        Cyclic { data, window }
    }

    /// The `len` bytes (at most the window) at stream offset `pos`.
    pub fn at(&self, pos: u64, len: usize) -> &[u8] {
        let len = len.min(self.window);
        let off = (pos % PERIOD as u64) as usize;
        &self.data[off..off + len]
    }

    /// Where `got`, received at stream offset `pos`, first differs from the
    /// stream: None when every byte matches.
    pub fn mismatch(&self, pos: u64, got: &[u8]) -> Option<usize> {
        let mut done = 0;
        while done < got.len() {
            let n = (got.len() - done).min(self.window);
            let want = self.at(pos + done as u64, n);
            if want != &got[done..done + n] {
                let i = want.iter().zip(&got[done..]).position(|(a, b)| a != b);
                return Some(done + i.unwrap_or(0));
            }
            done += n;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_wrap_around_the_period() {
        let c = Cyclic::new(7, 1000);
        let p = bytes(PERIOD, 7);
        let w = c.at(PERIOD as u64 - 10, 20);
        assert_eq!(&w[..10], &p[PERIOD - 10..]);
        assert_eq!(&w[10..], &p[..10]);
        assert_eq!(c.at(3 * PERIOD as u64 + 5, 4), &p[5..9]);
    }

    #[test]
    fn mismatch_finds_the_first_wrong_byte() {
        let c = Cyclic::new(9, 100);
        let mut got = Vec::new();
        for i in 0..5 {
            got.extend_from_slice(c.at(PERIOD as u64 - 150 + i * 100, 100));
        }
        assert_eq!(c.mismatch(PERIOD as u64 - 150, &got), None);
        got[321] ^= 1;
        assert_eq!(c.mismatch(PERIOD as u64 - 150, &got), Some(321));
        assert_ne!(bytes(64, 1), bytes(64, 2));
    }
}

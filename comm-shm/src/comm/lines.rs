//! Where everything of a communicator lies in its segment: named accessors
//! for the control lines and the payload areas, instead of index arithmetic
//! spread over the algorithms.
//!
//! ```text
//! control lines, per rank r (6 each):
//!   arrive(r, 0), arrive(r, 1)   step k: seq = k, words = StepDesc (by parity of k)
//!   reduced(r)                   two-shot / single-copy all_reduce: my slice is reduced
//!   done(r)                      I finished reading everyone's buffers for step k
//!   doorbell(r)                  bumped by whoever published something for my p2p
//!   probe(r)                     set-up: settings and the single-copy probe
//! then per ordered pair s -> d (4 each):
//!   sent(s, d)                   seq = chunks published on the channel
//!   acked(s, d)                  seq = chunks consumed; words = receiver's posted desc
//!   slot(s, d, 0), slot(s, d, 1) SlotHeader of each slot
//! payload:
//!   buf(r, parity)               W * 2 collective buffers of `ws` bytes
//!   slot_data(s, d, j)           W * (W - 1) * 2 point-to-point slots of `p2p` bytes
//! ```

/// Control-line indices of a group of `world` ranks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lines {
    world: usize,
}

const PER_RANK: usize = 6;
const PER_PAIR: usize = 4;

impl Lines {
    pub(crate) fn new(world: usize) -> Self {
        Lines { world }
    }

    /// Number of control lines.
    pub(crate) fn count(&self) -> usize {
        self.world * PER_RANK + self.pairs() * PER_PAIR
    }

    fn pairs(&self) -> usize {
        self.world * (self.world - 1)
    }

    fn rank(&self, r: usize, i: usize) -> usize {
        assert!(r < self.world, "rank {r} of {}", self.world);
        r * PER_RANK + i
    }

    /// Rank `r`'s arrival line for steps of parity `parity`.
    pub(crate) fn arrive(&self, r: usize, parity: usize) -> usize {
        self.rank(r, parity & 1)
    }
    pub(crate) fn reduced(&self, r: usize) -> usize {
        self.rank(r, 2)
    }
    pub(crate) fn done(&self, r: usize) -> usize {
        self.rank(r, 3)
    }
    pub(crate) fn doorbell(&self, r: usize) -> usize {
        self.rank(r, 4)
    }
    pub(crate) fn probe(&self, r: usize) -> usize {
        self.rank(r, 5)
    }

    /// Index of the ordered pair `s -> d` (`s != d`).
    pub(crate) fn pair(&self, s: usize, d: usize) -> usize {
        assert!(s != d && s < self.world && d < self.world, "pair {s}->{d}");
        s * (self.world - 1) + if d > s { d - 1 } else { d }
    }

    fn pair_line(&self, s: usize, d: usize, i: usize) -> usize {
        self.world * PER_RANK + self.pair(s, d) * PER_PAIR + i
    }

    pub(crate) fn sent(&self, s: usize, d: usize) -> usize {
        self.pair_line(s, d, 0)
    }
    pub(crate) fn acked(&self, s: usize, d: usize) -> usize {
        self.pair_line(s, d, 1)
    }
    pub(crate) fn slot(&self, s: usize, d: usize, j: usize) -> usize {
        self.pair_line(s, d, 2 + (j & 1))
    }
}

/// Payload offsets of a group of `world` ranks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Payload {
    pub world: usize,
    /// Bytes of each collective buffer.
    pub ws: usize,
    /// Bytes of each point-to-point slot.
    pub p2p: usize,
}

impl Payload {
    /// Total payload bytes, or `None` on overflow.
    pub(crate) fn bytes(&self) -> Option<usize> {
        let bufs = self.world.checked_mul(2)?.checked_mul(self.ws)?;
        let slots = (self.world * (self.world - 1))
            .checked_mul(2)?
            .checked_mul(self.p2p)?;
        bufs.checked_add(slots)
    }

    /// Offset of rank `r`'s collective buffer of parity `parity`.
    pub(crate) fn buf(&self, r: usize, parity: usize) -> usize {
        (2 * r + (parity & 1)) * self.ws
    }

    /// Offset of slot `j` of the channel with pair index `pair`.
    pub(crate) fn slot(&self, pair: usize, j: usize) -> usize {
        2 * self.world * self.ws + (2 * pair + (j & 1)) * self.p2p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_is_distinct_and_in_range() {
        for w in 2..6 {
            let l = Lines::new(w);
            let mut seen = vec![false; l.count()];
            let mut mark = |i: usize| {
                assert!(!seen[i], "line {i} used twice at world {w}");
                seen[i] = true;
            };
            for r in 0..w {
                for i in [
                    l.arrive(r, 0),
                    l.arrive(r, 1),
                    l.reduced(r),
                    l.done(r),
                    l.doorbell(r),
                    l.probe(r),
                ] {
                    mark(i);
                }
                for d in (0..w).filter(|&d| d != r) {
                    for i in [
                        l.sent(r, d),
                        l.acked(r, d),
                        l.slot(r, d, 0),
                        l.slot(r, d, 1),
                    ] {
                        mark(i);
                    }
                }
            }
            assert!(seen.into_iter().all(|x| x));
            let p = Payload {
                world: w,
                ws: 4096,
                p2p: 4096,
            };
            let last = p.slot(l.pair(w - 1, w - 2), 1) + 4096;
            assert_eq!(last, p.bytes().unwrap());
        }
    }
}

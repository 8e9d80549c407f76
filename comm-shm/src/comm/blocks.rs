//! Byte ranges of strided blocks ([`BlockLayout`]): which pieces of a
//! buffer hold bytes `[off, off + len)` of block `j`, so an all-to-all can
//! copy a chunk of a strided block straight into or out of the shared
//! workspace (or between two strided buffers) with no packing copy. A flat
//! all-to-all is the contiguous layout: one piece per chunk.

use comm_core::BlockLayout;

/// The pieces `(byte offset in the buffer, length)` holding bytes
/// `[off, off + len)` of block `j`, in order.
#[derive(Debug, Clone)]
pub(crate) struct Pieces {
    base: usize,
    stride: usize,
    run: usize,
    pos: usize,
    end: usize,
}

impl Pieces {
    pub(crate) fn new(l: &BlockLayout, j: usize, es: usize, off: usize, len: usize) -> Self {
        Pieces {
            base: j * l.block_step * es,
            stride: l.stride * es,
            run: (l.run * es).max(1),
            pos: off,
            end: off + len,
        }
    }
}

impl Iterator for Pieces {
    type Item = (usize, usize);

    #[inline]
    fn next(&mut self) -> Option<(usize, usize)> {
        if self.pos >= self.end {
            return None;
        }
        let (k, within) = (self.pos / self.run, self.pos % self.run);
        let n = (self.run - within).min(self.end - self.pos);
        self.pos += n;
        Some((self.base + k * self.stride + within, n))
    }
}

/// Copies bytes `[off, off + dst.len())` of block `j` of `src` into `dst`.
/// Panics (slice bounds) if the layout does not fit `src`.
pub(crate) fn gather_range(
    src: &[u8],
    l: &BlockLayout,
    j: usize,
    es: usize,
    off: usize,
    dst: &mut [u8],
) {
    let mut at = 0;
    for (p, n) in Pieces::new(l, j, es, off, dst.len()) {
        dst[at..at + n].copy_from_slice(&src[p..p + n]);
        at += n;
    }
}

/// Copies `src` into bytes `[off, off + src.len())` of block `j` of `dst`.
/// Panics (slice bounds) if the layout does not fit `dst`.
pub(crate) fn scatter_range(
    src: &[u8],
    l: &BlockLayout,
    j: usize,
    es: usize,
    off: usize,
    dst: &mut [u8],
) {
    let mut at = 0;
    for (p, n) in Pieces::new(l, j, es, off, src.len()) {
        dst[p..p + n].copy_from_slice(&src[at..at + n]);
        at += n;
    }
}

/// Copies bytes `[off, off + len)` of block `js` of `src` (layout `ls`) to
/// the same bytes of block `jd` of `dst` (layout `ld`), piece by piece.
#[allow(clippy::too_many_arguments)]
pub(crate) fn copy_between(
    src: &[u8],
    ls: &BlockLayout,
    js: usize,
    dst: &mut [u8],
    ld: &BlockLayout,
    jd: usize,
    es: usize,
    off: usize,
    len: usize,
) {
    let mut a = Pieces::new(ls, js, es, off, len);
    let mut b = Pieces::new(ld, jd, es, off, len);
    let (mut pa, mut pb) = (a.next(), b.next());
    while let (Some((sa, na)), Some((sb, nb))) = (pa, pb) {
        let n = na.min(nb);
        dst[sb..sb + n].copy_from_slice(&src[sa..sa + n]);
        pa = if n == na {
            a.next()
        } else {
            Some((sa + n, na - n))
        };
        pb = if n == nb {
            b.next()
        } else {
            Some((sb + n, nb - n))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_match_the_reference_gather() {
        let l = BlockLayout {
            block_step: 3,
            runs: 4,
            run: 3,
            stride: 9,
        };
        let src: Vec<u8> = (0..=255).collect();
        for es in [1, 2, 4] {
            for j in 0..3 {
                let mut whole = vec![0u8; l.block_len() * es];
                l.gather(&src, j, es, &mut whole);
                for off in 0..whole.len() {
                    for len in 0..=whole.len() - off {
                        let mut part = vec![0u8; len];
                        gather_range(&src, &l, j, es, off, &mut part);
                        assert_eq!(part, whole[off..off + len]);
                        let mut back = vec![0u8; src.len()];
                        scatter_range(&part, &l, j, es, off, &mut back);
                        let mut moved = vec![0u8; src.len()];
                        copy_between(&src, &l, j, &mut moved, &l, j, es, off, len);
                        assert_eq!(back, moved);
                    }
                }
                // Strided to contiguous and back.
                let c = BlockLayout::contiguous(l.block_len());
                let mut flat = vec![0u8; 3 * l.block_len() * es];
                copy_between(&src, &l, j, &mut flat, &c, j, es, 0, whole.len());
                let b = j * whole.len();
                assert_eq!(flat[b..b + whole.len()], whole[..]);
            }
        }
    }
}

//! # demo-model
//!
//! The model both demos run: a stack of attention layers over a
//! `[B, S, H*D]` sequence (Q/K/V projections, softmax attention, output
//! projection, residual), with its matrix products done by the
//! `matrixmultiply` GEMM so the balance of communication and compute
//! resembles a real run.
//!
//! Attention is computed with an online softmax ([`OnlineSoftmax`]): keys
//! and values may arrive in blocks (ring attention) and the result is the
//! same, within rounding, as attending to all of them at once. The
//! single-process [`Model::reference`] uses the same code with one block.
//!
//! [`usp`] runs the same layers over sequence-parallel groups: Ulysses
//! all-to-alls and ring attention whose K/V exchange hides behind the
//! attention compute (the main job, `parallel-state`'s `ulysses_attention`).
//!
//! ```
//! use demo_model::{Config, Model};
//! let cfg = Config { batch: 1, seq: 6, heads: 2, head_dim: 4, layers: 1 };
//! let m = Model::new(&cfg);
//! let out = m.reference(&m.input());
//! assert_eq!(out.len(), 6 * 8);
//! ```

#![warn(missing_docs)]

mod attention;
mod gemm;
pub mod usp;

pub use attention::OnlineSoftmax;
pub use gemm::{matmul, matmul_into};

/// The largest absolute difference between `a` and `b` (infinite when
/// their lengths differ or either holds a NaN where the other does not).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter().zip(b).fold(0f32, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() {
            f32::INFINITY
        } else {
            m.max(d)
        }
    })
}

/// Shape of the demo model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Batch size.
    pub batch: usize,
    /// Sequence length.
    pub seq: usize,
    /// Attention heads.
    pub heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Attention layers.
    pub layers: usize,
}

impl Config {
    /// Hidden size `heads * head_dim`.
    pub fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// A small deterministic generator, so every rank builds identical weights.
#[derive(Debug, Clone)]
pub struct Lcg(pub u64);

impl Lcg {
    /// The next value in [-0.5, 0.5).
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }
    /// `n` values scaled by `scale`.
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
}

/// One attention layer's weights, `[hidden, hidden]` each, row-major.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Query projection.
    pub wq: Vec<f32>,
    /// Key projection.
    pub wk: Vec<f32>,
    /// Value projection.
    pub wv: Vec<f32>,
    /// Output projection.
    pub wo: Vec<f32>,
}

/// The model: its configuration and layers.
#[derive(Debug, Clone)]
pub struct Model {
    /// Shape.
    pub cfg: Config,
    /// Layers.
    pub layers: Vec<Layer>,
}

impl Model {
    /// Deterministic weights for `cfg` (the same on every rank).
    pub fn new(cfg: &Config) -> Self {
        let hidden = cfg.hidden();
        let mut g = Lcg(0x5eed);
        let s = 1.0 / (hidden as f32).sqrt();
        let layers = (0..cfg.layers)
            .map(|_| Layer {
                wq: g.vec(hidden * hidden, s),
                wk: g.vec(hidden * hidden, s),
                wv: g.vec(hidden * hidden, s),
                wo: g.vec(hidden * hidden, s),
            })
            .collect();
        Model { cfg: *cfg, layers }
    }

    /// The deterministic input `[B, S, H*D]`.
    pub fn input(&self) -> Vec<f32> {
        self.input_seeded(42)
    }

    /// A deterministic input from `seed` (different requests of a demo).
    pub fn input_seeded(&self, seed: u64) -> Vec<f32> {
        Lcg(seed).vec(self.cfg.batch * self.cfg.seq * self.cfg.hidden(), 1.0)
    }

    /// One process: every layer over the full sequence.
    pub fn reference(&self, x: &[f32]) -> Vec<f32> {
        let Config {
            batch: b,
            seq: s,
            heads: h,
            head_dim: d,
            ..
        } = self.cfg;
        let hid = h * d;
        let mut x = x.to_vec();
        for l in &self.layers {
            let q = matmul(&x, &l.wq, b * s, hid, hid);
            let k = matmul(&x, &l.wk, b * s, hid, hid);
            let v = matmul(&x, &l.wv, b * s, hid, hid);
            let mut att = OnlineSoftmax::new(b, s, h, d);
            att.update(&q, &k, &v, s, s);
            let o = matmul(&att.finish(), &l.wo, b * s, hid, hid);
            x.iter_mut().zip(&o).for_each(|(xv, ov)| *xv += ov);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_match_one_block() {
        let (b, s, h, d) = (2, 10, 3, 4);
        let mut g = Lcg(7);
        let (q, k, v) = (
            g.vec(b * s * h * d, 1.0),
            g.vec(b * s * h * d, 1.0),
            g.vec(b * s * h * d, 1.0),
        );
        let mut whole = OnlineSoftmax::new(b, s, h, d);
        whole.update(&q, &k, &v, s, 8);
        let whole = whole.finish();
        // The same keys in blocks of 4, 4 and 2 (the last 2 are padding).
        let mut blocks = OnlineSoftmax::new(b, s, h, d);
        for (start, len) in [(0, 4), (4, 4), (8, 2)] {
            let take = |t: &[f32]| -> Vec<f32> {
                let mut out = Vec::new();
                for bb in 0..b {
                    let row = |ss: usize| ((bb * s + ss) * h) * d;
                    out.extend_from_slice(&t[row(start)..row(start + len)]);
                }
                out
            };
            let valid = 8usize.saturating_sub(start).min(len);
            blocks.update(&q, &take(&k), &take(&v), len, valid);
        }
        let blocks = blocks.finish();
        let err = whole
            .iter()
            .zip(&blocks)
            .map(|(a, c)| (a - c).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-5, "max abs error {err}");
    }

    #[test]
    fn packed_blocks_and_reuse_are_bit_identical() {
        let (b, s, h, d) = (2, 9, 3, 4);
        let mut g = Lcg(11);
        let (q, k, v) = (
            g.vec(b * s * h * d, 1.0),
            g.vec(b * s * h * d, 1.0),
            g.vec(b * s * h * d, 1.0),
        );
        // [b, s, h, 2d]: each head's key, then its value.
        let kv: Vec<f32> = k
            .chunks(d)
            .zip(v.chunks(d))
            .flat_map(|(kc, vc)| kc.iter().chain(vc).copied())
            .collect();
        let mut plain = OnlineSoftmax::new(b, s, h, d);
        plain.update(&q, &k, &v, s, 7);
        let plain = plain.finish();
        let mut packed = OnlineSoftmax::new(b, s, h, d);
        let mut out = vec![0f32; plain.len()];
        for _ in 0..2 {
            packed.reset();
            packed.update_packed(&q, &kv, s, 7);
            packed.finish_into(&mut out);
            assert_eq!(out, plain);
        }
    }

    #[test]
    fn matmul_into_matches_a_naive_product() {
        let (m, k, n) = (5, 7, 3);
        let mut g = Lcg(3);
        let (x, w) = (g.vec(m * k, 1.0), g.vec(k * n, 1.0));
        let got = matmul(&x, &w, m, k, n);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|t| x[i * k + t] * w[t * n + j]).sum();
                assert!((got[i * n + j] - want).abs() < 1e-5);
            }
        }
    }
}

//! Softmax attention with an online softmax, so keys and values can arrive
//! in blocks (ring attention) and still give the full-attention result.

use crate::gemm::gemm_strided;

/// Running attention of `[B, S_q, h, D]` queries over key/value blocks.
///
/// For every query row it keeps the running maximum score `m`, the running
/// sum of `exp(score - m)` and the weighted value sum; a new block rescales
/// them by `exp(m_old - m_new)` (the online-softmax recurrence), so the
/// order and split of the blocks change the result only by rounding.
///
/// Reusable: [`finish_into`](Self::finish_into) then [`reset`](Self::reset)
/// run layer after layer without allocating.
#[derive(Debug, Clone)]
pub struct OnlineSoftmax {
    b: usize,
    s: usize,
    h: usize,
    d: usize,
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
    scores: Vec<f32>,
}

/// Where keys and values lie: element `e` of head `hh` of key `j` of batch
/// `bb` is at `base + (bb * kv_len + j) * row + hh * head + e`.
#[derive(Clone, Copy)]
struct KvView<'a> {
    k: &'a [f32],
    k_base: usize,
    v: &'a [f32],
    v_base: usize,
    row: usize,
    head: usize,
}

impl OnlineSoftmax {
    /// An empty accumulator for queries of shape `[b, s, h, d]`.
    pub fn new(b: usize, s: usize, h: usize, d: usize) -> Self {
        OnlineSoftmax {
            b,
            s,
            h,
            d,
            max: vec![f32::NEG_INFINITY; b * h * s],
            sum: vec![0.0; b * h * s],
            acc: vec![0.0; b * s * h * d],
            scores: Vec::new(),
        }
    }

    /// Forgets every block attended so far (keeps the memory).
    pub fn reset(&mut self) {
        self.max.fill(f32::NEG_INFINITY);
        self.sum.fill(0.0);
        self.acc.fill(0.0);
    }

    /// Attends the queries `q` (`[b, s, h, d]`) to a block of `kv_len` keys
    /// and values (`[b, kv_len, h, d]` each), of which only the first
    /// `valid` count (the rest is sequence padding).
    pub fn update(&mut self, q: &[f32], k: &[f32], v: &[f32], kv_len: usize, valid: usize) {
        let (b, h, d) = (self.b, self.h, self.d);
        assert!(
            k.len() == b * kv_len * h * d && v.len() == k.len(),
            "keys and values"
        );
        let view = KvView {
            k,
            k_base: 0,
            v,
            v_base: 0,
            row: h * d,
            head: d,
        };
        self.attend(q, view, kv_len, valid);
    }

    /// [`update`](Self::update) with keys and values packed in one buffer
    /// `[b, kv_len, h, 2 * d]`: each head's key, then its value (the block
    /// ring attention passes around as one message).
    pub fn update_packed(&mut self, q: &[f32], kv: &[f32], kv_len: usize, valid: usize) {
        let (b, h, d) = (self.b, self.h, self.d);
        assert_eq!(kv.len(), b * kv_len * h * 2 * d, "packed keys and values");
        let view = KvView {
            k: kv,
            k_base: 0,
            v: kv,
            v_base: d,
            row: h * 2 * d,
            head: 2 * d,
        };
        self.attend(q, view, kv_len, valid);
    }

    fn attend(&mut self, q: &[f32], kv: KvView<'_>, kv_len: usize, valid: usize) {
        let (b, s, h, d) = (self.b, self.s, self.h, self.d);
        assert_eq!(q.len(), b * s * h * d, "queries");
        let valid = valid.min(kv_len);
        if valid == 0 {
            return;
        }
        let scale = 1.0 / (d as f32).sqrt();
        let hd = (h * d) as isize;
        let row = kv.row as isize;
        self.scores.resize(s * valid, 0.0);
        for bb in 0..b {
            for hh in 0..h {
                let q_off = (bb * s * h + hh) * d;
                let kv_off = bb * kv_len * kv.row + hh * kv.head;
                // scores [s, valid] = q [s, d] @ k^T [d, valid] * scale
                gemm_strided(
                    s,
                    d,
                    valid,
                    scale,
                    (q, q_off, hd, 1),
                    (kv.k, kv.k_base + kv_off, 1, row),
                    0.0,
                    (&mut self.scores, 0, valid as isize, 1),
                );
                let stats = (bb * h + hh) * s;
                for i in 0..s {
                    let sc = &mut self.scores[i * valid..(i + 1) * valid];
                    let bmax = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let m_old = self.max[stats + i];
                    let m_new = m_old.max(bmax);
                    let corr = if m_old == f32::NEG_INFINITY {
                        0.0
                    } else {
                        (m_old - m_new).exp()
                    };
                    let mut sum = 0f32;
                    for x in sc.iter_mut() {
                        *x = (*x - m_new).exp();
                        sum += *x;
                    }
                    self.max[stats + i] = m_new;
                    self.sum[stats + i] = self.sum[stats + i] * corr + sum;
                    if corr != 1.0 {
                        let a = &mut self.acc[q_off + i * h * d..q_off + i * h * d + d];
                        a.iter_mut().for_each(|x| *x *= corr);
                    }
                }
                // acc [s, d] += p [s, valid] @ v [valid, d]
                gemm_strided(
                    s,
                    valid,
                    d,
                    1.0,
                    (&self.scores, 0, valid as isize, 1),
                    (kv.v, kv.v_base + kv_off, row, 1),
                    1.0,
                    (&mut self.acc, q_off, hd, 1),
                );
            }
        }
    }

    /// Writes the attention output `[b, s, h, d]` into `out`; call
    /// [`reset`](Self::reset) before attending the next queries.
    pub fn finish_into(&self, out: &mut [f32]) {
        let (b, s, h, d) = (self.b, self.s, self.h, self.d);
        assert_eq!(out.len(), self.acc.len(), "attention output");
        for bb in 0..b {
            for hh in 0..h {
                for i in 0..s {
                    let l = self.sum[(bb * h + hh) * s + i];
                    let off = ((bb * s + i) * h + hh) * d;
                    let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
                    for (o, a) in out[off..off + d].iter_mut().zip(&self.acc[off..off + d]) {
                        *o = a * inv;
                    }
                }
            }
        }
    }

    /// The attention output `[b, s, h, d]`.
    pub fn finish(self) -> Vec<f32> {
        let mut out = vec![0f32; self.acc.len()];
        self.finish_into(&mut out);
        out
    }
}

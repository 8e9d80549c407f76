//! Every primitive x dtype x reduce op, world sizes 1 to 5, sizes 0, 1, 7,
//! 1000 and about 1 MiB, checked exactly (integer-valued data; avg within a
//! tolerance for floats, truncating for integers).

mod common;

use comm_core::{bf16, f16, Communicator, DType, Element, ReduceOp, Tensor};

const OPS: [ReduceOp; 5] = [
    ReduceOp::Sum,
    ReduceOp::Prod,
    ReduceOp::Min,
    ReduceOp::Max,
    ReduceOp::Avg,
];

/// Element counts tried for `dt`: 0, 1, 7, 1000 and a large size (not a
/// multiple of the world size) above every small-message threshold: about
/// 1 MiB for f32, 256 KiB for the other dtypes (debug builds reduce slowly and
/// the whole suite must stay well under a minute on two cores).
fn sizes(dt: DType) -> [usize; 5] {
    let big = if dt == DType::F32 { 1 << 20 } else { 256 << 10 };
    [0, 1, 7, 1000, big / dt.size() + 3]
}

/// Value of element `i` on rank `r`, chosen so every op is exact in every dtype.
fn val(op: ReduceOp, r: usize, i: usize) -> f64 {
    match op {
        // Products of at most five 1s and 2s: at most 32.
        ReduceOp::Prod => 1.0 + ((r + i) % 2) as f64,
        // Sums of at most five values <= 11: at most 55 (fits i8).
        _ => ((r * 7 + i * 3) % 11) as f64,
    }
}

fn expected(op: ReduceOp, w: usize, i: usize, dt: DType) -> f64 {
    let vals = (0..w).map(|r| val(op, r, i));
    match op {
        ReduceOp::Sum => vals.sum(),
        ReduceOp::Prod => vals.product(),
        ReduceOp::Min => vals.fold(f64::INFINITY, f64::min),
        ReduceOp::Max => vals.fold(f64::NEG_INFINITY, f64::max),
        ReduceOp::Avg => {
            let s: f64 = vals.sum();
            if dt.is_float() {
                s / w as f64
            } else {
                (s as i64 / w as i64) as f64
            }
        }
    }
}

/// The exact expected bytes (or, for a float avg, values) of a reduction of
/// `n` elements starting at element `first`: the data is periodic (period 66),
/// so the expectation is computed once per period and repeated.
fn expect_reduced<T: Element>(op: ReduceOp, w: usize, first: usize, n: usize) -> Vec<T> {
    let period: Vec<T> = (0..66)
        .map(|i| T::from_f64(expected(op, w, first + i, T::DTYPE)))
        .collect();
    (0..n).map(|i| period[i % 66]).collect()
}

fn check_reduced<T: Element>(what: &str, op: ReduceOp, w: usize, first: usize, t: &Tensor) {
    let got = t.as_slice::<T>().unwrap();
    let want = expect_reduced::<T>(op, w, first, got.len());
    if op == ReduceOp::Avg && T::DTYPE.is_float() {
        for (i, (g, e)) in got.iter().zip(&want).enumerate().step_by(7) {
            let (g, e) = (g.to_f64(), e.to_f64());
            assert!(
                (g - e).abs() <= e.abs() * 1e-2 + 1e-6,
                "{what} {op:?}: [{i}] = {g}, want {e}"
            );
        }
    } else if got != &want[..] {
        let i = got.iter().zip(&want).position(|(g, e)| g != e).unwrap();
        panic!("{what} {op:?}: [{i}] = {:?}, want {:?}", got[i], want[i]);
    }
}

fn tensor<T: Element>(n: usize, f: impl Fn(usize) -> f64) -> Tensor {
    Tensor::from_vec1((0..n).map(|i| T::from_f64(f(i))).collect::<Vec<T>>())
}

fn values<T: Element>(t: &Tensor) -> Vec<f64> {
    t.as_slice::<T>()
        .unwrap()
        .iter()
        .map(|v| v.to_f64())
        .collect()
}

fn check_all<T: Element>(c: &Communicator) {
    let (r, w) = (c.rank(), c.world_size());
    let dt = T::DTYPE;
    for n in sizes(dt) {
        let ctx = |what: &str| format!("{what} world {w} rank {r} dtype {dt} n {n}");
        // all_reduce, every op.
        for op in OPS {
            let mut t = tensor::<T>(n, |i| val(op, r, i));
            c.all_reduce(&mut t, op).unwrap();
            check_reduced::<T>(&ctx("all_reduce"), op, w, 0, &t);
        }
        // reduce_scatter: input of w*m elements, m = n / w rounded down.
        let m = n / w;
        for op in OPS {
            let input = tensor::<T>(w * m, |i| val(op, r, i));
            let mut out = Tensor::zeros([m], dt);
            c.reduce_scatter(&input, &mut out, op).unwrap();
            check_reduced::<T>(&ctx("reduce_scatter"), op, w, r * m, &out);
        }
        // all_gather and gather: rank-stamped data.
        let stamp = |rr: usize, i: usize| ((rr * 5 + i) % 100) as f64;
        let input = tensor::<T>(n, |i| stamp(r, i));
        let mut out = Tensor::zeros([w * n], dt);
        c.all_gather(&input, &mut out).unwrap();
        let want: Vec<f64> = (0..w)
            .flat_map(|rr| (0..n).map(move |i| stamp(rr, i)))
            .collect();
        assert_eq!(values::<T>(&out), want, "{}", ctx("all_gather"));
        for root in 0..w {
            if r == root {
                let mut out = Tensor::zeros([w * n], dt);
                c.gather(&input, Some(&mut out), root).unwrap();
                assert_eq!(values::<T>(&out), want, "{}", ctx("gather"));
            } else {
                c.gather::<Tensor, Tensor>(&input, None, root).unwrap();
            }
        }
        // broadcast from every root.
        for root in 0..w {
            let mut t = tensor::<T>(n, |i| if r == root { stamp(root, i) } else { 0.0 });
            c.broadcast(&mut t, root).unwrap();
            let want: Vec<f64> = (0..n).map(|i| stamp(root, i)).collect();
            assert_eq!(values::<T>(&t), want, "{} root {root}", ctx("broadcast"));
        }
        // all_to_all: block j of rank i holds (i, j) stamps.
        let m = n / w;
        let cell = |from: usize, to: usize, k: usize| ((from * 13 + to * 3 + k) % 100) as f64;
        let input = tensor::<T>(w * m, |x| cell(r, x / m.max(1), x % m.max(1)));
        let mut out = Tensor::zeros([w * m], dt);
        c.all_to_all(&input, &mut out).unwrap();
        let want: Vec<f64> = (0..w * m)
            .map(|x| cell(x / m.max(1), r, x % m.max(1)))
            .collect();
        assert_eq!(values::<T>(&out), want, "{}", ctx("all_to_all"));
        // send/recv around the ring.
        if w > 1 {
            let right = (r + 1) % w;
            let left = (r + w - 1) % w;
            let t = tensor::<T>(n, |i| stamp(r, i));
            let mut got = Tensor::zeros([n], dt);
            if r % 2 == 0 {
                c.send(&t, right).unwrap();
                c.recv(&mut got, left).unwrap();
            } else {
                c.recv(&mut got, left).unwrap();
                c.send(&t, right).unwrap();
            }
            let want: Vec<f64> = (0..n).map(|i| stamp(left, i)).collect();
            assert_eq!(values::<T>(&got), want, "{}", ctx("send/recv"));
        }
        c.barrier().unwrap();
    }
}

fn suite(world: usize) {
    let mut o = common::opts();
    // Small pieces so the large size goes through several pipelined segments.
    o.segment = 16 << 10;
    common::run(world, o, 60.0, |_, c| {
        check_all::<f32>(&c);
        check_all::<f64>(&c);
        check_all::<f16>(&c);
        check_all::<bf16>(&c);
        check_all::<i8>(&c);
        check_all::<u8>(&c);
        check_all::<i32>(&c);
        check_all::<i64>(&c);
    });
}

#[test]
fn world_1() {
    suite(1);
}
#[test]
fn world_2() {
    suite(2);
}
#[test]
fn world_3() {
    suite(3);
}
#[test]
fn world_4() {
    suite(4);
}
#[test]
fn world_5() {
    suite(5);
}

/// Non-integer floats: every member must end with the very same bits, in both
/// the recursive-doubling and the ring regime.
#[test]
fn all_reduce_results_are_bit_identical_across_ranks() {
    for world in [3, 4] {
        let res = common::run(world, common::opts(), 30.0, |r, c| {
            let mut out = Vec::new();
            for n in [5usize, 3000, 300_000] {
                for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Avg] {
                    let v: Vec<f32> = (0..n)
                        .map(|i| ((i * 31 + r * 17) % 97) as f32 * 0.0137 + 0.5)
                        .collect();
                    let mut t = Tensor::from_vec1(v);
                    c.all_reduce(&mut t, op).unwrap();
                    out.push(t.as_bytes().unwrap().to_vec());
                }
                let v: Vec<bf16> = (0..n)
                    .map(|i| bf16::from_f32(((i + r) % 89) as f32 * 0.37))
                    .collect();
                let mut t = Tensor::from_vec1(v);
                c.all_reduce(&mut t, ReduceOp::Sum).unwrap();
                out.push(t.as_bytes().unwrap().to_vec());
            }
            out
        });
        for r in 1..world {
            assert!(
                res[r] == res[0],
                "world {world}: rank {r} differs from rank 0"
            );
        }
    }
}

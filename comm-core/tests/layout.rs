//! Layout operations against a naive index-by-index reference, for every dtype.

mod common;
use common::FakeDevice;

use comm_core::layout::{self, normalize_dim};
use comm_core::{CommError, DType, Tensor};
use proptest::prelude::*;
use proptest::sample::Index;

// ---------------------------------------------------------------- helpers

/// Deterministic pseudo-random bytes (xorshift64*), so every bit pattern of
/// every dtype shows up, NaNs included; comparisons are byte-exact.
fn rand_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn rand_tensor(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_bytes(&rand_bytes(seed, n * dtype.size()), shape.to_vec(), dtype).unwrap()
}

fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for k in (0..shape.len()).rev() {
        idx[k] = i % shape[k];
        i /= shape[k];
    }
    idx
}

fn ravel(idx: &[usize], shape: &[usize]) -> usize {
    idx.iter().zip(shape).fold(0, |acc, (&i, &s)| {
        assert!(i < s);
        acc * s + i
    })
}

/// Element `idx` of `t`, as bytes.
fn elem<'a>(t: &'a Tensor, idx: &[usize]) -> &'a [u8] {
    let es = t.dtype().size();
    let o = ravel(idx, t.shape()) * es;
    &t.as_bytes().unwrap()[o..o + es]
}

/// Builds a tensor of `shape` whose element at each multi-index is `f(idx)`
/// (`None`: zero bytes).
fn build(shape: &[usize], dtype: DType, f: impl Fn(&[usize]) -> Option<Vec<u8>>) -> Tensor {
    let es = dtype.size();
    let n: usize = shape.iter().product();
    let mut bytes = vec![0u8; n * es];
    for i in 0..n {
        if let Some(v) = f(&unravel(i, shape)) {
            bytes[i * es..(i + 1) * es].copy_from_slice(&v);
        }
    }
    Tensor::from_bytes(&bytes, shape.to_vec(), dtype).unwrap()
}

fn ref_narrow(t: &Tensor, d: usize, start: usize, len: usize) -> Tensor {
    let mut shape = t.shape().to_vec();
    shape[d] = len;
    build(&shape, t.dtype(), |idx| {
        let mut i = idx.to_vec();
        i[d] += start;
        Some(elem(t, &i).to_vec())
    })
}

fn ref_cat(ts: &[Tensor], d: usize) -> Tensor {
    let mut shape = ts[0].shape().to_vec();
    shape[d] = ts.iter().map(|t| t.shape()[d]).sum();
    build(&shape, ts[0].dtype(), |idx| {
        let mut i = idx.to_vec();
        for t in ts {
            if i[d] < t.shape()[d] {
                return Some(elem(t, &i).to_vec());
            }
            i[d] -= t.shape()[d];
        }
        unreachable!()
    })
}

fn ref_permute(t: &Tensor, perm: &[usize]) -> Tensor {
    let shape: Vec<usize> = perm.iter().map(|&p| t.shape()[p]).collect();
    build(&shape, t.dtype(), |idx| {
        let mut i = vec![0; perm.len()];
        for (k, &p) in perm.iter().enumerate() {
            i[p] = idx[k];
        }
        Some(elem(t, &i).to_vec())
    })
}

fn ref_pad(t: &Tensor, d: usize, amount: usize) -> Tensor {
    let mut shape = t.shape().to_vec();
    shape[d] += amount;
    build(&shape, t.dtype(), |idx| {
        (idx[d] < t.shape()[d]).then(|| elem(t, idx).to_vec())
    })
}

/// torch.chunk's piece sizes.
fn ref_chunk_sizes(size: usize, chunks: usize) -> Vec<usize> {
    if size == 0 {
        return vec![0; chunks];
    }
    let step = size.div_ceil(chunks);
    let mut out = vec![];
    let mut left = size;
    while left > 0 {
        out.push(step.min(left));
        left -= step.min(left);
    }
    out
}

fn assert_same(got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape(), want.shape());
    assert_eq!(got.dtype(), want.dtype());
    assert!(got.is_host());
    assert_eq!(got.as_bytes().unwrap(), want.as_bytes().unwrap());
    assert_eq!(got.as_bytes().unwrap().as_ptr() as usize % 64, 0);
}

fn signed(d: usize, ndim: usize, neg: bool) -> isize {
    if neg {
        d as isize - ndim as isize
    } else {
        d as isize
    }
}

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

/// Shapes of 1 to 5 dims, sizes mostly 1..=5 with the occasional 0.
fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![8 => 1usize..=5, 1 => Just(0usize)], 1..=5)
}

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(64)
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(config())]

    #[test]
    fn narrow_matches_reference(
        dt in dtype(), shape in shape(), seed in any::<u64>(),
        di in any::<Index>(), neg in any::<bool>(), a in any::<usize>(), b in any::<usize>(),
    ) {
        let t = rand_tensor(&shape, dt, seed);
        let d = di.index(shape.len());
        let start = a % (shape[d] + 1);
        let len = b % (shape[d] - start + 1);
        let got = layout::narrow(&t, signed(d, shape.len(), neg), start, len).unwrap();
        assert_same(&got, &ref_narrow(&t, d, start, len));
    }

    #[test]
    fn split_matches_reference(
        dt in dtype(), shape in shape(), seed in any::<u64>(),
        di in any::<Index>(), neg in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..5),
    ) {
        let t = rand_tensor(&shape, dt, seed);
        let d = di.index(shape.len());
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (shape[d] + 1)).collect();
        points.push(0);
        points.push(shape[d]);
        points.sort_unstable();
        let sizes: Vec<usize> = points.windows(2).map(|w| w[1] - w[0]).collect();
        let parts = layout::split(&t, &sizes, signed(d, shape.len(), neg)).unwrap();
        prop_assert_eq!(parts.len(), sizes.len());
        let mut start = 0;
        for (p, &len) in parts.iter().zip(&sizes) {
            assert_same(p, &ref_narrow(&t, d, start, len));
            start += len;
        }
        // Splitting then concatenating is the identity.
        assert_same(&layout::cat(&parts, d as isize).unwrap(), &t);
    }

    #[test]
    fn chunk_matches_reference(
        dt in dtype(), shape in shape(), seed in any::<u64>(),
        di in any::<Index>(), neg in any::<bool>(), chunks in 1usize..=7,
    ) {
        let t = rand_tensor(&shape, dt, seed);
        let d = di.index(shape.len());
        let parts = layout::chunk(&t, chunks, signed(d, shape.len(), neg)).unwrap();
        let sizes = ref_chunk_sizes(shape[d], chunks);
        prop_assert!(parts.len() <= chunks);
        prop_assert_eq!(parts.len(), sizes.len());
        let mut start = 0;
        for (p, &len) in parts.iter().zip(&sizes) {
            assert_same(p, &ref_narrow(&t, d, start, len));
            start += len;
        }
        if shape[d] % chunks == 0 {
            prop_assert_eq!(parts.len(), chunks);
        }
    }

    #[test]
    fn cat_matches_reference(
        dt in dtype(), shape in shape(), seed in any::<u64>(),
        di in any::<Index>(), neg in any::<bool>(),
        sizes in prop::collection::vec(0usize..=4, 1..=4),
    ) {
        let d = di.index(shape.len());
        let ts: Vec<Tensor> = sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let mut sh = shape.clone();
                sh[d] = s;
                rand_tensor(&sh, dt, seed.wrapping_add(i as u64 * 7919))
            })
            .collect();
        let want = ref_cat(&ts, d);
        let dim = signed(d, shape.len(), neg);
        assert_same(&layout::cat(&ts, dim).unwrap(), &want);
        let refs: Vec<&Tensor> = ts.iter().collect();
        assert_same(&layout::cat(&refs, dim).unwrap(), &want);
    }

    #[test]
    fn permute_matches_reference(
        dt in dtype(),
        (shape, perm) in shape().prop_flat_map(|s| {
            let n = s.len();
            (Just(s), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
        }),
        seed in any::<u64>(),
    ) {
        let t = rand_tensor(&shape, dt, seed);
        let got = layout::permute(&t, &perm).unwrap();
        assert_same(&got, &ref_permute(&t, &perm));
        // The inverse permutation restores the input.
        let mut inv = vec![0; perm.len()];
        for (k, &p) in perm.iter().enumerate() {
            inv[p] = k;
        }
        assert_same(&layout::permute(&got, &inv).unwrap(), &t);
    }

    /// Larger extents, so the tiled path crosses tile boundaries (tile = 32).
    #[test]
    fn permute_large_matches_reference(
        dt in dtype(),
        (shape, perm) in prop::collection::vec(1usize..=40, 2..=3).prop_flat_map(|s| {
            let n = s.len();
            (Just(s), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
        }),
        seed in any::<u64>(),
    ) {
        let t = rand_tensor(&shape, dt, seed);
        assert_same(&layout::permute(&t, &perm).unwrap(), &ref_permute(&t, &perm));
    }

    #[test]
    fn transpose_matches_reference(
        dt in dtype(), shape in shape(), seed in any::<u64>(),
        a in any::<Index>(), b in any::<Index>(), na in any::<bool>(), nb in any::<bool>(),
    ) {
        let t = rand_tensor(&shape, dt, seed);
        let n = shape.len();
        let (a, b) = (a.index(n), b.index(n));
        let mut perm: Vec<usize> = (0..n).collect();
        perm.swap(a, b);
        let got = layout::transpose(&t, signed(a, n, na), signed(b, n, nb)).unwrap();
        assert_same(&got, &ref_permute(&t, &perm));
    }

    #[test]
    fn pad_unpad_match_reference(
        dt in dtype(), shape in shape(), seed in any::<u64>(),
        di in any::<Index>(), neg in any::<bool>(), amount in 0usize..=4,
    ) {
        let t = rand_tensor(&shape, dt, seed);
        let d = di.index(shape.len());
        let dim = signed(d, shape.len(), neg);
        let p = layout::pad(&t, dim, amount).unwrap();
        assert_same(&p, &ref_pad(&t, d, amount));
        assert_same(&layout::unpad(&p, dim, amount).unwrap(), &t);
        let k = amount.min(shape[d]);
        assert_same(&layout::unpad(&t, dim, k).unwrap(), &ref_narrow(&t, d, 0, shape[d] - k));
    }
}

// ---------------------------------------------------------------- fixed cases

#[test]
fn permute_typical_attention_layouts() {
    // [B, S, H, D] <-> [B, H, S, D] and a full reverse, with sizes past a tile.
    for dt in DType::ALL {
        let t = rand_tensor(&[2, 33, 3, 5], dt, 42);
        for perm in [[0, 2, 1, 3], [3, 2, 1, 0], [1, 0, 3, 2], [0, 1, 3, 2]] {
            assert_same(
                &layout::permute(&t, &perm).unwrap(),
                &ref_permute(&t, &perm),
            );
        }
    }
}

#[test]
fn zero_dim_and_identity() {
    let t = Tensor::from_vec(vec![7i64], Vec::<usize>::new()).unwrap();
    assert_same(&layout::permute(&t, &[]).unwrap(), &t);
    let t = rand_tensor(&[1, 1, 1], DType::F32, 3);
    assert_same(
        &layout::permute(&t, &[2, 0, 1]).unwrap(),
        &ref_permute(&t, &[2, 0, 1]),
    );
    let t = rand_tensor(&[0, 3], DType::F32, 3);
    assert_eq!(layout::permute(&t, &[1, 0]).unwrap().shape(), &[3, 0]);
}

#[test]
fn chunk_of_empty_dim_gives_empty_pieces() {
    let t = rand_tensor(&[0, 2], DType::U8, 1);
    let parts = layout::chunk(&t, 3, 0).unwrap();
    assert_eq!(parts.len(), 3);
    assert!(parts.iter().all(|p| p.shape() == [0, 2]));
}

#[test]
fn normalize_dim_range() {
    for n in 1..5usize {
        for d in -(n as isize)..n as isize {
            let r = normalize_dim(d, n).unwrap();
            assert_eq!(r as isize, if d < 0 { d + n as isize } else { d });
        }
        assert!(normalize_dim(n as isize, n).is_err());
        assert!(normalize_dim(-(n as isize) - 1, n).is_err());
    }
    assert!(normalize_dim(0, 0).is_err());
    assert!(normalize_dim(-1, 0).is_err());
    assert!(normalize_dim(isize::MIN, 3).is_err());
    assert!(normalize_dim(isize::MAX, 3).is_err());
}

// ---------------------------------------------------------------- errors

fn is_invalid<T: std::fmt::Debug>(r: comm_core::Result<T>) -> bool {
    matches!(r, Err(CommError::InvalidArgument(_)))
}

#[test]
fn dim_out_of_range_errors() {
    let t = rand_tensor(&[2, 3], DType::F32, 1);
    for dim in [2isize, -3, 100, isize::MIN] {
        assert!(is_invalid(layout::narrow(&t, dim, 0, 1)));
        assert!(is_invalid(layout::split(&t, &[1, 1], dim)));
        assert!(is_invalid(layout::chunk(&t, 2, dim)));
        assert!(is_invalid(layout::cat(&[&t], dim)));
        assert!(is_invalid(layout::transpose(&t, dim, 0)));
        assert!(is_invalid(layout::transpose(&t, 0, dim)));
        assert!(is_invalid(layout::pad(&t, dim, 1)));
        assert!(is_invalid(layout::unpad(&t, dim, 1)));
    }
    let s = Tensor::from_vec(vec![1u8], Vec::<usize>::new()).unwrap();
    assert!(is_invalid(layout::narrow(&s, 0, 0, 1)));
    assert!(is_invalid(layout::pad(&s, -1, 1)));
}

#[test]
fn narrow_bounds_errors() {
    let t = rand_tensor(&[2, 3], DType::I32, 1);
    assert!(is_invalid(layout::narrow(&t, 1, 2, 2)));
    assert!(is_invalid(layout::narrow(&t, 1, 4, 0)));
    assert!(is_invalid(layout::narrow(&t, 1, usize::MAX, 2)));
    assert!(is_invalid(layout::narrow(&t, 1, 1, usize::MAX)));
    // Edge cases that are fine.
    assert_eq!(layout::narrow(&t, 1, 3, 0).unwrap().shape(), &[2, 0]);
    assert_same(&layout::narrow(&t, 0, 0, 2).unwrap(), &t);
    let msg = layout::narrow(&t, 1, 2, 2).unwrap_err().to_string();
    assert!(msg.contains("exceeds size 3"), "{msg}");
}

#[test]
fn split_and_chunk_errors() {
    let t = rand_tensor(&[5], DType::BF16, 1);
    assert!(is_invalid(layout::split(&t, &[2, 2], 0)));
    assert!(is_invalid(layout::split(&t, &[3, 3], 0)));
    assert!(is_invalid(layout::split(&t, &[], 0)));
    assert!(is_invalid(layout::split(&t, &[usize::MAX, 6], 0)));
    assert!(is_invalid(layout::chunk(&t, 0, 0)));
    assert_eq!(layout::split(&t, &[5], 0).unwrap().len(), 1);
}

#[test]
fn cat_errors() {
    let a = rand_tensor(&[2, 3], DType::F32, 1);
    let b = rand_tensor(&[2, 3], DType::I32, 2);
    let c = rand_tensor(&[3, 3], DType::F32, 3);
    let d = rand_tensor(&[2, 3, 1], DType::F32, 4);
    assert!(is_invalid(layout::cat::<Tensor>(&[], 0)));
    assert!(matches!(
        layout::cat(&[&a, &b], 0),
        Err(CommError::DTypeMismatch { .. })
    ));
    assert!(matches!(
        layout::cat(&[&a, &c], 1),
        Err(CommError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        layout::cat(&[&a, &d], 0),
        Err(CommError::ShapeMismatch { .. })
    ));
    // Mismatch only along the cat dim is fine.
    assert_eq!(layout::cat(&[&a, &c], 0).unwrap().shape(), &[5, 3]);
}

#[test]
fn permute_errors() {
    let t = rand_tensor(&[2, 3, 4], DType::F16, 1);
    for perm in [
        &[0, 1][..],
        &[0, 1, 1],
        &[0, 1, 3],
        &[0, 1, 2, 3],
        &[2, 2, 2],
    ] {
        let e = layout::permute(&t, perm).unwrap_err();
        assert!(matches!(e, CommError::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains("not a permutation"), "{e}");
    }
}

#[test]
fn unpad_errors() {
    let t = rand_tensor(&[2, 3], DType::I8, 1);
    assert!(is_invalid(layout::unpad(&t, 1, 4)));
    assert!(is_invalid(layout::unpad(&t, 0, usize::MAX)));
    assert_eq!(layout::unpad(&t, 1, 3).unwrap().shape(), &[2, 0]);
    assert!(is_invalid(layout::pad(&t, 1, usize::MAX)));
}

#[test]
fn device_tensors_are_refused() {
    let dev =
        Tensor::from_device_storage(Box::new(FakeDevice(vec![0; 24])), [2, 3], DType::F32).unwrap();
    let host = rand_tensor(&[2, 3], DType::F32, 1);
    let checks = [
        is_invalid(layout::narrow(&dev, 0, 0, 1)),
        is_invalid(layout::split(&dev, &[1, 1], 0)),
        is_invalid(layout::chunk(&dev, 2, 0)),
        is_invalid(layout::cat(&[&dev], 0)),
        is_invalid(layout::cat(&[&host, &dev], 0)),
        is_invalid(layout::transpose(&dev, 0, 1)),
        is_invalid(layout::pad(&dev, 0, 1)),
        is_invalid(layout::unpad(&dev, 0, 1)),
    ];
    assert!(checks.iter().all(|&c| c), "{checks:?}");
    let msg = layout::narrow(&dev, 0, 0, 1).unwrap_err().to_string();
    assert!(msg.contains("cuda:0") && msg.contains("to_host"), "{msg}");
    // Permutes run on the device storage's kernel where it has one, else
    // through the host, and stay on the device.
    let src = rand_tensor(&[2, 3], DType::F32, 7);
    let mut dev = dev;
    dev.copy_from(&src).unwrap();
    let p = layout::permute(&dev, &[1, 0]).unwrap();
    assert_eq!(p.device(), dev.device());
    assert_eq!(
        p.to_host().unwrap(),
        layout::permute(&src, &[1, 0]).unwrap()
    );
}

#[test]
fn permute_view_matches_permute_of_reshaped_copy() {
    let t = Tensor::from_vec1((0..120i32).collect::<Vec<_>>());
    for (view, perm) in [
        (vec![2usize, 3, 4, 5], vec![2usize, 0, 3, 1]),
        (vec![4, 30], vec![1, 0]),
        (vec![2, 2, 2, 15], vec![1, 0, 2, 3]),
    ] {
        let want = layout::permute(
            &t.try_clone().unwrap().reshape(view.clone()).unwrap(),
            &perm,
        )
        .unwrap();
        assert_eq!(
            layout::permute_view(&t, &view, &perm).unwrap(),
            want,
            "{view:?} {perm:?}"
        );
    }
    assert!(layout::permute_view(&t, &[7, 3], &[1, 0]).is_err());
}

//! Multi-process tests: every scenario runs in real processes started by the
//! project's launcher. The launched processes re-enter this test binary
//! through the ignored `worker_entry` test with `PS_SCENARIO` set (the
//! crate's shared harness, tests/common).

mod common;

use std::sync::Arc;
use std::time::Duration;

use parallel_state as ps;
use parallel_state::{
    CommError, DType, Device, GroupCoordinator, InitOptions, ParallelState, ReduceOp, Tensor,
    TensorDict, Value, MAX_DICT_DEPTH,
};

/// Launches `scenario` on `nproc` ranks through the shared harness
/// (tests/common), which requires every rank to finish it.
fn run(scenario: &str, nproc: usize, env: &[(&str, &str)]) {
    common::run("worker_entry", scenario, nproc, env);
}

#[test]
#[ignore = "entry point of the processes the other tests launch"]
fn worker_entry() {
    let scenario = common::scenario().expect("PS_SCENARIO is set by the launching test");
    // Scenarios of the global (FastVideo-named) layer build the process-wide
    // state themselves.
    let global: Option<fn()> = match scenario.as_str() {
        "reinit" => Some(reinit),
        "maybe_init" => Some(maybe_init),
        "names" => Some(names),
        "destroy" => Some(destroy),
        "helpers" => Some(helpers),
        "custom_all_reduce" => Some(custom_all_reduce),
        _ => None,
    };
    if let Some(f) = global {
        f();
        let rank = ps::get_world_rank().unwrap();
        // Nobody tears down the store (hosted by rank 0) while another rank
        // still needs it.
        ps::get_world_group().unwrap().barrier().unwrap();
        ps::cleanup_dist_env_and_memory();
        println!("PS_OK {scenario} rank {rank}");
        return;
    }
    let ps = ParallelState::init_from_env(
        InitOptions::default()
            .with_timeout(Duration::from_secs(if scenario == "absent" {
                3
            } else {
                60
            }))
            .with_message_queue(scenario == "mq"),
    )
    .expect("init");
    match scenario.as_str() {
        "a2a" => a2a(&ps),
        "a2a_uneven" => a2a_uneven(&ps),
        "gather" => gather(&ps),
        "dicts" => dicts(&ps),
        "send_dicts" => send_dicts(&ps),
        "shard" => shard(&ps),
        "single" => single(&ps),
        "dict_values" => dict_values(&ps),
        "concurrent" => concurrent(&ps),
        "block" => block(&ps),
        "errors" => errors(&ps),
        "layout8" => layout8(&ps),
        "mq" => mq(&ps),
        "absent" => absent(&ps),
        "abandon" => abandon(&ps),
        other => panic!("unknown scenario {other}"),
    }
    println!("PS_OK {scenario} rank {}", ps.rank());
}

fn narrow(t: &Tensor, dim: usize, start: usize, len: usize) -> Tensor {
    parallel_state::core::layout::narrow(t, dim as isize, start, len).unwrap()
}

fn cat(parts: &[Tensor], dim: usize) -> Tensor {
    parallel_state::core::layout::cat(parts, dim as isize).unwrap()
}

/// A deterministic tensor whose values are small integers (exact in f32).
fn det(shape: &[usize], seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(
        (0..n)
            .map(|i| ((i * 7 + seed * 13) % 1009) as f32)
            .collect::<Vec<_>>(),
        shape.to_vec(),
    )
    .unwrap()
}

/// Element `[b, s, h, d]` of a `[B, S, H, D]` row-major tensor.
fn at(t: &[f32], shape: [usize; 4], i: [usize; 4]) -> f32 {
    t[((i[0] * shape[1] + i[1]) * shape[2] + i[2]) * shape[3] + i[3]]
}

fn sp_world(ps: &ParallelState) -> std::sync::Arc<GroupCoordinator> {
    ps.initialize_model_parallel(1, ps.world_size(), None)
        .unwrap();
    ps.sp_group().unwrap()
}

fn a2a(ps: &ParallelState) {
    let g = sp_world(ps);
    let (p, r) = (g.world_size(), g.rank_in_group());
    let (b, sl, h, d) = (2, 3, 2 * p, 5);
    let s = sl * p;
    let full = det(&[b, s, h, d], 1);
    let fv = full.to_vec::<f32>().unwrap();
    // Mode (2,1): my sequence shard in, full sequence and my head block out.
    let mine = narrow(&full, 1, r * sl, sl);
    let out = g.all_to_all_4d(&mine, 2, 1).unwrap();
    assert_eq!(out.shape(), &[b, s, h / p, d]);
    let ov = out.to_vec::<f32>().unwrap();
    for bi in 0..b {
        for si in 0..s {
            for hi in 0..h / p {
                for di in 0..d {
                    let got = at(&ov, [b, s, h / p, d], [bi, si, hi, di]);
                    let want = at(&fv, [b, s, h, d], [bi, si, r * h / p + hi, di]);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "(2,1) at {bi},{si},{hi},{di}"
                    );
                }
            }
        }
    }
    // Mode (1,2) after (2,1) is the identity, bit for bit.
    let back = g.all_to_all_4d(&out, 1, 2).unwrap();
    assert_eq!(back, mine);
    // Every dtype moves bit-exactly.
    for dt in DType::ALL {
        let n = b * sl * h * d;
        let bytes: Vec<u8> = (0..n * dt.size()).map(|i| (i * 31 + r * 7) as u8).collect();
        let x = Tensor::from_bytes(&bytes, [b, sl, h, d], dt).unwrap();
        let y = g.all_to_all_4d(&x, 2, 1).unwrap();
        assert_eq!(g.all_to_all_4d(&y, 1, 2).unwrap(), x, "{dt}");
    }
    // Bad pairs and non-divisible sizes are errors on every rank.
    assert!(matches!(
        g.all_to_all_4d(&mine, 1, 3),
        Err(CommError::InvalidArgument(_))
    ));
    if p > 1 {
        let odd = det(&[1, 2, p + 1, 1], 0);
        assert!(matches!(
            g.all_to_all_4d(&odd, 2, 1),
            Err(CommError::ShapeMismatch { .. })
        ));
        let odd = det(&[1, p + 1, 2, 1], 0);
        assert!(matches!(
            g.all_to_all_4d(&odd, 1, 2),
            Err(CommError::ShapeMismatch { .. })
        ));
    }
}

fn a2a_uneven(ps: &ParallelState) {
    let g = sp_world(ps);
    let (p, r) = (g.world_size(), g.rank_in_group());
    let (b, h, d) = (2, 2 * p + 1, 3); // heads do not divide
    let seqs: Vec<usize> = (0..p).map(|i| 2 + i).collect(); // every rank a different length
    let s: usize = seqs.iter().sum();
    let full = det(&[b, s, h, d], 5);
    let fv = full.to_vec::<f32>().unwrap();
    let off: usize = seqs[..r].iter().sum();
    let mine = narrow(&full, 1, off, seqs[r]);
    let out = g.all_to_all_4d_uneven(&mine, 2, 1, None).unwrap();
    let hs: Vec<usize> = (0..p).map(|i| h / p + usize::from(i < h % p)).collect();
    let hoff: usize = hs[..r].iter().sum();
    assert_eq!(out.shape(), &[b, s, hs[r], d]);
    let ov = out.to_vec::<f32>().unwrap();
    for bi in 0..b {
        for si in 0..s {
            for hi in 0..hs[r] {
                for di in 0..d {
                    assert_eq!(
                        at(&ov, [b, s, hs[r], d], [bi, si, hi, di]).to_bits(),
                        at(&fv, [b, s, h, d], [bi, si, hoff + hi, di]).to_bits()
                    );
                }
            }
        }
    }
    let back = g.all_to_all_4d_uneven(&out, 1, 2, Some(&seqs)).unwrap();
    assert_eq!(back, mine, "uneven (1,2) inverts (2,1)");
}

fn gather(ps: &ParallelState) {
    let g = sp_world(ps);
    let (p, r) = (g.world_size(), g.rank_in_group());
    let shape = [2usize, 3, 4];
    let x = det(&shape, r);
    let parts: Vec<Tensor> = (0..p).map(|i| det(&shape, i)).collect();
    for dim in [0isize, 1, 2, -1, -2, -3] {
        let d = if dim < 0 {
            (3 + dim) as usize
        } else {
            dim as usize
        };
        let expected = cat(&parts, d);
        assert_eq!(
            g.all_gather(&x, dim).unwrap(),
            expected,
            "all_gather dim {dim}"
        );
        for dst in 0..p {
            let got = g.gather(&x, dst, dim).unwrap();
            if r == dst {
                assert_eq!(got.unwrap(), expected, "gather dim {dim} dst {dst}");
            } else {
                assert!(got.is_none());
            }
        }
    }
    assert!(matches!(
        g.all_gather(&x, 3),
        Err(CommError::InvalidArgument(_))
    ));
    // reduce_scatter along a dim: my block of the sum.
    let y = det(&[2, 2 * p, 3], 3);
    let out = g.reduce_scatter(&y, 1, ReduceOp::Sum).unwrap();
    let want = narrow(&y, 1, 2 * r, 2);
    let wv: Vec<f32> = want
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|v| v * p as f32)
        .collect();
    assert_eq!(out.to_vec::<f32>().unwrap(), wv);
    // Objects.
    let payload = vec![7u32, 8, 9];
    let v: Vec<u32> = g
        .broadcast_object((r == p - 1).then_some(&payload), p - 1)
        .unwrap();
    assert_eq!(v, [7, 8, 9]);
    let list = ["x".to_string(), "y".into()];
    let l: Vec<String> = g
        .broadcast_object_list((r == 0).then_some(&list[..]), 0)
        .unwrap();
    assert_eq!(l, ["x", "y"]);
    if p > 1 {
        if r == 0 {
            g.send_object(&("hello".to_string(), 42u64), 1).unwrap();
        } else if r == 1 {
            let got: (String, u64) = g.recv_object(0).unwrap();
            assert_eq!(got, ("hello".to_string(), 42));
        }
    }
    g.barrier().unwrap();
}

fn mixed_dict(r: usize) -> TensorDict {
    let mut d = TensorDict::new();
    d.insert("hidden", det(&[2, 3], 4 + r));
    d.insert("empty", Tensor::zeros([0, 5], DType::BF16));
    d.insert("step", 12i64);
    d.insert("name", "unet");
    d.insert("none", Value::None);
    d.insert("ids", Tensor::from_vec1(vec![1i64, -2, 3]));
    d.insert("scale", 0.5f64);
    d
}

fn dicts(ps: &ParallelState) {
    let g = sp_world(ps);
    let (p, r) = (g.world_size(), g.rank_in_group());
    let src = p - 1;
    let got = g
        .broadcast_tensor_dict(
            if r == src {
                Some(mixed_dict(src))
            } else {
                None
            },
            src,
        )
        .unwrap();
    let want = mixed_dict(src);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    assert_eq!(got, want);
    assert_eq!(got.tensor("empty").unwrap().shape(), &[0, 5]);
    assert_eq!(got.tensor("empty").unwrap().dtype(), DType::BF16);
}

fn send_dicts(ps: &ParallelState) {
    // World 4 as tp=2 x sp=2 (FastVideo layout): pipeline-style transfer from
    // dp group rank 0 to dp group rank 1 ({0,2} and {1,3}), with the tp group
    // as the all-gather group.
    ps.initialize_model_parallel(2, 2, None).unwrap();
    let tp = ps.tp_group().unwrap();
    let dp = ps.dp_group().unwrap();
    let mut d = TensorDict::new();
    d.insert("div", det(&[4, 6], 1)); // 24 elements: travels sliced
    d.insert("odd", det(&[7], 2)); // 7 elements: travels whole
    d.insert("k", 3i64);
    let want = {
        let mut w = TensorDict::new();
        w.insert("div", det(&[4, 6], 1));
        w.insert("odd", det(&[7], 2));
        w.insert("k", 3i64);
        w
    };
    for ag in [None, Some(&*tp)] {
        if dp.rank_in_group() == 0 {
            dp.send_tensor_dict(&d, Some(1), ag).unwrap();
        } else {
            let got = dp.recv_tensor_dict(Some(0), ag).unwrap();
            assert_eq!(
                got.as_ref(),
                Some(&want),
                "all_gather_group {}",
                ag.is_some()
            );
        }
    }
}

/// `shard` is FastVideo's exact split where the length divides and an
/// error naming the padding functions where it does not; `shard_with_pad`
/// pads (zeros at the end) and `all_gather_with_unpad` inverts it.
fn shard(ps: &ParallelState) {
    let g = sp_world(ps);
    let (p, r) = (g.world_size(), g.rank_in_group());
    // A dividing length: rows [r * len / p, (r + 1) * len / p), both ways.
    let even = det(&[2, 3 * p, 3], 4);
    let (s, len) = g.shard(&even, 1).unwrap();
    assert_eq!(
        (s.clone_checked(), len),
        (narrow(&even, 1, 3 * r, 3), 3 * p)
    );
    assert_eq!(
        g.shard_with_pad(&even, 1).unwrap(),
        (s.clone_checked(), 3 * p)
    );
    assert_eq!(g.shard(&even, -2).unwrap().0, s);
    assert_eq!(g.all_gather_with_unpad(&s, 1, len).unwrap(), even);
    // A length that does not divide: an error pointing to the padding.
    let len = if p == 2 { 7 } else { 13 };
    let x = det(&[2, len, 3], 9);
    match g.shard(&x, 1) {
        Err(CommError::ShapeMismatch { actual, .. }) => {
            assert!(
                actual.contains("shard_with_pad")
                    && actual.contains("sequence_model_parallel_shard"),
                "{actual}"
            );
        }
        other => panic!("shard of {len} over {p}: {other:?}"),
    }
    let (s, orig) = g.shard_with_pad(&x, 1).unwrap();
    let per = len.div_ceil(p);
    assert_eq!((s.shape().to_vec(), orig), (vec![2, per, 3], len));
    // Rows past the end are zero padding.
    let sv = s.to_vec::<f32>().unwrap();
    let xv = x.to_vec::<f32>().unwrap();
    for bi in 0..2 {
        for row in 0..per {
            for c in 0..3 {
                let gl = r * per + row;
                let want = if gl < len {
                    xv[(bi * len + gl) * 3 + c]
                } else {
                    0.0
                };
                assert_eq!(sv[(bi * per + row) * 3 + c], want);
            }
        }
    }
    assert_eq!(g.all_gather_with_unpad(&s, 1, orig).unwrap(), x);
    assert_eq!(g.all_gather_with_unpad(&s, -2, orig).unwrap(), x);
}

/// A tensor copy for comparisons (`Tensor` is not `Clone`: copies are explicit).
trait CloneChecked {
    fn clone_checked(&self) -> Tensor;
}
impl CloneChecked for Tensor {
    fn clone_checked(&self) -> Tensor {
        self.try_clone().unwrap()
    }
}

fn concurrent(ps: &ParallelState) {
    ps.initialize_model_parallel(2, 2, None).unwrap();
    let r = ps.rank();
    let groups = [
        ps.world_group(),
        ps.tp_group().unwrap(),
        ps.sp_group().unwrap(),
        ps.dp_group().unwrap(),
    ];
    for round in 0..20usize {
        for (gi, g) in groups.iter().enumerate() {
            let mut t = Tensor::from_vec1(vec![(r * 100 + round * 10 + gi) as i64; 33]);
            g.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            let want: i64 = g
                .ranks()
                .iter()
                .map(|&m| (m * 100 + round * 10 + gi) as i64)
                .sum();
            assert!(
                t.to_vec::<i64>().unwrap().iter().all(|&v| v == want),
                "group {} round {round}",
                g.name()
            );
            let x = Tensor::from_vec1(vec![(r * 1000 + round) as i32]);
            let all = g.all_gather(&x, 0).unwrap();
            let want: Vec<i32> = g
                .ranks()
                .iter()
                .map(|&m| (m * 1000 + round) as i32)
                .collect();
            assert_eq!(all.to_vec::<i32>().unwrap(), want);
        }
    }
}

fn layout8(ps: &ParallelState) {
    ps.initialize_model_parallel(2, 4, Some(2)).unwrap();
    let r = ps.rank();
    assert_eq!(ps.tp_group().unwrap().ranks(), &[r / 2 * 2, r / 2 * 2 + 1]);
    assert_eq!(
        ps.sp_group().unwrap().ranks(),
        &(r / 4 * 4..r / 4 * 4 + 4).collect::<Vec<_>>()[..]
    );
    assert_eq!(ps.dp_group().unwrap().ranks(), &[r % 4, r % 4 + 4]);
    let sp = ps.sp_group().unwrap();
    assert_eq!(sp.next_rank(), sp.ranks()[(sp.rank_in_group() + 1) % 4]);
    assert_eq!(sp.prev_rank(), sp.ranks()[(sp.rank_in_group() + 3) % 4]);
    assert_eq!(sp.is_first_rank(), r.is_multiple_of(4));
    assert_eq!(sp.is_last_rank(), r % 4 == 3);
    ps.initialize_ulysses_ring(2).unwrap();
    let base = r / 4 * 4;
    assert_eq!(
        ps.ulysses_group().unwrap().ranks(),
        &[base + (r % 4) / 2 * 2, base + (r % 4) / 2 * 2 + 1]
    );
    assert_eq!(
        ps.ring_group().unwrap().ranks(),
        &[base + r % 2, base + r % 2 + 2]
    );
    let mut t = Tensor::from_vec1(vec![r as i32]);
    ps.ring_group()
        .unwrap()
        .all_reduce(&mut t, ReduceOp::Max)
        .unwrap();
    assert_eq!(t.to_vec::<i32>().unwrap(), [(base + r % 2 + 2) as i32]);
    assert!(matches!(
        ps.initialize_model_parallel(2, 4, None),
        Err(CommError::State(_))
    ));
}

fn errors(ps: &ParallelState) {
    let g = sp_world(ps);
    let r = g.rank_in_group();
    let x = det(&[3], 0);
    assert!(matches!(
        g.send(&x, Some(r)),
        Err(CommError::InvalidArgument(_))
    ));
    assert!(matches!(
        g.recv(&[3], DType::F32, Some(r)),
        Err(CommError::InvalidArgument(_))
    ));
    assert!(matches!(
        g.send(&x, Some(99)),
        Err(CommError::InvalidArgument(_))
    ));
    assert!(matches!(
        g.broadcast_object::<u8>(None, 99),
        Err(CommError::InvalidArgument(_))
    ));
    assert!(matches!(
        g.send_object(&1u8, r),
        Err(CommError::InvalidArgument(_))
    ));
    // Point to point with the default ring neighbours still works afterwards.
    let mine = Tensor::from_vec1(vec![r as f64; 5]);
    if r.is_multiple_of(2) {
        g.send(&mine, None).unwrap();
        let got = g.recv(&[5], DType::F64, None).unwrap();
        assert_eq!(
            got.to_vec::<f64>().unwrap(),
            vec![((r + g.world_size() - 1) % g.world_size()) as f64; 5]
        );
    } else {
        let got = g.recv(&[5], DType::F64, None).unwrap();
        g.send(&mine, None).unwrap();
        assert_eq!(got.to_vec::<f64>().unwrap(), vec![(r - 1) as f64; 5]);
    }
}

fn mq(ps: &ParallelState) {
    let g = ps.world_group();
    assert!(
        g.uses_message_queue(),
        "world group on one host should use the message queue"
    );
    let r = g.rank_in_group();
    // Sizes from tiny to larger than the 1 MiB ring; every value checked.
    for (i, n) in [0usize, 1, 200, 4096, 3 << 20, 17].into_iter().enumerate() {
        let payload: Vec<u8> = (0..n).map(|k| (k * 31 + i) as u8).collect();
        let got: Vec<u8> = g.broadcast_object((r == 0).then_some(&payload), 0).unwrap();
        assert_eq!(got, payload, "message {i} of {n} bytes");
    }
    // Another source falls back to the collective path.
    let v: String = g
        .broadcast_object((r == 1).then_some(&"from one".to_string()), 1)
        .unwrap();
    assert_eq!(v, "from one");
}

/// World 4, tp=2 x sp=2: dp groups are {0,2} and {1,3}. Rank 3 never joins
/// the dp all-reduce; rank 1 must fail by its 3 s deadline with a Timeout
/// that names global rank 3, while the other dp group is unaffected.
fn absent(ps: &ParallelState) {
    ps.initialize_model_parallel(2, 2, None).unwrap();
    let dp = ps.dp_group().unwrap();
    let mut t = Tensor::from_vec1(vec![1.0f32; 64]);
    match ps.rank() {
        1 => {
            let start = std::time::Instant::now();
            let err = dp.all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
            let waited = start.elapsed();
            let text = err.to_string();
            assert!(matches!(err, CommError::Timeout { .. }), "{text}");
            assert!(text.contains("global rank 3"), "{text}");
            assert!(waited < Duration::from_secs(20), "failed after {waited:?}");
            println!("rank 1 failed after {waited:?}: {text}");
            ps.store().set("absent/done", b"1").unwrap();
        }
        // Stays alive (so the failure is a Timeout, not PeerLost) until rank 1 has seen it.
        3 => {
            ps.store()
                .get("absent/done", Duration::from_secs(60))
                .unwrap();
        }
        _ => {
            dp.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            assert_eq!(t.to_vec::<f32>().unwrap(), vec![2.0; 64]);
        }
    }
}

/// Rank 1 gives up on the world group because of a failure elsewhere (as
/// `ParallelState` does when its node group's set-up fails after the world
/// group was built) that blames rank 2. Ranks 0 and 2, waiting in a barrier
/// on the world group, fail at once naming rank 2 (sent by rank 1), not
/// rank 1 for leaving.
fn abandon(ps: &ParallelState) {
    use parallel_state::core::Missing;
    let world = ps.world_group();
    let done = |r: usize| format!("abandon/done/{r}");
    if ps.rank() == 1 {
        let why = CommError::timeout_ranks(
            "set-up of another group",
            Duration::from_secs(5),
            vec![Missing::new(2, "did not open its control connection")],
        );
        world.abort_for(&why);
        // Later calls here fail with that error.
        let again = world.barrier().unwrap_err();
        assert!(
            again
                .to_string()
                .contains("did not open its control connection"),
            "{again}"
        );
    } else {
        let err = world.barrier().unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, CommError::PeerAborted { peer, .. } if peer.group == 1),
            "{text}"
        );
        let blamed: Vec<usize> = err.culprits().iter().map(|r| r.group).collect();
        assert_eq!(blamed, vec![2], "{text}");
    }
    // Rank 0 hosts the store: it leaves last.
    ps.store().set(&done(ps.rank()), b"1").unwrap();
    if ps.rank() == 0 {
        ps.store()
            .wait(&[&done(1), &done(2)], Duration::from_secs(60))
            .unwrap();
    }
}

// ------------------------------------------------------ FastVideo parity (issue 12)

fn env_usize(k: &str) -> usize {
    std::env::var(k)
        .unwrap_or_else(|_| panic!("{k} is set by the launcher"))
        .parse()
        .unwrap()
}

/// `init_distributed_environment` from the launcher's variables.
fn init_global(backend: Option<&str>) -> (usize, usize, usize) {
    let (w, r, lr) = (
        env_usize("WORLD_SIZE"),
        env_usize("RANK"),
        env_usize("LOCAL_RANK"),
    );
    ps::init_distributed_environment(w, r, "env://", Some(lr), backend).unwrap();
    (w, r, lr)
}

fn state_error(r: ps::Result<()>) -> String {
    match r {
        Err(CommError::State(m)) => m,
        other => panic!("expected a State error, got {other:?}"),
    }
}

fn sum_over(g: &GroupCoordinator, value: i64) -> i64 {
    let mut t = Tensor::from_vec1(vec![value; 3]);
    g.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    let v = t.to_vec::<i64>().unwrap();
    assert!(v.iter().all(|&x| x == v[0]));
    v[0]
}

/// Item 1: a repeated `init_distributed_environment` is a no-op when it
/// agrees and an error naming both values when it does not.
fn reinit() {
    let (w, r, lr) = init_global(Some("tcp"));
    let world = ps::get_world_group().unwrap();
    // Agreeing calls (the backend by an alias, or left open; another init
    // method is not compared) change nothing.
    ps::init_distributed_environment(w, r, "env://", Some(lr), Some("tcp")).unwrap();
    ps::init_distributed_environment(w, r, "env://", None, Some("gloo")).unwrap();
    ps::init_distributed_environment(w, r, "tcp://127.0.0.1:1", None, None).unwrap();
    assert!(Arc::ptr_eq(&world, &ps::get_world_group().unwrap()));
    let e = state_error(ps::init_distributed_environment(
        w + 1,
        r,
        "env://",
        Some(lr),
        None,
    ));
    assert!(
        e.contains(&format!("world_size: initialized with {w}, now {}", w + 1)),
        "{e}"
    );
    let other = (r + 1) % w;
    let e = state_error(ps::init_distributed_environment(
        w, other, "env://", None, None,
    ));
    assert!(
        e.contains(&format!("rank: initialized with {r}, now {other}")),
        "{e}"
    );
    let e = state_error(ps::init_distributed_environment(
        w,
        r,
        "env://",
        Some(lr + 5),
        None,
    ));
    assert!(
        e.contains(&format!(
            "local_rank: initialized with {lr}, now {}",
            lr + 5
        )),
        "{e}"
    );
    let e = state_error(ps::init_distributed_environment(
        w,
        r,
        "env://",
        None,
        Some("shm"),
    ));
    assert!(
        e.contains("backend: initialized with `tcp`, now `shm`"),
        "{e}"
    );
    // Two differences at once are both named.
    let e = state_error(ps::init_distributed_environment(
        w + 1,
        other,
        "env://",
        None,
        None,
    ));
    assert!(e.contains("world_size") && e.contains("rank: "), "{e}");
    // The environment still works, on the forced backend.
    assert!(Arc::ptr_eq(&world, &ps::get_world_group().unwrap()));
    assert_eq!(world.host_backend(), "tcp");
    assert_eq!(sum_over(&world, r as i64 + 1), (w * (w + 1) / 2) as i64);
}

/// Item 2: `maybe_init_distributed_environment_and_model_parallel` with
/// other sizes than the existing groups is an error naming both.
fn maybe_init() {
    ps::maybe_init_distributed_environment_and_model_parallel(1, 2).unwrap();
    let sp = ps::get_sp_group().unwrap();
    ps::maybe_init_distributed_environment_and_model_parallel(1, 2).unwrap();
    assert!(
        Arc::ptr_eq(&sp, &ps::get_sp_group().unwrap()),
        "same sizes keep the groups"
    );
    let e = state_error(ps::maybe_init_distributed_environment_and_model_parallel(
        2, 2,
    ));
    assert!(
        e.contains("tensor_parallel_size 2 requested, but the groups exist with 1"),
        "{e}"
    );
    let e = state_error(ps::maybe_init_distributed_environment_and_model_parallel(
        1, 1,
    ));
    assert!(
        e.contains("sequence_parallel_size 1 requested, but the groups exist with 2"),
        "{e}"
    );
    let e = state_error(ps::maybe_init_distributed_environment_and_model_parallel(
        2, 1,
    ));
    assert!(e.contains("tensor_parallel_size 2") && e.contains("sequence_parallel_size 1"));
    // The groups are unchanged.
    assert!(Arc::ptr_eq(&sp, &ps::get_sp_group().unwrap()));
    assert_eq!(
        (
            ps::get_tp_world_size().unwrap(),
            ps::get_sp_world_size().unwrap()
        ),
        (1, 2)
    );
    assert_eq!(sum_over(&sp, 5), 10);
}

/// Item 3: FastVideo's group names `tp_{suffix}` / `sp_{suffix}`, and
/// name-based all_reduce over them.
fn names() {
    let (w, r, _) = init_global(None);
    assert_eq!(w, 4);
    let tp = ps::initialize_tensor_parallel_group(2, "model1").unwrap();
    assert_eq!(tp.name(), "tp_model1:0");
    assert_eq!(tp.ranks(), &[r / 2 * 2, r / 2 * 2 + 1]);
    let sp = ps::initialize_sequence_parallel_group(4, "vae").unwrap();
    assert_eq!(sp.name(), "sp_vae:0");
    assert_eq!(
        ps::initialize_tensor_parallel_group(2, "").unwrap().name(),
        "tp:0"
    );
    assert_eq!(
        ps::initialize_sequence_parallel_group(2, "")
            .unwrap()
            .name(),
        "sp:0"
    );
    assert_eq!(
        ps::initialize_tensor_parallel_group(2, "model1")
            .unwrap()
            .name(),
        "tp_model1:1"
    );
    let mut t = Tensor::from_vec1(vec![r as f32 + 1.0; 4]);
    ps::all_reduce(&mut t, "tp_model1:0").unwrap();
    let pair = (r / 2 * 2 + 1 + r / 2 * 2 + 2) as f32;
    assert_eq!(t.to_vec::<f32>().unwrap(), vec![pair; 4]);
    let mut t = Tensor::from_vec1(vec![r as f32 + 1.0; 4]);
    ps::all_reduce(&mut t, "sp_vae:0").unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), vec![10.0; 4]);
    // The old spelling names no group.
    assert!(matches!(
        ps::all_reduce(&mut t, "tpmodel1:0"),
        Err(CommError::InvalidArgument(_))
    ));
    // Explicit state too.
    let st = ps::global_state().unwrap();
    assert_eq!(st.group_by_name("tp_model1:0").unwrap().ranks(), tp.ranks());
}

/// Item 4: every operation of a one-member group returns its input after
/// the usual checks; tensor dicts do not communicate. World 2 as tp=1,
/// sp=2: the TP and DP groups have one member each.
fn single(st: &ParallelState) {
    st.initialize_model_parallel(1, 2, None).unwrap();
    let g = st.tp_group().unwrap();
    let r = st.rank();
    assert_eq!((g.world_size(), g.ranks()), (1, &[r][..]));
    assert_eq!(st.dp_group().unwrap().world_size(), 1);
    assert_eq!(g.device(), st.local_device());
    let invalid = |res: ps::Result<()>, what: &str| {
        assert!(
            matches!(res, Err(CommError::InvalidArgument(_))),
            "{what}: {res:?}"
        )
    };
    let x = det(&[2, 3, 4], r);
    // Flat collectives.
    for op in ReduceOp::ALL {
        let mut y = x.clone_checked();
        g.all_reduce(&mut y, op).unwrap();
        assert_eq!(y, x, "{op:?}");
    }
    let mut y = x.clone_checked();
    g.broadcast(&mut y, 0).unwrap();
    assert_eq!(y, x);
    invalid(g.broadcast(&mut y, 1), "broadcast from group rank 1");
    g.barrier().unwrap();
    // Along a dimension.
    for dim in [0isize, 1, 2, -1] {
        assert_eq!(g.all_gather(&x, dim).unwrap(), x, "all_gather {dim}");
        assert_eq!(g.gather(&x, 0, dim).unwrap().unwrap(), x, "gather {dim}");
        assert_eq!(g.reduce_scatter(&x, dim, ReduceOp::Sum).unwrap(), x);
        assert_eq!(
            g.shard(&x, dim).unwrap(),
            (x.clone_checked(), x.shape()[dim.rem_euclid(3) as usize])
        );
        assert_eq!(g.shard_with_pad(&x, dim).unwrap().0, x);
    }
    let mut out = x.zeros_like().unwrap();
    g.all_gather_into(&x, 1, &mut out).unwrap();
    assert_eq!(out, x);
    assert!(matches!(
        g.all_gather(&x, 3),
        Err(CommError::InvalidArgument(_))
    ));
    assert!(matches!(
        g.gather(&x, 1, 0),
        Err(CommError::InvalidArgument(_))
    ));
    assert_eq!(g.all_gather_with_unpad(&x, 1, 3).unwrap(), x);
    // Ulysses.
    let x4 = det(&[2, 3, 5, 2], r);
    assert_eq!(g.all_to_all_4d(&x4, 2, 1).unwrap(), x4);
    assert_eq!(g.all_to_all_4d(&x4, 1, 2).unwrap(), x4);
    assert_eq!(g.all_to_all_4d_uneven(&x4, 2, 1, None).unwrap(), x4);
    assert!(matches!(
        g.all_to_all_4d(&x4, 0, 1),
        Err(CommError::InvalidArgument(_))
    ));
    // Ring: one step on the member's own block.
    let (mut block, mut spare) = (vec![r as i32; 4], vec![0i32; 4]);
    let mut seen = Vec::new();
    let times = g
        .ring_pass(&mut block, &mut spare, |step, b| {
            seen.push((step, b[0]));
            Ok(())
        })
        .unwrap();
    assert_eq!((seen, times.exchanges), (vec![(0, r as i32)], 0));
    // Objects.
    let v: Vec<String> = g.broadcast_object(Some(&vec!["a".to_string()]), 0).unwrap();
    assert_eq!(v, ["a"]);
    let l: Vec<u8> = g.broadcast_object_list(Some(&[1u8, 2][..]), 0).unwrap();
    assert_eq!(l, [1, 2]);
    assert!(matches!(
        g.broadcast_object::<u8>(None, 0),
        Err(CommError::InvalidArgument(_))
    ));
    // Tensor dicts: the dict back (broadcast), nothing sent, `None` received.
    let d = nested_dict(r);
    assert_eq!(g.broadcast_tensor_dict(Some(nested_dict(r)), 0).unwrap(), d);
    g.send_tensor_dict(&d, None, None).unwrap();
    g.send_tensor_dict(&d, Some(0), Some(&g)).unwrap();
    assert_eq!(g.recv_tensor_dict(None, None).unwrap(), None);
    assert_eq!(g.recv_tensor_dict(Some(0), Some(&g)).unwrap(), None);
    invalid(
        g.send_tensor_dict(&d, Some(1), None),
        "send_tensor_dict to group rank 1",
    );
    invalid(
        g.recv_tensor_dict(Some(1), None).map(|_| ()),
        "recv_tensor_dict from 1",
    );
    invalid(
        g.send_tensor_dict(&too_deep(), None, None),
        "a dict too deep",
    );
    // Point to point needs a peer; a group of one has none.
    invalid(g.send(&x, None), "send");
    invalid(g.recv(&[2, 3, 4], DType::F32, None).map(|_| ()), "recv");
    invalid(g.send_object(&1u8, 0), "send_object");
    invalid(g.recv_object::<u8>(0).map(|_| ()), "recv_object");
    assert!(!g.graph_capture().unwrap().is_cuda());
    assert_eq!(st.get_same_node_ranks(&g, 0).unwrap(), [r]);
    // The two-member SP group beside them is unaffected.
    assert_eq!(sum_over(&st.sp_group().unwrap(), r as i64), 1);
}

/// Nested values at every level, tensors inside lists and dicts included.
fn nested_dict(seed: usize) -> TensorDict {
    let mut deeper = TensorDict::new();
    deeper.insert("x", det(&[3, 2], seed + 1));
    deeper.insert("scale", 0.25f32);
    let mut nested = TensorDict::new();
    nested.insert("dtype", DType::BF16);
    nested.insert("empty", Tensor::zeros([0, 3], DType::BF16));
    nested.insert("deeper", deeper);
    let mut d = TensorDict::new();
    d.insert("latents", det(&[2, 5], seed));
    d.insert(
        "list",
        vec![
            Value::Int(-3),
            Value::Float(1.5),
            Value::Tensor(Tensor::from_vec1(vec![7i64, -8, 9])),
            Value::Str("text".into()),
            Value::List(vec![]),
        ],
    );
    d.insert(
        "tuple",
        Value::Tuple(vec![
            Value::Int(4),
            Value::Tuple(vec![Value::Bool(true), Value::None]),
        ]),
    );
    d.insert("nested", nested);
    d.insert(
        "dtypes",
        DType::ALL.into_iter().map(Value::from).collect::<Vec<_>>(),
    );
    d.insert("object", Value::encode(&("pickled", 12u32)).unwrap());
    d.insert("nothing", Option::<i64>::None);
    d
}

/// A dict whose value nests one level deeper than may travel.
fn too_deep() -> TensorDict {
    let mut v = Value::Tensor(det(&[1], 0));
    for _ in 0..MAX_DICT_DEPTH {
        v = Value::List(vec![v]);
    }
    let mut d = TensorDict::new();
    d.insert("deep", v);
    d
}

/// Item 7: lists, tuples, nested dicts, dtypes and serde objects travel in
/// tensor dicts, tensors at any depth; a dict too deep is refused by the
/// sender before anything is sent.
fn dict_values(st: &ParallelState) {
    let g = sp_world(st);
    let (p, r) = (g.world_size(), g.rank_in_group());
    let src = p - 1;
    let got = g
        .broadcast_tensor_dict((r == src).then(|| nested_dict(src)), src)
        .unwrap();
    assert_eq!(got, nested_dict(src));
    let Some(Value::List(list)) = got.get("list") else {
        panic!("list lost: {got:?}")
    };
    assert_eq!(list[2], Value::Tensor(Tensor::from_vec1(vec![7i64, -8, 9])));
    assert_eq!(
        got.get("object")
            .unwrap()
            .decode::<(String, u32)>()
            .unwrap(),
        ("pickled".to_string(), 12)
    );
    // Point to point, 0 -> 1.
    match r {
        0 => g.send_tensor_dict(&nested_dict(0), Some(1), None).unwrap(),
        1 => assert_eq!(
            g.recv_tensor_dict(Some(0), None).unwrap(),
            Some(nested_dict(0))
        ),
        _ => {}
    }
    // Too deep: the sender fails at once with the key path; nothing
    // travels, so the others do not take part and the group stays usable.
    if r == 0 {
        for e in [
            g.send_tensor_dict(&too_deep(), Some(1), None).unwrap_err(),
            g.broadcast_tensor_dict(Some(too_deep()), 0).unwrap_err(),
        ] {
            let text = e.to_string();
            assert!(matches!(e, CommError::InvalidArgument(_)), "{text}");
            assert!(
                text.contains("`deep/0/0")
                    && text.contains(&format!("deeper than {MAX_DICT_DEPTH}")),
                "{text}"
            );
        }
    }
    let got = g
        .broadcast_tensor_dict((r == 0).then(|| nested_dict(0)), 0)
        .unwrap();
    assert_eq!(got, nested_dict(0));
}

/// Item 6: `destroy_model_parallel` destroys the node group too; it is
/// built again by the next initialization or by `init_node_group`.
fn destroy() {
    ps::maybe_init_distributed_environment_and_model_parallel(1, 2).unwrap();
    let lr = env_usize("LOCAL_RANK");
    let node = ps::get_node_group().unwrap();
    assert_eq!((node.name(), node.ranks()), ("node:0", &[0, 1][..]));
    assert_eq!(sum_over(&node, 1), 2);
    ps::destroy_model_parallel();
    assert!(node.is_destroyed());
    let e = ps::get_node_group().unwrap_err().to_string();
    assert!(e.contains("init_node_group"), "{e}");
    assert!(matches!(node.barrier(), Err(CommError::State(_))));
    assert!(ps::get_tp_group().is_err() && !ps::model_parallel_is_initialized());
    let world = ps::get_world_group().unwrap();
    assert!(!world.is_destroyed());
    assert_eq!(sum_over(&world, 2), 4);
    // maybe_init builds node and model groups again.
    ps::maybe_init_distributed_environment_and_model_parallel(1, 2).unwrap();
    let node = ps::get_node_group().unwrap();
    assert_eq!(node.name(), "node:1");
    assert_eq!(sum_over(&node, 3), 6);
    // So does a repeated init_distributed_environment, as in FastVideo.
    ps::destroy_model_parallel();
    let (w, r) = (env_usize("WORLD_SIZE"), env_usize("RANK"));
    ps::init_distributed_environment(w, r, "env://", Some(lr), None).unwrap();
    assert_eq!(ps::get_node_group().unwrap().name(), "node:2");
    // And init_node_group, explicitly.
    ps::destroy_model_parallel();
    let node = ps::init_node_group(lr, None).unwrap();
    assert!(Arc::ptr_eq(&node, &ps::get_node_group().unwrap()));
    assert_eq!(node.name(), "node:3");
    assert_eq!(sum_over(&node, 4), 8);
    assert!(matches!(
        ps::init_node_group(lr + 1, None),
        Err(CommError::InvalidArgument(_))
    ));
}

/// Item 8: the functions that were missing.
fn helpers() {
    ps::maybe_init_distributed_environment_and_model_parallel(1, 2).unwrap();
    let (r, lr) = (env_usize("RANK"), env_usize("LOCAL_RANK"));
    let world = ps::get_world_group().unwrap();
    // Same-node ranks, from either source, by both names.
    for src in 0..2 {
        assert_eq!(ps::get_same_node_ranks(&world, src).unwrap(), [0, 1]);
    }
    assert_eq!(ps::is_the_same_node_as(&world, 1).unwrap(), [0, 1]);
    assert!(matches!(
        ps::get_same_node_ranks(&world, 2),
        Err(CommError::InvalidArgument(_))
    ));
    // init_world_group with its arguments: a new group on the forced backend.
    let w2 = ps::init_world_group(&[0, 1], lr, Some("tcp")).unwrap();
    assert_eq!((w2.name(), w2.host_backend()), ("world:1", "tcp"));
    assert_eq!(sum_over(&w2, r as i64 + 1), 3);
    let e = ps::init_world_group(&[0, 1], lr + 1, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("local_rank {}", lr + 1)) && e.contains(&format!("local rank {lr}")),
        "{e}"
    );
    // init_node_group.
    let node = ps::init_node_group(lr, Some("tcp")).unwrap();
    assert_eq!((node.name(), node.host_backend()), ("node:1", "tcp"));
    assert!(Arc::ptr_eq(&node, &ps::get_node_group().unwrap()));
    // init_model_parallel_group with FastVideo's arguments.
    let mine =
        ps::init_model_parallel_group(&[vec![0], vec![1]], lr, None, false, Some("mine")).unwrap();
    assert_eq!((mine.name(), mine.ranks()), ("mine:0", &[r][..]));
    let anon = ps::init_model_parallel_group(&[vec![0, 1]], lr, None, false, None).unwrap();
    assert_eq!(anon.name(), "anonymous:0");
    assert_eq!(sum_over(&anon, 1), 2);
    // The local device, and groups and receives that use it.
    let dev = ps::get_local_torch_device().unwrap();
    assert_eq!(dev, ps::get_local_device());
    assert_eq!(dev, ps::global_state().unwrap().local_device());
    if ps::core::visible_devices() == 0 {
        assert_eq!(dev, Device::Cpu, "no GPU visible to this build");
    }
    let sp = ps::get_sp_group().unwrap();
    assert_eq!(
        (sp.device(), ps::get_tp_group().unwrap().device()),
        (dev, dev)
    );
    if r == 0 {
        sp.send(&Tensor::from_vec1(vec![1.5f64, 2.5]), Some(1))
            .unwrap();
    } else {
        let t = sp.recv(&[2], DType::F64, Some(0)).unwrap();
        assert_eq!(
            (t.device(), t.to_vec::<f64>().unwrap()),
            (dev, vec![1.5, 2.5])
        );
    }
    // Warm-up: collective over SP, then a no-op for the same group.
    ps::warmup_sequence_parallel_communication(None).unwrap();
    ps::warmup_sequence_parallel_communication(Some(Device::Cpu)).unwrap();
    // The padding shard, through the global layer.
    let x = det(&[1, 5, 2], 3);
    let (s, len) = ps::sequence_model_parallel_shard(&x, 1).unwrap();
    assert_eq!((s.shape(), len), (&[1, 3, 2][..], 5));
    assert_eq!(
        ps::sequence_model_parallel_all_gather_with_unpad(&s, len, 1).unwrap(),
        x
    );
    // utils.py under FastVideo's names.
    assert_eq!(ps::divide(12, 4).unwrap(), 3);
    assert!(ps::divide(10, 4).is_err() && ps::ensure_divisibility(10, 4).is_err());
    ps::ensure_divisibility(12, 3).unwrap();
    assert_eq!(ps::compute_padding_for_sp(7, 2), (8, 1));
    assert_eq!(ps::compute_padding_for_sp(8, 2), (8, 0));
    let parts = ps::split_tensor_along_last_dim(&x, 2).unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[1], narrow(&x, 2, 1, 1));
    let t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2]).unwrap();
    let p = ps::pad_sequence_tensor(&t, 4, 1, 9.5).unwrap();
    assert_eq!(
        p.to_vec::<f32>().unwrap(),
        [1.0, 2.0, 9.5, 9.5, 3.0, 4.0, 9.5, 9.5]
    );
    assert_eq!(ps::pad_sequence_tensor(&t, 1, -1, 9.5).unwrap(), t);
    let bf = Tensor::from_vec1(vec![ps::core::bf16::from_f32(1.0)]);
    let pb = ps::pad_sequence_tensor(&bf, 2, 0, -2.0).unwrap();
    assert_eq!(pb.to_vec::<ps::core::bf16>().unwrap()[1].to_f32(), -2.0);
    assert_eq!(ps::unpad_sequence_tensor(&p, 2, 1).unwrap(), t);
    assert!(ps::unpad_sequence_tensor(&p, 5, 1).is_err());
}

/// Item 9: `set_custom_all_reduce` is accepted and changes nothing.
fn custom_all_reduce() {
    ps::maybe_init_distributed_environment_and_model_parallel(2, 1).unwrap();
    let r = env_usize("RANK");
    for enable in [false, true] {
        ps::set_custom_all_reduce(enable).unwrap();
        assert_eq!(ps::global_state().unwrap().custom_all_reduce(), enable);
        let mut t = Tensor::from_vec1(vec![r as f32 + 1.0; 1000]);
        ps::tensor_model_parallel_all_reduce(&mut t).unwrap();
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![3.0; 1000]);
    }
}

// ------------------------------------------------ transformer block (FastVideo's SP check)

fn matmul(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    for r in 0..rows {
        for kk in 0..k {
            let xv = x[r * k + kk];
            for j in 0..n {
                out[r * n + j] += xv * w[kk * n + j];
            }
        }
    }
    out
}

fn attention(q: &[f32], k: &[f32], v: &[f32], [b, s, h, d]: [usize; 4], valid: usize) -> Vec<f32> {
    let mut out = vec![0f32; b * s * h * d];
    let idx = |bb: usize, ss: usize, hh: usize| ((bb * s + ss) * h + hh) * d;
    for bb in 0..b {
        for hh in 0..h {
            for i in 0..s {
                let sc: Vec<f32> = (0..valid)
                    .map(|j| {
                        (0..d)
                            .map(|e| q[idx(bb, i, hh) + e] * k[idx(bb, j, hh) + e])
                            .sum::<f32>()
                            / (d as f32).sqrt()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let ex: Vec<f32> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = ex.iter().sum();
                for (j, e) in ex.iter().enumerate() {
                    for c in 0..d {
                        out[idx(bb, i, hh) + c] += e / z * v[idx(bb, j, hh) + c];
                    }
                }
            }
        }
    }
    out
}

struct Block {
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
    w1: Vec<f32>,
    w2: Vec<f32>,
}

fn weights(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) % 200) as f32 / 1000.0
                - 0.1
        })
        .collect()
}

fn block_forward(
    x: &[f32],
    w: &Block,
    b: usize,
    s: usize,
    h: usize,
    d: usize,
    sp: Option<(&GroupCoordinator, usize)>,
) -> Vec<f32> {
    let hid = h * d;
    let rows = b * s;
    let proj = |wm: &[f32]| matmul(x, wm, rows, hid, hid);
    let (q, k, v) = (proj(&w.wq), proj(&w.wk), proj(&w.wv));
    let o = match sp {
        None => attention(&q, &k, &v, [b, s, h, d], s),
        Some((g, valid)) => {
            let p = g.world_size();
            let a2a = |t: Vec<f32>| {
                g.all_to_all_4d(&Tensor::from_vec(t, [b, s, h, d]).unwrap(), 2, 1)
                    .unwrap()
                    .to_vec::<f32>()
                    .unwrap()
            };
            let (q, k, v) = (a2a(q), a2a(k), a2a(v));
            let o = attention(&q, &k, &v, [b, s * p, h / p, d], valid);
            let o = g
                .all_to_all_4d(&Tensor::from_vec(o, [b, s * p, h / p, d]).unwrap(), 1, 2)
                .unwrap();
            o.to_vec::<f32>().unwrap()
        }
    };
    let o = matmul(&o, &w.wo, rows, hid, hid);
    let x1: Vec<f32> = x.iter().zip(&o).map(|(a, c)| a + c).collect();
    let m = matmul(&x1, &w.w1, rows, hid, 2 * hid)
        .into_iter()
        .map(|v| v.max(0.0))
        .collect::<Vec<_>>();
    let m = matmul(&m, &w.w2, rows, 2 * hid, hid);
    x1.iter().zip(&m).map(|(a, c)| a + c).collect()
}

fn block(ps: &ParallelState) {
    let g = sp_world(ps);
    let (b, s, h, d) = (2, 9, 4, 8); // S = 9 is not divisible by 2: padded
    let hid = h * d;
    let w = Block {
        wq: weights(hid * hid, 1),
        wk: weights(hid * hid, 2),
        wv: weights(hid * hid, 3),
        wo: weights(hid * hid, 4),
        w1: weights(hid * 2 * hid, 5),
        w2: weights(2 * hid * hid, 6),
    };
    let x: Vec<f32> = weights(b * s * hid, 7).iter().map(|v| v * 10.0).collect();
    let full = Tensor::from_vec(x.clone(), [b, s, hid]).unwrap();
    let (shard, orig) = g.shard_with_pad(&full, 1).unwrap();
    let sl = shard.shape()[1];
    let y = block_forward(
        shard.as_slice::<f32>().unwrap(),
        &w,
        b,
        sl,
        h,
        d,
        Some((&g, orig)),
    );
    let y = g
        .all_gather_with_unpad(&Tensor::from_vec(y, [b, sl, hid]).unwrap(), 1, orig)
        .unwrap();
    let reference = block_forward(&x, &w, b, s, h, d, None);
    let err = y
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .zip(&reference)
        .map(|(a, c)| (a - c).abs())
        .fold(0f32, f32::max);
    println!("transformer block: max abs error vs single rank {err:e}");
    assert!(
        err <= 1e-5,
        "sharded block differs from the single-rank forward by {err}"
    );
}

// ------------------------------------------------------------------- tests

#[test]
fn all_to_all_4d_p2() {
    run("a2a", 2, &[]);
}
#[test]
fn all_to_all_4d_p3() {
    run("a2a", 3, &[]);
}
#[test]
fn all_to_all_4d_p4() {
    run("a2a", 4, &[]);
}
#[test]
fn all_to_all_4d_p4_over_tcp() {
    run("a2a", 4, &[("DIST_BACKEND", "tcp")]);
}
#[test]
fn all_to_all_4d_uneven_p3() {
    run("a2a_uneven", 3, &[]);
}
#[test]
fn all_to_all_4d_uneven_p4() {
    run("a2a_uneven", 4, &[]);
}
#[test]
fn all_gather_and_gather_every_dim() {
    run("gather", 3, &[]);
}
#[test]
fn broadcast_tensor_dict_mixed_values() {
    run("dicts", 3, &[]);
}
#[test]
fn send_recv_tensor_dict_with_and_without_all_gather_group() {
    run("send_dicts", 4, &[]);
}
#[test]
fn shard_unpad_round_trip_l7_p2() {
    run("shard", 2, &[]);
}
#[test]
fn shard_unpad_round_trip_l13_p4() {
    run("shard", 4, &[]);
}
#[test]
fn concurrent_groups_no_cross_talk() {
    run("concurrent", 8, &[]);
}
#[test]
fn layout_w8_tp2_sp4_and_ulysses_ring() {
    run("layout8", 8, &[]);
}
#[test]
fn broadcast_object_through_message_queue() {
    run("mq", 4, &[]);
}
#[test]
fn absent_member_times_out_naming_its_global_rank() {
    run("absent", 4, &[]);
}
#[test]
fn absent_member_times_out_naming_its_global_rank_over_tcp() {
    run("absent", 4, &[("DIST_BACKEND", "tcp")]);
}
#[test]
fn abandoning_a_group_names_the_ranks_blamed() {
    run("abandon", 3, &[]);
}
#[test]
fn abandoning_a_group_names_the_ranks_blamed_over_tcp() {
    run("abandon", 3, &[("DIST_BACKEND", "tcp")]);
}
#[test]
fn transformer_block_sharded_matches_single_rank() {
    run("block", 2, &[]);
}
#[test]
fn error_cases_and_default_neighbours() {
    run("errors", 4, &[("DIST_BACKEND", "tcp")]);
}
#[test]
fn reinit_agrees_or_names_both_values() {
    run("reinit", 2, &[]);
}
#[test]
fn maybe_init_with_other_sizes_names_both() {
    run("maybe_init", 2, &[]);
}
#[test]
fn fastvideo_group_names_and_lookup_by_name() {
    run("names", 4, &[]);
}
#[test]
fn one_member_groups_return_inputs() {
    run("single", 2, &[]);
}
#[test]
fn shard_exact_or_error_and_padding_shard_p3() {
    run("shard", 3, &[]);
}
#[test]
fn destroy_model_parallel_destroys_node_group() {
    run("destroy", 2, &[]);
}
#[test]
fn tensor_dict_nested_values_lists_tuples_dtypes() {
    run("dict_values", 3, &[]);
}
#[test]
fn fastvideo_helpers_node_world_device_warmup_utils() {
    run("helpers", 2, &[]);
}
#[test]
fn set_custom_all_reduce_is_accepted_and_ignored() {
    run("custom_all_reduce", 2, &[]);
}

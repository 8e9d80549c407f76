//! Multi-process tests: every scenario runs in real processes started by the
//! project's launcher. The launched processes re-enter this test binary
//! through the ignored `worker_entry` test with `PS_SCENARIO` set.

use std::sync::Mutex;
use std::time::Duration;

use executor::{launch, LaunchConfig};
use parallel_state::{
    CommError, DType, GroupCoordinator, InitOptions, ParallelState, ReduceOp, Tensor, TensorDict,
    Value,
};

/// One launch at a time: the machine has 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn run(scenario: &str, nproc: usize, env: &[(&str, &str)]) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let exe = std::env::current_exe().unwrap();
    let mut cfg = LaunchConfig::new(exe, nproc)
        .args([
            "--ignored",
            "--exact",
            "worker_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PS_SCENARIO", scenario)
        .env("DIST_TIMEOUT_S", "60")
        .timeout(Duration::from_secs(180))
        .capture(true);
    for (k, v) in env {
        cfg = cfg.env(*k, *v);
    }
    let out = launch(&cfg).unwrap();
    let dump = || {
        (0..nproc)
            .map(|r| {
                format!(
                    "--- rank {r}\n{}\n{}",
                    out.stdout[r].join("\n"),
                    out.stderr[r].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        out.success(),
        "scenario {scenario} failed: exit codes {:?}\n{}",
        out.exit_codes(),
        dump()
    );
    for r in 0..nproc {
        let marker = format!("PS_OK {scenario} rank {r}");
        assert!(
            out.stdout[r].iter().any(|l| l.contains(&marker)),
            "rank {r} did not finish {scenario}\n{}",
            dump()
        );
    }
}

#[test]
#[ignore = "entry point of the processes the other tests launch"]
fn worker_entry() {
    let scenario = std::env::var("PS_SCENARIO").expect("PS_SCENARIO is set by the launching test");
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
        "concurrent" => concurrent(&ps),
        "block" => block(&ps),
        "errors" => errors(&ps),
        "layout8" => layout8(&ps),
        "mq" => mq(&ps),
        "absent" => absent(&ps),
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
            assert_eq!(got, want, "all_gather_group {}", ag.is_some());
        }
    }
}

fn shard(ps: &ParallelState) {
    let g = sp_world(ps);
    let (p, r) = (g.world_size(), g.rank_in_group());
    let len = if p == 2 { 7 } else { 13 };
    let x = det(&[2, len, 3], 9);
    let (s, orig) = g.shard(&x, 1).unwrap();
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
    let (shard, orig) = g.shard(&full, 1).unwrap();
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
fn transformer_block_sharded_matches_single_rank() {
    run("block", 2, &[]);
}
#[test]
fn error_cases_and_default_neighbours() {
    run("errors", 4, &[("DIST_BACKEND", "tcp")]);
}

//! Rank layouts and single-process behaviour (no other processes needed).

use parallel_state::layout::{fastvideo_layout, mesh_layout, ulysses_ring_split};
use parallel_state::{CommError, DType, InitOptions, ParallelState, ReduceOp, Tensor, TensorDict};

#[test]
fn fastvideo_examples_from_design() {
    let l = fastvideo_layout(8, 2, 2, None).unwrap();
    let pairs = vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]];
    assert_eq!(l.tp, pairs);
    assert_eq!(l.sp, pairs);
    assert_eq!(l.dp, vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]]);

    let l = fastvideo_layout(8, 2, 4, None).unwrap();
    assert_eq!(l.tp, pairs);
    assert_eq!(l.sp, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
    assert_eq!(l.dp, vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
    assert!(fastvideo_layout(8, 2, 4, Some(2)).is_ok());
}

fn assert_invalid<T: std::fmt::Debug>(r: Result<T, CommError>, needle: &str) {
    match r {
        Err(CommError::InvalidArgument(m)) => assert!(m.contains(needle), "`{m}` lacks `{needle}`"),
        other => panic!("expected InvalidArgument containing `{needle}`, got {other:?}"),
    }
}

#[test]
fn layout_errors() {
    assert_invalid(fastvideo_layout(8, 3, 1, None), "tensor_parallel_size 3");
    assert_invalid(fastvideo_layout(6, 2, 4, None), "sequence_parallel_size 4");
    assert_invalid(fastvideo_layout(8, 2, 2, Some(2)), "data_parallel_size 2");
    assert_invalid(fastvideo_layout(8, 0, 2, None), "positive");
    assert_invalid(mesh_layout(8, 4, 4, None), "not divisible");
    assert_invalid(mesh_layout(8, 2, 2, Some(3)), "data_parallel_size 3");
    assert_invalid(ulysses_ring_split(&[0, 1, 2, 3], 3), "ulysses degree 3");
}

#[test]
fn mesh_is_orthogonal_for_every_combination() {
    for world in [1usize, 2, 4, 6, 8, 12] {
        for tp in (1..=world).filter(|t| world % t == 0) {
            for sp in (1..=world / tp).filter(|s| (world / tp) % s == 0) {
                let l = mesh_layout(world, tp, sp, None).unwrap();
                let dp = world / (tp * sp);
                for (groups, size) in [(&l.tp, tp), (&l.sp, sp), (&l.dp, dp)] {
                    assert_eq!(groups.len(), world / size);
                    let mut all: Vec<usize> = groups.iter().flatten().copied().collect();
                    all.sort();
                    assert_eq!(
                        all,
                        (0..world).collect::<Vec<_>>(),
                        "partition {world} {tp} {sp}"
                    );
                }
                // Any tp group and any sp group share at most one rank (orthogonality).
                for a in &l.tp {
                    for b in &l.sp {
                        assert!(a.iter().filter(|r| b.contains(r)).count() <= 1);
                    }
                }
            }
        }
    }
}

#[test]
fn ulysses_ring_split_layout() {
    let (u, r) = ulysses_ring_split(&[4, 5, 6, 7, 8, 9], 3).unwrap();
    assert_eq!(u, vec![vec![4, 5, 6], vec![7, 8, 9]]);
    assert_eq!(r, vec![vec![4, 7], vec![5, 8], vec![6, 9]]);
}

fn world_of_one() -> ParallelState {
    ParallelState::init(1, 0, "env://", Some(0), InitOptions::default()).unwrap()
}

#[test]
fn single_member_groups_return_inputs_unchanged() {
    let ps = world_of_one();
    ps.initialize_model_parallel(1, 1, None).unwrap();
    let g = ps.sp_group().unwrap();
    let x = Tensor::from_vec((0..24).map(|i| i as f32).collect::<Vec<_>>(), [1, 2, 3, 4]).unwrap();
    let mut y = x.try_clone().unwrap();
    g.all_reduce(&mut y, ReduceOp::Avg).unwrap();
    assert_eq!(y, x);
    assert_eq!(g.all_gather(&x, -1).unwrap(), x);
    assert_eq!(g.all_to_all_4d(&x, 2, 1).unwrap(), x);
    assert_eq!(g.gather(&x, 0, 1).unwrap().unwrap(), x);
    let (s, len) = g.shard(&x, 1).unwrap();
    assert_eq!((s.shape().to_vec(), len), (vec![1, 2, 3, 4], 2));
    assert!(matches!(
        g.send(&x, Some(0)),
        Err(CommError::InvalidArgument(_))
    ));
    assert!(matches!(
        g.recv(&[1], DType::F32, Some(0)),
        Err(CommError::InvalidArgument(_))
    ));
    assert!(matches!(
        g.send_object(&1u8, 0),
        Err(CommError::InvalidArgument(_))
    ));
    assert!(matches!(
        g.all_to_all_4d(&x, 0, 1),
        Err(CommError::InvalidArgument(_))
    ));
    let v: Vec<String> = g.broadcast_object(Some(&vec!["a".to_string()]), 0).unwrap();
    assert_eq!(v, ["a"]);
    let mut d = TensorDict::new();
    d.insert("x", x.try_clone().unwrap());
    let d2 = g.broadcast_tensor_dict(Some(d), 0).unwrap();
    assert_eq!(d2.tensor("x").unwrap(), &x);
    assert!(!g.graph_capture().unwrap().is_cuda());
}

#[test]
fn double_initialisation_is_an_error() {
    let ps = world_of_one();
    ps.initialize_model_parallel(1, 1, None).unwrap();
    assert!(matches!(
        ps.initialize_model_parallel(1, 1, None),
        Err(CommError::State(_))
    ));
    ps.destroy_model_parallel();
    ps.initialize_model_parallel(1, 1, Some(1)).unwrap();
    assert!(ps.initialize_model_parallel(2, 1, None).is_err());
}

#[test]
fn patch_restores_previous_group_even_on_panic() {
    let ps = world_of_one();
    ps.initialize_model_parallel(1, 1, None).unwrap();
    let original = ps.tp_group().unwrap().name().to_string();
    let other = ps.initialize_tensor_parallel_group(1, "_vae").unwrap();
    {
        let _g = ps.patch_tensor_parallel_group(other.clone()).unwrap();
        assert_eq!(ps.tp_group().unwrap().name(), other.name());
    }
    assert_eq!(ps.tp_group().unwrap().name(), original);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _g = ps.patch_tensor_parallel_group(other.clone()).unwrap();
        panic!("boom");
    }));
    assert!(r.is_err());
    assert_eq!(ps.tp_group().unwrap().name(), original);
}

#[test]
fn group_registry_and_destroy() {
    let ps = world_of_one();
    ps.initialize_model_parallel(1, 1, None).unwrap();
    let tp = ps.tp_group().unwrap();
    assert!(tp.name().starts_with("tp:"));
    assert_eq!(ps.group_by_name(tp.name()).unwrap().ranks(), &[0]);
    let node = ps.node_group().unwrap();
    ps.destroy_model_parallel();
    assert!(ps.tp_group().is_err());
    // The node group goes with the model-parallel groups, as in FastVideo.
    assert!(node.is_destroyed() && ps.node_group().is_err());
    assert!(!ps.world_group().is_destroyed());
    assert!(!ps.ensure_node_group().unwrap().is_destroyed());
}

#[test]
fn check_environment_names_both_values() {
    let ps = world_of_one();
    ps.check_environment(1, 0, Some(0), None).unwrap();
    // Automatic choice: a world of one uses the `single` backend.
    ps.check_environment(1, 0, None, Some("single")).unwrap();
    let e = ps
        .check_environment(2, 0, Some(3), Some("gloo"))
        .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, CommError::State(_)), "{text}");
    for part in [
        "world_size: initialized with 1, now 2",
        "local_rank: initialized with 0, now 3",
        "backend: initialized with the automatic choice (world group: `single`), now `tcp`",
    ] {
        assert!(text.contains(part), "`{text}` lacks `{part}`");
    }
}

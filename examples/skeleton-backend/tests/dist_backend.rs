//! The skeleton selected by name through the group layer, as an
//! application would: registered with `InitOptions::backends`, chosen with
//! `DIST_BACKEND=skeleton`, in two real processes.

use std::sync::Arc;

use comm_conformance::ranks::Processes;
use parallel_state::{InitOptions, ParallelState, ReduceOp, Tensor};
use skeleton_backend::{communicators_created, SkeletonFactory};

#[test]
fn dist_backend_selects_the_skeleton() {
    Processes::new(2)
        .env("DIST_BACKEND", "skeleton")
        .run(|ctx| {
            let mut opts = InitOptions::default();
            // The group layer's registry: built-in backends plus these.
            opts.backends.push(Arc::new(SkeletonFactory));
            let st = ParallelState::with_store(
                ctx.store.clone(),
                ctx.rank,
                ctx.world,
                ctx.local_rank,
                opts,
            )
            .map_err(|e| format!("initialising the parallel state: {e}"))?;
            if communicators_created() == 0 {
                return Err("DIST_BACKEND=skeleton created no skeleton communicator".into());
            }
            let world = st.world_group();
            let mut t = Tensor::from_vec1(vec![ctx.rank as f32 + 1.0; 8]);
            world
                .all_reduce(&mut t, ReduceOp::Sum)
                .map_err(|e| format!("all_reduce on the world group: {e}"))?;
            let got = t.to_vec::<f32>().map_err(|e| e.to_string())?;
            if got != vec![3.0; 8] {
                return Err(format!("all_reduce gave {got:?}, expected eight 3.0"));
            }
            Ok(())
        });
}

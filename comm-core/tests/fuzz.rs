//! What peers send, decoded by comm-core: call descriptions (64 bytes on
//! every backend's wire) and shapes of tensors to allocate. No input may
//! panic; a description round-trips exactly; an impossible allocation is an
//! error, not an abort.

use comm_core::{CallDesc, Collective, DType, ReduceOp, Tensor};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn any_bytes_decode_or_refuse(bytes in proptest::collection::vec(any::<u8>(), 0..160)) {
        let _ = CallDesc::from_wire(&bytes);
    }

    #[test]
    fn corrupted_descriptions_never_panic(wire in proptest::array::uniform32(any::<u8>()),
                                          flip in 0usize..64, bit in 0u8..8) {
        let d = CallDesc::new(Collective::AllReduce, 3, DType::F32, 9).with_reduce(ReduceOp::Sum);
        let mut full = d.to_wire();
        full[32..].copy_from_slice(&wire);
        full[flip] ^= 1 << bit;
        if let Ok(back) = CallDesc::from_wire(&full) {
            // Whatever decodes encodes to the same bytes.
            prop_assert_eq!(back.to_wire(), full);
        }
    }

    #[test]
    fn descriptions_round_trip(op in 0u8..15, seq in any::<u64>(), dt in 0usize..8, count in any::<u64>(),
                               root in any::<u32>(), red in proptest::option::of(0usize..5),
                               shape in proptest::collection::vec(0usize..1 << 20, 0..7)) {
        let mut d = CallDesc::new(Collective::from_code(op).unwrap(), seq, DType::ALL[dt], 0)
            .with_shape(&shape);
        d.count = count;
        d.root = root;
        d.reduce = red.map(|r| ReduceOp::ALL[r]);
        prop_assert_eq!(CallDesc::from_wire(&d.to_wire()).unwrap(), d);
    }

    #[test]
    fn peer_shapes_allocate_or_refuse(shape in proptest::collection::vec(any::<usize>(), 0..5), dt in 0usize..8) {
        // Only tiny tensors are really allocated; the others must be refused
        // (overflow) or are skipped here because they are legitimately large.
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        match n.and_then(|n| n.checked_mul(DType::ALL[dt].size())) {
            Some(bytes) if bytes <= 1 << 20 => {
                let t = Tensor::try_zeros(shape.clone(), DType::ALL[dt]).unwrap();
                prop_assert_eq!(t.nbytes(), bytes);
            }
            Some(bytes) if bytes > isize::MAX as usize => {
                prop_assert!(Tensor::try_zeros(shape.clone(), DType::ALL[dt]).is_err());
            }
            None => prop_assert!(Tensor::try_zeros(shape.clone(), DType::ALL[dt]).is_err()),
            Some(_) => {}
        }
    }
}

#[test]
fn an_allocation_the_machine_cannot_give_is_an_error() {
    // 2^62 bytes: representable, but no machine has it.
    let e = Tensor::try_zeros([1usize << 59], DType::F64).unwrap_err();
    assert!(e.to_string().contains("allocate"), "{e}");
}

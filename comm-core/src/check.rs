//! Argument checks, made once in the checked front for every backend, so
//! errors read the same everywhere and backends never see bad arguments.

use crate::buffer::{BufMut, BufRef};
use crate::{CommError, DType, Device, Result};

fn same_dtype(op: &str, a: DType, b: DType) -> Result<()> {
    if a != b {
        return Err(CommError::DTypeMismatch {
            operation: op.into(),
            expected: a.to_string(),
            actual: b.to_string(),
        });
    }
    Ok(())
}

/// Errors unless a buffer on `have` can be moved by a communicator of
/// `backend_device` (host backends take any memory: the front stages device
/// memory; device backends take only their own device's).
pub fn device(op: &str, have: Device, backend_device: Device) -> Result<()> {
    if backend_device != Device::Cpu && have != backend_device {
        return Err(CommError::invalid(format!(
            "{op}: the buffer is on {have} but this communicator moves {backend_device} memory"
        )));
    }
    Ok(())
}

/// Errors unless `root < world`.
pub fn root(op: &str, root: usize, world: usize) -> Result<()> {
    if root >= world {
        return Err(CommError::invalid(format!(
            "{op}: root {root} is out of range for a group of {world}"
        )));
    }
    Ok(())
}

/// Errors unless `peer` is another member of the group.
pub fn peer(op: &str, peer: usize, rank: usize, world: usize) -> Result<()> {
    if peer >= world {
        return Err(CommError::invalid(format!(
            "{op}: peer {peer} is out of range for a group of {world}"
        )));
    }
    if peer == rank {
        return Err(CommError::invalid(format!(
            "{op}: rank {rank} cannot {op} to or from itself"
        )));
    }
    Ok(())
}

/// `output` holds `world` times `input`'s elements, of the same dtype.
pub fn gathered(op: &str, input: &BufRef<'_>, output: &BufMut<'_>, world: usize) -> Result<()> {
    same_dtype(op, input.dtype(), output.dtype())?;
    if output.numel() != world * input.numel() {
        return Err(CommError::shape(
            op,
            format!(
                "output of {} elements ({world} x {})",
                world * input.numel(),
                input.numel()
            ),
            format!("{} elements", output.numel()),
        ));
    }
    Ok(())
}

/// `input` holds `world` times `output`'s elements, of the same dtype.
pub fn scattered(op: &str, input: &BufRef<'_>, output: &BufMut<'_>, world: usize) -> Result<()> {
    same_dtype(op, input.dtype(), output.dtype())?;
    if input.numel() != world * output.numel() {
        return Err(CommError::shape(
            op,
            format!(
                "input of {} elements ({world} x {})",
                world * output.numel(),
                output.numel()
            ),
            format!("{} elements", input.numel()),
        ));
    }
    Ok(())
}

/// Equal element counts divisible by `world`, same dtype.
pub fn all_to_all(input: &BufRef<'_>, output: &BufMut<'_>, world: usize) -> Result<()> {
    same_dtype("all_to_all", input.dtype(), output.dtype())?;
    if input.numel() != output.numel() || !input.numel().is_multiple_of(world) {
        return Err(CommError::shape(
            "all_to_all",
            format!("input and output of equal size divisible by {world}"),
            format!("{} and {} elements", input.numel(), output.numel()),
        ));
    }
    Ok(())
}

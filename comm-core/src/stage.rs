//! Host staging: how the front lets host backends move device memory (and
//! finishes `Avg` where a backend has no native one), with workspaces that
//! are reused from call to call instead of allocated.

use crate::buffer::{BufMut, BufRef, Mem, MemMut};
use crate::{reduce, Device, HostBuffer, Result};

/// Runs `f` on a host view of `buf`: `buf` itself when it is host memory or
/// when the backend moves device memory (`host_backend` false), else a copy
/// of it in `stage` (copied in first when `copy_in`, copied back after).
pub(crate) fn with_out<R>(
    host_backend: bool,
    buf: BufMut<'_>,
    stage: &mut HostBuffer,
    copy_in: bool,
    f: impl FnOnce(BufMut<'_>) -> Result<R>,
) -> Result<R> {
    if !host_backend || buf.device() == Device::Cpu {
        return f(buf);
    }
    let dtype = buf.dtype();
    stage.reuse(buf.nbytes());
    let mut mem = buf.into_mem();
    if copy_in {
        MemMut::Host(stage.as_bytes_mut()).copy_from(mem.as_mem())?;
    }
    let r = f(BufMut::host(stage.as_bytes_mut(), dtype)?)?;
    mem.copy_from(Mem::Host(stage.as_bytes()))?;
    Ok(r)
}

/// Runs `f` on a host view of `buf` (a copy in `stage` when needed, as in
/// [`with_out`]).
pub(crate) fn with_in<R>(
    host_backend: bool,
    buf: BufRef<'_>,
    stage: &mut HostBuffer,
    f: impl FnOnce(BufRef<'_>) -> Result<R>,
) -> Result<R> {
    if !host_backend || buf.device() == Device::Cpu {
        return f(buf);
    }
    stage.reuse(buf.nbytes());
    MemMut::Host(stage.as_bytes_mut()).copy_from(buf.mem())?;
    f(BufRef::host(stage.as_bytes(), buf.dtype())?)
}

/// Divides a sum by `count` in place, wherever the buffer lives.
pub(crate) fn finish_avg(buf: &mut BufMut<'_>, count: usize, stage: &mut HostBuffer) -> Result<()> {
    let dtype = buf.dtype();
    if let Some(b) = buf.host_bytes() {
        return reduce::finish_avg(b, dtype, count);
    }
    stage.reuse(buf.nbytes());
    let mem = buf.mem();
    MemMut::Host(stage.as_bytes_mut()).copy_from(mem.as_mem())?;
    reduce::finish_avg(stage.as_bytes_mut(), dtype, count)?;
    mem.copy_from(Mem::Host(stage.as_bytes()))
}

//! Reaching the [`NcclCommunicator`] behind a checked front
//! (`comm_core::Communicator`): its stream, events, and graph capture.

use std::sync::Arc;

use comm_core::{CommError, Communicator, Result};
use cudarc::driver::{CudaGraph, CudaStream};

use crate::NcclCommunicator;

/// Runs `f` on the [`NcclCommunicator`] behind `comm`, once its queued
/// operations have been handed to the stream; an error when its backend is
/// not NCCL.
///
/// ```no_run
/// # fn demo(comm: &comm_core::Communicator) -> comm_core::Result<()> {
/// // Make the application's compute stream wait for the collectives so far.
/// let event = comm_nccl::with_nccl(comm, |n| n.record_event())??;
/// # let _ = event; Ok(()) }
/// ```
pub fn with_nccl<R>(comm: &Communicator, f: impl FnOnce(&mut NcclCommunicator) -> R) -> Result<R> {
    comm.with_backend(|b| {
        let backend = b.backend().to_string();
        match b
            .as_any_mut()
            .and_then(|a| a.downcast_mut::<NcclCommunicator>())
        {
            Some(n) => Ok(f(n)),
            None => Err(CommError::invalid(format!(
                "this communicator's backend is `{backend}`, not nccl"
            ))),
        }
    })?
}

/// A graph capture of a communicator's collectives, made through the
/// checked front: between [`graph_capture`] and [`GraphCapture::finish`],
/// the communicator's calls (`comm.all_reduce(...)`, ...) are recorded on
/// [`GraphCapture::stream`] instead of running; launch the returned graph
/// to run them (as often as you like, with the same buffers).
///
/// Dropped without `finish`, the capture is ended and discarded.
#[derive(Debug)]
pub struct GraphCapture {
    comm: Communicator,
    stream: Arc<CudaStream>,
    open: bool,
}

/// Starts capturing `comm`'s collectives (see
/// [`NcclCommunicator::begin_capture`] for the rules while capturing).
/// Capture on the thread that makes the calls.
///
/// Calls the front answers without the backend (one-member groups, empty
/// buffers) are not captured: they run at once.
pub fn graph_capture(comm: &Communicator) -> Result<GraphCapture> {
    let stream = with_nccl(comm, |n| n.begin_capture())??;
    Ok(GraphCapture {
        comm: comm.clone(),
        stream,
        open: true,
    })
}

impl GraphCapture {
    /// The stream being captured: enqueue the rest of the step here.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Ends the capture and instantiates the graph.
    pub fn finish(mut self) -> Result<CudaGraph> {
        self.open = false;
        with_nccl(&self.comm, |n| n.end_capture())?
    }
}

impl Drop for GraphCapture {
    fn drop(&mut self) {
        if self.open {
            let _ = with_nccl(&self.comm, |n| n.end_capture());
        }
    }
}

//! `broadcast_object` from group rank 0 through comm-shm's MessageQueue,
//! the counterpart of vLLM's `mq_broadcaster`: one copy into shared memory
//! by the writer, one copy out by each reader, no collective handshake.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use comm_core::{CommError, Result, Store};
use comm_shm::{MessageQueue, MqOptions, Role};

/// Ring size: objects (metadata, RPC calls) are small; bigger ones stream
/// through the ring in chunks.
const RING_BYTES: usize = 1 << 20;

#[derive(Debug)]
pub(crate) struct MqBroadcaster {
    queue: Mutex<MessageQueue>,
}

impl MqBroadcaster {
    /// Group rank 0 writes; every other member reads. Collective over the group.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let opts = MqOptions::default()
            .timeout(timeout)
            .name("broadcast_object");
        let queue = if rank == 0 {
            let readers: Vec<usize> = (1..world).collect();
            MessageQueue::create_writer(&*store, "bcast", 0, &readers, RING_BYTES, opts)?
        } else {
            MessageQueue::open_reader(&*store, "bcast", rank, opts)?
        };
        Ok(MqBroadcaster {
            queue: Mutex::new(queue),
        })
    }

    /// The writer passes `Some(bytes)` and gets them back; readers pass `None`.
    pub(crate) fn broadcast(&self, bytes: Option<&[u8]>) -> Result<Vec<u8>> {
        let mut q = self
            .queue
            .lock()
            .map_err(|_| CommError::State("message queue lock poisoned".into()))?;
        match (q.role(), bytes) {
            (Role::Writer, Some(b)) => {
                q.enqueue(b)?;
                Ok(b.to_vec())
            }
            (Role::Reader(_), None) => q.dequeue(),
            (Role::Writer, None) => Err(CommError::invalid(
                "broadcast_object: the source must pass a value",
            )),
            (Role::Reader(_), Some(_)) => Err(CommError::invalid(
                "broadcast_object through the message queue: only group rank 0 can be the source",
            )),
        }
    }
}

//! `broadcast_object` through comm-shm's MessageQueue (wired once the queue lands).

use std::sync::Arc;
use std::time::Duration;

use comm_core::{CommError, Result, Store};

#[derive(Debug)]
pub(crate) struct MqBroadcaster;

impl MqBroadcaster {
    pub(crate) fn new(_store: Arc<dyn Store>, _rank: usize, _world: usize, _timeout: Duration) -> Result<Self> {
        Err(CommError::unavailable("shm message queue", "PENDING-WIRING"))
    }
    pub(crate) fn broadcast(&self, _bytes: Option<&[u8]>) -> Result<Vec<u8>> {
        Err(CommError::unavailable("shm message queue", "PENDING-WIRING"))
    }
}

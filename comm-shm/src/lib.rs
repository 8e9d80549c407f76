//! Shared-memory backend: segments, futex waits, the MessageQueue broadcaster and intra-host collectives.

//! Multi-process integration tests and the backend conformance suite.

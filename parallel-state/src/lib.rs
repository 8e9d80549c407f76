//! GroupCoordinator, parallel groups (world, node, tp, sp, dp) and the communication ops users call.

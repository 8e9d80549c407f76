//! Process launcher (distrun) and multi-process executor with collective RPC.

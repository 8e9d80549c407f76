//! NCCL backend for CUDA tensors, loading libnccl and libcuda at run time.

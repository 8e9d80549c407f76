//! TCP backend of the distributed layer: a DeviceCommunicator for host tensors across hosts.

//! Objects and tensor dicts over a group: `broadcast_object(_list)`,
//! `send_object` / `recv_object`, `broadcast_tensor_dict`,
//! `send_tensor_dict` / `recv_tensor_dict`.

use comm_core::{Collective, CommError, Device, Layout, Result, Tensor, TensorMetadata};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::GroupCoordinator;
use crate::tensor_dict::{Metadata, TensorDict, TensorMeta};

/// Objects larger than this are refused on receipt (a corrupt or hostile
/// length must not allocate without bound).
const MAX_OBJECT_BYTES: u64 = 1 << 40;

fn object_len(n: i64) -> Result<usize> {
    u64::try_from(n)
        .ok()
        .filter(|&n| n <= MAX_OBJECT_BYTES)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| CommError::Protocol(format!("an object length of {n} bytes is not valid")))
}

impl GroupCoordinator {
    /// Broadcasts a serde value from group rank `src` (`obj` is read only there).
    pub fn broadcast_object<T: Serialize + DeserializeOwned>(
        &self,
        obj: Option<&T>,
        src: usize,
    ) -> Result<T> {
        let bytes = self.broadcast_encoded("broadcast_object", obj, src)?;
        dist_utils::codec::decode(&bytes)
    }

    /// Broadcasts a list of serde values from group rank `src`.
    pub fn broadcast_object_list<T: Serialize + DeserializeOwned>(
        &self,
        list: Option<&[T]>,
        src: usize,
    ) -> Result<Vec<T>> {
        let bytes = self.broadcast_encoded("broadcast_object_list", list.as_ref(), src)?;
        dist_utils::codec::decode(&bytes)
    }

    fn broadcast_encoded<T: Serialize + ?Sized>(
        &self,
        what: &str,
        obj: Option<&T>,
        src: usize,
    ) -> Result<Vec<u8>> {
        self.check_member(what, src)?;
        if self.rank_in_group != src {
            return self.broadcast_bytes(None, src);
        }
        let obj = obj.ok_or_else(|| {
            CommError::invalid(format!("{what}: the source rank must pass a value"))
        })?;
        let bytes = dist_utils::codec::encode(obj)?;
        if self.world_size() > 1 {
            self.broadcast_bytes(Some(&bytes), src)?;
        }
        Ok(bytes)
    }

    /// The length, then the bytes, over the host plane (or the message
    /// queue from group rank 0 when the group has one).
    fn broadcast_bytes(&self, bytes: Option<&[u8]>, src: usize) -> Result<Vec<u8>> {
        if let (Some(mq), 0) = (&self.mq, src) {
            return mq.broadcast(bytes);
        }
        let host = self.host_communicator()?;
        let desc = Layout {
            op: Collective::BroadcastObject,
            shape: &[],
            arg: 0,
        };
        let mut len = [bytes.map_or(0, |b| b.len() as i64)];
        host.broadcast_with(&mut len, src, Some(desc))?;
        let n = object_len(len[0])?;
        let mut buf = match bytes {
            Some(b) => b.to_vec(),
            None => vec![0u8; n],
        };
        if n > 0 {
            host.broadcast_with(&mut buf, src, Some(desc))?;
        }
        Ok(buf)
    }

    /// Sends a serde value to group rank `dst`. Sending to oneself is an error.
    pub fn send_object<T: Serialize>(&self, obj: &T, dst: usize) -> Result<()> {
        let host = self.host_communicator()?;
        let bytes = dist_utils::codec::encode(obj)?;
        host.send(&[bytes.len() as i64], dst)?;
        if !bytes.is_empty() {
            host.send(&bytes, dst)?;
        }
        Ok(())
    }

    /// Receives a serde value from group rank `src`.
    pub fn recv_object<T: DeserializeOwned>(&self, src: usize) -> Result<T> {
        let host = self.host_communicator()?;
        let mut len = [0i64];
        host.recv(&mut len, src)?;
        let mut buf = vec![0u8; object_len(len[0])?];
        if !buf.is_empty() {
            host.recv(&mut buf, src)?;
        }
        dist_utils::codec::decode(&buf)
    }

    /// Broadcasts an ordered dict of tensors and values from group rank
    /// `src`: the metadata (keys, plain and nested values, each tensor's
    /// device kind, dtype and shape) first over the host plane, then each
    /// non-empty tensor, at any depth, in order over the plane matching its
    /// device. Receivers allocate on their own device and fill.
    ///
    /// The source passes its dict by value and gets it back unchanged, so no
    /// tensor is copied on the source. A one-member group returns the dict
    /// without communicating (after checking `src` and that the dict can
    /// travel, as on any group).
    pub fn broadcast_tensor_dict(
        &self,
        dict: Option<TensorDict>,
        src: usize,
    ) -> Result<TensorDict> {
        self.check_member("broadcast_tensor_dict", src)?;
        if self.rank_in_group == src {
            let mut dict = dict.ok_or_else(|| {
                CommError::invalid("broadcast_tensor_dict: the source rank must pass a dict")
            })?;
            let meta = dict.metadata()?;
            if self.world_size() > 1 {
                self.broadcast_encoded("broadcast_tensor_dict", Some(&meta), src)?;
                for t in dict.tensors_mut() {
                    if t.numel() > 0 {
                        self.broadcast(t, src)?;
                    }
                }
            }
            return Ok(dict);
        }
        let meta: Metadata = dist_utils::codec::decode(&self.broadcast_bytes(None, src)?)?;
        let mut out = TensorDict::from_metadata(meta, |m| self.alloc(m))?;
        for t in out.tensors_mut() {
            if t.numel() > 0 {
                self.broadcast(t, src)?;
            }
        }
        Ok(out)
    }

    /// Sends a dict to group rank `dst` (default: next rank). With an
    /// `all_gather_group` of size G > 1, a tensor whose element count divides
    /// by G travels as slice `all_gather_group.rank_in_group()` of its
    /// flattened data, and the receiver all-gathers it over its own
    /// all-gather group (which must mirror the sender's).
    ///
    /// On a one-member group nothing is sent (FastVideo returns the dict; the
    /// caller here still holds it), after the same checks as on any group.
    pub fn send_tensor_dict(
        &self,
        dict: &TensorDict,
        dst: Option<usize>,
        all_gather_group: Option<&GroupCoordinator>,
    ) -> Result<()> {
        let dst = dst.unwrap_or_else(|| self.default_dst());
        self.check_member("send_tensor_dict", dst)?;
        let meta = dict.metadata()?;
        if self.world_size() == 1 {
            return Ok(());
        }
        self.send_object(&meta, dst)?;
        for t in dict.tensors() {
            if t.numel() == 0 {
                continue;
            }
            match slice_plan(t.numel(), all_gather_group) {
                Some((g, r)) => {
                    let n = t.numel() / g;
                    let es = t.dtype().size();
                    let part = super::on_host(t, |h| {
                        Tensor::from_bytes(
                            &h.as_bytes()?[r * n * es..(r + 1) * n * es],
                            [n],
                            h.dtype(),
                        )
                    })?;
                    self.send(&part, Some(dst))?;
                }
                None => self.send(t, Some(dst))?,
            }
        }
        Ok(())
    }

    /// Receives a dict sent by [`send_tensor_dict`](Self::send_tensor_dict)
    /// from group rank `src` (default: previous rank). A one-member group
    /// receives nothing and returns `None`, as FastVideo does; otherwise the
    /// result is always `Some`.
    pub fn recv_tensor_dict(
        &self,
        src: Option<usize>,
        all_gather_group: Option<&GroupCoordinator>,
    ) -> Result<Option<TensorDict>> {
        let src = src.unwrap_or_else(|| self.default_src());
        self.check_member("recv_tensor_dict", src)?;
        if self.world_size() == 1 {
            return Ok(None);
        }
        let meta: Metadata = self.recv_object(src)?;
        let mut out = TensorDict::from_metadata(meta, |m| self.alloc(m))?;
        for t in out.tensors_mut() {
            if t.numel() == 0 {
                continue;
            }
            match slice_plan(t.numel(), all_gather_group) {
                Some((g, _)) => {
                    let mut part = t.zeros_with_shape([t.numel() / g])?;
                    self.recv_into(&mut part, Some(src))?;
                    let ag = all_gather_group
                        .ok_or_else(|| CommError::State("all-gather group vanished".into()))?;
                    let shape = t.shape().to_vec();
                    *t = ag.all_gather(&part, 0)?.reshape(shape)?;
                }
                None => self.recv_into(t, Some(src))?,
            }
        }
        Ok(Some(out))
    }

    /// Allocates a zeroed tensor for incoming metadata on THIS member's
    /// device: host tensors on the host, CUDA tensors on the group's device
    /// (never on the sender's GPU number).
    fn alloc(&self, meta: &TensorMeta) -> Result<Tensor> {
        let device = match (meta.cuda, self.device) {
            (false, _) => Device::Cpu,
            (true, d @ Device::Cuda(_)) => d,
            (true, Device::Cpu) => {
                return Err(CommError::invalid(format!(
                    "group `{}` received a CUDA tensor ({:?} {}) but this rank has no CUDA \
                     device (its groups move host memory; set DIST_DEVICE=cuda or \
                     InitOptions::device)",
                    self.name, meta.shape, meta.dtype
                )))
            }
        };
        Tensor::zeros_on(&TensorMetadata {
            device,
            dtype: meta.dtype,
            shape: meta.shape.clone(),
        })
    }
}

/// `(G, rank in the all-gather group)` when a tensor of `numel` elements
/// travels sliced, else `None`.
fn slice_plan(numel: usize, ag: Option<&GroupCoordinator>) -> Option<(usize, usize)> {
    let ag = ag?;
    let g = ag.world_size();
    (g > 1 && numel.is_multiple_of(g)).then_some((g, ag.rank_in_group()))
}

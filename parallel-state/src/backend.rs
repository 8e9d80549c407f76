//! Which backend a group uses, chosen from one open [`Registry`].
//!
//! The built-in backends (`single`, `tcp`, `shm`, and `nccl` with the
//! feature) are registered exactly like a third party's
//! ([`InitOptions::backends`](crate::InitOptions)); `DIST_BACKEND` or
//! `InitOptions::backend` can name any registered backend.

use std::sync::Arc;

use comm_core::{BackendFactory, CommError, Device, Registry, Result};

/// Environment variable that forces a backend by name: a host backend
/// (`tcp`, `shm`, or any registered one serving host memory) for every
/// group's host plane, or a device backend (`nccl`) for the device plane.
pub const BACKEND_ENV: &str = "DIST_BACKEND";

/// The registry of the built-in backends: `single`, `tcp`, `shm`, and
/// `nccl` when built with the `nccl` feature (which also installs the CUDA
/// device allocator, so device tensors can be allocated anywhere).
///
/// ```
/// let r = parallel_state::default_registry();
/// assert!(r.names().contains(&"tcp") && r.names().contains(&"shm"));
/// ```
pub fn default_registry() -> Registry {
    let r = Registry::new()
        .with(comm_core::SingleFactory)
        .with(comm_cpu::TcpFactory::default())
        .with(comm_shm::ShmFactory::default());
    #[cfg(feature = "nccl-app-cudarc")]
    let r = {
        comm_nccl::install();
        r.with(comm_nccl::NcclFactory)
    };
    r
}

/// The built-in registry plus `extra` factories (a third party's replace a
/// built-in of the same name).
pub fn registry_with(extra: &[Arc<dyn BackendFactory>]) -> Registry {
    let mut r = default_registry();
    for f in extra {
        r.register_arc(f.clone());
    }
    r
}

/// The forced backend name from [`BACKEND_ENV`], if any (aliases: `gloo`
/// and `cpu` mean `tcp`, `cuda` means `nccl`).
pub fn backend_from_env() -> Option<String> {
    std::env::var(BACKEND_ENV)
        .ok()
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .map(|s| canonical(&s))
}

/// Maps the aliases users know from torch to our names.
pub fn canonical(name: &str) -> String {
    match name.trim().to_ascii_lowercase().as_str() {
        "gloo" | "cpu" => "tcp".into(),
        "cuda" => "nccl".into(),
        other => other.to_string(),
    }
}

/// True when the named backend moves host memory (so it can serve a
/// group's host plane).
pub fn is_host_backend(reg: &Registry, name: &str) -> Result<bool> {
    Ok(reg.get(name)?.serves(Device::Cpu))
}

/// Picks the host-plane backend of a group, and says why.
///
/// Every member reaches the same decision: `all_on_this_host` is true on
/// every member or on none (a group that spans hosts has, on every member,
/// a rank that is elsewhere).
pub fn choose_host_backend(
    reg: &Registry,
    world: usize,
    all_on_this_host: bool,
    forced: Option<&str>,
) -> Result<(String, String)> {
    if world == 1 {
        return Ok(("single".into(), "the group has one member".into()));
    }
    if let Some(name) = forced {
        let f = reg.get(name)?;
        if f.serves(Device::Cpu) {
            if f.same_host_only() && !all_on_this_host {
                return Err(CommError::invalid(format!(
                    "backend `{name}` was forced ({BACKEND_ENV} or InitOptions::backend), but it \
                     needs every member on one host and this group spans several; use tcp"
                )));
            }
            return Ok((f.name().to_string(), "forced by configuration".into()));
        }
        // A device backend was forced: it applies to the device plane only.
    }
    if all_on_this_host && reg.get("shm").is_ok() {
        Ok(("shm".into(), "every member is on this host".into()))
    } else {
        reg.get("tcp")?;
        Ok(("tcp".into(), "members are on different hosts".into()))
    }
}

/// Picks the device-plane backend for `device`: the forced one, else the
/// first registered backend serving the device that is available here.
/// `Err(reason)` when there is none (device buffers are then staged through
/// host memory on the host plane).
pub fn choose_device_backend(
    reg: &Registry,
    device: Device,
    world: usize,
    forced: Option<&str>,
) -> Result<std::result::Result<Arc<dyn BackendFactory>, String>> {
    if device == Device::Cpu {
        return Ok(Err("host tensors use the host backend".into()));
    }
    if world == 1 {
        return Ok(Err("one-member group".into()));
    }
    if let Some(name) = forced {
        let f = reg.get(name)?;
        if f.serves(device) && !f.serves(Device::Cpu) {
            return match f.available(device) {
                Ok(()) => Ok(Ok(f)),
                Err(e) => Err(CommError::unavailable(
                    name,
                    format!("forced for {device} tensors, but: {e}"),
                )),
            };
        }
    }
    let mut why = Vec::new();
    for name in reg.names() {
        let f = reg.get(name)?;
        if !f.serves(device) || f.serves(Device::Cpu) {
            continue;
        }
        match f.available(device) {
            Ok(()) => return Ok(Ok(f)),
            Err(e) => why.push(format!("{name}: {e}")),
        }
    }
    Ok(Err(if why.is_empty() {
        format!("no registered backend serves {device} (build with the `nccl` feature); device tensors are staged through host memory")
    } else {
        format!(
            "{}; device tensors are staged through host memory",
            why.join("; ")
        )
    }))
}

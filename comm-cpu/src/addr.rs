//! Which local address a member binds and publishes.
//!
//! In order of precedence:
//! 1. an explicit address ([`crate::TcpOptions::addr`], `DIST_SOCKET_ADDR`);
//! 2. an interface list ([`crate::TcpOptions::interface`],
//!    `DIST_SOCKET_IFNAME`), NCCL_SOCKET_IFNAME style: `eth` (prefix),
//!    `=eth0` (exact), `eth,ib` (either), `^lo,docker` (anything but);
//! 3. the local address of the route towards the master
//!    (`MASTER_ADDR`:`MASTER_PORT`), found by connecting a UDP socket (no
//!    packet is sent): loopback exactly when the master is reached over
//!    loopback, i.e. it is on this host and named as such;
//! 4. with no master either, `127.0.0.1` (one host only).
//!
//! Members also publish a host identity (boot id and network namespace), so
//! a group that spans hosts while a member is on loopback fails at set-up
//! with an error naming the variables to set, instead of waiting out its
//! deadline.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

use comm_core::{CommError, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::options::{SOCKET_ADDR_ENV, SOCKET_IFNAME_ENV};

/// A parsed interface list (`DIST_SOCKET_IFNAME`), with NCCL_SOCKET_IFNAME's
/// rules: comma-separated names that match as prefixes (`eth` matches
/// `eth0`), exactly with a leading `=` (`=eth0`), and a leading `^` turns
/// the whole list into exclusions (`^lo,docker`: anything but `lo*` and
/// `docker*`).
///
/// ```
/// use comm_cpu::IfnameSpec;
/// let s = IfnameSpec::parse("^lo,docker").unwrap();
/// assert!(s.matches("eth0") && !s.matches("lo") && !s.matches("docker0"));
/// let s = IfnameSpec::parse("=eth0").unwrap();
/// assert!(s.matches("eth0") && !s.matches("eth01"));
/// assert!(IfnameSpec::parse(" , ").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IfnameSpec {
    /// True when the names are exclusions (`^` prefix).
    pub exclude: bool,
    /// True when names match exactly (`=` prefix) rather than as prefixes.
    pub exact: bool,
    /// The names, in order of preference (inclusion lists).
    pub names: Vec<String>,
}

impl IfnameSpec {
    /// Parses a list; an empty list is an error naming the variable.
    pub fn parse(spec: &str) -> Result<IfnameSpec> {
        let mut s = spec.trim();
        let exclude = s.starts_with('^');
        if exclude {
            s = &s[1..];
        }
        let exact = s.starts_with('=');
        if exact {
            s = &s[1..];
        }
        let names: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect();
        if names.is_empty() {
            return Err(CommError::invalid(format!(
                "{SOCKET_IFNAME_ENV}=`{spec}` names no interface; use e.g. `eth0`, `eth,ib` or \
                 `^lo,docker`"
            )));
        }
        Ok(IfnameSpec {
            exclude,
            exact,
            names,
        })
    }

    fn item_matches(&self, item: &str, name: &str) -> bool {
        if self.exact {
            name == item
        } else {
            name.starts_with(item)
        }
    }

    /// Whether interface `name` is selected.
    pub fn matches(&self, name: &str) -> bool {
        let any = self.names.iter().any(|i| self.item_matches(i, name));
        any != self.exclude
    }

    /// The address to use among `(interface, address)` pairs: inclusion
    /// lists in the order of their names, then of the interfaces; addresses
    /// of `family` (IPv4 or IPv6, when given) first, link-local IPv6 never
    /// (it cannot be bound without a scope).
    pub fn select(
        &self,
        interfaces: &[(String, IpAddr)],
        prefer_v6: Option<bool>,
    ) -> Option<(String, IpAddr)> {
        let usable = |ip: &IpAddr| match ip {
            IpAddr::V4(_) => true,
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        };
        let rank = |name: &str, ip: &IpAddr| {
            let item = if self.exclude {
                0
            } else {
                self.names
                    .iter()
                    .position(|i| self.item_matches(i, name))
                    .unwrap_or(usize::MAX)
            };
            let family = match prefer_v6 {
                Some(v6) => usize::from(ip.is_ipv6() != v6),
                None => usize::from(ip.is_ipv6()),
            };
            (item, family)
        };
        interfaces
            .iter()
            .filter(|(n, ip)| self.matches(n) && usable(ip))
            .min_by_key(|(n, ip)| rank(n, ip))
            .cloned()
    }
}

/// Every `(interface, address)` of this host (IPv4 and IPv6).
pub fn interface_addrs() -> Result<Vec<(String, IpAddr)>> {
    let list =
        if_addrs::get_if_addrs().map_err(|e| CommError::io("listing the network interfaces", e))?;
    Ok(list.into_iter().map(|i| (i.name.clone(), i.ip())).collect())
}

/// The address of the interface `spec` selects (see [`IfnameSpec`]).
pub fn interface_addr(spec: &str, prefer_v6: Option<bool>) -> Result<(String, IpAddr)> {
    let parsed = IfnameSpec::parse(spec)?;
    let all = interface_addrs()?;
    parsed.select(&all, prefer_v6).ok_or_else(|| {
        let names: Vec<String> = all.iter().map(|(n, ip)| format!("{n} {ip}")).collect();
        CommError::invalid(format!(
            "{SOCKET_IFNAME_ENV}=`{spec}` selects no interface with a usable address; this host \
             has: {}. Set {SOCKET_ADDR_ENV} to an IP address instead",
            names.join(", ")
        ))
    })
}

/// The local address of the route towards `host:port`: a UDP socket is
/// connected there (which sends nothing) and its local address read, for
/// each address `host` resolves to until one has a route.
pub fn route_to(host: &str, port: u16) -> Result<IpAddr> {
    let targets: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| CommError::io(format!("resolving MASTER_ADDR `{host}`"), e))?
        .collect();
    let mut last = None;
    for t in &targets {
        let found = (|| {
            let s = Socket::new(Domain::for_address(*t), Type::DGRAM, Some(Protocol::UDP))?;
            s.connect(&SockAddr::from(*t))?;
            s.local_addr()?
                .as_socket()
                .map(|a| a.ip())
                .ok_or_else(|| std::io::Error::other("not an IP socket"))
        })();
        match found {
            Ok(ip) => return Ok(ip),
            Err(e) => last = Some(format!("{t}: {e}")),
        }
    }
    Err(CommError::invalid(format!(
        "no route from this host towards MASTER_ADDR `{host}` ({}); set {SOCKET_IFNAME_ENV} or \
         {SOCKET_ADDR_ENV}",
        last.unwrap_or_else(|| "it resolves to no address".into())
    )))
}

/// How the bind address was chosen, for logs and errors.
#[derive(Debug, Clone)]
pub(crate) struct Chosen {
    pub ip: IpAddr,
    pub why: String,
}

/// Applies the rules of this module's documentation.
pub(crate) fn choose(
    addr: Option<IpAddr>,
    interface: Option<&str>,
    master: Option<(&str, u16)>,
) -> Result<Chosen> {
    if let Some(ip) = addr {
        return Ok(Chosen {
            ip,
            why: format!("given ({SOCKET_ADDR_ENV} or TcpOptions::addr)"),
        });
    }
    let master_v6 = master.and_then(|(h, p)| {
        (h, p)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .map(|a| a.is_ipv6())
    });
    if let Some(spec) = interface {
        let (name, ip) = interface_addr(spec, master_v6)?;
        return Ok(Chosen {
            ip,
            why: format!("interface {name} selected by {SOCKET_IFNAME_ENV}=`{spec}`"),
        });
    }
    if let Some((h, p)) = master {
        let ip = route_to(h, p)?;
        return Ok(Chosen {
            ip,
            why: format!("local address of the route towards MASTER_ADDR {h}:{p}"),
        });
    }
    Ok(Chosen {
        ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        why: format!(
            "no {SOCKET_ADDR_ENV}, {SOCKET_IFNAME_ENV} or MASTER_ADDR: loopback (one host only)"
        ),
    })
}

/// This process's network stack: the host's boot id and the network
/// namespace (two namespaces on one host cannot reach each other's
/// loopback either), plus the host name for messages.
pub fn host_identity() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let ns = std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut host = read("/proc/sys/kernel/hostname");
    if host.is_empty() {
        host = std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown-host".into());
    }
    let id: String = format!("{host}/{}/{ns}", read("/proc/sys/kernel/random/boot_id"))
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    id
}

/// The host name part of a [`host_identity`], for messages.
pub(crate) fn host_name(identity: &str) -> &str {
    identity.split('/').next().unwrap_or(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifs() -> Vec<(String, IpAddr)> {
        [
            ("lo", "127.0.0.1"),
            ("lo", "::1"),
            ("docker0", "172.17.0.1"),
            ("eth0", "fe80::1"),
            ("eth0", "fd00::2"),
            ("eth0", "192.0.2.2"),
            ("eth1", "198.51.100.7"),
            ("ib0", "10.0.0.5"),
        ]
        .iter()
        .map(|(n, a)| (n.to_string(), a.parse().unwrap()))
        .collect()
    }

    fn pick(spec: &str, v6: Option<bool>) -> Option<String> {
        IfnameSpec::parse(spec)
            .unwrap()
            .select(&ifs(), v6)
            .map(|(n, ip)| format!("{n} {ip}"))
    }

    #[test]
    fn ifname_lists_include_exclude_and_prefix() {
        assert_eq!(pick("eth", None).as_deref(), Some("eth0 192.0.2.2"));
        assert_eq!(pick("eth", Some(true)).as_deref(), Some("eth0 fd00::2"));
        assert_eq!(pick("=eth1", None).as_deref(), Some("eth1 198.51.100.7"));
        assert_eq!(pick("=eth", None), None);
        // Inclusion lists keep their order of preference.
        assert_eq!(pick("ib,eth", None).as_deref(), Some("ib0 10.0.0.5"));
        assert_eq!(
            pick(" eth1 , ib", None).as_deref(),
            Some("eth1 198.51.100.7")
        );
        // Exclusions: the first remaining interface, IPv4 first.
        assert_eq!(pick("^lo,docker", None).as_deref(), Some("eth0 192.0.2.2"));
        assert_eq!(
            pick("^lo,docker,eth", None).as_deref(),
            Some("ib0 10.0.0.5")
        );
        assert_eq!(
            pick("^=eth0,lo,docker0", None).as_deref(),
            Some("eth1 198.51.100.7")
        );
        // Link-local IPv6 is never chosen.
        let only_ll = vec![("eth0".to_string(), "fe80::1".parse().unwrap())];
        assert_eq!(
            IfnameSpec::parse("eth")
                .unwrap()
                .select(&only_ll, Some(true)),
            None
        );
        assert!(IfnameSpec::parse("^").is_err());
        assert!(IfnameSpec::parse("").is_err());
    }

    #[test]
    fn real_interfaces_resolve() {
        let (name, ip) = interface_addr("=lo", None).unwrap();
        assert_eq!((name.as_str(), ip), ("lo", IpAddr::V4(Ipv4Addr::LOCALHOST)));
        let e = interface_addr("no-such-if", None).unwrap_err().to_string();
        assert!(
            e.contains(SOCKET_IFNAME_ENV) && e.contains(SOCKET_ADDR_ENV),
            "{e}"
        );
    }

    #[test]
    fn route_towards_the_master() {
        // Named as this host: loopback.
        assert!(route_to("127.0.0.1", 29500).unwrap().is_loopback());
        assert!(route_to("localhost", 29500).unwrap().is_loopback());
        // A master at one of this host's own non-loopback addresses: the route
        // leaves from that address, not loopback.
        for (name, ip) in interface_addrs().unwrap() {
            if ip.is_loopback()
                || matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
            {
                continue;
            }
            assert_eq!(route_to(&ip.to_string(), 29500).unwrap(), ip, "via {name}");
        }
        // IPv6 loopback when the master is ::1 (where IPv6 is configured).
        if interface_addrs()
            .unwrap()
            .iter()
            .any(|(_, ip)| *ip == "::1".parse::<IpAddr>().unwrap())
        {
            assert_eq!(
                route_to("::1", 29500).unwrap(),
                "::1".parse::<IpAddr>().unwrap()
            );
        }
        let e = choose(None, None, None).unwrap();
        assert!(e.ip.is_loopback());
        let c = choose(None, Some("=lo"), Some(("127.0.0.1", 1))).unwrap();
        assert!(c.why.contains("interface lo"), "{}", c.why);
        let c = choose(Some("10.1.2.3".parse().unwrap()), Some("=lo"), None).unwrap();
        assert_eq!(c.ip, "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn host_identity_is_stable_and_has_no_spaces() {
        let a = host_identity();
        assert_eq!(a, host_identity());
        assert!(!a.contains(' ') && a.contains("net:"), "{a}");
        assert!(!host_name(&a).is_empty());
    }
}

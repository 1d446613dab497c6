//! The node's IPv4 and IPv6 addresses, found the way calico/node finds them (`IP`,
//! `IP_AUTODETECTION_METHOD`; `IP6`, `IP6_AUTODETECTION_METHOD` with the same methods). An
//! IPv6 node address is never link-local: it is the next hop the node announces (Calico
//! #10321).
//!
//! The address keeps the prefix of the interface that holds it (`192.168.92.128/24`): the
//! prefix decides which peers are in the same subnet (CrossSubnet).
//!
//! Interfaces are searched in calico/node's order, highest interface index first
//! ([`list_interfaces`] returns them so). Unlike calico/node, interfaces that are
//! administratively down are never picked by the enumerating methods.

use std::collections::HashMap;
use std::ffi::CStr;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::str::FromStr;
use std::sync::LazyLock;

use ipnet::{Ipv4Net, Ipv6Net};
use regex::Regex;
use thiserror::Error;

/// Interfaces that `first-found` and `skip-interface=` never pick: calico/node's defaults
/// (container bridges, veths, loopback, tunnels and other CNI devices).
pub const DEFAULT_INTERFACES_TO_EXCLUDE: &[&str] = &[
    "^docker.*",
    "^cbr.*",
    "^dummy.*",
    "^virbr.*",
    "^lxcbr.*",
    "^veth.*",
    "^lo",
    "^cali.*",
    "^tunl.*",
    "^flannel.*",
    "^kube-ipvs.*",
    "^cni.*",
    r"^vxlan\.calico.*",
    r"^vxlan-v6\.calico.*",
    r"^wireguard\.cali.*",
    r"^wg-v6\.cali.*",
    "^nodelocaldns.*",
];

const METHODS_HELP: &str = "first-found, interface=REGEX[,REGEX...], \
     skip-interface=REGEX[,REGEX...], can-reach=ADDR, cidr=CIDR[,CIDR...] or \
     kubernetes-internal-ip";

/// An `IP_AUTODETECTION_METHOD`.
#[derive(Debug, Clone)]
pub enum Method {
    /// `first-found`: the first usable address on an interface not in
    /// [`DEFAULT_INTERFACES_TO_EXCLUDE`].
    FirstFound,
    /// `interface=REGEX[,REGEX...]`: the first usable address on an interface whose name
    /// matches any of the expressions (unanchored; the default exclusions do not apply).
    Interface(Vec<Regex>),
    /// `skip-interface=REGEX[,REGEX...]`: `first-found`, also skipping interfaces whose name
    /// matches any of the expressions.
    SkipInterface(Vec<Regex>),
    /// `can-reach=ADDR`: the source address the kernel would use towards `ADDR` (an IPv4
    /// address; host names are not resolved).
    CanReach(IpAddr),
    /// `cidr=CIDR[,CIDR...]`: the first usable address inside any of the networks, on any
    /// interface (the default exclusions do not apply).
    Cidr(Vec<Ipv4Net>),
    /// `cidr=CIDR[,CIDR...]` with IPv6 networks (`IP6_AUTODETECTION_METHOD`).
    Cidr6(Vec<Ipv6Net>),
    /// `kubernetes-internal-ip`: the Node's `InternalIP`.
    KubernetesInternalIp,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn join<T: fmt::Display>(items: &[T]) -> String {
            items
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        }
        match self {
            Method::FirstFound => f.write_str("first-found"),
            Method::Interface(r) => write!(f, "interface={}", join(r)),
            Method::SkipInterface(r) => write!(f, "skip-interface={}", join(r)),
            Method::CanReach(a) => write!(f, "can-reach={a}"),
            Method::Cidr(c) => write!(f, "cidr={}", join(c)),
            Method::Cidr6(c) => write!(f, "cidr={}", join(c)),
            Method::KubernetesInternalIp => f.write_str("kubernetes-internal-ip"),
        }
    }
}

/// A bad `IP_AUTODETECTION_METHOD`.
#[derive(Debug, Error)]
pub enum MethodError {
    #[error("unknown IP autodetection method {0:?}; use {METHODS_HELP}")]
    Unknown(String),
    #[error("IP autodetection method {method}= needs a value, e.g. {example}")]
    Empty {
        method: &'static str,
        example: &'static str,
    },
    #[error(
        "IP autodetection method {method}={value:?} has an empty item; separate items with \
         single commas"
    )]
    EmptyItem { method: &'static str, value: String },
    #[error(
        "IP autodetection method {method}=: {regex:?} is not a valid regular expression: {source}"
    )]
    BadRegex {
        method: &'static str,
        regex: String,
        #[source]
        source: regex::Error,
    },
    #[error("IP autodetection method cidr=: {0:?} is not an IPv4 network such as 192.168.92.0/24")]
    BadCidr(String),
    #[error(
        "IP autodetection method can-reach=: {0:?} is not an IPv4 address (host names are not \
         resolved); use e.g. can-reach=192.168.92.1"
    )]
    BadReachAddress(String),
    #[error("IP6 autodetection method cidr=: {0:?} is not an IPv6 network such as fd00:92::/64")]
    BadCidr6(String),
    #[error(
        "IP6 autodetection method can-reach=: {0:?} is not an IPv6 address (host names are not \
         resolved); use e.g. can-reach=fd00:92::1"
    )]
    BadReachAddress6(String),
}

fn split_items<'a>(
    method: &'static str,
    value: &'a str,
    example: &'static str,
) -> Result<Vec<&'a str>, MethodError> {
    if value.trim().is_empty() {
        return Err(MethodError::Empty { method, example });
    }
    let items: Vec<&str> = value.split(',').map(str::trim).collect();
    if items.iter().any(|i| i.is_empty()) {
        return Err(MethodError::EmptyItem {
            method,
            value: value.to_string(),
        });
    }
    Ok(items)
}

fn parse_regexes(
    method: &'static str,
    value: &str,
    example: &'static str,
) -> Result<Vec<Regex>, MethodError> {
    split_items(method, value, example)?
        .into_iter()
        .map(|r| {
            Regex::new(r).map_err(|source| MethodError::BadRegex {
                method,
                regex: r.to_string(),
                source,
            })
        })
        .collect()
}

impl FromStr for Method {
    type Err = MethodError;

    /// Parses calico/node's spellings; an empty string is `first-found`, as in calico/node.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.is_empty() || text == "first-found" {
            return Ok(Method::FirstFound);
        }
        if text == "kubernetes-internal-ip" {
            return Ok(Method::KubernetesInternalIp);
        }
        let Some((name, value)) = text.split_once('=') else {
            return Err(MethodError::Unknown(text.to_string()));
        };
        match name.trim() {
            "interface" => Ok(Method::Interface(parse_regexes(
                "interface",
                value,
                "interface=eth0 or interface=ens.*,eth.*",
            )?)),
            "skip-interface" => Ok(Method::SkipInterface(parse_regexes(
                "skip-interface",
                value,
                "skip-interface=eth1 or skip-interface=enp6s.*,br.*",
            )?)),
            "cidr" => {
                let items = split_items("cidr", value, "cidr=192.168.92.0/24")?;
                let nets = items
                    .into_iter()
                    .map(|c| {
                        c.parse::<Ipv4Net>()
                            .map(|n| n.trunc())
                            .map_err(|_| MethodError::BadCidr(c.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Method::Cidr(nets))
            }
            "can-reach" => {
                let value = value.trim();
                if value.is_empty() {
                    return Err(MethodError::Empty {
                        method: "can-reach",
                        example: "can-reach=192.168.92.1",
                    });
                }
                match value.parse::<Ipv4Addr>() {
                    Ok(a) if !a.is_unspecified() => Ok(Method::CanReach(IpAddr::V4(a))),
                    _ => Err(MethodError::BadReachAddress(value.to_string())),
                }
            }
            _ => Err(MethodError::Unknown(text.to_string())),
        }
    }
}

impl Method {
    /// Parses an `IP6_AUTODETECTION_METHOD`: the same spellings, with IPv6 networks for
    /// `cidr=` and an IPv6 address for `can-reach=`.
    pub fn parse_v6(text: &str) -> Result<Method, MethodError> {
        let text = text.trim();
        match text.split_once('=').map(|(n, v)| (n.trim(), v)) {
            Some(("cidr", value)) => {
                let items = split_items("cidr", value, "cidr=fd00:92::/64")?;
                let nets = items
                    .into_iter()
                    .map(|c| {
                        c.parse::<Ipv6Net>()
                            .map(|n| n.trunc())
                            .map_err(|_| MethodError::BadCidr6(c.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Method::Cidr6(nets))
            }
            Some(("can-reach", value)) => {
                let value = value.trim();
                if value.is_empty() {
                    return Err(MethodError::Empty {
                        method: "can-reach",
                        example: "can-reach=fd00:92::1",
                    });
                }
                match value.parse::<Ipv6Addr>() {
                    Ok(a) if !a.is_unspecified() => Ok(Method::CanReach(IpAddr::V6(a))),
                    _ => Err(MethodError::BadReachAddress6(value.to_string())),
                }
            }
            _ => text.parse(),
        }
    }
}

/// One network interface of the host, with its addresses and their prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInterface {
    pub name: String,
    pub index: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Addresses with the interface's prefix (`192.168.92.128/24`), in the kernel's order.
    pub addrs: Vec<Ipv4Net>,
    /// IPv6 addresses with their prefixes (`fd00:92::128/64`), in the kernel's order.
    pub addrs6: Vec<Ipv6Net>,
}

/// The node address that was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// The address with its interface's prefix, e.g. `192.168.92.128/24`.
    pub address: Ipv4Net,
    /// The interface holding it, when one does.
    pub interface: Option<String>,
}

impl fmt::Display for Detected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.interface {
            Some(name) => write!(f, "{} on {name}", self.address),
            None => write!(f, "{} (on no local interface)", self.address),
        }
    }
}

/// The node IPv6 address that was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected6 {
    /// The address with its interface's prefix, e.g. `fd00:92::128/64`.
    pub address: Ipv6Net,
    /// The interface holding it, when one does.
    pub interface: Option<String>,
}

/// Why no node address was found.
#[derive(Debug, Error)]
pub enum DetectError {
    #[error(transparent)]
    Method(#[from] MethodError),
    #[error(
        "IP={0:?} is not `autodetect`, `none` or an IPv4 address with an optional prefix \
         such as 192.168.92.128/24"
    )]
    BadIp(String),
    #[error("cannot list the host's network interfaces: {0}")]
    Interfaces(#[source] io::Error),
    #[error(
        "IP autodetection method {method} found no usable IPv4 address (up interface, not \
         loopback or link-local); candidate interfaces: {candidates}; set IP or another \
         IP_AUTODETECTION_METHOD"
    )]
    NoAddress { method: String, candidates: String },
    #[error(
        "IP6={0:?} is not `autodetect`, `none` or a global IPv6 address with an optional \
         prefix such as fd00:92::128/64"
    )]
    BadIp6(String),
    #[error(
        "IP6 autodetection method {method} found no usable IPv6 address (up interface, not \
         loopback or link-local); candidate interfaces: {candidates}; set IP6 or another \
         IP6_AUTODETECTION_METHOD"
    )]
    NoAddress6 { method: String, candidates: String },
    #[error(
        "IP autodetection method kubernetes-internal-ip: the Node has no IPv4 InternalIP in \
         status.addresses; set IP or another IP_AUTODETECTION_METHOD"
    )]
    NoInternalIp,
    #[error(
        "IP6 autodetection method kubernetes-internal-ip: the Node has no IPv6 InternalIP in \
         status.addresses; set IP6 or another IP6_AUTODETECTION_METHOD"
    )]
    NoInternalIp6,
    #[error("IP autodetection method can-reach={dest}: no route to {dest}: {source}")]
    Unreachable {
        dest: IpAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "IP autodetection method can-reach={dest}: the kernel's source address {source_addr} \
         is on no local interface"
    )]
    SourceNotLocal { dest: IpAddr, source_addr: IpAddr },
}

/// Not loopback, link-local, unspecified, multicast or broadcast.
fn usable(addr: Ipv4Addr) -> bool {
    !(addr.is_loopback()
        || addr.is_link_local()
        || addr.is_unspecified()
        || addr.is_multicast()
        || addr.is_broadcast())
}

fn any_match(regexes: &[Regex], name: &str) -> bool {
    regexes.iter().any(|r| r.is_match(name))
}

/// [`DEFAULT_INTERFACES_TO_EXCLUDE`], compiled once.
fn default_exclusions() -> &'static [Regex] {
    static COMPILED: LazyLock<Vec<Regex>> = LazyLock::new(|| {
        DEFAULT_INTERFACES_TO_EXCLUDE
            .iter()
            .map(|r| Regex::new(r).expect("default exclusion regexes are valid"))
            .collect()
    });
    &COMPILED
}

/// The first up interface passing `pick` and its first address in `addrs` that passes `ok`;
/// otherwise the candidates looked at, for the error message. Shared by both families.
fn first_address<N: Copy + std::fmt::Display>(
    ifaces: &[HostInterface],
    pick: impl Fn(&HostInterface) -> bool,
    addrs: impl Fn(&HostInterface) -> &[N],
    ok: impl Fn(&N) -> bool,
) -> Result<(N, String), String> {
    let mut candidates = Vec::new();
    for iface in ifaces.iter().filter(|i| pick(i)) {
        if !iface.up {
            candidates.push(format!("{} (down)", iface.name));
            continue;
        }
        if let Some(net) = addrs(iface).iter().find(|n| ok(n)) {
            return Ok((*net, iface.name.clone()));
        }
        let shown: Vec<String> = addrs(iface).iter().map(ToString::to_string).collect();
        candidates.push(format!("{} [{}]", iface.name, shown.join(" ")));
    }
    // A host with hundreds of workload interfaces must not make a page-long message.
    const SHOWN: usize = 8;
    let more = candidates.len().saturating_sub(SHOWN);
    candidates.truncate(SHOWN);
    Err(match (candidates.is_empty(), more) {
        (true, _) => "none".to_string(),
        (false, 0) => candidates.join(", "),
        (false, n) => format!("{} and {n} more", candidates.join(", ")),
    })
}

/// Returns the first (interface, address) where the interface is up and passes `pick` and
/// the address is usable and passes `want`.
fn enumerate(
    method: &Method,
    ifaces: &[HostInterface],
    pick: impl Fn(&HostInterface) -> bool,
    want: impl Fn(Ipv4Addr) -> bool,
) -> Result<Detected, DetectError> {
    first_address(
        ifaces,
        pick,
        |i| &i.addrs,
        |n| usable(n.addr()) && want(n.addr()),
    )
    .map(|(address, name)| Detected {
        address,
        interface: Some(name),
    })
    .map_err(|candidates| DetectError::NoAddress {
        method: method.to_string(),
        candidates,
    })
}

/// The first interface (in `ifaces` order) that holds `addr`, whether up or not.
pub fn interface_of(addr: Ipv4Addr, ifaces: &[HostInterface]) -> Option<&HostInterface> {
    ifaces
        .iter()
        .find(|i| i.addrs.iter().any(|n| n.addr() == addr))
}

/// `addr` with the prefix of the interface holding it, or /32 when none does.
fn with_local_prefix(addr: Ipv4Addr, ifaces: &[HostInterface]) -> Detected {
    match interface_of(addr, ifaces) {
        Some(iface) => {
            let net = iface
                .addrs
                .iter()
                .find(|n| n.addr() == addr)
                .copied()
                .unwrap_or_else(|| Ipv4Net::from(addr));
            Detected {
                address: net,
                interface: Some(iface.name.clone()),
            }
        }
        None => Detected {
            address: Ipv4Net::from(addr),
            interface: None,
        },
    }
}

/// Picks the node address from `ifaces` (searched in slice order) by `method`;
/// `internal_ip` is the Node's `InternalIP`, used by `kubernetes-internal-ip`. For
/// `can-reach=` this asks the kernel through [`source_address_for`].
pub fn select(
    method: &Method,
    ifaces: &[HostInterface],
    internal_ip: Option<Ipv4Addr>,
) -> Result<Detected, DetectError> {
    select_with(method, ifaces, internal_ip, source_address_for)
}

/// [`select`] with the kernel's source-address lookup replaced by `source_for`.
pub fn select_with(
    method: &Method,
    ifaces: &[HostInterface],
    internal_ip: Option<Ipv4Addr>,
    source_for: impl FnOnce(IpAddr) -> io::Result<IpAddr>,
) -> Result<Detected, DetectError> {
    match method {
        Method::FirstFound => {
            let excl = default_exclusions();
            enumerate(method, ifaces, |i| !any_match(excl, &i.name), |_| true)
        }
        Method::SkipInterface(skip) => {
            let excl = default_exclusions();
            enumerate(
                method,
                ifaces,
                |i| !any_match(excl, &i.name) && !any_match(skip, &i.name),
                |_| true,
            )
        }
        Method::Interface(incl) => {
            enumerate(method, ifaces, |i| any_match(incl, &i.name), |_| true)
        }
        Method::Cidr(nets) => enumerate(
            method,
            ifaces,
            |_| true,
            |a| nets.iter().any(|n| n.contains(&a)),
        ),
        // IPv6 networks select no IPv4 address (only parse_v6 makes this).
        Method::Cidr6(_) => enumerate(method, ifaces, |_| true, |_| false),
        Method::KubernetesInternalIp => {
            let ip = internal_ip.ok_or(DetectError::NoInternalIp)?;
            Ok(with_local_prefix(ip, ifaces))
        }
        Method::CanReach(dest) => {
            let dest = *dest;
            let source =
                source_for(dest).map_err(|source| DetectError::Unreachable { dest, source })?;
            let not_local = || DetectError::SourceNotLocal {
                dest,
                source_addr: source,
            };
            let IpAddr::V4(v4) = source else {
                return Err(not_local());
            };
            let found = with_local_prefix(v4, ifaces);
            if found.interface.is_none() {
                return Err(not_local());
            }
            Ok(found)
        }
    }
}

/// Not loopback, link-local, unspecified or multicast: an address other nodes can use as
/// a next hop.
fn usable6(addr: Ipv6Addr) -> bool {
    !(addr.is_loopback()
        || addr.is_unicast_link_local()
        || addr.is_unspecified()
        || addr.is_multicast())
}

/// [`enumerate`] for IPv6 addresses.
fn enumerate6(
    method: &Method,
    ifaces: &[HostInterface],
    pick: impl Fn(&HostInterface) -> bool,
    want: impl Fn(Ipv6Addr) -> bool,
) -> Result<Detected6, DetectError> {
    first_address(
        ifaces,
        pick,
        |i| &i.addrs6,
        |n| usable6(n.addr()) && want(n.addr()),
    )
    .map(|(address, name)| Detected6 {
        address,
        interface: Some(name),
    })
    .map_err(|candidates| DetectError::NoAddress6 {
        method: method.to_string(),
        candidates,
    })
}

/// The first interface (in `ifaces` order) that holds IPv6 `addr`, whether up or not.
pub fn interface_of6(addr: Ipv6Addr, ifaces: &[HostInterface]) -> Option<&HostInterface> {
    ifaces
        .iter()
        .find(|i| i.addrs6.iter().any(|n| n.addr() == addr))
}

/// `addr` with the prefix of the interface holding it, or /128 when none does.
fn with_local_prefix6(addr: Ipv6Addr, ifaces: &[HostInterface]) -> Detected6 {
    let iface = interface_of6(addr, ifaces);
    Detected6 {
        address: iface
            .and_then(|i| i.addrs6.iter().find(|n| n.addr() == addr).copied())
            .unwrap_or_else(|| Ipv6Net::from(addr)),
        interface: iface.map(|i| i.name.clone()),
    }
}

/// [`select_with`] for the node's IPv6 address (`IP6_AUTODETECTION_METHOD`):
/// `internal_ip` is the Node's IPv6 `InternalIP`.
pub fn select6_with(
    method: &Method,
    ifaces: &[HostInterface],
    internal_ip: Option<Ipv6Addr>,
    source_for: impl FnOnce(IpAddr) -> io::Result<IpAddr>,
) -> Result<Detected6, DetectError> {
    let excl = default_exclusions();
    match method {
        Method::FirstFound => enumerate6(method, ifaces, |i| !any_match(excl, &i.name), |_| true),
        Method::SkipInterface(skip) => enumerate6(
            method,
            ifaces,
            |i| !any_match(excl, &i.name) && !any_match(skip, &i.name),
            |_| true,
        ),
        Method::Interface(incl) => {
            enumerate6(method, ifaces, |i| any_match(incl, &i.name), |_| true)
        }
        Method::Cidr6(nets) => enumerate6(
            method,
            ifaces,
            |_| true,
            |a| nets.iter().any(|n| n.contains(&a)),
        ),
        // IPv4 networks select no IPv6 address (parse_v6 never makes this).
        Method::Cidr(_) => enumerate6(method, ifaces, |_| true, |_| false),
        Method::KubernetesInternalIp => {
            let ip = internal_ip.ok_or(DetectError::NoInternalIp6)?;
            Ok(with_local_prefix6(ip, ifaces))
        }
        Method::CanReach(dest) => {
            let dest = *dest;
            let source =
                source_for(dest).map_err(|source| DetectError::Unreachable { dest, source })?;
            let not_local = || DetectError::SourceNotLocal {
                dest,
                source_addr: source,
            };
            let IpAddr::V6(v6) = source else {
                return Err(not_local());
            };
            let found = with_local_prefix6(v6, ifaces);
            if found.interface.is_none() || !usable6(v6) {
                return Err(not_local());
            }
            Ok(found)
        }
    }
}

/// The source address the kernel would use to send to `dest` (a connected UDP socket to port
/// 80; no packet is sent). Runs in the calling thread's network namespace.
pub fn source_address_for(dest: IpAddr) -> io::Result<IpAddr> {
    let bind: IpAddr = match dest {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((bind, 0))?;
    socket.connect((dest, 80))?;
    Ok(socket.local_addr()?.ip())
}

/// Frees a `getifaddrs` list.
struct IfAddrs(*mut libc::ifaddrs);

impl Drop for IfAddrs {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the pointer came from a successful getifaddrs and is freed once.
            unsafe { libc::freeifaddrs(self.0) };
        }
    }
}

/// The interfaces of the calling thread's network namespace with their addresses, in
/// calico/node's search order: highest interface index first.
pub fn list_interfaces() -> io::Result<Vec<HostInterface>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head to a valid out-pointer.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let list = IfAddrs(head);
    let mut order: Vec<String> = Vec::new();
    let mut by_name: HashMap<String, HostInterface> = HashMap::new();
    let mut cursor = list.0;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list owned by `list`, alive until it drops.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let label = unsafe { CStr::from_ptr(entry.ifa_name) }.to_string_lossy();
        // IPv4 addresses carry their label (`eth0:1`); device names never contain ':'.
        let name = label.split(':').next().unwrap_or_default().to_string();
        let iface = by_name.entry(name.clone()).or_insert_with(|| {
            order.push(name.clone());
            HostInterface {
                name: name.clone(),
                index: 0,
                up: false,
                addrs: Vec::new(),
                addrs6: Vec::new(),
            }
        });
        iface.up |= entry.ifa_flags & libc::IFF_UP as libc::c_uint != 0;
        if entry.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
        let family = i32::from(unsafe { (*entry.ifa_addr).sa_family });
        match family {
            libc::AF_PACKET => {
                // SAFETY: AF_PACKET entries carry a sockaddr_ll.
                let ll = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_ll) };
                iface.index = u32::try_from(ll.sll_ifindex).unwrap_or(0);
            }
            libc::AF_INET => {
                // SAFETY: AF_INET entries carry a sockaddr_in.
                let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                let prefix = if entry.ifa_netmask.is_null() {
                    32
                } else {
                    // SAFETY: an AF_INET entry's netmask is a sockaddr_in too.
                    let mask = unsafe { &*(entry.ifa_netmask as *const libc::sockaddr_in) };
                    u32::from_be(mask.sin_addr.s_addr).leading_ones() as u8
                };
                if let Ok(net) = Ipv4Net::new(addr, prefix) {
                    iface.addrs.push(net);
                }
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 entries carry a sockaddr_in6.
                let sin6 = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in6) };
                let addr = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                let prefix = if entry.ifa_netmask.is_null() {
                    128
                } else {
                    // SAFETY: an AF_INET6 entry's netmask is a sockaddr_in6 too.
                    let mask = unsafe { &*(entry.ifa_netmask as *const libc::sockaddr_in6) };
                    u128::from_be_bytes(mask.sin6_addr.s6_addr).leading_ones() as u8
                };
                if let Ok(net) = Ipv6Net::new(addr, prefix) {
                    iface.addrs6.push(net);
                }
            }
            _ => {}
        }
    }
    drop(list);
    let mut ifaces: Vec<HostInterface> = order
        .into_iter()
        .filter_map(|name| by_name.remove(&name))
        .map(|mut iface| {
            if iface.index == 0
                && let Ok(cname) = std::ffi::CString::new(iface.name.clone())
            {
                // SAFETY: if_nametoindex reads a valid NUL-terminated string.
                iface.index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            }
            iface
        })
        .collect();
    ifaces.sort_by_key(|i| std::cmp::Reverse(i.index));
    Ok(ifaces)
}

/// What `IP` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IpChoice {
    Autodetect,
    Disabled,
    Explicit(Ipv4Addr, Option<u8>),
}

fn parse_ip_flag(text: &str) -> Result<IpChoice, DetectError> {
    let t = text.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("autodetect") {
        return Ok(IpChoice::Autodetect);
    }
    if t.eq_ignore_ascii_case("none") {
        return Ok(IpChoice::Disabled);
    }
    let bad = || DetectError::BadIp(text.to_string());
    let (addr, prefix) = match t.split_once('/') {
        Some((a, p)) => {
            let p: u8 = p.trim().parse().map_err(|_| bad())?;
            if p > 32 {
                return Err(bad());
            }
            (a.trim(), Some(p))
        }
        None => (t, None),
    };
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() {
        return Err(bad());
    }
    Ok(IpChoice::Explicit(addr, prefix))
}

/// [`resolve`] against a given interface list (searched in slice order).
pub fn resolve_in(
    ip_flag: &str,
    method: &str,
    internal_ip: Option<Ipv4Addr>,
    ifaces: &[HostInterface],
) -> Result<Option<Detected>, DetectError> {
    match parse_ip_flag(ip_flag)? {
        IpChoice::Disabled => Ok(None),
        IpChoice::Autodetect => {
            let method: Method = method.parse()?;
            select(&method, ifaces, internal_ip).map(Some)
        }
        IpChoice::Explicit(addr, None) => Ok(Some(with_local_prefix(addr, ifaces))),
        IpChoice::Explicit(addr, Some(prefix)) => {
            let address =
                Ipv4Net::new(addr, prefix).map_err(|_| DetectError::BadIp(ip_flag.into()))?;
            Ok(Some(Detected {
                address,
                interface: interface_of(addr, ifaces).map(|i| i.name.clone()),
            }))
        }
    }
}

/// The node address from the `IP` flag: `none` → `None`; `ADDR/PREFIX` as given; `ADDR` with
/// the prefix of the interface holding it (else /32); `autodetect` (or empty) by `method`
/// (`IP_AUTODETECTION_METHOD`, parsed only then). Reads the calling thread's network
/// namespace.
pub fn resolve(
    ip_flag: &str,
    method: &str,
    internal_ip: Option<Ipv4Addr>,
) -> Result<Option<Detected>, DetectError> {
    match parse_ip_flag(ip_flag)? {
        IpChoice::Disabled => return Ok(None),
        // A bad method is reported before the interfaces are read.
        IpChoice::Autodetect => drop(method.parse::<Method>()?),
        IpChoice::Explicit(..) => {}
    }
    let ifaces = list_interfaces().map_err(DetectError::Interfaces)?;
    resolve_in(ip_flag, method, internal_ip, &ifaces)
}

/// What `IP6` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ip6Choice {
    Autodetect,
    Disabled,
    Explicit(Ipv6Addr, Option<u8>),
}

fn parse_ip6_flag(text: &str) -> Result<Ip6Choice, DetectError> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("autodetect") {
        return Ok(Ip6Choice::Autodetect);
    }
    // calico/node: an empty IP6 means no IPv6 address.
    if t.is_empty() || t.eq_ignore_ascii_case("none") {
        return Ok(Ip6Choice::Disabled);
    }
    let bad = || DetectError::BadIp6(text.to_string());
    let (addr, prefix) = match t.split_once('/') {
        Some((a, p)) => {
            let p: u8 = p.trim().parse().map_err(|_| bad())?;
            if p > 128 {
                return Err(bad());
            }
            (a.trim(), Some(p))
        }
        None => (t, None),
    };
    let addr: Ipv6Addr = addr.parse().map_err(|_| bad())?;
    if !usable6(addr) {
        return Err(bad());
    }
    Ok(Ip6Choice::Explicit(addr, prefix))
}

/// [`resolve6`] against a given interface list (searched in slice order), with the kernel's
/// source-address lookup given.
pub fn resolve6_in(
    ip6_flag: &str,
    method: &str,
    internal_ip: Option<Ipv6Addr>,
    ifaces: &[HostInterface],
    source_for: impl FnOnce(IpAddr) -> io::Result<IpAddr>,
) -> Result<Option<Detected6>, DetectError> {
    match parse_ip6_flag(ip6_flag)? {
        Ip6Choice::Disabled => Ok(None),
        Ip6Choice::Autodetect => {
            let method = Method::parse_v6(method)?;
            select6_with(&method, ifaces, internal_ip, source_for).map(Some)
        }
        Ip6Choice::Explicit(addr, None) => Ok(Some(with_local_prefix6(addr, ifaces))),
        Ip6Choice::Explicit(addr, Some(prefix)) => {
            let address =
                Ipv6Net::new(addr, prefix).map_err(|_| DetectError::BadIp6(ip6_flag.into()))?;
            Ok(Some(Detected6 {
                address,
                interface: interface_of6(addr, ifaces).map(|i| i.name.clone()),
            }))
        }
    }
}

/// The node's IPv6 address from the `IP6` flag: `none` or empty → `None`; `ADDR/PREFIX` as
/// given; `ADDR` with the prefix of the interface holding it (else /128); `autodetect` by
/// `method` (`IP6_AUTODETECTION_METHOD`). Reads the calling thread's network namespace.
pub fn resolve6(
    ip6_flag: &str,
    method: &str,
    internal_ip: Option<Ipv6Addr>,
) -> Result<Option<Detected6>, DetectError> {
    match parse_ip6_flag(ip6_flag)? {
        Ip6Choice::Disabled => return Ok(None),
        Ip6Choice::Autodetect => drop(Method::parse_v6(method)?),
        Ip6Choice::Explicit(..) => {}
    }
    let ifaces = list_interfaces().map_err(DetectError::Interfaces)?;
    resolve6_in(ip6_flag, method, internal_ip, &ifaces, source_address_for)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, index: u32, up: bool, addrs: &[&str]) -> HostInterface {
        HostInterface {
            name: name.into(),
            index,
            up,
            addrs: addrs
                .iter()
                .filter(|a| !a.contains(':'))
                .map(|a| a.parse().unwrap())
                .collect(),
            addrs6: addrs
                .iter()
                .filter(|a| a.contains(':'))
                .map(|a| a.parse().unwrap())
                .collect(),
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn found(address: &str, interface: &str) -> Detected {
        Detected {
            address: net(address),
            interface: Some(interface.into()),
        }
    }

    fn pick(method: &str, ifaces: &[HostInterface]) -> Result<Detected, DetectError> {
        select_with(&method.parse().unwrap(), ifaces, None, |_| {
            panic!("no kernel lookup expected")
        })
    }

    /// A node like seed 001's master01, in calico/node's order (highest index first).
    fn host() -> Vec<HostInterface> {
        vec![
            iface("cali1a2b3c4d5e6", 9, true, &["172.16.241.64/32"]),
            iface("ens37", 7, false, &["10.99.0.5/24"]),
            iface("docker0", 5, true, &["172.17.0.1/16"]),
            iface("ens33", 4, true, &["169.254.3.3/16", "192.168.92.128/24"]),
            iface("ens34", 3, true, &["10.10.0.5/24"]),
            iface("tunl0", 2, true, &["172.16.241.64/32"]),
            iface("lo", 1, true, &["127.0.0.1/8"]),
        ]
    }

    #[test]
    fn parses_calico_spellings() {
        let m = |s: &str| s.parse::<Method>().unwrap();
        assert!(matches!(m("first-found"), Method::FirstFound));
        assert!(matches!(m(""), Method::FirstFound));
        assert!(matches!(m("  first-found "), Method::FirstFound));
        assert!(matches!(
            m("kubernetes-internal-ip"),
            Method::KubernetesInternalIp
        ));
        match m("interface=ens.*, eth0") {
            Method::Interface(r) => {
                assert_eq!(r.len(), 2);
                assert_eq!(r[0].as_str(), "ens.*");
                assert_eq!(r[1].as_str(), "eth0");
            }
            other => panic!("{other:?}"),
        }
        match m("skip-interface=eth1") {
            Method::SkipInterface(r) => assert_eq!(r[0].as_str(), "eth1"),
            other => panic!("{other:?}"),
        }
        match m("cidr=192.168.92.7/24,10.0.0.0/8") {
            Method::Cidr(c) => assert_eq!(c, vec![net("192.168.92.0/24"), net("10.0.0.0/8")]),
            other => panic!("{other:?}"),
        }
        match m("can-reach=192.168.92.1") {
            Method::CanReach(a) => assert_eq!(a, "192.168.92.1".parse::<IpAddr>().unwrap()),
            other => panic!("{other:?}"),
        }
        assert_eq!(m("cidr=10.0.0.0/8").to_string(), "cidr=10.0.0.0/8");
        assert_eq!(m("interface=a,b").to_string(), "interface=a,b");
    }

    #[test]
    fn rejects_bad_methods_with_a_reason() {
        let err = |s: &str| s.parse::<Method>().unwrap_err();
        assert!(matches!(err("first-fund"), MethodError::Unknown(_)));
        assert!(matches!(err("nic=eth0"), MethodError::Unknown(_)));
        assert!(matches!(err("interface="), MethodError::Empty { .. }));
        assert!(matches!(err("skip-interface= "), MethodError::Empty { .. }));
        assert!(matches!(err("cidr="), MethodError::Empty { .. }));
        assert!(matches!(err("can-reach="), MethodError::Empty { .. }));
        assert!(matches!(
            err("interface=eth0,"),
            MethodError::EmptyItem { .. }
        ));
        assert!(matches!(
            err("interface=eth[0"),
            MethodError::BadRegex { .. }
        ));
        assert!(matches!(
            err("skip-interface=(x"),
            MethodError::BadRegex { .. }
        ));
        assert!(matches!(err("cidr=10.0.0.0"), MethodError::BadCidr(_)));
        assert!(matches!(err("cidr=10.0.0.0/33"), MethodError::BadCidr(_)));
        assert!(matches!(err("cidr=fd00::/64"), MethodError::BadCidr(_)));
        assert!(matches!(
            err("can-reach=www.example.com"),
            MethodError::BadReachAddress(_)
        ));
        assert!(matches!(
            err("can-reach=fd00::1"),
            MethodError::BadReachAddress(_)
        ));
        assert!(matches!(
            err("can-reach=0.0.0.0"),
            MethodError::BadReachAddress(_)
        ));
        let msg = err("first-fund").to_string();
        assert!(
            msg.contains("\"first-fund\"") && msg.contains("can-reach=ADDR"),
            "{msg}"
        );
        let msg = err("interface=eth[0").to_string();
        assert!(
            msg.contains("eth[0") && msg.contains("regular expression"),
            "{msg}"
        );
    }

    #[test]
    fn first_found_skips_exclusions_down_loopback_and_link_local() {
        assert_eq!(
            pick("first-found", &host()).unwrap(),
            found("192.168.92.128/24", "ens33")
        );
    }

    #[test]
    fn first_found_follows_slice_order() {
        let mut ifaces = host();
        ifaces.swap(3, 4); // ens34 before ens33
        assert_eq!(
            pick("first-found", &ifaces).unwrap(),
            found("10.10.0.5/24", "ens34")
        );
        let ifaces: Vec<_> = host().into_iter().filter(|i| i.name != "ens33").collect();
        assert_eq!(
            pick("first-found", &ifaces).unwrap(),
            found("10.10.0.5/24", "ens34")
        );
    }

    #[test]
    fn every_default_exclusion_applies() {
        let excluded = [
            "docker0",
            "cbr0",
            "dummy0",
            "virbr0",
            "lxcbr0",
            "veth1234",
            "lo",
            "cali0123456789a",
            "tunl0",
            "flannel.1",
            "kube-ipvs0",
            "cni0",
            "vxlan.calico",
            "vxlan-v6.calico",
            "wireguard.cali",
            "wg-v6.cali",
            "nodelocaldns",
        ];
        assert_eq!(excluded.len(), DEFAULT_INTERFACES_TO_EXCLUDE.len());
        for name in excluded {
            let ifaces = vec![
                iface(name, 2, true, &["10.1.1.1/24"]),
                iface("eth0", 1, true, &["192.168.92.128/24"]),
            ];
            assert_eq!(
                pick("first-found", &ifaces).unwrap(),
                found("192.168.92.128/24", "eth0"),
                "{name} must be skipped"
            );
            // interface= does not apply the exclusions.
            assert_eq!(
                pick(&format!("interface=^{}$", regex::escape(name)), &ifaces).unwrap(),
                found("10.1.1.1/24", name)
            );
        }
        // Near misses are not excluded ("vxlanXcalico" has no dot).
        for name in ["eth-docker", "vxlanXcalico", "mycali0"] {
            let ifaces = vec![
                iface(name, 2, true, &["10.1.1.1/24"]),
                iface("eth0", 1, true, &["192.168.92.128/24"]),
            ];
            assert_eq!(
                pick("first-found", &ifaces).unwrap(),
                found("10.1.1.1/24", name)
            );
        }
    }

    #[test]
    fn first_found_with_nothing_usable_explains() {
        let ifaces = vec![
            iface("eth1", 3, false, &["10.0.0.1/24"]),
            iface("eth0", 2, true, &["169.254.1.1/16"]),
            iface("docker0", 1, true, &["172.17.0.1/16"]),
        ];
        let e = pick("first-found", &ifaces).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, DetectError::NoAddress { .. }));
        assert!(msg.contains("eth1 (down)"), "{msg}");
        assert!(msg.contains("eth0 [169.254.1.1/16]"), "{msg}");
        assert!(!msg.contains("docker0"), "{msg}");
        let many: Vec<_> = (0..20)
            .map(|i| iface(&format!("eth{i}"), 100 - i, false, &[]))
            .collect();
        let msg = pick("cidr=10.0.0.0/8", &many).unwrap_err().to_string();
        assert!(msg.contains("eth7 (down) and 12 more"), "{msg}");
        assert!(!msg.contains("eth8"), "{msg}");
        assert!(
            pick("first-found", &[])
                .unwrap_err()
                .to_string()
                .contains("none")
        );
    }

    #[test]
    fn interface_regex() {
        let h = host();
        assert_eq!(
            pick("interface=ens34", &h).unwrap(),
            found("10.10.0.5/24", "ens34")
        );
        // Unanchored, like calico/node; the first matching interface in order wins.
        assert_eq!(
            pick("interface=ens3", &h).unwrap(),
            found("192.168.92.128/24", "ens33")
        );
        assert_eq!(
            pick("interface=^ens33$", &h).unwrap(),
            found("192.168.92.128/24", "ens33")
        );
        assert_eq!(
            pick("interface=nomatch,ens33", &h).unwrap(),
            found("192.168.92.128/24", "ens33")
        );
        assert_eq!(
            pick("interface=docker.*", &h).unwrap(),
            found("172.17.0.1/16", "docker0")
        );
        // Down interface, loopback-only interface, no match.
        assert!(matches!(
            pick("interface=ens37", &h),
            Err(DetectError::NoAddress { .. })
        ));
        assert!(matches!(
            pick("interface=^lo$", &h),
            Err(DetectError::NoAddress { .. })
        ));
        assert!(matches!(
            pick("interface=wlan0", &h),
            Err(DetectError::NoAddress { .. })
        ));
    }

    #[test]
    fn skip_interface() {
        let h = host();
        assert_eq!(
            pick("skip-interface=ens33", &h).unwrap(),
            found("10.10.0.5/24", "ens34")
        );
        assert_eq!(
            pick("skip-interface=ens34", &h).unwrap(),
            found("192.168.92.128/24", "ens33")
        );
        // The default exclusions still apply.
        assert!(matches!(
            pick("skip-interface=ens3.*", &h),
            Err(DetectError::NoAddress { .. })
        ));
    }

    #[test]
    fn cidr() {
        let h = host();
        assert_eq!(
            pick("cidr=192.168.92.0/24", &h).unwrap(),
            found("192.168.92.128/24", "ens33")
        );
        assert_eq!(
            pick("cidr=10.99.0.0/16,10.10.0.0/16", &h).unwrap(),
            found("10.10.0.5/24", "ens34")
        );
        // No default exclusions for cidr= (as in calico/node), but link-local never counts.
        assert_eq!(
            pick("cidr=172.17.0.0/16", &h).unwrap(),
            found("172.17.0.1/16", "docker0")
        );
        assert!(matches!(
            pick("cidr=169.254.0.0/16", &h),
            Err(DetectError::NoAddress { .. })
        ));
        assert!(matches!(
            pick("cidr=10.99.0.0/24", &h),
            Err(DetectError::NoAddress { .. })
        ));
        assert!(matches!(
            pick("cidr=8.8.8.0/24", &h),
            Err(DetectError::NoAddress { .. })
        ));
    }

    #[test]
    fn kubernetes_internal_ip() {
        let h = host();
        let m = Method::KubernetesInternalIp;
        let never = |_| -> io::Result<IpAddr> { panic!("no kernel lookup expected") };
        assert_eq!(
            select_with(&m, &h, Some("192.168.92.128".parse().unwrap()), never).unwrap(),
            found("192.168.92.128/24", "ens33")
        );
        assert_eq!(
            select_with(&m, &h, Some("10.0.0.9".parse().unwrap()), never).unwrap(),
            Detected {
                address: net("10.0.0.9/32"),
                interface: None
            }
        );
        assert!(matches!(
            select_with(&m, &h, None, never),
            Err(DetectError::NoInternalIp)
        ));
    }

    #[test]
    fn can_reach_uses_the_kernel_source_address() {
        let h = host();
        let m: Method = "can-reach=192.168.92.1".parse().unwrap();
        let reply = |a: &'static str| {
            move |dest: IpAddr| {
                assert_eq!(dest, "192.168.92.1".parse::<IpAddr>().unwrap());
                Ok(a.parse().unwrap())
            }
        };
        assert_eq!(
            select_with(&m, &h, None, reply("192.168.92.128")).unwrap(),
            found("192.168.92.128/24", "ens33")
        );
        // Whatever interface holds it, even an excluded one.
        assert_eq!(
            select_with(&m, &h, None, reply("172.17.0.1")).unwrap(),
            found("172.17.0.1/16", "docker0")
        );
        assert!(matches!(
            select_with(&m, &h, None, reply("10.0.0.9")),
            Err(DetectError::SourceNotLocal { .. })
        ));
        let unreachable = |_| Err(io::Error::from_raw_os_error(libc::ENETUNREACH));
        let e = select_with(&m, &h, None, unreachable).unwrap_err();
        assert!(matches!(e, DetectError::Unreachable { .. }));
        assert!(e.to_string().contains("no route to 192.168.92.1"), "{e}");
    }

    #[test]
    fn source_address_towards_loopback() {
        let src = source_address_for("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(src, "127.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn interface_lookup() {
        let h = host();
        assert_eq!(
            interface_of("10.10.0.5".parse().unwrap(), &h).unwrap().name,
            "ens34"
        );
        assert_eq!(
            interface_of("10.99.0.5".parse().unwrap(), &h).unwrap().name,
            "ens37"
        );
        assert!(interface_of("10.10.0.6".parse().unwrap(), &h).is_none());
    }

    #[test]
    fn resolve_ip_flag() {
        let h = host();
        let r = |ip: &str, method: &str| resolve_in(ip, method, None, &h);
        assert_eq!(r("none", "first-found").unwrap(), None);
        assert_eq!(r("none", "garbage").unwrap(), None);
        assert_eq!(
            r("autodetect", "first-found").unwrap(),
            Some(found("192.168.92.128/24", "ens33"))
        );
        assert_eq!(
            r("", "interface=ens34").unwrap(),
            Some(found("10.10.0.5/24", "ens34"))
        );
        // An explicit address takes the prefix of the interface holding it, else /32.
        assert_eq!(
            r("10.10.0.5", "garbage").unwrap(),
            Some(found("10.10.0.5/24", "ens34"))
        );
        assert_eq!(
            r("10.0.0.9", "first-found").unwrap(),
            Some(Detected {
                address: net("10.0.0.9/32"),
                interface: None
            })
        );
        // An explicit prefix wins; the interface is still looked up.
        assert_eq!(
            r("10.10.0.5/16", "first-found").unwrap(),
            Some(found("10.10.0.5/16", "ens34"))
        );
        assert_eq!(
            r("10.0.0.9/24", "first-found").unwrap(),
            Some(Detected {
                address: net("10.0.0.9/24"),
                interface: None
            })
        );
        for bad in [
            "auto",
            "10.0.0",
            "10.0.0.5/33",
            "10.0.0.5/",
            "fd00::1",
            "0.0.0.0",
            "224.0.0.1",
        ] {
            let e = r(bad, "first-found").unwrap_err();
            assert!(matches!(e, DetectError::BadIp(_)), "{bad}: {e}");
            assert!(e.to_string().contains("autodetect"), "{e}");
        }
        assert!(matches!(
            r("autodetect", "garbage"),
            Err(DetectError::Method(_))
        ));
    }

    #[test]
    fn resolve_rejects_bad_input_before_reading_interfaces() {
        assert!(matches!(
            resolve("bogus", "first-found", None),
            Err(DetectError::BadIp(_))
        ));
        assert!(matches!(
            resolve("autodetect", "cidr=x", None),
            Err(DetectError::Method(MethodError::BadCidr(_)))
        ));
        assert_eq!(resolve("none", "cidr=x", None).unwrap(), None);
    }

    #[test]
    fn lists_this_namespace() {
        let ifaces = list_interfaces().unwrap();
        let lo = ifaces
            .iter()
            .find(|i| i.name == "lo")
            .expect("lo is listed");
        assert_eq!(lo.index, 1);
        assert!(lo.addrs.contains(&net("127.0.0.1/8")), "{lo:?}");
        assert!(
            ifaces.windows(2).all(|w| w[0].index > w[1].index),
            "{ifaces:?}"
        );
    }
    /// A dual-stack node: link-local addresses everywhere, a global one on ens33.
    fn host6() -> Vec<HostInterface> {
        vec![
            iface(
                "cali1a2b3c4d5e6",
                9,
                true,
                &["fe80::ecee:eeff:feee:eeee/64"],
            ),
            iface("ens37", 7, false, &["fd00:99::5/64"]),
            iface("docker0", 5, true, &["fd00:17::1/64"]),
            iface(
                "ens33",
                4,
                true,
                &["192.168.92.128/24", "fe80::1/64", "fd00:92::128/64"],
            ),
            iface("ens34", 3, true, &["10.10.0.5/24", "2001:db8:10::5/64"]),
            iface("lo", 1, true, &["127.0.0.1/8", "::1/128"]),
        ]
    }

    fn pick6(method: &str, ifaces: &[HostInterface]) -> Result<Detected6, DetectError> {
        let method = Method::parse_v6(method).unwrap();
        select6_with(&method, ifaces, None, |_| {
            panic!("no kernel lookup expected")
        })
    }

    fn found6(address: &str, interface: &str) -> Detected6 {
        Detected6 {
            address: address.parse().unwrap(),
            interface: Some(interface.into()),
        }
    }

    #[test]
    fn ipv6_methods_never_pick_link_local_loopback_or_down() {
        let h = host6();
        assert_eq!(
            pick6("first-found", &h).unwrap(),
            found6("fd00:92::128/64", "ens33")
        );
        assert_eq!(
            pick6("interface=ens3.*", &h).unwrap(),
            found6("fd00:92::128/64", "ens33")
        );
        assert_eq!(
            pick6("skip-interface=ens33", &h).unwrap(),
            found6("2001:db8:10::5/64", "ens34")
        );
        assert_eq!(
            pick6("cidr=2001:db8::/32", &h).unwrap(),
            found6("2001:db8:10::5/64", "ens34")
        );
        // Only link-local on the workload interface: nothing usable there.
        let err = pick6("interface=cali.*", &h).unwrap_err();
        assert!(matches!(err, DetectError::NoAddress6 { .. }), "{err}");
        assert!(err.to_string().contains("IP6"), "{err}");
        // An IPv4-only host has no IPv6 address to find.
        let err = pick6("first-found", &host()).unwrap_err();
        assert!(matches!(err, DetectError::NoAddress6 { .. }), "{err}");
    }

    #[test]
    fn ipv6_method_spellings() {
        assert!(matches!(
            Method::parse_v6("cidr=192.168.0.0/16"),
            Err(MethodError::BadCidr6(_))
        ));
        assert!(matches!(
            Method::parse_v6("can-reach=192.168.92.1"),
            Err(MethodError::BadReachAddress6(_))
        ));
        assert!(matches!(
            Method::parse_v6("can-reach=fd00:92::1"),
            Ok(Method::CanReach(IpAddr::V6(_)))
        ));
        assert!(matches!(Method::parse_v6(""), Ok(Method::FirstFound)));
        // The IPv4 method parser keeps refusing IPv6 networks.
        assert!("cidr=fd00::/64".parse::<Method>().is_err());
        // And an IPv6 cidr selects no IPv4 address.
        let m = Method::parse_v6("cidr=fd00:92::/64").unwrap();
        assert!(select_with(&m, &host6(), None, |_| unreachable!()).is_err());
    }

    #[test]
    fn ipv6_can_reach_and_the_ip6_flag() {
        let h = host6();
        let m = Method::parse_v6("can-reach=2001:db8:10::1").unwrap();
        let got = select6_with(&m, &h, None, |dest| {
            assert_eq!(dest, "2001:db8:10::1".parse::<IpAddr>().unwrap());
            Ok("2001:db8:10::5".parse().unwrap())
        })
        .unwrap();
        assert_eq!(got, found6("2001:db8:10::5/64", "ens34"));
        let err = select6_with(&m, &h, None, |_| Ok("fe80::1".parse().unwrap())).unwrap_err();
        assert!(matches!(err, DetectError::SourceNotLocal { .. }), "{err}");

        let none = |_: IpAddr| -> io::Result<IpAddr> { panic!("no kernel lookup expected") };
        assert_eq!(resolve6_in("none", "", None, &h, none).unwrap(), None);
        assert_eq!(resolve6_in("", "", None, &h, none).unwrap(), None);
        assert_eq!(
            resolve6_in("autodetect", "first-found", None, &h, none).unwrap(),
            Some(found6("fd00:92::128/64", "ens33"))
        );
        assert_eq!(
            resolve6_in("fd00:92::128", "", None, &h, none).unwrap(),
            Some(found6("fd00:92::128/64", "ens33"))
        );
        assert_eq!(
            resolve6_in("fd00:1::9/112", "", None, &h, none).unwrap(),
            Some(Detected6 {
                address: "fd00:1::9/112".parse().unwrap(),
                interface: None
            })
        );
        assert_eq!(
            resolve6_in("fd00:1::9", "", None, &h, none).unwrap(),
            Some(Detected6 {
                address: "fd00:1::9/128".parse().unwrap(),
                interface: None
            })
        );
        assert_eq!(
            resolve6_in(
                "autodetect",
                "kubernetes-internal-ip",
                Some("fd00:92::128".parse().unwrap()),
                &h,
                none
            )
            .unwrap(),
            Some(found6("fd00:92::128/64", "ens33"))
        );
        assert!(matches!(
            resolve6_in("autodetect", "kubernetes-internal-ip", None, &h, none),
            Err(DetectError::NoInternalIp6)
        ));
        for bad in [
            "fe80::1",
            "::1",
            "10.0.0.1",
            "fd00::1/129",
            "ff02::1",
            "yes",
        ] {
            assert!(
                matches!(
                    resolve6_in(bad, "", None, &h, none),
                    Err(DetectError::BadIp6(_))
                ),
                "{bad}"
            );
        }
    }
}

//! The IPIP tunnel device `tunl0`.
//!
//! Calico routes IPIP traffic with `BLOCK via PEER dev tunl0 onlink`; the device must exist,
//! be up, have MTU = NIC MTU − 20 (the outer IPv4 header) and carry the node's tunnel address.
//! [`TunnelDevice`] is the small interface behind which the device is made: [`KernelIpip`]
//! uses the kernel's `ipip` link type; [`super::ipip_user::UserspaceIpip`] makes a TUN device
//! named `tunl0` whose packets a userspace forwarder carries over raw IP-protocol-4 sockets,
//! for kernels without `ipip` ([`super::ipip_user::IpipDataplane`] chooses).
//!
//! Without the `ipip` module the kernel answers `EOPNOTSUPP` to creating an `ipip` link; that
//! becomes one [`TunnelError::IpipUnsupported`] naming the cause. The dataplane does not need
//! the device to program everything else: routes through a missing `tunl0` are held back and
//! reported per route as [`super::RouteError::MissingDevice`], and are installed as soon as a
//! device of that name appears (the monitor sees the link).

use std::future::Future;
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkInfo};
use rtnetlink::{Handle, LinkIpIp, LinkUnspec};

/// Bytes the outer IPv4 header adds.
pub const IPIP_OVERHEAD: u32 = 20;

/// What the tunnel device must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSpec {
    /// Device name, `tunl0`.
    pub name: String,
    /// Name of the host NIC whose MTU the tunnel's derives from.
    pub nic: String,
    /// Tunnel address (`/32`), from the node annotation or the node's block; see
    /// [`crate::plan::tunnel_address`].
    pub address: Option<Ipv4Addr>,
}

/// The device as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelState {
    pub index: u32,
    pub mtu: u32,
    /// True when this call created the device.
    pub created: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    #[error(
        "cannot create IPIP device {name:?}: the kernel has no ipip support (module `ipip` not \
         loaded or not built; `ip link add {name} type ipip` fails with EOPNOTSUPP). Load it \
         with `modprobe ipip`, or use a pool with ipipMode: Never. Routes through {name} are \
         reported as failed until the device exists; all other routes are programmed."
    )]
    IpipUnsupported { name: String },
    #[error("host NIC {0:?} not found; set the node's interface correctly")]
    NicNotFound(String),
    #[error("{what} failed: {error}")]
    Netlink { what: String, error: String },
    /// A system call of the userspace tunnel failed (TUN device, raw sockets, threads).
    #[error("{what} failed: {error}")]
    Io { what: String, error: String },
    /// A device of the tunnel's name exists but is of another kind.
    #[error(
        "device {name:?} exists but is a {kind} device, not {wanted}; remove it or choose the \
         matching IPIP dataplane"
    )]
    WrongKind {
        name: String,
        kind: String,
        wanted: String,
    },
}

impl TunnelError {
    pub(crate) fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        TunnelError::Io {
            what: what.into(),
            error: e.to_string(),
        }
    }
}

/// What [`KernelIpip::link_details`] reports about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkDetails {
    pub index: u32,
    pub mtu: u32,
    /// `IFLA_INFO_KIND` (`"ipip"`, `"tun"`, `"veth"`, ...); `None` for kinds without one.
    pub kind: Option<String>,
}

/// Makes sure the tunnel device exists as specified.
pub trait TunnelDevice {
    fn ensure(
        &self,
        spec: &TunnelSpec,
    ) -> impl Future<Output = Result<TunnelState, TunnelError>> + Send;
}

/// The kernel `ipip` device, configured over rtnetlink.
#[derive(Debug, Clone)]
pub struct KernelIpip {
    handle: Handle,
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

fn netlink(what: impl Into<String>, e: rtnetlink::Error) -> TunnelError {
    TunnelError::Netlink {
        what: what.into(),
        error: e.to_string(),
    }
}

impl KernelIpip {
    /// Opens an rtnetlink connection in the calling thread's network namespace and spawns its
    /// driver on the current tokio runtime.
    pub fn connect() -> Result<Self, TunnelError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| TunnelError::Netlink {
            what: "netlink socket".into(),
            error: e.to_string(),
        })?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Index and MTU of the link `name`; `None` if it does not exist.
    pub async fn link(&self, name: &str) -> Result<Option<(u32, u32)>, TunnelError> {
        Ok(self.link_details(name).await?.map(|l| (l.index, l.mtu)))
    }

    /// Index, MTU and kind of the link `name`; `None` if it does not exist.
    pub async fn link_details(&self, name: &str) -> Result<Option<LinkDetails>, TunnelError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => {
                let mut mtu = 1500;
                let mut kind = None;
                for a in &msg.attributes {
                    match a {
                        LinkAttribute::Mtu(m) => mtu = *m,
                        LinkAttribute::LinkInfo(infos) => {
                            for i in infos {
                                if let LinkInfo::Kind(k) = i {
                                    kind = Some(k.to_string());
                                }
                            }
                        }
                        _ => {}
                    }
                }
                Ok(Some(LinkDetails {
                    index: msg.header.index,
                    mtu,
                    kind,
                }))
            }
            Ok(None) => Ok(None),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(netlink(format!("looking up link {name}"), e)),
        }
    }

    /// Can this kernel make `ipip` devices? True when `tunl0` already is one, else tries to
    /// create (and deletes again) a throwaway `ipip` link: `EOPNOTSUPP` means no. Creating
    /// it loads the `ipip` module where it exists, which adds the kernel's own `tunl0`.
    pub async fn probe_ipip(&self) -> Result<bool, TunnelError> {
        if let Some(l) = self.link_details("tunl0").await?
            && l.kind.as_deref() == Some("ipip")
        {
            return Ok(true);
        }
        let name = format!("prprobe{}", std::process::id() % 100_000);
        match self
            .handle
            .link()
            .add(LinkIpIp::new(&name).build())
            .execute()
            .await
        {
            Ok(()) => {
                if let Some(l) = self.link_details(&name).await? {
                    self.handle
                        .link()
                        .del(l.index)
                        .execute()
                        .await
                        .map_err(|e| netlink(format!("deleting probe link {name}"), e))?;
                }
                Ok(true)
            }
            Err(e) if errno_of(&e) == Some(libc::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(netlink(format!("creating probe ipip link {name}"), e)),
        }
    }

    /// Deletes `address` from the link `name` (nothing when the link or the address is not
    /// there). Deleting a device's last IPv4 address makes the kernel drop every route
    /// through it: call it only once no route needs the device.
    pub async fn remove_address(&self, name: &str, address: Ipv4Addr) -> Result<bool, TunnelError> {
        let Some(link) = self.link_details(name).await? else {
            return Ok(false);
        };
        let mut found = Vec::new();
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .set_address_filter(address.into())
            .execute();
        loop {
            match addrs.try_next().await {
                Ok(Some(msg)) => found.push(msg),
                Ok(None) => break,
                Err(e) => return Err(netlink(format!("listing the addresses of {name}"), e)),
            }
        }
        let removed = !found.is_empty();
        for msg in found {
            match self.handle.address().del(msg).execute().await {
                Ok(()) => {}
                Err(e) if errno_of(&e) == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) => return Err(netlink(format!("deleting {address}/32 from {name}"), e)),
            }
        }
        Ok(removed)
    }

    /// Sets MTU and up on the link `index`, and adds `address/32` (replace) when given.
    pub(crate) async fn configure(
        &self,
        name: &str,
        index: u32,
        mtu: u32,
        address: Option<Ipv4Addr>,
    ) -> Result<(), TunnelError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(|e| netlink(format!("setting {name} mtu {mtu} up"), e))?;
        if let Some(addr) = address {
            self.handle
                .address()
                .add(index, addr.into(), 32)
                .replace()
                .execute()
                .await
                .map_err(|e| netlink(format!("adding {addr}/32 to {name}"), e))?;
        }
        Ok(())
    }
}

impl TunnelDevice for KernelIpip {
    async fn ensure(&self, spec: &TunnelSpec) -> Result<TunnelState, TunnelError> {
        let (_, nic_mtu) = self
            .link(&spec.nic)
            .await?
            .ok_or_else(|| TunnelError::NicNotFound(spec.nic.clone()))?;
        let mtu = nic_mtu.saturating_sub(IPIP_OVERHEAD);
        let mut created = false;
        let index = match self.link(&spec.name).await? {
            Some((index, _)) => index,
            None => {
                let msg = LinkIpIp::new(&spec.name).build();
                if let Err(e) = self.handle.link().add(msg).execute().await {
                    return Err(match errno_of(&e) {
                        Some(libc::EOPNOTSUPP) => TunnelError::IpipUnsupported {
                            name: spec.name.clone(),
                        },
                        _ => netlink(format!("creating {}", spec.name), e),
                    });
                }
                created = true;
                self.link(&spec.name)
                    .await?
                    .map(|(i, _)| i)
                    .ok_or_else(|| TunnelError::Netlink {
                        what: format!("creating {}", spec.name),
                        error: "device missing after creation".into(),
                    })?
            }
        };
        self.configure(&spec.name, index, mtu, spec.address).await?;
        tracing::info!(device = %spec.name, index, mtu, created, address = ?spec.address, "tunnel device ready");
        Ok(TunnelState {
            index,
            mtu,
            created,
        })
    }
}

//! The IPIP tunnel device `tunl0`.
//!
//! Calico routes IPIP traffic with `BLOCK via PEER dev tunl0 onlink`; the device must exist,
//! be up, have MTU = NIC MTU − 20 (the outer IPv4 header) and carry the node's tunnel address.
//! [`TunnelDevice`] is the small interface behind which the device is made: [`KernelIpip`]
//! uses the kernel's `ipip` link type; a userspace implementation (a TUN device named `tunl0`
//! plus a raw IP-protocol-4 socket) can implement the same trait later.
//!
//! Without the `ipip` module the kernel answers `EOPNOTSUPP` to creating an `ipip` link; that
//! becomes one [`TunnelError::IpipUnsupported`] naming the cause. The dataplane does not need
//! the device to program everything else: routes through a missing `tunl0` are held back and
//! reported per route as [`super::RouteError::MissingDevice`], and are installed as soon as a
//! device of that name appears (the monitor sees the link).

use std::future::Future;
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use netlink_packet_route::link::LinkAttribute;
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
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => {
                let mtu = msg
                    .attributes
                    .iter()
                    .find_map(|a| {
                        if let LinkAttribute::Mtu(m) = a {
                            Some(*m)
                        } else {
                            None
                        }
                    })
                    .unwrap_or(1500);
                Ok(Some((msg.header.index, mtu)))
            }
            Ok(None) => Ok(None),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(netlink(format!("looking up link {name}"), e)),
        }
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
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(|e| netlink(format!("setting {} mtu {mtu} up", spec.name), e))?;
        if let Some(addr) = spec.address {
            self.handle
                .address()
                .add(index, addr.into(), 32)
                .replace()
                .execute()
                .await
                .map_err(|e| netlink(format!("adding {addr}/32 to {}", spec.name), e))?;
        }
        tracing::info!(device = %spec.name, index, mtu, created, address = ?spec.address, "tunnel device ready");
        Ok(TunnelState {
            index,
            mtu,
            created,
        })
    }
}

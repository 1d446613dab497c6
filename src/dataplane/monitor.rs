//! The netlink route monitor: route and link notifications from the kernel.
//!
//! The socket joins `RTNLGRP_IPV4_ROUTE`, `RTNLGRP_IPV6_ROUTE`, `RTNLGRP_LINK` and `RTNLGRP_NEIGH`. It is opened
//! before the first dump, so that nothing that happens between the dump and the first read is
//! missed; events that arrive for routes the dump already showed are idempotent.
//!
//! The kernel echoes every route change to the groups, including the dataplane's own, and each
//! notification is its own datagram: at 100,000 routes, reading and parsing our own echoes cost
//! a recv, a parse and a wake-up of the runtime per route, for nothing the ACKs had not said.
//! [`MonitorSocket::ignore_sender`] attaches a socket filter that drops, inside the kernel,
//! the notifications whose `nlmsg_pid` is the request socket's port id: the kernel stamps a
//! notification with the port id of the socket whose request caused it (0 for the kernel's
//! own changes). Changes by anyone else (`ip route`, other daemons, the kernel removing
//! routes of a vanished device) still arrive, so drift is seen as before.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use netlink_packet_core::{NLM_F_REPLACE, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::kernel::KernelRoute;
use super::socket::{NetlinkError, grow_buffer};

const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const MONITOR_RCVBUF_BYTES: usize = 64 << 20;
/// `SO_ATTACH_FILTER` (`asm-generic/socket.h`; the same on every architecture Linux has).
const SO_ATTACH_FILTER: libc::c_int = 26;
/// Offset of `nlmsg_pid` in `struct nlmsghdr`.
const NLMSG_PID_OFFSET: u32 = 12;

/// Something the kernel told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A route was added; `replaced` when it overwrote the route with the same key.
    RouteAdded {
        route: KernelRoute,
        replaced: bool,
    },
    RouteRemoved(KernelRoute),
    LinkChanged(LinkInfo),
    LinkRemoved(LinkInfo),
    /// A neighbour or FDB entry on link `ifindex` was added, changed or removed (the
    /// VXLAN devices' entries are checked again when it is one of theirs).
    Neighbour {
        ifindex: u32,
    },
    /// Notifications were lost (receive buffer overrun): the table must be re-read.
    Overrun,
}

/// What the dataplane needs of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: Option<String>,
    pub up: bool,
    /// `IFF_RUNNING`: the link has carrier (operationally up).
    pub running: bool,
    pub mtu: Option<u32>,
}

impl LinkInfo {
    pub fn from_message(msg: &LinkMessage) -> Self {
        let mut info = LinkInfo {
            index: msg.header.index,
            name: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            running: msg.header.flags.contains(LinkFlags::Running),
            mtu: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => info.name = Some(n.clone()),
                LinkAttribute::Mtu(m) => info.mtu = Some(*m),
                _ => {}
            }
        }
        info
    }
}

/// Non-blocking multicast socket.
pub struct MonitorSocket {
    socket: Socket,
    buf: Vec<u8>,
}

impl AsRawFd for MonitorSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl MonitorSocket {
    /// Opens the monitor in the calling thread's network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let io = |what: &str, e: io::Error| NetlinkError::Io(format!("monitor {what}: {e}"));
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| io("socket", e))?;
        socket
            .bind(&SocketAddr::new(0, 0))
            .map_err(|e| io("bind", e))?;
        for group in [
            RTNLGRP_LINK,
            RTNLGRP_NEIGH,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV6_ROUTE,
        ] {
            socket
                .add_membership(group)
                .map_err(|e| io("add_membership", e))?;
        }
        grow_buffer(
            socket.as_raw_fd(),
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            MONITOR_RCVBUF_BYTES,
        );
        socket
            .set_non_blocking(true)
            .map_err(|e| io("O_NONBLOCK", e))?;
        Ok(Self {
            socket,
            buf: vec![0; 1 << 16],
        })
    }

    /// Drops, inside the kernel, every notification caused by the netlink socket with port id
    /// `port` (the dataplane's request socket): those echo changes whose result the request's
    /// answer already gave. Classic BPF on a netlink socket sees the message from its
    /// `nlmsghdr`; multicast notifications hold one message each.
    pub fn ignore_sender(&self, port: u32) -> Result<(), NetlinkError> {
        // BPF word loads are big-endian: compare with the id's bytes as the kernel wrote them
        // (native order), read big-endian.
        let pid_as_loaded = u32::from_be_bytes(port.to_ne_bytes());
        let mut program = [
            // A = nlmsg_pid
            bpf(
                libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
                0,
                0,
                NLMSG_PID_OFFSET,
            ),
            // A == port ? drop : keep
            bpf(
                libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                0,
                1,
                pid_as_loaded,
            ),
            bpf(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
            bpf(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),
        ];
        let prog = libc::sock_fprog {
            len: program.len() as libc::c_ushort,
            filter: program.as_mut_ptr(),
        };
        // SAFETY: `prog` points at `program`, which outlives the call (the kernel copies it);
        // the size passed is that of `prog`.
        let rc = unsafe {
            libc::setsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_ATTACH_FILTER,
                (&prog as *const libc::sock_fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(NetlinkError::Io(format!(
                "monitor SO_ATTACH_FILTER: {}",
                io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Reads every notification queued now (never blocks).
    pub fn drain(&mut self, events: &mut Vec<Event>) -> Result<(), NetlinkError> {
        loop {
            let mut buf = &mut self.buf[..];
            match self.socket.recv(&mut buf, 0) {
                Ok(n) => parse_datagram(&self.buf[..n.min(self.buf.len())], events),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => events.push(Event::Overrun),
                Err(e) => return Err(NetlinkError::Io(format!("monitor recv: {e}"))),
            }
        }
    }
}

fn bpf(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        // BPF opcodes fit in 16 bits.
        code: code as u16,
        jt,
        jf,
        k,
    }
}

fn parse_datagram(mut data: &[u8], events: &mut Vec<Event>) {
    while data.len() >= 16 {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < 16 || len > data.len() {
            tracing::warn!(len, "malformed netlink notification; re-reading the table");
            events.push(Event::Overrun);
            return;
        }
        let msg = &data[..len];
        data = data.get((len + 3) & !3..).unwrap_or_default();
        let parsed = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(msg) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "skipping undecodable notification");
                continue;
            }
        };
        let replaced = parsed.header.flags & NLM_F_REPLACE != 0;
        let NetlinkPayload::InnerMessage(inner) = parsed.payload else {
            continue;
        };
        match inner {
            RouteNetlinkMessage::NewRoute(m) => {
                if let Some(route) = KernelRoute::from_message(&m) {
                    events.push(Event::RouteAdded { route, replaced });
                }
            }
            RouteNetlinkMessage::DelRoute(m) => {
                if let Some(route) = KernelRoute::from_message(&m) {
                    events.push(Event::RouteRemoved(route));
                }
            }
            RouteNetlinkMessage::NewLink(m) => {
                events.push(Event::LinkChanged(LinkInfo::from_message(&m)))
            }
            RouteNetlinkMessage::DelLink(m) => {
                events.push(Event::LinkRemoved(LinkInfo::from_message(&m)))
            }
            RouteNetlinkMessage::NewNeighbour(m) | RouteNetlinkMessage::DelNeighbour(m) => events
                .push(Event::Neighbour {
                    ifindex: m.header.ifindex,
                }),
            _ => {}
        }
    }
}

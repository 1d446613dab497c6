//! The netlink route monitor: route and link notifications from the kernel.
//!
//! The socket joins `RTNLGRP_IPV4_ROUTE`, `RTNLGRP_IPV6_ROUTE` and `RTNLGRP_LINK`. It is opened
//! before the first dump, so that nothing that happens between the dump and the first read is
//! missed; events that arrive for routes the dump already showed are idempotent.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use netlink_packet_core::{NLM_F_REPLACE, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::kernel::KernelRoute;
use super::socket::{NetlinkError, grow_buffer};

const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const MONITOR_RCVBUF_BYTES: usize = 64 << 20;

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
    /// Notifications were lost (receive buffer overrun): the table must be re-read.
    Overrun,
}

/// What the dataplane needs of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: Option<String>,
    pub up: bool,
    pub mtu: Option<u32>,
}

impl LinkInfo {
    pub fn from_message(msg: &LinkMessage) -> Self {
        let mut info = LinkInfo {
            index: msg.header.index,
            name: None,
            up: msg.header.flags.contains(LinkFlags::Up),
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
        for group in [RTNLGRP_LINK, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE] {
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
            _ => {}
        }
    }
}

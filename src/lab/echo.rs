//! The lab's own ICMP and ICMPv6 echo ("ping"), sent from inside a network namespace.
//!
//! The lab used to run `ip netns exec POD ping ...`: on a machine without iputils-ping every
//! ping check failed with "exec of ping failed". Now a thread enters the namespace (`setns`)
//! and sends echo requests on a raw socket it opens there (the socket stays in that
//! namespace). A raw socket, not a datagram ICMP socket: those need
//! `net.ipv4.ping_group_range`, which is closed in a new namespace; the lab runs as root.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |     Type      |     Code      |          Checksum             |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |           Identifier          |        Sequence Number        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |     Data ...
//! +-+-+-+-+-
//! ```
//! Echo request/reply: type 8/0 (RFC 792), 128/129 for ICMPv6 (RFC 4443). The ICMPv4
//! checksum is ours to compute; for ICMPv6 the kernel fills it in (it covers a pseudo-header).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use super::LabError;
use super::netns::in_namespace;

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;
/// Bytes after the 8-byte header: a recognisable pattern.
const PAYLOAD: &[u8] = b"podroute-lab-echo";

/// Identifiers of this process's echo runs: each run its own, so concurrent runs in one
/// namespace (raw sockets see every ICMP packet) do not take each other's replies.
static NEXT_ID: AtomicU16 = AtomicU16::new(0);

/// How a run of echo requests went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoReport {
    pub to: IpAddr,
    pub sent: u32,
    /// Round-trip time of each answered request, in order.
    pub rtts: Vec<Duration>,
    /// What went wrong with the requests that got no reply (send errors, timeouts, ICMP
    /// errors received instead of a reply).
    pub problems: Vec<String>,
}

impl EchoReport {
    pub fn received(&self) -> u32 {
        u32::try_from(self.rtts.len()).unwrap_or(u32::MAX)
    }

    /// Every request was answered (and at least one was sent).
    pub fn all_answered(&self) -> bool {
        self.sent > 0 && self.received() == self.sent
    }

    /// `ping`-like summary: counts, loss and the reasons for the lost ones.
    pub fn summary(&self) -> String {
        let loss = (100 * self.received())
            .checked_div(self.sent)
            .map_or(100, |answered| 100u32.saturating_sub(answered));
        let mut s = format!(
            "echo to {}: {} sent, {} received, {loss}% loss",
            self.to,
            self.sent,
            self.received()
        );
        if let (Some(min), Some(max)) = (self.rtts.iter().min(), self.rtts.iter().max()) {
            let _ = write!(s, ", rtt {min:.1?}..{max:.1?}");
        }
        for p in &self.problems {
            let _ = write!(s, "\n  {p}");
        }
        s
    }
}

/// Sends `count` echo requests to `to` from inside namespace `ns`, one every `interval`,
/// each waiting up to `wait` for its reply. `Err` only when the namespace cannot be entered
/// or no raw socket can be opened; lost requests are in the report.
pub fn echo(
    ns: &str,
    to: IpAddr,
    count: u32,
    interval: Duration,
    wait: Duration,
) -> Result<EchoReport, LabError> {
    let ident = NEXT_ID
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_add(std::process::id() as u16);
    let ns_name = ns.to_string();
    in_namespace(ns, move || run(to, ident, count, interval, wait))?.map_err(|source| {
        LabError::Namespace {
            ns: ns_name,
            source,
        }
    })
}

fn run(
    to: IpAddr,
    ident: u16,
    count: u32,
    interval: Duration,
    wait: Duration,
) -> std::io::Result<EchoReport> {
    let socket = open(to)?;
    let mut report = EchoReport {
        to,
        sent: 0,
        rtts: Vec::new(),
        problems: Vec::new(),
    };
    for seq in 0..count {
        if seq > 0 {
            std::thread::sleep(interval);
        }
        let seq = u16::try_from(seq).unwrap_or(u16::MAX);
        let packet = request(to, ident, seq);
        report.sent += 1;
        let started = Instant::now();
        if let Err(e) = send(&socket, to, &packet) {
            report.problems.push(format!("seq {seq}: send failed: {e}"));
            continue;
        }
        match wait_reply(&socket, to, ident, seq, wait, started)? {
            Ok(rtt) => report.rtts.push(rtt),
            Err(problem) => report.problems.push(format!("seq {seq}: {problem}")),
        }
    }
    Ok(report)
}

fn open(to: IpAddr) -> std::io::Result<OwnedFd> {
    let (domain, protocol) = match to {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6),
    };
    // SAFETY: socket has no memory-safety preconditions; the result is checked.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly opened descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An echo request: header, then the payload.
fn request(to: IpAddr, ident: u16, seq: u16) -> Vec<u8> {
    let kind = match to {
        IpAddr::V4(_) => ICMP_ECHO_REQUEST,
        IpAddr::V6(_) => ICMP6_ECHO_REQUEST,
    };
    let mut p = vec![kind, 0, 0, 0];
    p.extend_from_slice(&ident.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(PAYLOAD);
    if to.is_ipv4() {
        let sum = checksum(&p);
        p[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    p
}

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn send(socket: &OwnedFd, to: IpAddr, packet: &[u8]) -> std::io::Result<()> {
    let sent = match to {
        IpAddr::V4(a) => {
            // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
            let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
            // SAFETY: buffer and address are valid for the lengths given.
            unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const sa).cast(),
                    std::mem::size_of_val(&sa) as libc::socklen_t,
                )
            }
        }
        IpAddr::V6(a) => {
            // SAFETY: as above.
            let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_addr.s6_addr = a.octets();
            // SAFETY: as above.
            unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const sa).cast(),
                    std::mem::size_of_val(&sa) as libc::socklen_t,
                )
            }
        }
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads packets until the reply to (`ident`, `seq`) from `to` arrives (`Ok(Ok(rtt))`) or
/// `wait` passes (`Ok(Err(why))`, naming an ICMP error seen meanwhile).
fn wait_reply(
    socket: &OwnedFd,
    to: IpAddr,
    ident: u16,
    seq: u16,
    wait: Duration,
    started: Instant,
) -> std::io::Result<Result<Duration, String>> {
    let mut buf = [0u8; 1500];
    let mut seen_error: Option<String> = None;
    loop {
        let left = wait.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Ok(Err(
                seen_error.unwrap_or_else(|| format!("no reply within {wait:?}"))
            ));
        }
        let mut pfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if ready == 0 {
            continue;
        }
        // SAFETY: sockaddr_storage is plain data; all-zero is valid.
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of_val(&from) as libc::socklen_t;
        // SAFETY: buffer and address storage are valid for the lengths given.
        let n = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&raw mut from).cast(),
                &raw mut from_len,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => continue,
                _ => {
                    // An ICMP error queued for the socket (e.g. host unreachable).
                    seen_error = Some(format!("receive: {e}"));
                    continue;
                }
            }
        }
        let packet = &buf[..usize::try_from(n).unwrap_or(0)];
        match classify(to, sender(&from), packet, ident, seq) {
            Reply::Ours => return Ok(Ok(started.elapsed())),
            Reply::Error(what) => seen_error = Some(what),
            Reply::Other => {}
        }
    }
}

fn sender(from: &libc::sockaddr_storage) -> Option<IpAddr> {
    match libc::c_int::from(from.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sa: &libc::sockaddr_in = unsafe { &*(std::ptr::from_ref(from).cast()) };
            Some(IpAddr::from(sa.sin_addr.s_addr.to_ne_bytes()))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sa: &libc::sockaddr_in6 = unsafe { &*(std::ptr::from_ref(from).cast()) };
            Some(IpAddr::from(sa.sin6_addr.s6_addr))
        }
        _ => None,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// The echo reply we wait for.
    Ours,
    /// An ICMP error (unreachable, time exceeded): kept as the reason if no reply comes.
    Error(String),
    /// Anything else a raw socket sees (other pingers, our own request on loopback, ...).
    Other,
}

/// What a received packet is to the run (`ident`, `seq`) towards `to`. IPv4 raw sockets
/// deliver the IP header too; IPv6 ones only the ICMPv6 message. Never panics on a short or
/// malformed packet.
fn classify(to: IpAddr, from: Option<IpAddr>, packet: &[u8], ident: u16, seq: u16) -> Reply {
    let icmp = match to {
        IpAddr::V4(_) => {
            let Some(ihl) = packet.first().map(|b| usize::from(b & 0x0f) * 4) else {
                return Reply::Other;
            };
            packet.get(ihl..).unwrap_or(&[])
        }
        IpAddr::V6(_) => packet,
    };
    let (Some(&kind), Some(&code)) = (icmp.first(), icmp.get(1)) else {
        return Reply::Other;
    };
    let reply = if to.is_ipv4() {
        ICMP_ECHO_REPLY
    } else {
        ICMP6_ECHO_REPLY
    };
    let id_seq = |m: &[u8]| -> Option<(u16, u16)> {
        Some((
            u16::from_be_bytes([*m.get(4)?, *m.get(5)?]),
            u16::from_be_bytes([*m.get(6)?, *m.get(7)?]),
        ))
    };
    if kind == reply {
        return if from == Some(to) && id_seq(icmp) == Some((ident, seq)) {
            Reply::Ours
        } else {
            Reply::Other
        };
    }
    // ICMP errors quote the offending packet: IPv4 header + 8 bytes, or the IPv6 header
    // (40 bytes) + as much as fits, after the 8-byte error header.
    let quoted_echo = match to {
        IpAddr::V4(_) => icmp.get(8..).and_then(|q| {
            let ihl = usize::from(q.first()? & 0x0f) * 4;
            q.get(ihl..)
        }),
        IpAddr::V6(_) => icmp.get(48..),
    };
    let ours = quoted_echo.and_then(id_seq) == Some((ident, seq));
    let name = match (to, kind) {
        (IpAddr::V4(_), 3) => Some("destination unreachable"),
        (IpAddr::V4(_), 11) => Some("time exceeded"),
        (IpAddr::V6(_), 1) => Some("destination unreachable"),
        (IpAddr::V6(_), 3) => Some("time exceeded"),
        _ => None,
    };
    match name {
        Some(name) if ours => Reply::Error(format!(
            "{name} (code {code}) from {}",
            from.map_or("?".to_string(), |a| a.to_string())
        )),
        _ => Reply::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_an_echo_request_verifies() {
        let p = request("10.0.0.1".parse().unwrap(), 0x1234, 7);
        assert_eq!(&p[..8], &[8, 0, p[2], p[3], 0x12, 0x34, 0, 7]);
        // Summing a packet with its checksum in place gives 0xffff, i.e. checksum() == 0.
        assert_eq!(checksum(&p), 0);
        // ICMPv6: the kernel computes it.
        let p6 = request("fd00::1".parse().unwrap(), 1, 2);
        assert_eq!(&p6[..8], &[128, 0, 0, 0, 0, 1, 0, 2]);
    }

    #[test]
    fn replies_are_matched_by_sender_identifier_and_sequence() {
        let to: IpAddr = "fd00::1".parse().unwrap();
        let mut reply = request(to, 9, 3);
        reply[0] = ICMP6_ECHO_REPLY;
        assert_eq!(classify(to, Some(to), &reply, 9, 3), Reply::Ours);
        assert_eq!(classify(to, Some(to), &reply, 9, 4), Reply::Other);
        assert_eq!(classify(to, Some(to), &reply, 8, 3), Reply::Other);
        let other: IpAddr = "fd00::2".parse().unwrap();
        assert_eq!(classify(to, Some(other), &reply, 9, 3), Reply::Other);
        // Our own request looped back is not a reply.
        assert_eq!(
            classify(to, Some(to), &request(to, 9, 3), 9, 3),
            Reply::Other
        );
        // IPv4: behind a 20-byte IP header.
        let to4: IpAddr = "10.0.0.1".parse().unwrap();
        let mut ip = vec![0x45u8; 1];
        ip.resize(20, 0);
        let mut r4 = request(to4, 9, 3);
        r4[0] = ICMP_ECHO_REPLY;
        ip.extend_from_slice(&r4);
        assert_eq!(classify(to4, Some(to4), &ip, 9, 3), Reply::Ours);
    }

    #[test]
    fn errors_quoting_our_request_are_reasons_and_garbage_is_ignored() {
        let to4: IpAddr = "10.0.0.1".parse().unwrap();
        let router: IpAddr = "10.0.0.254".parse().unwrap();
        // IP header of the error, error header (type 3 code 1), quoted IP header, our echo.
        let mut p = vec![0x45u8];
        p.resize(20, 0);
        p.extend_from_slice(&[3, 1, 0, 0, 0, 0, 0, 0]);
        let mut quoted = vec![0x45u8];
        quoted.resize(20, 0);
        p.extend_from_slice(&quoted);
        p.extend_from_slice(&request(to4, 5, 6)[..8]);
        assert_eq!(
            classify(to4, Some(router), &p, 5, 6),
            Reply::Error("destination unreachable (code 1) from 10.0.0.254".into())
        );
        assert_eq!(classify(to4, Some(router), &p, 5, 7), Reply::Other);
        for garbage in [&[][..], &[0x4f][..], &[0x45, 0, 0][..], &[129][..]] {
            assert_eq!(classify(to4, Some(to4), garbage, 5, 6), Reply::Other);
            assert_eq!(
                classify("fd00::1".parse().unwrap(), None, garbage, 5, 6),
                Reply::Other
            );
        }
    }
}

//! The socket options BGP sessions need beyond plain TCP: TCP-MD5 signatures (RFC 2385,
//! Linux `TCP_MD5SIG`) and the Generalized TTL Security Mechanism (RFC 5082: send with TTL
//! 255, have the kernel drop segments that arrive with a lower TTL than `256 - hops`).
//!
//! The only `unsafe` of the crate: `setsockopt` on a descriptor the caller owns.

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

/// Longest TCP-MD5 key Linux accepts (`TCP_MD5SIG_MAXKEYLEN`).
pub const MD5_MAX_KEY_LEN: usize = 80;

/// `struct tcp_md5sig` of `linux/tcp.h`.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; MD5_MAX_KEY_LEN],
}

fn setsockopt<T>(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(size_of::<T>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `value` points to a live `T` of `len` bytes for the duration of the call, and
    // the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast::<libc::c_void>(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn storage_of(addr: IpAddr) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match SocketAddr::new(addr, 0) {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe {
                std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin);
            }
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe {
                std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6);
            }
        }
    }
    storage
}

/// Set (or, with `key: None`, remove) the TCP-MD5 key for segments to and from `peer` on
/// `fd` — a listening socket (the key then applies to connections accepted from `peer`) or a
/// socket about to connect. An IPv4 peer on an IPv6 socket is given in its mapped form.
pub fn set_md5_key(fd: &impl AsRawFd, peer: IpAddr, key: Option<&[u8]>) -> io::Result<()> {
    let key = key.unwrap_or_default();
    if key.len() > MD5_MAX_KEY_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a TCP-MD5 password is at most {MD5_MAX_KEY_LEN} bytes, this one has {}",
                key.len()
            ),
        ));
    }
    let mut sig = TcpMd5Sig {
        addr: storage_of(peer),
        flags: 0,
        prefixlen: 0,
        keylen: key.len() as u16,
        ifindex: 0,
        key: [0; MD5_MAX_KEY_LEN],
    };
    sig.key[..key.len()].copy_from_slice(key);
    match setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_MD5SIG, &sig) {
        // Removing a key that was never set.
        Err(e) if key.is_empty() && e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// GTSM (RFC 5082) on a socket to or from a peer at most `hops` away: outgoing TTL (hop
/// limit) 255, and incoming segments with a TTL below `256 - hops` dropped by the kernel.
pub fn set_gtsm(fd: &impl AsRawFd, v6: bool, hops: u8) -> io::Result<()> {
    let min: libc::c_int = 256 - libc::c_int::from(hops.max(1));
    let max: libc::c_int = 255;
    if v6 {
        setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, &max)?;
        setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_MINHOPCOUNT, &min)
    } else {
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_TTL, &max)?;
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_MINTTL, &min)
    }
}

/// Send with TTL (hop limit) 255, so that a GTSM peer accepts our segments, without
/// checking what arrives (for a listening socket shared by every peer).
pub fn set_max_ttl(fd: &impl AsRawFd, v6: bool) -> io::Result<()> {
    let max: libc::c_int = 255;
    if v6 {
        setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, &max)
    } else {
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_TTL, &max)
    }
}

/// Make an IPv6 socket dual-stack (`IPV6_V6ONLY` off): IPv4 peers reach it as
/// `::ffff:a.b.c.d`, whatever `net.ipv6.bindv6only` says.
pub fn set_dual_stack(fd: &impl AsRawFd) -> io::Result<()> {
    let off: libc::c_int = 0;
    setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &off)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_key_set_and_removed_on_a_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        set_md5_key(&l, "127.0.0.2".parse().unwrap(), Some(b"secret")).unwrap();
        set_md5_key(&l, "127.0.0.2".parse().unwrap(), None).unwrap();
        // Removing again is not an error.
        set_md5_key(&l, "127.0.0.2".parse().unwrap(), None).unwrap();
        let long = [b'x'; 81];
        let e = set_md5_key(&l, "127.0.0.2".parse().unwrap(), Some(&long)).unwrap_err();
        assert!(e.to_string().contains("at most 80 bytes"), "{e}");
    }

    #[test]
    fn gtsm_on_v4_socket() {
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        set_gtsm(&s, false, 1).unwrap();
        set_max_ttl(&s, false).unwrap();
    }
}

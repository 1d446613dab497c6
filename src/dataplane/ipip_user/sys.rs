//! The system calls of the userspace tunnel: the TUN device, the two raw sockets, batched
//! `recvmmsg`/`sendmmsg`, `poll` and an eventfd to wake threads. All `unsafe` of the
//! userspace tunnel is here.

use std::ffi::CString;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `struct ifreq` with the `ifr_flags` member (40 bytes on Linux).
#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn cvt_size(rc: libc::ssize_t) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// An open queue of a TUN device (`IFF_TUN | IFF_NO_PI`), non-blocking.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
}

impl Tun {
    /// Opens `/dev/net/tun` and attaches to the TUN device `name`, creating it (not
    /// persistent) when missing, in the calling thread's network namespace. Fails with
    /// `EINVAL` when `name` is a device of another kind, and `EBUSY` when another process
    /// holds its queue. `vnet`: every packet carries a virtio-net header and the device
    /// offers TSO and checksum offload (`TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN`);
    /// without it the offloads are switched off.
    pub fn attach(name: &str, vnet: bool) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {name:?}"),
            ));
        }
        let path = CString::new("/dev/net/tun").expect("no NUL");
        // SAFETY: `path` is a valid C string; the returned descriptor is checked.
        let fd = cvt(unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero ifreq is valid.
        let mut req: IfReqFlags = unsafe { zeroed() };
        for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if vnet {
            flags |= libc::IFF_VNET_HDR;
        }
        req.flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is laid out as.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) })?;
        let offloads = if vnet {
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO_ECN
        } else {
            0
        };
        // SAFETY: TUNSETOFFLOAD takes an integer argument.
        cvt(unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(offloads),
            )
        })?;
        Ok(Self { fd })
    }

    /// Makes the attached device persistent (it outlives this descriptor) or not.
    pub fn set_persist(&self, persist: bool) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST takes an integer argument.
        cvt(unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETPERSIST,
                libc::c_ulong::from(persist),
            )
        })?;
        Ok(())
    }

    /// Reads one packet (`WouldBlock` when none is queued).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        cvt_size(unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
    }

    /// Writes one packet gathered from `parts`.
    pub fn write_parts(&self, parts: &[std::io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: `IoSlice` is ABI-compatible with `iovec`; the slices are live.
        cvt_size(unsafe {
            libc::writev(
                self.fd.as_raw_fd(),
                parts.as_ptr().cast(),
                parts.len().min(1024) as libc::c_int,
            )
        })
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the option value is a valid `c_int` of the given size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// A raw IPv4 socket, non-blocking.
#[derive(Debug)]
pub struct RawSocket {
    fd: OwnedFd,
}

impl RawSocket {
    fn open(protocol: libc::c_int, local: Ipv4Addr) -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = cvt(unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                protocol,
            )
        })?;
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let sa = sockaddr(local);
        // SAFETY: `sa` is a valid sockaddr_in of the given length.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        })?;
        Ok(Self { fd })
    }

    /// The receiving socket: IP protocol 4, bound to `local` (only packets to that address
    /// arrive, each with its outer IPv4 header).
    pub fn ipip_receiver(local: Ipv4Addr, rcvbuf: usize) -> io::Result<Self> {
        let s = Self::open(libc::IPPROTO_IPIP, local)?;
        s.set_buffer(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, rcvbuf);
        Ok(s)
    }

    /// The sending socket: `IPPROTO_RAW` (send only, the caller writes the IPv4 header),
    /// bound to `local`.
    pub fn sender(local: Ipv4Addr, sndbuf: usize) -> io::Result<Self> {
        let s = Self::open(libc::IPPROTO_RAW, local)?;
        set_int(s.fd.as_raw_fd(), libc::IPPROTO_IP, libc::IP_HDRINCL, 1)?;
        s.set_buffer(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, sndbuf);
        Ok(s)
    }

    /// Sets a socket buffer size, beyond the sysctl limit when privileged.
    fn set_buffer(&self, force: libc::c_int, plain: libc::c_int, bytes: usize) {
        let bytes = bytes.min(i32::MAX as usize / 2) as libc::c_int;
        let fd = self.fd.as_raw_fd();
        if set_int(fd, libc::SOL_SOCKET, force, bytes).is_err() {
            let _ = set_int(fd, libc::SOL_SOCKET, plain, bytes);
        }
    }

    /// Receives up to `bufs.len()` datagrams without blocking; `lens[i]` gets the length of
    /// the datagram in `bufs[i]`. Returns how many arrived (`WouldBlock` when none).
    pub fn recv_batch(&self, bufs: &mut [Vec<u8>], lens: &mut [usize]) -> io::Result<usize> {
        const MAX: usize = 64;
        let n = bufs.len().min(lens.len()).min(MAX);
        // SAFETY: all-zero iovec and mmsghdr are valid (null pointers, zero lengths).
        let mut iov: [libc::iovec; MAX] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; MAX] = unsafe { zeroed() };
        for i in 0..n {
            iov[i] = libc::iovec {
                iov_base: bufs[i].as_mut_ptr().cast(),
                iov_len: bufs[i].len(),
            };
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at one iovec that points into a live buffer of the
        // stated length; the arrays outlive the call.
        let got = cvt(unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        })? as usize;
        for i in 0..got {
            lens[i] = msgs[i].msg_len as usize;
        }
        Ok(got)
    }

    /// Sends the packets `packets[i]` (each the concatenation of its two parts, starting
    /// with its IPv4 header) to `dsts[i]` without blocking. Returns how many were sent from
    /// the front; an error means the first packet was not sent (`WouldBlock`: the send
    /// buffer is full).
    pub fn send_batch(&self, packets: &[[&[u8]; 2]], dsts: &[Ipv4Addr]) -> io::Result<usize> {
        const MAX: usize = 64;
        let n = packets.len().min(dsts.len()).min(MAX);
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: all-zero iovec, sockaddr_in and mmsghdr are valid.
        let mut iov: [[libc::iovec; 2]; MAX] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut addrs: [libc::sockaddr_in; MAX] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; MAX] = unsafe { zeroed() };
        for i in 0..n {
            let mut parts = 0;
            for part in packets[i] {
                if !part.is_empty() {
                    iov[i][parts] = libc::iovec {
                        iov_base: part.as_ptr() as *mut libc::c_void,
                        iov_len: part.len(),
                    };
                    parts += 1;
                }
            }
            addrs[i] = sockaddr(dsts[i]);
            msgs[i].msg_hdr.msg_iov = iov[i].as_mut_ptr();
            msgs[i].msg_hdr.msg_iovlen = parts;
            msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
            msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        }
        // SAFETY: every header points at a live address and its iovecs over live packet
        // parts; the kernel only reads them.
        let sent = cvt(unsafe {
            libc::sendmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        })?;
        Ok(sent as usize)
    }

    /// The MTU of the device `name`, asked through this socket (so in its namespace).
    pub fn device_mtu(&self, name: &str) -> io::Result<u32> {
        #[repr(C)]
        struct IfReqMtu {
            name: [libc::c_char; libc::IFNAMSIZ],
            mtu: libc::c_int,
            _pad: [u8; 20],
        }
        const SIOCGIFMTU: libc::c_ulong = 0x8921;
        // SAFETY: an all-zero ifreq is valid.
        let mut req: IfReqMtu = unsafe { zeroed() };
        for (dst, src) in req
            .name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        // SAFETY: SIOCGIFMTU reads the name and writes `ifr_mtu` of a `struct ifreq`.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), SIOCGIFMTU, &mut req) })?;
        Ok(req.mtu.max(0) as u32)
    }
}

impl AsRawFd for RawSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// An eventfd that wakes the forwarding threads when they must stop.
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain eventfd(2); the result is checked.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Makes the eventfd readable for good (it is never drained).
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64.
        let _ = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                size_of::<u64>(),
            )
        };
    }
}

/// Which readiness [`wait`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    Read,
    Write,
}

/// Blocks until `fd` is ready or `waker` fired; returns false when woken by `waker`.
pub fn wait(fd: RawFd, ready: Ready, waker: &Waker) -> io::Result<bool> {
    let events = match ready {
        Ready::Read => libc::POLLIN,
        Ready::Write => libc::POLLOUT,
    };
    let mut fds = [
        libc::pollfd {
            fd,
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: waker.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}

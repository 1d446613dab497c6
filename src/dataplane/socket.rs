//! A NETLINK_ROUTE request socket that sends many messages per `sendto` and reads only the
//! answers that matter: errors, and one ACK per datagram.
//!
//! rtnetlink's high-level API (and netlink-proto under it) writes one message per send and
//! hands each answer to its own future. Programming 100,000 routes that way costs a task
//! wake-up per route, so this socket talks to the kernel directly: requests are serialized
//! back to back into one buffer (up to `batch` messages), sent with a single `sendto`, and the
//! kernel processes the datagram synchronously inside `sendmsg`, message by message.
//!
//! Only the datagram's last message carries `NLM_F_ACK` (the barrier). The kernel answers the
//! others only when they fail, so a batch of successful route changes costs one answer to
//! read instead of one per route (reading an ACK per route was a large part of the agent's
//! CPU time at 100,000 routes). Answers are matched by sequence number: a NACK carries the
//! errno and the kernel's extended-ACK message for that one request; a request that got no
//! NACK before the barrier's answer succeeded.
//!
//! The receive buffer is sized (`SO_RCVBUFFORCE` when root) so that a whole batch of NACKs fits
//! even if every request fails; should the kernel still drop answers (`ENOBUFS`), the requests
//! of the batch not known to have failed are reported as [`NetlinkError::AckLost`] and the
//! caller re-reads the table.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

/// `NLM_F_CAPPED` in an error message: the original request was cut to its header.
const NLM_F_CAPPED: u16 = 0x100;
/// `NLM_F_ACK_TLVS` in an error message: extended-ACK attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`: the extended ACK's human-readable message.
const NLMSGERR_ATTR_MSG: u16 = 1;
const NETLINK_HEADER_LEN: usize = 16;

/// Receive buffer asked for, so that a batch's NACKs (about 1 KiB of socket memory each) fit.
const RCVBUF_BYTES: usize = 16 << 20;
const SNDBUF_BYTES: usize = 4 << 20;
/// Upper bound on one request datagram.
const MAX_SEND_BYTES: usize = 256 << 10;
/// A kernel that does not answer within this time is treated as a failed request.
const RECV_TIMEOUT_SECS: libc::time_t = 10;

/// A failed netlink exchange.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetlinkError {
    /// The kernel refused the request.
    #[error("{}{}", io::Error::from_raw_os_error(*errno), message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        /// Positive errno (`libc::ENETUNREACH`, ...).
        errno: i32,
        /// Extended-ACK message, when the kernel gave one.
        message: Option<String>,
    },
    /// A socket call failed.
    #[error("netlink socket: {0}")]
    Io(String),
    /// The kernel's answer could not be decoded.
    #[error("malformed netlink answer: {0}")]
    Decode(String),
    /// The ACK for this request was dropped by the kernel (receive buffer overrun).
    #[error("netlink ACK lost (receive buffer overrun); the table will be re-read")]
    AckLost,
}

impl NetlinkError {
    /// The errno of a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    fn io(context: &str, e: io::Error) -> Self {
        Self::Io(format!("{context}: {e}"))
    }
}

/// One request of a batch: the message and its `NLM_F_*` flags (`NLM_F_REQUEST` is added, and
/// `NLM_F_ACK` on a datagram's last request).
#[derive(Debug)]
pub struct Request {
    pub message: RouteNetlinkMessage,
    pub flags: u16,
}

/// The socket itself and its buffers: what [`RequestSocket`] lends its sender thread.
struct Core {
    socket: Socket,
    seq: u32,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
    batch: usize,
    /// `sendto` calls made (for measurements).
    sends: u64,
}

/// A NETLINK_ROUTE socket for dumps and batched requests. Blocking, with a receive timeout:
/// the kernel answers rtnetlink requests synchronously, so calls never wait on the network.
///
/// [`submit`](Self::submit) hands a batch to a sender thread of the socket's own (started at
/// the first one, named `netlink`) and returns at once: the kernel does its work inside that
/// thread's `sendto`, so the caller can prepare its next batch meanwhile. The socket and its
/// buffers go to the thread with the batch and come back with the results, so there is never
/// more than one user of the socket: any other call made before [`wait`](Self::wait) first
/// takes the socket back (waiting for the batch to finish) and keeps the results for `wait`.
pub struct RequestSocket {
    /// `None` while the sender thread has it.
    core: Option<Box<Core>>,
    sender: Option<SenderThread>,
    /// The submitted batch's results, read back before [`wait`](Self::wait) asked for them.
    done: Option<BatchResults>,
    /// Requests in the submitted batch (for the error results when it is lost).
    in_flight: usize,
    batch: usize,
    /// `sendto` calls made, as of the last time the socket was here (it counts them itself).
    sends_seen: u64,
}

/// The results of a batch of requests, one per request in order, and the `sendto` calls it
/// took.
#[derive(Debug, Default)]
pub struct BatchResults {
    pub results: Vec<Result<(), NetlinkError>>,
    pub sends: u64,
}

impl BatchResults {
    /// `count` requests that all failed with `error`.
    fn failed(count: usize, error: NetlinkError) -> Self {
        Self {
            results: vec![Err(error); count],
            sends: 0,
        }
    }
}

/// A batch handed to a socket ([`RequestSocket::submit`]): its results when the socket ran it
/// at once, or a claim on the results of the batch its sender thread runs.
#[derive(Debug)]
pub struct Submitted {
    done: Option<BatchResults>,
}

impl Submitted {
    /// A batch that was run at once.
    pub fn done(results: BatchResults) -> Self {
        Self {
            done: Some(results),
        }
    }

    /// A batch the socket runs elsewhere; `wait` returns its results.
    pub(crate) fn running() -> Self {
        Self { done: None }
    }

    /// The results of a batch that was run at once; `None` for one a thread runs.
    pub fn into_done(self) -> Option<BatchResults> {
        self.done
    }
}

/// The thread that runs submitted batches: the socket goes there with a batch and comes back
/// with its results.
struct SenderThread {
    /// `None` once dropped (the thread then ends).
    tx: Option<mpsc::Sender<(Box<Core>, Vec<Request>)>>,
    rx: mpsc::Receiver<(Box<Core>, BatchResults)>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl SenderThread {
    fn start() -> io::Result<Self> {
        let (tx, jobs) = mpsc::channel::<(Box<Core>, Vec<Request>)>();
        let (done, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("netlink".into())
            .spawn(move || {
                while let Ok((mut core, requests)) = jobs.recv() {
                    let results = core.run_batch(requests);
                    if done.send((core, results)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            rx,
            handle: Some(handle),
        })
    }
}

impl Drop for SenderThread {
    fn drop(&mut self) {
        // The thread ends once the batch it runs (if any) is answered.
        self.tx = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl RequestSocket {
    /// Opens a socket in the calling thread's network namespace. `batch` is the maximum number
    /// of messages per `sendto`.
    pub fn open(batch: usize) -> Result<Self, NetlinkError> {
        let core = Core::open(batch)?;
        Ok(Self {
            batch: core.batch,
            core: Some(Box::new(core)),
            sender: None,
            done: None,
            in_flight: 0,
            sends_seen: 0,
        })
    }

    /// Takes the socket back from the sender thread, keeping the batch's results for
    /// [`wait`](Self::wait). Should the thread have ended, the socket is opened again.
    fn reclaim(&mut self) {
        if self.core.is_some() {
            return;
        }
        let Some(sender) = &self.sender else {
            return;
        };
        match sender.rx.recv() {
            Ok((core, results)) => self.returned(core, results),
            Err(_) => {
                self.sender = None;
                let error = NetlinkError::Io("the netlink sender thread ended".into());
                tracing::error!("the netlink sender thread ended; opening the socket again");
                self.done = Some(BatchResults::failed(self.in_flight, error));
                match Core::open(self.batch) {
                    Ok(mut core) => {
                        core.sends = self.sends_seen;
                        self.core = Some(Box::new(core));
                    }
                    Err(e) => tracing::error!(error = %e, "could not open a netlink socket"),
                }
            }
        }
    }

    /// The sender thread gave the socket back with the submitted batch's results.
    fn returned(&mut self, core: Box<Core>, results: BatchResults) {
        self.core = Some(core);
        self.done = Some(results);
    }

    fn core(&mut self) -> Result<&mut Core, NetlinkError> {
        self.reclaim();
        self.core
            .as_deref_mut()
            .ok_or_else(|| NetlinkError::Io("no netlink socket".into()))
    }

    /// Starts `requests` on the sender thread and returns at once; [`wait`](Self::wait)
    /// returns their results. Call `wait` before the next `submit`. Runs them at once when
    /// the thread cannot be started.
    pub fn submit(&mut self, requests: Vec<Request>) -> Submitted {
        self.reclaim();
        self.done = None;
        if self.sender.is_none() {
            match SenderThread::start() {
                Ok(sender) => self.sender = Some(sender),
                Err(e) => {
                    tracing::warn!(error = %e, "no netlink sender thread; sending inline");
                }
            }
        }
        let (Some(core), Some(tx)) = (
            self.core.take(),
            self.sender.as_ref().and_then(|s| s.tx.as_ref()),
        ) else {
            return self.run_inline(requests);
        };
        self.in_flight = requests.len();
        self.sends_seen = core.sends;
        match tx.send((core, requests)) {
            Ok(()) => Submitted::running(),
            Err(mpsc::SendError((core, requests))) => {
                self.core = Some(core);
                self.sender = None;
                self.run_inline(requests)
            }
        }
    }

    fn run_inline(&mut self, requests: Vec<Request>) -> Submitted {
        let count = requests.len();
        Submitted::done(match self.core() {
            Ok(core) => core.run_batch(requests),
            Err(e) => BatchResults::failed(count, e),
        })
    }

    /// Has the submitted batch been answered (the socket is back, or nothing is submitted)?
    /// Never waits.
    pub fn ready(&mut self) -> bool {
        if self.core.is_some() {
            return true;
        }
        let Some(sender) = &self.sender else {
            return true;
        };
        match sender.rx.try_recv() {
            Ok((core, results)) => {
                self.returned(core, results);
                true
            }
            Err(mpsc::TryRecvError::Empty) => false,
            // `reclaim` reopens the socket.
            Err(mpsc::TryRecvError::Disconnected) => true,
        }
    }

    /// The results of the batch `submitted` (waits for the sender thread to finish it).
    pub fn wait(&mut self, submitted: Submitted) -> BatchResults {
        if let Some(done) = submitted.done {
            return done;
        }
        self.reclaim();
        let count = self.in_flight;
        self.done.take().unwrap_or_else(|| {
            BatchResults::failed(count, NetlinkError::Io("batch results lost".into()))
        })
    }

    /// The socket's netlink port id: the `nlmsg_pid` of the notifications its requests cause.
    pub fn port(&self) -> Result<u32, NetlinkError> {
        self.core
            .as_ref()
            .ok_or_else(|| NetlinkError::Io("the socket is with its sender thread".into()))?
            .port()
    }

    /// Messages per `sendto` actually used (bounded by the receive buffer).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// `sendto` calls made so far (for measurements).
    pub fn sends(&self) -> u64 {
        self.core.as_ref().map_or(self.sends_seen, |c| c.sends)
    }

    /// Sends `requests` in batches and returns one result per request, in order (only the
    /// last request of each datagram asks for an ACK; see the module doc).
    pub fn execute(
        &mut self,
        requests: impl IntoIterator<Item = Request>,
    ) -> Vec<Result<(), NetlinkError>> {
        match self.core() {
            Ok(core) => core.execute(requests),
            Err(e) => requests.into_iter().map(|_| Err(e.clone())).collect(),
        }
    }

    /// Sends one plain request (no dump, no ACK asked) and returns the kernel's one answer:
    /// e.g. `RTM_GETROUTE` for an address, answered by the route the kernel would use.
    pub fn get(
        &mut self,
        message: RouteNetlinkMessage,
    ) -> Result<RouteNetlinkMessage, NetlinkError> {
        self.core()?.get(message)
    }

    /// Runs a dump request and returns every message of the answer.
    pub fn dump(
        &mut self,
        message: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let mut out = Vec::new();
        self.dump_each(message, |m| out.push(m))?;
        Ok(out)
    }

    /// Runs a dump request and hands each message of the answer to `each` as it is read (a
    /// table of 100,000 routes is never held as messages).
    pub fn dump_each(
        &mut self,
        message: RouteNetlinkMessage,
        each: impl FnMut(RouteNetlinkMessage),
    ) -> Result<(), NetlinkError> {
        self.core()?.dump_each(message, each)
    }
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` lives across the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Grows a socket buffer, beyond `rmem_max`/`wmem_max` when we have CAP_NET_ADMIN.
pub(crate) fn grow_buffer(fd: i32, force: i32, plain: i32, bytes: usize) {
    let bytes = i32::try_from(bytes).unwrap_or(i32::MAX);
    if setsockopt_int(fd, libc::SOL_SOCKET, force, bytes).is_err() {
        // Not privileged: take what rmem_max allows.
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, bytes);
    }
}

impl Core {
    fn open(batch: usize) -> Result<Self, NetlinkError> {
        let mut socket =
            Socket::new(NETLINK_ROUTE).map_err(|e| NetlinkError::io("socket(NETLINK_ROUTE)", e))?;
        socket
            .bind_auto()
            .map_err(|e| NetlinkError::io("bind", e))?;
        socket
            .connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(|e| NetlinkError::io("connect", e))?;
        // Extended ACK messages and capped ACKs (no echo of the request in each ACK).
        socket
            .set_ext_ack(true)
            .map_err(|e| NetlinkError::io("NETLINK_EXT_ACK", e))?;
        socket
            .set_cap_ack(true)
            .map_err(|e| NetlinkError::io("NETLINK_CAP_ACK", e))?;
        // Strict checking lets the kernel filter route dumps by protocol and table.
        socket
            .set_netlink_get_strict_chk(true)
            .map_err(|e| NetlinkError::io("NETLINK_GET_STRICT_CHK", e))?;
        let fd = socket.as_raw_fd();
        grow_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, RCVBUF_BYTES);
        grow_buffer(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, SNDBUF_BYTES);
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT_SECS,
            tv_usec: 0,
        };
        // SAFETY: `timeout` lives across the call and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(NetlinkError::io("SO_RCVTIMEO", io::Error::last_os_error()));
        }
        // Each queued NACK costs about 1 KiB of receive buffer (skb overhead): never send more
        // messages at once than the buffer can answer should all of them fail.
        let rcvbuf = socket.get_rx_buf_sz().unwrap_or(212_992);
        let fits = (rcvbuf / 1280).max(1);
        Ok(Self {
            socket,
            seq: 0,
            send_buf: Vec::with_capacity(MAX_SEND_BYTES),
            recv_buf: vec![0; 1 << 16],
            batch: batch.clamp(1, fits),
            sends: 0,
        })
    }

    /// [`execute`](Self::execute), with the `sendto` calls it took.
    fn run_batch(&mut self, requests: Vec<Request>) -> BatchResults {
        let before = self.sends;
        let results = self.execute(requests);
        BatchResults {
            results,
            sends: self.sends - before,
        }
    }

    fn port(&self) -> Result<u32, NetlinkError> {
        let mut addr = netlink_sys::SocketAddr::new(0, 0);
        self.socket
            .get_address(&mut addr)
            .map_err(|e| NetlinkError::io("getsockname", e))?;
        Ok(addr.port_number())
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        if self.seq == 0 {
            self.seq = 1;
        }
        self.seq
    }

    fn append(&mut self, message: RouteNetlinkMessage, flags: u16, seq: u32) {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        msg.finalize();
        let start = self.send_buf.len();
        let len = msg.buffer_len();
        let aligned = (len + 3) & !3;
        self.send_buf.resize(start + aligned, 0);
        msg.serialize(&mut self.send_buf[start..start + len]);
    }

    /// Receives one datagram into `recv_buf`. Kernel dump parts are at most 32 KiB, well
    /// below the 64 KiB buffer; `MSG_TRUNC` reports a larger one instead of cutting it silently.
    fn recv(&mut self) -> Result<usize, NetlinkError> {
        loop {
            let mut buf = &mut self.recv_buf[..];
            match self.socket.recv(&mut buf, libc::MSG_TRUNC) {
                Ok(n) if n > self.recv_buf.len() => {
                    return Err(NetlinkError::Decode(format!(
                        "netlink datagram of {n} bytes exceeds the {} byte buffer",
                        self.recv_buf.len()
                    )));
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(recv_error(e)),
            }
        }
    }

    /// Sends `requests` in batches and returns one result per request, in order.
    ///
    /// Only the last request of each datagram asks for an ACK (the barrier): the kernel
    /// answers every other request only when it fails (`netlink_rcv_skb` acks on
    /// `NLM_F_ACK || err`), and it handles the messages of a datagram in order, so once the
    /// barrier's answer is read every error of the datagram has been read before it. A
    /// request without an error message is thus a success. When the answers cannot be read to
    /// the barrier (receive error, overrun), every request not known to have failed gets that
    /// error ([`NetlinkError::AckLost`] on overrun): its kernel state is unknown.
    fn execute(
        &mut self,
        requests: impl IntoIterator<Item = Request>,
    ) -> Vec<Result<(), NetlinkError>> {
        let requests = requests.into_iter();
        let mut results: Vec<Result<(), NetlinkError>> = Vec::with_capacity(requests.size_hint().0);
        let mut requests = requests.peekable();
        while requests.peek().is_some() {
            self.send_buf.clear();
            let first_seq = self.seq.wrapping_add(1);
            let base = results.len();
            let mut count = 0usize;
            let mut last_start = 0usize;
            while count < self.batch && self.send_buf.len() < MAX_SEND_BYTES - 1024 {
                let Some(req) = requests.next() else { break };
                let seq = self.next_seq();
                last_start = self.send_buf.len();
                self.append(req.message, req.flags | NLM_F_REQUEST, seq);
                results.push(Ok(()));
                count += 1;
            }
            // The datagram's last request is the barrier: the only one acknowledged.
            if let Some(flags) = self.send_buf.get_mut(last_start + 6..last_start + 8) {
                let barrier_flags = u16::from_ne_bytes([flags[0], flags[1]]) | NLM_F_ACK;
                flags.copy_from_slice(&barrier_flags.to_ne_bytes());
            }
            let batch_results = &mut results[base..];
            self.sends += 1;
            if let Err(e) = send_all(&self.socket, &self.send_buf) {
                batch_results
                    .iter_mut()
                    .for_each(|r| *r = Err(NetlinkError::io("sendto", clone_io(&e))));
                continue;
            }
            let barrier = count - 1;
            let mut barrier_answered = false;
            while !barrier_answered {
                let n = match self.recv() {
                    Ok(n) => n,
                    Err(e) => {
                        for r in batch_results.iter_mut().filter(|r| r.is_ok()) {
                            *r = Err(e.clone());
                        }
                        break;
                    }
                };
                for ack in acks(&self.recv_buf[..n]) {
                    let Ok(ack) = ack else { continue };
                    let idx = ack.seq.wrapping_sub(first_seq) as usize;
                    if idx >= count {
                        continue;
                    }
                    barrier_answered |= idx == barrier;
                    if ack.result.is_err() {
                        batch_results[idx] = ack.result;
                    }
                }
            }
        }
        results
    }

    /// Sends one plain request (no dump, no ACK asked) and returns the kernel's one answer:
    /// e.g. `RTM_GETROUTE` for an address, answered by the route the kernel would use.
    fn get(&mut self, message: RouteNetlinkMessage) -> Result<RouteNetlinkMessage, NetlinkError> {
        let seq = self.send_one(message, NLM_F_REQUEST)?;
        self.read_answer(seq, |kind, flags, msg| {
            Some(if kind == NLMSG_ERROR {
                parse_error(msg, flags).and(Err(NetlinkError::Decode(
                    "an ACK instead of an answer".into(),
                )))
            } else {
                match NetlinkMessage::<RouteNetlinkMessage>::deserialize(msg) {
                    Ok(NetlinkMessage {
                        payload: NetlinkPayload::InnerMessage(m),
                        ..
                    }) => Ok(m),
                    Ok(_) => Err(NetlinkError::Decode("not an rtnetlink answer".into())),
                    Err(e) => Err(NetlinkError::Decode(e.to_string())),
                }
            })
        })
    }

    fn dump_each(
        &mut self,
        message: RouteNetlinkMessage,
        mut each: impl FnMut(RouteNetlinkMessage),
    ) -> Result<(), NetlinkError> {
        let seq = self.send_one(message, NLM_F_REQUEST | NLM_F_DUMP)?;
        self.read_answer(seq, |kind, flags, msg| {
            if kind == NLMSG_DONE {
                return Some(Ok(()));
            }
            if kind == NLMSG_ERROR {
                return Some(parse_error(msg, flags));
            }
            match NetlinkMessage::<RouteNetlinkMessage>::deserialize(msg) {
                Ok(NetlinkMessage {
                    payload: NetlinkPayload::InnerMessage(m),
                    ..
                }) => each(m),
                Ok(_) => {}
                // One attribute this crate version cannot parse must not hide the rest.
                Err(e) => tracing::debug!(error = %e, "skipping undecodable dump message"),
            }
            None
        })
    }

    /// Sends `message` alone with `flags`; returns its sequence number.
    fn send_one(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<u32, NetlinkError> {
        self.send_buf.clear();
        let seq = self.next_seq();
        self.append(message, flags, seq);
        send_all(&self.socket, &self.send_buf).map_err(|e| NetlinkError::io("sendto", e))?;
        self.sends += 1;
        Ok(seq)
    }

    /// Reads the answer to request `seq`: hands each of its messages (type, flags, bytes) to
    /// `on` until `on` returns the result. Messages of other requests are skipped.
    fn read_answer<T>(
        &mut self,
        seq: u32,
        mut on: impl FnMut(u16, u16, &[u8]) -> Option<Result<T, NetlinkError>>,
    ) -> Result<T, NetlinkError> {
        loop {
            let n = self.recv()?;
            let mut offset = 0;
            while offset + NETLINK_HEADER_LEN <= n {
                let data = &self.recv_buf[offset..n];
                let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
                if len < NETLINK_HEADER_LEN || len > data.len() {
                    return Err(NetlinkError::Decode(format!(
                        "message length {len} in {n} bytes"
                    )));
                }
                let msg = &data[..len];
                offset += (len + 3) & !3;
                let msg_seq = u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]);
                if msg_seq != seq {
                    continue;
                }
                let kind = u16::from_ne_bytes([msg[4], msg[5]]);
                let flags = u16::from_ne_bytes([msg[6], msg[7]]);
                if let Some(result) = on(kind, flags, msg) {
                    return result;
                }
            }
        }
    }
}

fn recv_error(e: io::Error) -> NetlinkError {
    match e.raw_os_error() {
        Some(libc::ENOBUFS) => NetlinkError::AckLost,
        _ => NetlinkError::io("recv", e),
    }
}

fn clone_io(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

fn send_all(socket: &Socket, buf: &[u8]) -> io::Result<()> {
    loop {
        match socket.send(buf, 0) {
            Ok(n) if n == buf.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "short netlink send: {n} of {}",
                    buf.len()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// One answer to a request.
pub(crate) struct Ack {
    pub seq: u32,
    pub result: Result<(), NetlinkError>,
}

/// The ACKs/NACKs in a datagram; other messages are skipped.
pub(crate) fn acks(datagram: &[u8]) -> impl Iterator<Item = Result<Ack, NetlinkError>> + '_ {
    let mut offset = 0usize;
    std::iter::from_fn(move || {
        loop {
            let data = datagram.get(offset..)?;
            if data.len() < NETLINK_HEADER_LEN {
                return None;
            }
            let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
            if len < NETLINK_HEADER_LEN || len > data.len() {
                offset = datagram.len();
                return Some(Err(NetlinkError::Decode(format!("message length {len}"))));
            }
            offset += (len + 3) & !3;
            let msg = &data[..len];
            let kind = u16::from_ne_bytes([msg[4], msg[5]]);
            if kind != NLMSG_ERROR {
                continue;
            }
            let flags = u16::from_ne_bytes([msg[6], msg[7]]);
            let seq = u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]);
            return Some(Ok(Ack {
                seq,
                result: parse_error(msg, flags),
            }));
        }
    })
}

/// Decodes an `NLMSG_ERROR` message: `Ok` for an ACK, the errno and extended-ACK message for
/// a NACK.
fn parse_error(msg: &[u8], flags: u16) -> Result<(), NetlinkError> {
    let body = &msg[NETLINK_HEADER_LEN..];
    let Some(code) = body.get(..4) else {
        return Err(NetlinkError::Decode("truncated NLMSG_ERROR".into()));
    };
    let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
    if code == 0 {
        return Ok(());
    }
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        let orig = &body[4..];
        let skip = if flags & NLM_F_CAPPED != 0 {
            NETLINK_HEADER_LEN
        } else {
            orig.get(..4)
                .map(|b| (u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize + 3) & !3)
                .unwrap_or(orig.len())
        };
        let mut tlvs = orig.get(skip..).unwrap_or_default();
        while tlvs.len() >= 4 {
            let len = u16::from_ne_bytes([tlvs[0], tlvs[1]]) as usize;
            let kind = u16::from_ne_bytes([tlvs[2], tlvs[3]]);
            if len < 4 || len > tlvs.len() {
                break;
            }
            if kind == NLMSGERR_ATTR_MSG {
                let text = &tlvs[4..len];
                let text = text.split(|b| *b == 0).next().unwrap_or_default();
                message = Some(String::from_utf8_lossy(text).into_owned());
            }
            tlvs = tlvs.get((len + 3) & !3..).unwrap_or_default();
        }
    }
    Err(NetlinkError::Kernel {
        errno: code.saturating_abs(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_msg(seq: u32, code: i32, ext: Option<&str>) -> Vec<u8> {
        let mut body = code.to_ne_bytes().to_vec();
        // Capped original header.
        body.extend_from_slice(&[0u8; 16]);
        let mut flags = NLM_F_CAPPED;
        if let Some(text) = ext {
            flags |= NLM_F_ACK_TLVS;
            let mut t = text.as_bytes().to_vec();
            t.push(0);
            let len = 4 + t.len();
            body.extend_from_slice(&(len as u16).to_ne_bytes());
            body.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
            body.extend_from_slice(&t);
            while !body.len().is_multiple_of(4) {
                body.push(0);
            }
        }
        let mut msg = Vec::new();
        msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&body);
        msg
    }

    #[test]
    fn acks_and_nacks_with_extended_message() {
        let mut datagram = error_msg(7, 0, None);
        datagram.extend(error_msg(
            8,
            -libc::ENETUNREACH,
            Some("Nexthop has invalid gateway"),
        ));
        let acks: Vec<Ack> = acks(&datagram).map(Result::unwrap).collect();
        assert_eq!(acks.len(), 2);
        assert_eq!((acks[0].seq, acks[0].result.clone()), (7, Ok(())));
        let err = acks[1].result.clone().unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENETUNREACH));
        assert_eq!(
            err,
            NetlinkError::Kernel {
                errno: libc::ENETUNREACH,
                message: Some("Nexthop has invalid gateway".into())
            }
        );
        assert!(
            err.to_string().contains("Nexthop has invalid gateway"),
            "{err}"
        );
    }

    #[test]
    fn truncated_datagrams_do_not_panic() {
        let datagram = error_msg(1, -1, Some("x"));
        for cut in 0..datagram.len() {
            let _ = acks(&datagram[..cut]).count();
        }
        let mut bogus = datagram.clone();
        bogus[0] = 3; // length below the header size
        assert!(acks(&bogus).next().unwrap().is_err());
    }
}

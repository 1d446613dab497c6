//! A TCP relay between two BGP speakers on loopback, to stage what loopback alone never shows:
//! two connections that both exist before either carries an OPEN (a connection collision,
//! RFC 4271 §6.8), and a connection that goes silent without closing (a peer that crashed
//! and restarted before its old session timed out, RFC 4724 §4.2).
//!
//! A [`Relay`] listens on `listen` (an address of the speaker that is connected to, on a port
//! of its own) and forwards each accepted connection to `target`, connecting from `source`
//! (an address of the speaker that connected), so each speaker sees the peer address it is
//! configured with. Relays that share a [`Gate`] connect onward only once every one of them
//! has accepted a connection in the gate's current round (or the gate's patience is over).

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Holds connections until every relay of the gate has one in the current round, then each
/// connection's first bytes in either direction (a speaker's OPEN) until every connection of
/// the round has sent them both ways (or closed). So each speaker has both connections, and
/// has sent its OPEN on both, before it receives an OPEN on either.
pub struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
    members: usize,
    patience: Duration,
}

struct GateState {
    round: u64,
    /// Relays that accepted a connection in this round.
    arrived: Vec<bool>,
    /// Per relay and direction (2 × relay + from-target), first bytes read (or the end).
    spoke: Vec<bool>,
}

impl Gate {
    pub fn new(members: usize, patience: Duration) -> Arc<Gate> {
        Arc::new(Gate {
            state: Mutex::new(GateState {
                round: 0,
                arrived: vec![false; members],
                spoke: vec![false; 2 * members],
            }),
            cv: Condvar::new(),
            members,
            patience,
        })
    }

    /// Start a new round: connections accepted from now on wait for each other again.
    pub fn next_round(&self) {
        let mut s = self.state.lock().unwrap();
        s.round += 1;
        s.arrived = vec![false; self.members];
        s.spoke = vec![false; 2 * self.members];
        self.cv.notify_all();
    }

    /// Whether every relay accepted a connection in the current round.
    pub fn all_arrived(&self) -> bool {
        self.arrived().iter().all(|a| *a)
    }

    /// Per relay, whether it accepted a connection in the current round.
    pub fn arrived(&self) -> Vec<bool> {
        self.state.lock().unwrap().arrived.clone()
    }

    /// Set `flag(state)[i]` and wait until all are set, the patience is over, or a new round
    /// began.
    fn mark_and_wait(&self, i: usize, flag: fn(&mut GateState) -> &mut Vec<bool>) {
        let deadline = Instant::now() + self.patience;
        let mut s = self.state.lock().unwrap();
        let round = s.round;
        flag(&mut s)[i] = true;
        self.cv.notify_all();
        while s.round == round && !flag(&mut s).iter().all(|a| *a) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            s = self.cv.wait_timeout(s, deadline - now).unwrap().0;
        }
    }

    /// Member `i` has a connection: wait until all have.
    fn arrive(&self, i: usize) {
        self.mark_and_wait(i, |s| &mut s.arrived);
    }

    /// Member `i`'s connection read its first bytes (or its end) from one end: wait until
    /// every direction of every member's connection has.
    fn spoke(&self, i: usize, from_target: bool) {
        self.mark_and_wait(2 * i + usize::from(from_target), |s| &mut s.spoke);
    }
}

/// One relayed TCP connection.
pub struct Link {
    /// Which relay carried it (see [`Relay::name`]).
    pub relay: &'static str,
    /// Relay-wide number, in order of acceptance.
    pub seq: usize,
    /// Either end closed it.
    closed: AtomicBool,
    /// The target end (the speaker connected to) closed it.
    target_closed: AtomicBool,
    /// Bytes are no longer forwarded, and a close by the connecting end is not passed on.
    frozen: AtomicBool,
    /// Kept until the relay goes away, so a frozen link's target end stays open.
    streams: Mutex<Vec<TcpStream>>,
}

impl Link {
    pub fn is_open(&self) -> bool {
        !self.closed.load(Ordering::SeqCst)
    }

    /// Whether the end that was connected to closed the connection.
    pub fn target_closed(&self) -> bool {
        self.target_closed.load(Ordering::SeqCst)
    }

    /// Stop forwarding without closing: the target end sees a silent but open connection,
    /// whatever the connecting end does.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

/// A relay; stops accepting and closes its connections on drop.
pub struct Relay {
    pub name: &'static str,
    pub listen: SocketAddr,
    links: Arc<Mutex<Vec<Arc<Link>>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Listen on `listen` (port 0: any free one) and forward to `target` from `source`.
    /// With `gate`, this relay is its member `member`.
    pub fn start(
        name: &'static str,
        listen: SocketAddr,
        target: SocketAddr,
        source: IpAddr,
        gate: Option<(Arc<Gate>, usize)>,
    ) -> Relay {
        let listener = TcpListener::bind(listen).expect("relay binds");
        let listen = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let links: Arc<Mutex<Vec<Arc<Link>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let seq = Arc::new(AtomicUsize::new(0));
        let (l2, s2) = (links.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let n = seq.fetch_add(1, Ordering::SeqCst);
                        let (links, gate) = (l2.clone(), gate.clone());
                        std::thread::spawn(move || {
                            relay_one(name, n, client, target, source, gate, links)
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Relay {
            name,
            listen,
            links,
            stop,
        }
    }

    /// Every connection relayed so far, in order of acceptance.
    pub fn links(&self) -> Vec<Arc<Link>> {
        let mut v = self.links.lock().unwrap().clone();
        v.sort_by_key(|l| l.seq);
        v
    }

    pub fn open_links(&self) -> Vec<Arc<Link>> {
        self.links().into_iter().filter(|l| l.is_open()).collect()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for l in self.links.lock().unwrap().iter() {
            for s in l.streams.lock().unwrap().iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

fn relay_one(
    name: &'static str,
    seq: usize,
    client: TcpStream,
    target: SocketAddr,
    source: IpAddr,
    gate: Option<(Arc<Gate>, usize)>,
    links: Arc<Mutex<Vec<Arc<Link>>>>,
) {
    if let Some((g, i)) = &gate {
        g.arrive(*i);
    }
    let server = match connect_from(source, target) {
        Ok(s) => s,
        Err(_) => return,
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let link = Arc::new(Link {
        relay: name,
        seq,
        closed: AtomicBool::new(false),
        target_closed: AtomicBool::new(false),
        frozen: AtomicBool::new(false),
        streams: Mutex::new(vec![
            client.try_clone().unwrap(),
            server.try_clone().unwrap(),
        ]),
    });
    links.lock().unwrap().push(link.clone());
    let (c2, s2, l2) = (
        client.try_clone().unwrap(),
        server.try_clone().unwrap(),
        link.clone(),
    );
    let g2 = gate.clone();
    std::thread::spawn(move || pump(c2, s2, &l2, false, g2));
    pump(server, client, &link, true, gate);
}

/// Connect to `target` from `source` (any port), as a blocking std stream.
fn connect_from(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let stream = rt.block_on(async {
        let sock = match target {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        sock.bind(SocketAddr::new(source, 0))?;
        sock.connect(target).await
    })?;
    let std_stream = stream.into_std()?;
    std_stream.set_nonblocking(false)?;
    Ok(std_stream)
}

/// Copy `from` → `to` until `from` ends; then pass the close on, unless frozen.
/// `from_target`: `from` is the end that was connected to.
/// With a gate, the first bytes wait for the other connections' (see [`Gate`]).
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    link: &Link,
    from_target: bool,
    mut gate: Option<(Arc<Gate>, usize)>,
) {
    let mut buf = [0u8; 16384];
    loop {
        let r = from.read(&mut buf);
        if let Some((g, i)) = gate.take() {
            g.spoke(i, from_target);
        }
        match r {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if link.frozen.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    if from_target {
        link.target_closed.store(true, Ordering::SeqCst);
    }
    link.closed.store(true, Ordering::SeqCst);
    if !link.frozen.load(Ordering::SeqCst) {
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    }
}

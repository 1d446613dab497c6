//! The speaker as a route reflector (RFC 4456) over real TCP sessions on loopback, with
//! hand-driven clients: what each client receives is checked message by message.
//!
//! - every client gets every other client's routes, with ORIGINATOR_ID = the originating
//!   client and CLUSTER_LIST = our cluster ID, and never its own (the clients share one update
//!   group and one encoded stream, so this is the per-member exclusion at work);
//! - a client without the 4-octet AS capability in the same group gets a stream encoded for
//!   it (its AS_PATHs decode correctly);
//! - a client joining later gets the whole table, then End-of-RIB;
//! - removing a client withdraws its routes from the others;
//! - the per-peer "advertised" counts in the status match what each client received.

mod support;

use ipnet::IpNet;
use podroute_bgp::wire::{
    AsPath, Capability, CodecContext, Family, Message, Open, Origin, PathAttrs, Update,
    decode_message, encode_message,
};
use podroute_bgp::{PeerConfig, PeerStatus, Speaker, SpeakerConfig};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use support::Endpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AS: u32 = 64512;
/// An external AS the clients put in their AS_PATHs, so that 2- and 4-octet encodings differ.
const EXTERNAL_AS: u32 = 65010;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// One route as a client received it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Received {
    next_hop: Option<Ipv4Addr>,
    originator_id: Option<Ipv4Addr>,
    cluster_list: Vec<Ipv4Addr>,
    as_path: Option<AsPath>,
}

/// A route-reflector client driven by the test.
struct Client {
    ep: Endpoint,
    stream: tokio::net::TcpStream,
    buf: bytes::BytesMut,
    ctx: CodecContext,
    /// The client's Adj-RIB-In: what the reflector announced and did not withdraw.
    rib: BTreeMap<IpNet, Received>,
    /// Every prefix ever announced to the client, in order (to catch its own routes).
    ever: Vec<IpNet>,
    end_of_rib: bool,
}

impl Client {
    async fn send(&mut self, m: Message) {
        let mut out = bytes::BytesMut::new();
        encode_message(&m, self.ctx, &mut out);
        self.stream.write_all(&out).await.unwrap();
    }

    async fn recv(&mut self) -> Message {
        loop {
            if let Some(m) = decode_message(&mut self.buf, self.ctx).unwrap() {
                return m;
            }
            let n =
                tokio::time::timeout(Duration::from_secs(10), self.stream.read_buf(&mut self.buf))
                    .await
                    .unwrap_or_else(|_| panic!("{}: nothing from the reflector", self.ep.addr))
                    .unwrap();
            assert!(n > 0, "{}: connection closed", self.ep.addr);
        }
    }

    /// Read until `done` holds for the client's state.
    async fn until(&mut self, what: &str, done: impl Fn(&Client) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: waiting for {what}; has {:?}",
                self.ep.addr,
                self.rib.keys().collect::<Vec<_>>()
            );
            match self.recv().await {
                Message::Update(u) => self.apply(u),
                Message::Keepalive => {}
                m => panic!("{}: unexpected {m:?}", self.ep.addr),
            }
        }
    }

    fn apply(&mut self, u: Update) {
        if u.end_of_rib_family() == Some(Family::IPV4_UNICAST) {
            self.end_of_rib = true;
            return;
        }
        assert!(u.errors.is_empty(), "{}: {:?}", self.ep.addr, u.errors);
        for p in &u.withdrawn {
            self.rib.remove(p);
        }
        for p in &u.nlri {
            self.ever.push(*p);
            self.rib.insert(
                *p,
                Received {
                    next_hop: u.attrs.next_hop,
                    originator_id: u.attrs.originator_id,
                    cluster_list: u.attrs.cluster_list.clone(),
                    as_path: u.attrs.as_path.clone(),
                },
            );
        }
    }

    /// The client's own /26.
    fn prefix(&self) -> IpNet {
        // 18 bits of the (unique) address, as a /26 in 10.0.0.0/8.
        let n = u32::from(self.ep.addr) & 0x3_ffff;
        IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (n << 6))), 26).unwrap()
    }

    async fn announce_own(&mut self) {
        let u = Update {
            attrs: PathAttrs {
                origin: Some(Origin::Igp),
                as_path: Some(AsPath::from_sequence(vec![EXTERNAL_AS])),
                next_hop: Some(self.ep.nh_v4),
                local_pref: Some(100),
                ..Default::default()
            },
            nlri: vec![self.prefix()],
            ..Default::default()
        };
        self.send(Message::Update(u)).await;
    }
}

fn advertised(peers: &[PeerStatus], c: &Client) -> usize {
    peers
        .iter()
        .find(|p| p.addr == IpAddr::V4(c.ep.addr))
        .unwrap_or_else(|| panic!("no status for {}", c.ep.addr))
        .prefixes_advertised
}

async fn add_client(sp: &Speaker, ep: &Endpoint) {
    let mut p = PeerConfig::new(IpAddr::V4(ep.addr), AS);
    p.passive = true;
    p.rr_client = true;
    p.families = vec![Family::IPV4_UNICAST];
    sp.add_peer(p).await.unwrap();
}

/// Configure a client on the reflector, connect it and read its initial table up to
/// End-of-RIB.
async fn connect_client(sp: &Speaker, rr: &Endpoint, four_octet_as: bool) -> Client {
    let ep = Endpoint::alloc();
    add_client(sp, &ep).await;
    let mut c = Client::establish(ep, rr, four_octet_as).await;
    c.until("End-of-RIB", |c| c.end_of_rib).await;
    c
}

impl Client {
    async fn establish(ep: Endpoint, rr: &Endpoint, four_octet_as: bool) -> Client {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(IpAddr::V4(ep.addr), 0)).unwrap();
        let stream = sock
            .connect(SocketAddr::new(IpAddr::V4(rr.addr), rr.port))
            .await
            .unwrap();
        let mut c = Client {
            ep,
            stream,
            buf: bytes::BytesMut::new(),
            ctx: CodecContext { four_octet_as },
            rib: BTreeMap::new(),
            ever: Vec::new(),
            end_of_rib: false,
        };
        let mut open = Open::new(
            AS,
            90,
            ep.router_id(),
            vec![Capability::Multiprotocol(Family::IPV4_UNICAST)],
        );
        if !four_octet_as {
            open.capabilities
                .retain(|c| !matches!(c, Capability::FourOctetAs(_)));
        }
        c.send(Message::Open(open)).await;
        assert!(matches!(c.recv().await, Message::Open(_)));
        c.send(Message::Keepalive).await;
        match c.recv().await {
            Message::Keepalive => {}
            m => panic!("expected KEEPALIVE, got {m:?}"),
        }
        c
    }
}

async fn start_reflector() -> (Endpoint, Speaker) {
    let ep = Endpoint::alloc();
    let mut cfg = SpeakerConfig::new(AS, ep.router_id());
    cfg.listen = Some(SocketAddr::new(IpAddr::V4(ep.addr), ep.port));
    cfg.graceful_restart_time = None;
    let (sp, mut best) = Speaker::start(cfg).await.unwrap();
    tokio::spawn(async move { while best.recv().await.is_some() {} });
    (ep, sp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_get_each_others_routes_never_their_own() {
    let (rr, sp) = start_reflector().await;
    let mut clients = Vec::new();
    for i in 0..4 {
        // The last one speaks 2-octet AS numbers only.
        clients.push(connect_client(&sp, &rr, i != 3).await);
    }
    for c in &mut clients {
        assert!(c.rib.is_empty(), "empty table before any announcement");
        c.announce_own().await;
    }
    let prefixes: Vec<IpNet> = clients.iter().map(Client::prefix).collect();
    let sources: Vec<(IpNet, Endpoint)> = clients.iter().map(|c| (c.prefix(), c.ep)).collect();
    for c in &mut clients {
        let own = c.prefix();
        let others: Vec<IpNet> = prefixes.iter().copied().filter(|p| *p != own).collect();
        c.until("the other clients' routes", |c| {
            others.iter().all(|p| c.rib.contains_key(p))
        })
        .await;
        for (p, src) in &sources {
            let Some(r) = c.rib.get(p) else { continue };
            assert_eq!(
                r.originator_id,
                Some(src.router_id()),
                "{p} at {}",
                c.ep.addr
            );
            assert_eq!(r.cluster_list, vec![rr.router_id()], "{p}");
            assert_eq!(
                r.next_hop,
                Some(src.nh_v4),
                "iBGP reflection keeps the next hop"
            );
            assert_eq!(
                r.as_path,
                Some(AsPath::from_sequence(vec![EXTERNAL_AS])),
                "{p} at {} (4-octet AS: {})",
                c.ctx.four_octet_as,
                c.ep.addr
            );
        }
    }
    // A route of our own goes to everyone, after whatever was queued before it: once it
    // arrived, a client has been sent everything it will be sent for the announcements.
    let local = net("10.255.0.0/26");
    sp.announce(local, None).await.unwrap();
    for c in &mut clients {
        c.until("our own route", |c| c.rib.contains_key(&local))
            .await;
        assert!(
            !c.ever.contains(&c.prefix()),
            "{} was sent its own route",
            c.ep.addr
        );
        assert_eq!(c.rib.len(), 4, "{}: 3 others + ours", c.ep.addr);
    }
    let status = sp.peers().await.unwrap();
    for c in &clients {
        assert_eq!(advertised(&status, c), c.rib.len(), "{}", c.ep.addr);
    }

    // A late joiner gets the whole table, then End-of-RIB.
    let late = connect_client(&sp, &rr, true).await;
    let mut want: Vec<IpNet> = prefixes.clone();
    want.push(local);
    want.sort_unstable();
    assert_eq!(late.rib.keys().copied().collect::<Vec<_>>(), want);
    assert_eq!(
        late.rib[&prefixes[0]].originator_id,
        Some(sources[0].1.router_id())
    );
    clients.push(late);

    // Removing a client withdraws its route from everyone else.
    let gone = clients.remove(0);
    sp.remove_peer(IpAddr::V4(gone.ep.addr)).await.unwrap();
    for c in &mut clients {
        c.until("the removed client's route withdrawn", |c| {
            !c.rib.contains_key(&gone.prefix())
        })
        .await;
    }
    // Once more, our own route as a marker that everything queued has been read.
    sp.withdraw(local).await.unwrap();
    for c in &mut clients {
        c.until("our route withdrawn", |c| !c.rib.contains_key(&local))
            .await;
        assert!(
            !c.ever.contains(&c.prefix()),
            "{} was sent its own route",
            c.ep.addr
        );
    }
    let status = sp.peers().await.unwrap();
    for c in &clients {
        let expect = if c.ep == clients.last().unwrap().ep {
            3
        } else {
            2
        };
        assert_eq!(c.rib.len(), expect, "{}", c.ep.addr);
        assert_eq!(advertised(&status, c), expect, "{}", c.ep.addr);
    }
    sp.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_from_many_clients_reaches_everyone() {
    // Enough clients writing at once that the reflector exports several UPDATEs together.
    const N: usize = 24;
    let (rr, sp) = start_reflector().await;
    let mut clients = Vec::new();
    for _ in 0..N {
        clients.push(connect_client(&sp, &rr, true).await);
    }
    for c in &mut clients {
        c.announce_own().await;
    }
    let marker = net("10.255.1.0/26");
    let all: Vec<IpNet> = clients.iter().map(Client::prefix).collect();
    let mut waits = Vec::new();
    for mut c in clients {
        let all = all.clone();
        waits.push(tokio::spawn(async move {
            let own = c.prefix();
            c.until("every other client's route", |c| {
                all.iter()
                    .filter(|p| **p != own)
                    .all(|p| c.rib.contains_key(p))
            })
            .await;
            c
        }));
    }
    let mut clients = Vec::new();
    for w in waits {
        clients.push(w.await.unwrap());
    }
    sp.announce(marker, None).await.unwrap();
    let status = sp.peers().await.unwrap();
    for c in &mut clients {
        c.until("the marker", |c| c.rib.contains_key(&marker)).await;
        assert!(
            !c.ever.contains(&c.prefix()),
            "{} was sent its own route",
            c.ep.addr
        );
        assert_eq!(c.rib.len(), N);
        assert_eq!(c.ever.len(), N, "{}: each route sent once", c.ep.addr);
    }
    let status_after = sp.peers().await.unwrap();
    for c in &clients {
        assert_eq!(advertised(&status_after, c), N, "{}", c.ep.addr);
        assert!(advertised(&status, c) >= N - 1);
    }
    sp.shutdown().await.unwrap();
}

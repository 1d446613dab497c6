//! Two connections to one peer, decided sans-IO: connection collision (RFC 4271 §6.8 with the
//! RFC 6286 §2.3 tie-break) and a restarted peer's new session replacing the old one
//! (RFC 4724 §4.2).
//!
//! A peer's session task holds at most two [`Fsm`]s: the *main* one (the session the speaker
//! core sees) and an *extra* one, made with [`Fsm::accept`] for a connection the peer opened
//! while the main FSM already had one (OpenSent or later). After every event the driver asks
//! [`resolve`] what to do with the pair and carries out the [`Resolution`]; nothing here
//! touches a socket or a clock.
//!
//! | main | extra | resolution |
//! |---|---|---|
//! | any | Idle, Connect, Active (closed) | [`Resolution::Wait`]: the driver discards it |
//! | Idle, Connect, Active (no OPEN sent) | OpenSent or later | [`Resolution::TakeOver`] |
//! | OpenSent | OpenSent | [`Resolution::Wait`]: no peer BGP ID known yet |
//! | OpenSent, OpenConfirm | OpenSent, OpenConfirm (one of them OpenConfirm) | by BGP ID, then AS: [`Resolution::CloseMain`] or [`Resolution::CloseExtra`] |
//! | OpenSent, OpenConfirm | Established | [`Resolution::CloseMain`] |
//! | Established | OpenSent | [`Resolution::Wait`]: the peer's OPEN says whether it restarted |
//! | Established | OpenConfirm | Restart State bit set: [`Resolution::Wait`]; else [`Resolution::CloseExtra`] |
//! | Established | Established | Restart State bit set: [`Resolution::Replace`]; else [`Resolution::CloseExtra`] |
//!
//! By BGP ID (RFC 4271 §6.8): the connection opened by the speaker with the higher BGP
//! identifier survives; on equal identifiers (legal between ASes only, RFC 6286 §2.2) the one
//! opened by the speaker with the larger AS number (RFC 6286 §2.3; the 4-octet AS of the
//! capability, [`Negotiated::peer_as`]). §6.8 asks for the check on receipt of an OPEN
//! against connections in OpenConfirm and allows it against OpenSent when the peer's BGP ID
//! is known otherwise: here it is known from the OPEN on the other connection, so a pair is
//! decided as soon as one of the two is in OpenConfirm. Two connections both opened by the
//! peer are no §6.8 collision: the peer gave up on the older one, which is closed.
//!
//! The OPEN that decides a pair against its own connection gets no KEEPALIVE in answer, only
//! the Cease ([`withhold_from_loser`]): a KEEPALIVE would make the peer's end of that
//! connection Established, and a peer that then gets our OPEN on the other connection may
//! close that one as colliding with an Established session (§6.8; BIRD 2 does), leaving
//! neither.
//!
//! Equal identifiers within one AS are not tie-broken: they are an OPEN error (RFC 6286 §2.2,
//! Bad BGP Identifier). The FSM already refuses such an OPEN ([`crate::fsm::OpenError`]), so
//! no connection reaches OpenConfirm with it; should one appear anyway the answer is
//! [`Resolution::BadBgpId`], never a tie-break.

use crate::fsm::{
    Action, CollisionCheck, ConnectionSide, Fsm, Negotiated, State, collision_check,
    collision_loser_with_as,
};
use crate::wire::Message;
use std::net::Ipv4Addr;

/// One of the two connections to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Conn {
    /// The connection of the session the speaker core sees.
    Main,
    /// A second connection the peer opened, with its own FSM from [`Fsm::accept`].
    Extra,
}

/// What the driver does with the two connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Nothing yet; ask again after the next event.
    Wait,
    /// Close the main connection with [`crate::fsm::Event::CollisionLost`] (Cease /
    /// Connection Collision Resolution); the extra connection becomes the main one.
    CloseMain,
    /// Close the extra connection with [`crate::fsm::Event::CollisionLost`].
    CloseExtra,
    /// The main FSM has sent no OPEN (no connection, or only an attempt): drop it and its
    /// attempt; the extra connection becomes the main one.
    TakeOver,
    /// The peer restarted (RFC 4724 §4.2) and its new session is Established: the old one
    /// goes down as a TCP failure would (its routes kept by graceful restart), its connection
    /// is closed, and the extra connection becomes the main one.
    Replace,
    /// This connection's OPEN carries our BGP identifier on an iBGP session: answer it with
    /// OPEN error Bad BGP Identifier (RFC 6286 §2.2), do not tie-break.
    BadBgpId(Conn),
}

/// Our side of the session: what the tie-breaks compare against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Local {
    pub id: Ipv4Addr,
    /// Our AS number (4 octets).
    pub asn: u32,
}

/// What the decision needs from the peer's OPEN on one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerOpen {
    pub id: Ipv4Addr,
    /// The peer's AS from the 4-octet AS capability (RFC 6793), else the 2-octet field.
    pub asn: u32,
    /// The graceful restart capability's Restart State bit (RFC 4724 §3).
    pub restart_state: bool,
}

impl PeerOpen {
    pub fn of(n: &Negotiated) -> PeerOpen {
        PeerOpen {
            id: n.peer_id,
            asn: n.peer_as,
            restart_state: n
                .peer_graceful_restart
                .as_ref()
                .is_some_and(|g| g.restart_state),
        }
    }
}

/// What the decision needs from one connection's FSM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnView {
    pub state: State,
    /// Which end opened the connection; `None` without one.
    pub side: Option<ConnectionSide>,
    /// The peer's OPEN, once the FSM accepted it (OpenConfirm, Established).
    pub peer: Option<PeerOpen>,
}

impl ConnView {
    pub fn of(fsm: &Fsm) -> ConnView {
        ConnView {
            state: fsm.state(),
            side: fsm.side(),
            peer: fsm.negotiated().map(PeerOpen::of),
        }
    }
}

/// The connection [`resolve`] closes, if it closes one now.
pub fn loser(main: &Fsm, extra: &Fsm) -> Option<Conn> {
    match resolve(main, extra) {
        Resolution::CloseMain => Some(Conn::Main),
        Resolution::CloseExtra => Some(Conn::Extra),
        _ => None,
    }
}

/// Of the actions an event on connection `conn` produced (its FSM already past the event),
/// drop the KEEPALIVE if [`resolve`] now closes that connection.
///
/// An OPEN accepted in OpenSent answers with a KEEPALIVE; when that same OPEN decides the
/// collision against its connection, the driver sends the Cease right after it. The
/// KEEPALIVE would only make the peer's side of a connection we are closing Established,
/// and a peer that checks collisions against an Established connection (BIRD 2 closes any
/// new connection then, as §6.8 allows) closes the connection we keep when our OPEN on it
/// arrives after that KEEPALIVE: both connections go. Without the KEEPALIVE the peer sees
/// OPEN then Cease, as from a connection dumped in OpenSent.
pub fn withhold_from_loser(main: &Fsm, extra: &Fsm, conn: Conn, actions: &mut Vec<Action>) {
    if loser(main, extra) == Some(conn) {
        actions.retain(|a| !matches!(a, Action::Send(Message::Keepalive)));
    }
}

/// [`decide`] over the two FSMs of one peer; our identity is the main FSM's configuration.
pub fn resolve(main: &Fsm, extra: &Fsm) -> Resolution {
    let cfg = main.config();
    let local = Local {
        id: cfg.local_id,
        asn: cfg.local_as,
    };
    decide(local, ConnView::of(main), ConnView::of(extra))
}

/// What to do with the main and the extra connection of one peer (see the module docs).
pub fn decide(local: Local, main: ConnView, extra: ConnView) -> Resolution {
    if !extra.state.has_connection() {
        return Resolution::Wait;
    }
    if !main.state.has_connection() {
        return Resolution::TakeOver;
    }
    // RFC 6286 §2.2: our identifier in an OPEN from our own AS is an error, not a tie.
    for (conn, v) in [(Conn::Main, main), (Conn::Extra, extra)] {
        if let Some(p) = v.peer
            && p.id == local.id
            && p.asn == local.asn
        {
            return Resolution::BadBgpId(conn);
        }
    }
    let restarted = extra.peer.is_some_and(|p| p.restart_state);
    match (main.state, extra.state) {
        (State::Established, State::Established) if restarted => Resolution::Replace,
        (State::Established, State::Established) => Resolution::CloseExtra,
        (_, State::Established) => Resolution::CloseMain,
        // The peer's OPEN arrived on the new connection: RFC 4271 §6.8 against the other.
        (_, State::OpenConfirm) => match collision_check(main.state) {
            // Unless the peer says it restarted: then its new session replaces the old one
            // once it is Established.
            CollisionCheck::NewConnectionLoses if restarted => Resolution::Wait,
            CollisionCheck::NewConnectionLoses => Resolution::CloseExtra,
            // ByBgpId, or main in OpenSent (the "MAY" of §6.8: the peer's ID is known from
            // this OPEN).
            _ => by_bgp_id(local, extra.peer, main.side, extra.side),
        },
        // The peer's OPEN arrived on the main connection while the new one waits for its
        // own: the same "MAY".
        (State::OpenConfirm, State::OpenSent) => by_bgp_id(local, main.peer, main.side, extra.side),
        // No peer OPEN on the new connection yet: its restart bit and ID are unknown.
        _ => Resolution::Wait,
    }
}

/// RFC 4271 §6.8 with the RFC 6286 §2.3 tie-break between two connections in OpenSent or
/// OpenConfirm.
fn by_bgp_id(
    local: Local,
    peer: Option<PeerOpen>,
    main: Option<ConnectionSide>,
    extra: Option<ConnectionSide>,
) -> Resolution {
    // Unreachable by construction (OpenConfirm comes with the peer's OPEN); wait safely.
    let Some(peer) = peer else {
        return Resolution::Wait;
    };
    if main == extra {
        // Both opened by the same end: no §6.8 collision; the older one was given up.
        return Resolution::CloseMain;
    }
    let loser = collision_loser_with_as(local.id, local.asn, peer.id, peer.asn);
    if main == Some(loser) {
        Resolution::CloseMain
    } else {
        Resolution::CloseExtra
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::{DownReason, Event, FsmConfig};
    use crate::wire::{
        Capability, Family, GrFamily, GracefulRestartCap, Notification, Open, cease,
    };
    use proptest::prelude::*;

    const LOW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const HIGH: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const ALL: [State; 6] = State::ALL;
    use ConnectionSide::{Inbound, Outbound};

    fn open(asn: u32, id: Ipv4Addr, restarted: bool) -> Open {
        let mut caps = vec![Capability::Multiprotocol(Family::IPV4_UNICAST)];
        caps.push(Capability::GracefulRestart(GracefulRestartCap {
            restart_state: restarted,
            notification: false,
            restart_time: 120,
            families: vec![GrFamily {
                family: Family::IPV4_UNICAST,
                forwarding_state: true,
            }],
        }));
        Open::new(asn, 90, id, caps)
    }

    fn msg(m: Message) -> Event {
        Event::Message(m)
    }

    /// An outbound FSM driven to `st` (with the peer's OPEN if `st` is past OpenSent).
    fn main_fsm(cfg: &FsmConfig, st: State, peer: &Open) -> Fsm {
        let mut f = Fsm::new(cfg.clone());
        let drive: &[Event] = match st {
            State::Idle => &[],
            State::Connect => &[Event::ManualStart],
            State::Active => &[Event::ManualStart, Event::TcpFailed],
            State::OpenSent => &[Event::ManualStart, Event::TcpConnected],
            State::OpenConfirm | State::Established => &[Event::ManualStart, Event::TcpConnected],
        };
        for ev in drive {
            let _ = f.handle(ev.clone());
        }
        if matches!(st, State::OpenConfirm | State::Established) {
            let _ = f.handle(msg(Message::Open(peer.clone())));
        }
        if st == State::Established {
            let _ = f.handle(msg(Message::Keepalive));
        }
        assert_eq!(f.state(), st);
        f
    }

    /// The FSM of the peer's second connection, from [`Fsm::accept`], driven to `st`.
    fn extra_fsm(cfg: &FsmConfig, st: State, peer: &Open) -> Fsm {
        let (mut f, acts) = Fsm::accept(cfg.clone());
        assert!(acts.contains(&Action::Send(Message::Open(cfg.open()))));
        match st {
            State::OpenSent => {}
            State::OpenConfirm => {
                let _ = f.handle(msg(Message::Open(peer.clone())));
            }
            State::Established => {
                let _ = f.handle(msg(Message::Open(peer.clone())));
                let _ = f.handle(msg(Message::Keepalive));
            }
            // Closed: the peer dropped it before its OPEN.
            _ => {
                let _ = f.handle(Event::TcpFailed);
            }
        }
        f
    }

    /// Every (main, extra) state pair, with real FSMs: the table of the module docs.
    #[test]
    fn table_over_all_state_pairs() {
        let cfg = FsmConfig::new(65001, 65002, LOW);
        for restarted in [false, true] {
            let peer = open(65002, HIGH, restarted);
            for m in ALL {
                for x in [
                    State::Idle,
                    State::OpenSent,
                    State::OpenConfirm,
                    State::Established,
                ] {
                    let main = main_fsm(&cfg, m, &peer);
                    let extra = extra_fsm(&cfg, x, &peer);
                    let x = extra.state();
                    let want = match (m, x) {
                        (_, State::Idle | State::Active) => Resolution::Wait,
                        (State::Idle | State::Connect | State::Active, _) => Resolution::TakeOver,
                        (State::Established, State::OpenSent) => Resolution::Wait,
                        (State::Established, State::OpenConfirm) if restarted => Resolution::Wait,
                        (State::Established, State::Established) if restarted => {
                            Resolution::Replace
                        }
                        (State::Established, _) => Resolution::CloseExtra,
                        (_, State::Established) => Resolution::CloseMain,
                        (State::OpenSent, State::OpenSent) => Resolution::Wait,
                        // Our ID is lower: the connection we opened (main) loses.
                        _ => Resolution::CloseMain,
                    };
                    assert_eq!(
                        resolve(&main, &extra),
                        want,
                        "main {m}, extra {x}, restart bit {restarted}"
                    );
                }
            }
        }
    }

    /// Both in OpenConfirm (or one in OpenSent): the higher BGP ID's connection survives; on
    /// equal IDs (eBGP) the larger AS's.
    #[test]
    fn by_bgp_id_then_as() {
        // (local id, local AS, peer id, peer AS, who survives)
        let cases = [
            (LOW, 65001, HIGH, 65002, Inbound),
            (HIGH, 65001, LOW, 65002, Outbound),
            // The 4-octet comparison is numeric, not by octet order or text.
            (
                Ipv4Addr::new(9, 255, 255, 255),
                65001,
                Ipv4Addr::new(10, 0, 0, 0),
                65002,
                Inbound,
            ),
            // RFC 6286 §2.3: equal IDs, the larger AS's connection survives.
            (LOW, 65001, LOW, 65002, Inbound),
            (LOW, 65002, LOW, 65001, Outbound),
            // 4-octet ASes: 4200000001 > 65002 although its 2-octet field is AS_TRANS.
            (LOW, 4_200_000_001, LOW, 65002, Outbound),
            (LOW, 65002, LOW, 4_200_000_001, Inbound),
            // A different ID decides before any AS.
            (HIGH, 65001, LOW, 4_200_000_001, Outbound),
        ];
        for (lid, las, pid, pas, survivor) in cases {
            let cfg = FsmConfig::new(las, pas, lid);
            for (ms, xs) in [
                (State::OpenConfirm, State::OpenConfirm),
                (State::OpenSent, State::OpenConfirm),
                (State::OpenConfirm, State::OpenSent),
            ] {
                let peer = open(pas, pid, false);
                let main = main_fsm(&cfg, ms, &peer);
                let extra = extra_fsm(&cfg, xs, &peer);
                let want = if survivor == Outbound {
                    Resolution::CloseExtra
                } else {
                    Resolution::CloseMain
                };
                assert_eq!(
                    resolve(&main, &extra),
                    want,
                    "{lid} AS {las} vs {pid} AS {pas}, main {ms} extra {xs}"
                );
            }
        }
    }

    /// The AS compared is the 4-octet one from the capability, not the 2-octet field.
    #[test]
    fn equal_ids_compare_the_four_octet_as() {
        let cfg = FsmConfig::new(65002, 4_200_000_001, LOW);
        let peer = open(4_200_000_001, LOW, false);
        assert_eq!(peer.my_as, crate::wire::AS_TRANS);
        let main = main_fsm(&cfg, State::OpenConfirm, &peer);
        let extra = extra_fsm(&cfg, State::OpenConfirm, &peer);
        assert_eq!(main.negotiated().unwrap().peer_as, 4_200_000_001);
        // The peer's AS is larger: its connection (extra, inbound) survives. Compared with
        // the 2-octet field (23456 < 65002) ours would have won.
        assert_eq!(resolve(&main, &extra), Resolution::CloseMain);
    }

    /// RFC 6286 §2.2: our ID from our own AS is an OPEN error, answered as one by the FSM
    /// before any collision check; the pure decision never tie-breaks it either.
    #[test]
    fn equal_ids_within_an_as_are_an_open_error_not_a_tie() {
        let cfg = FsmConfig::new(65001, 65001, LOW);
        let peer = open(65001, LOW, false);
        let main = main_fsm(&cfg, State::OpenSent, &peer);
        let (mut extra, _) = Fsm::accept(cfg.clone());
        let out = extra.handle(msg(Message::Open(peer)));
        assert!(
            out.contains(&Action::Send(Message::Notification(Notification::new(
                2,
                3,
                Vec::new()
            ))))
        );
        assert_eq!(extra.state(), State::Idle);
        assert_eq!(resolve(&main, &extra), Resolution::Wait);

        let local = Local {
            id: LOW,
            asn: 65001,
        };
        let bad = ConnView {
            state: State::OpenConfirm,
            side: Some(Inbound),
            peer: Some(PeerOpen {
                id: LOW,
                asn: 65001,
                restart_state: false,
            }),
        };
        let sent = ConnView {
            state: State::OpenSent,
            side: Some(Outbound),
            peer: None,
        };
        assert_eq!(decide(local, sent, bad), Resolution::BadBgpId(Conn::Extra));
        assert_eq!(decide(local, bad, sent), Resolution::BadBgpId(Conn::Main));
    }

    /// The loser's FSM sends Cease / Connection Collision Resolution and goes Idle without an
    /// error (no idle hold-down); the survivor reaches Established.
    #[test]
    fn the_loser_sends_cease_collision_and_the_survivor_comes_up() {
        let cfg = FsmConfig::new(65001, 65002, HIGH);
        let peer = open(65002, LOW, false);
        let mut main = main_fsm(&cfg, State::OpenConfirm, &peer);
        let mut extra = extra_fsm(&cfg, State::OpenConfirm, &peer);
        assert_eq!(resolve(&main, &extra), Resolution::CloseExtra);
        let out = extra.handle(Event::CollisionLost);
        assert_eq!(
            out.first(),
            Some(&Action::Send(Message::Notification(Notification::cease(
                cease::CONNECTION_COLLISION
            ))))
        );
        assert_eq!(out.last(), Some(&Action::Down(DownReason::CollisionLost)));
        assert!(!out.iter().any(|a| matches!(a, Action::StartTimer(..))));
        let _ = main.handle(msg(Message::Keepalive));
        assert_eq!(main.state(), State::Established);
        assert_eq!(main.side(), Some(Outbound));
    }

    /// Both connections in OpenSent, the peer's OPEN arrives on one: if it decides the
    /// collision against that connection, the KEEPALIVE answering it is withheld (its Cease
    /// follows); on the connection that survives it is sent. Whichever connection the first
    /// OPEN arrives on, and whichever side's ID is higher.
    #[test]
    fn the_connection_an_open_decides_against_gets_no_keepalive() {
        for (local_id, peer_id) in [(HIGH, LOW), (LOW, HIGH)] {
            let cfg = FsmConfig::new(65001, 65002, local_id);
            let peer = open(65002, peer_id, false);
            // Our ID higher: the connection we opened (main) survives.
            let want_loser = if local_id == HIGH {
                Conn::Extra
            } else {
                Conn::Main
            };
            for first in [Conn::Main, Conn::Extra] {
                let mut main = main_fsm(&cfg, State::OpenSent, &peer);
                let mut extra = extra_fsm(&cfg, State::OpenSent, &peer);
                let ev = msg(Message::Open(peer.clone()));
                let mut out = match first {
                    Conn::Main => main.handle(ev),
                    Conn::Extra => extra.handle(ev),
                };
                assert!(out.contains(&Action::Send(Message::Keepalive)));
                withhold_from_loser(&main, &extra, first, &mut out);
                assert_eq!(loser(&main, &extra), Some(want_loser));
                assert_eq!(
                    out.contains(&Action::Send(Message::Keepalive)),
                    first != want_loser,
                    "our id {local_id}, OPEN first on {first:?}: {out:?}"
                );
                // Only the KEEPALIVE goes: the FSM's timers and state change stay.
                assert!(out.iter().any(|a| matches!(a, Action::StateChanged(..))));
            }
        }
    }

    /// Nothing is withheld while the pair is undecided or without a second connection.
    #[test]
    fn keepalives_pass_while_nothing_is_decided() {
        let cfg = FsmConfig::new(65001, 65002, HIGH);
        let peer = open(65002, LOW, false);
        // Established main, the peer's restarted OPEN on the extra: Wait, not a loser.
        let restarted = open(65002, LOW, true);
        let main = main_fsm(&cfg, State::Established, &peer);
        let mut extra = extra_fsm(&cfg, State::OpenSent, &restarted);
        let mut out = extra.handle(msg(Message::Open(restarted)));
        assert_eq!(resolve(&main, &extra), Resolution::Wait);
        withhold_from_loser(&main, &extra, Conn::Extra, &mut out);
        assert!(out.contains(&Action::Send(Message::Keepalive)));
        // The keepalive timer of the Established main session, with a closed extra.
        let extra = extra_fsm(&cfg, State::Idle, &peer);
        let mut out = vec![Action::Send(Message::Keepalive)];
        withhold_from_loser(&main, &extra, Conn::Main, &mut out);
        assert_eq!(out, vec![Action::Send(Message::Keepalive)]);
    }

    /// A promoted extra FSM takes the peer's mode: after its session fails it connects out
    /// itself, as the main FSM would have (it was passive while it was the extra one).
    #[test]
    fn a_promoted_fsm_reconnects_unless_the_peer_is_passive() {
        let cfg = FsmConfig::new(65001, 65002, LOW);
        let peer = open(65002, HIGH, false);
        for passive in [false, true] {
            let mut f = extra_fsm(&cfg, State::Established, &peer);
            f.set_passive(passive);
            let _ = f.handle(Event::TcpFailed);
            assert_eq!(f.state(), State::Idle);
            let out = f.handle(Event::IdleHoldTimerExpires);
            assert_eq!(
                out.contains(&Action::Connect),
                !passive,
                "passive {passive}: {out:?}"
            );
            let want = if passive {
                State::Active
            } else {
                State::Connect
            };
            assert_eq!(f.state(), want);
        }
    }

    fn state() -> impl Strategy<Value = State> {
        prop::sample::select(ALL.to_vec())
    }

    fn id() -> impl Strategy<Value = Ipv4Addr> {
        // A small range, so equal IDs come up often.
        (1u32..5).prop_map(|n| Ipv4Addr::from(0x0a00_0000 | n))
    }

    fn asn() -> impl Strategy<Value = u32> {
        prop::sample::select(vec![65001u32, 65002, 4_200_000_001])
    }

    fn view(st: State, side: ConnectionSide, peer: PeerOpen) -> ConnView {
        ConnView {
            state: st,
            side: st.has_connection().then_some(side),
            peer: matches!(st, State::OpenConfirm | State::Established).then_some(peer),
        }
    }

    proptest! {
        /// Two speakers A and B, each with its outbound connection as main and the other's
        /// as extra, both in OpenSent or OpenConfirm with at least one OpenConfirm: each
        /// closes exactly one, both close the same TCP connection, and the survivor is the
        /// one opened by the higher BGP ID (equal IDs: the larger AS).
        #[test]
        fn both_ends_keep_the_same_connection_the_rfc_names(
            a_id in id(), b_id in id(), a_as in asn(), b_as in asn(),
            a_main in prop::sample::select(vec![State::OpenSent, State::OpenConfirm]),
            a_extra in prop::sample::select(vec![State::OpenSent, State::OpenConfirm]),
            b_main in prop::sample::select(vec![State::OpenSent, State::OpenConfirm]),
            b_extra in prop::sample::select(vec![State::OpenSent, State::OpenConfirm]),
        ) {
            prop_assume!(a_id != b_id || a_as != b_as);
            prop_assume!(a_main == State::OpenConfirm || a_extra == State::OpenConfirm);
            prop_assume!(b_main == State::OpenConfirm || b_extra == State::OpenConfirm);
            let a = Local { id: a_id, asn: a_as };
            let b = Local { id: b_id, asn: b_as };
            let peer_of = |l: Local| PeerOpen { id: l.id, asn: l.asn, restart_state: false };
            // A's outbound connection is B's inbound one ("ab"); B's outbound is "ba".
            let ra = decide(a, view(a_main, Outbound, peer_of(b)), view(a_extra, Inbound, peer_of(b)));
            let rb = decide(b, view(b_main, Outbound, peer_of(a)), view(b_extra, Inbound, peer_of(a)));
            let closed_by_a = match ra {
                Resolution::CloseMain => "ab",
                Resolution::CloseExtra => "ba",
                other => return Err(TestCaseError::fail(format!("A: {other:?}"))),
            };
            let closed_by_b = match rb {
                Resolution::CloseMain => "ba",
                Resolution::CloseExtra => "ab",
                other => return Err(TestCaseError::fail(format!("B: {other:?}"))),
            };
            prop_assert_eq!(closed_by_a, closed_by_b);
            let a_wins = (u32::from(a_id), a_as) > (u32::from(b_id), b_as);
            let survivor = if closed_by_a == "ab" { "ba" } else { "ab" };
            prop_assert_eq!(survivor, if a_wins { "ab" } else { "ba" });
        }

        /// Any pair of states, sides and OPENs: a decision that closes something closes one
        /// connection, never both; an Established main session is only ever replaced by an
        /// Established new one of a peer with the Restart State bit; nothing is tie-broken
        /// on our own ID within our AS.
        #[test]
        fn any_pair_is_decided_consistently(
            m in state(), x in state(),
            m_side in prop::sample::select(vec![Inbound, Outbound]),
            local_id in id(), local_as in asn(), peer_id in id(), peer_as in asn(),
            restarted in any::<bool>(),
        ) {
            let local = Local { id: local_id, asn: local_as };
            let peer = PeerOpen { id: peer_id, asn: peer_as, restart_state: restarted };
            let r = decide(local, view(m, m_side, peer), view(x, Inbound, peer));
            let ibgp_self = peer_id == local_id && peer_as == local_as;
            match r {
                Resolution::Wait => {}
                Resolution::TakeOver => {
                    prop_assert!(!m.has_connection() && x.has_connection());
                }
                Resolution::Replace => {
                    prop_assert_eq!((m, x), (State::Established, State::Established));
                    prop_assert!(restarted && !ibgp_self);
                }
                Resolution::CloseMain => {
                    prop_assert!(m != State::Established && m.has_connection());
                    prop_assert!(!ibgp_self);
                }
                Resolution::CloseExtra => {
                    prop_assert!(x != State::Established || m == State::Established);
                    prop_assert!(!ibgp_self);
                }
                Resolution::BadBgpId(_) => prop_assert!(ibgp_self),
            }
            if !x.has_connection() {
                prop_assert_eq!(r, Resolution::Wait);
            }
        }
    }
}

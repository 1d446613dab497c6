//! Property tests for the session FSM: arbitrary event sequences (arbitrary OPENs,
//! NOTIFICATIONs, UPDATEs, timer ticks, TCP outcomes and operator commands, in any order)
//! never panic, and after every event the actions and the state keep the invariants a driver
//! relies on. A model of the driver's timers is kept from the actions alone.

use podroute_bgp::fsm::{Action, Event, Fsm, FsmConfig, State, Timer};
use podroute_bgp::wire::{
    AS_TRANS, Capability, Family, GrFamily, GracefulRestartCap, Message, Notification, Open,
    RouteRefresh, Update,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

const LOCAL_ID: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const PEER_ID: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const V4: Family = Family::IPV4_UNICAST;
const V6: Family = Family::IPV6_UNICAST;

fn config() -> impl Strategy<Value = FsmConfig> {
    (
        prop::sample::select(vec![65001u32, 4_200_000_001]),
        prop::sample::select(vec![65001u32, 65002, 4_200_000_002]),
        prop::sample::select(vec![0u16, 1, 3, 90, 240]),
        any::<bool>(),
        prop::sample::select(vec![vec![], vec![V4], vec![V6], vec![V4, V6]]),
        any::<bool>(),
        prop::sample::select(vec![0u64, 300, 1000, 70_000]),
        prop::sample::select(vec![1u64, 60]),
    )
        .prop_map(
            |(local_as, remote_as, hold_time, passive, families, rr, base_ms, max_s)| FsmConfig {
                local_as,
                remote_as,
                local_id: LOCAL_ID,
                hold_time,
                passive,
                families,
                route_refresh: rr,
                idle_hold_base: Duration::from_millis(base_ms),
                idle_hold_max: Duration::from_secs(max_s),
                ..FsmConfig::default()
            },
        )
}

fn family() -> impl Strategy<Value = Family> {
    prop_oneof![
        Just(V4),
        Just(V6),
        (any::<u16>(), any::<u8>()).prop_map(|(afi, safi)| Family { afi, safi }),
    ]
}

fn capability() -> impl Strategy<Value = Capability> {
    prop_oneof![
        family().prop_map(Capability::Multiprotocol),
        Just(Capability::RouteRefresh),
        (0u16..4096, any::<bool>()).prop_map(|(t, f)| Capability::GracefulRestart(
            GracefulRestartCap {
                restart_state: f,
                notification: false,
                restart_time: t,
                families: vec![GrFamily {
                    family: V4,
                    forwarding_state: f,
                }],
            }
        )),
        any::<u32>().prop_map(Capability::FourOctetAs),
        Just(Capability::AddPath(vec![(V4, 3)])),
    ]
}

/// OPENs from the peer: mostly acceptable ones (so sessions come up), plus arbitrary ones.
fn open(remote_as: u32) -> impl Strategy<Value = Open> {
    let asn = prop_oneof![4 => Just(remote_as), 1 => any::<u32>(), 1 => Just(0u32)];
    let hold = prop_oneof![
        3 => prop::sample::select(vec![0u16, 3, 90, 240]),
        1 => prop::sample::select(vec![1u16, 2]),
        1 => any::<u16>(),
    ];
    let id = prop_oneof![
        4 => Just(PEER_ID),
        1 => Just(Ipv4Addr::UNSPECIFIED),
        1 => Just(LOCAL_ID),
        1 => any::<u32>().prop_map(Ipv4Addr::from),
    ];
    let as4 = prop_oneof![4 => Just(true), 1 => Just(false)];
    let my_as_override = prop_oneof![4 => Just(None), 1 => any::<u16>().prop_map(Some)];
    (
        asn,
        hold,
        id,
        as4,
        my_as_override,
        prop::collection::vec(capability(), 0..5),
    )
        .prop_map(|(asn, hold, id, as4, my_as, caps)| {
            let mut o = if as4 {
                Open::new(asn, hold, id, caps)
            } else {
                Open {
                    version: 4,
                    my_as: u16::try_from(asn).unwrap_or(AS_TRANS),
                    hold_time: hold,
                    bgp_id: id,
                    capabilities: caps
                        .into_iter()
                        .filter(|c| !matches!(c, Capability::FourOctetAs(_)))
                        .collect(),
                }
            };
            if let Some(m) = my_as {
                o.my_as = m;
            }
            o
        })
}

fn notification() -> impl Strategy<Value = Notification> {
    (
        0u8..9,
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(c, s, d)| Notification::new(c, s, d))
}

fn update() -> impl Strategy<Value = Update> {
    prop_oneof![
        Just(Update::default()),
        Just(Update::end_of_rib(V6)),
        any::<[u8; 3]>().prop_map(|b| Update {
            nlri: vec![format!("10.{}.{}.0/26", b[0], b[1]).parse().unwrap()],
            ..Update::default()
        }),
    ]
}

fn event(remote_as: u32) -> impl Strategy<Value = Event> {
    prop_oneof![
        2 => Just(Event::ManualStart),
        1 => Just(Event::ManualStop),
        1 => Just(Event::AutomaticStart),
        1 => Just(Event::ConnectRetryTimerExpires),
        1 => Just(Event::HoldTimerExpires),
        1 => Just(Event::KeepaliveTimerExpires),
        2 => Just(Event::IdleHoldTimerExpires),
        3 => Just(Event::TcpConnected),
        3 => Just(Event::TcpAccepted),
        1 => Just(Event::TcpFailed),
        6 => open(remote_as).prop_map(|o| Event::Message(Message::Open(o))),
        6 => Just(Event::Message(Message::Keepalive)),
        2 => update().prop_map(|u| Event::Message(Message::Update(u))),
        1 => (family(), 0u8..4).prop_map(|(family, subtype)| Event::Message(
            Message::RouteRefresh(RouteRefresh { family, subtype })
        )),
        1 => notification().prop_map(|n| Event::Message(Message::Notification(n))),
        1 => notification().prop_map(Event::DecodeError),
        1 => Just(Event::CollisionLost),
    ]
}

fn scenario() -> impl Strategy<Value = (FsmConfig, Vec<Event>)> {
    config().prop_flat_map(|cfg| {
        let events = prop::collection::vec(event(cfg.remote_as), 0..200);
        (Just(cfg), events)
    })
}

/// What the driver would know from the actions alone.
#[derive(Default)]
struct Driver {
    timers: BTreeSet<Timer>,
    /// ManualStop was the last operator command.
    stopped: bool,
    visited: BTreeSet<State>,
    downs: usize,
}

impl Driver {
    /// Feeds `ev`, checks every invariant, and returns a description of the first violation.
    fn step(&mut self, fsm: &mut Fsm, ev: Event) -> Result<(), String> {
        let pre = fsm.state();
        let was_stopped = self.stopped;
        let timer_fired = match ev {
            Event::ConnectRetryTimerExpires => Some(Timer::ConnectRetry),
            Event::HoldTimerExpires => Some(Timer::Hold),
            Event::KeepaliveTimerExpires => Some(Timer::Keepalive),
            Event::IdleHoldTimerExpires => Some(Timer::IdleHold),
            _ => None,
        };
        match ev {
            Event::ManualStart => self.stopped = false,
            Event::ManualStop => self.stopped = true,
            _ => {}
        }
        let desc = format!("{ev:?} in {pre}");
        if let Some(t) = timer_fired {
            // A fired timer no longer runs.
            self.timers.remove(&t);
        }
        let actions = fsm.handle(ev);
        let post = fsm.state();
        self.visited.insert(post);
        let fail = |what: &str| Err(format!("{what}: {desc} -> {post}, actions {actions:?}"));

        // State changes chain from the old state to the new one.
        let mut cur = pre;
        for (i, a) in actions.iter().enumerate() {
            match a {
                Action::StateChanged(from, to) => {
                    if *from != cur || from == to {
                        return fail("StateChanged does not chain");
                    }
                    cur = *to;
                    // Down comes right after the change to Idle and only then.
                    let next_is_down = matches!(actions.get(i + 1), Some(Action::Down(_)));
                    if (*to == State::Idle) != next_is_down {
                        return fail("Down must follow StateChanged(_, Idle) and only it");
                    }
                    let next_is_est = matches!(actions.get(i + 1), Some(Action::Established(_)));
                    if (*to == State::Established) != next_is_est {
                        return fail("Established must follow StateChanged(_, Established)");
                    }
                }
                Action::Down(reason) => {
                    self.downs += 1;
                    let hold_down = actions
                        .iter()
                        .any(|a| matches!(a, Action::StartTimer(Timer::IdleHold, _)));
                    if hold_down != reason.is_error() {
                        return fail("idle hold-down starts exactly for error Downs");
                    }
                }
                Action::StartTimer(t, d) => {
                    self.timers.insert(*t);
                    if *t == Timer::IdleHold && *d > fsm.config().idle_hold_max {
                        return fail("idle hold-down above the maximum");
                    }
                }
                Action::StopTimer(t) => {
                    if !self.timers.remove(t) {
                        return fail("StopTimer for a timer that is not running");
                    }
                }
                Action::Send(m) => {
                    if !pre.has_connection() && !post.has_connection() {
                        return fail("Send without a connection");
                    }
                    if let Message::Notification(_) = m {
                        let closes = actions[i..].contains(&Action::CloseConnection);
                        if !closes || post != State::Idle {
                            return fail("NOTIFICATION sent without close and Idle");
                        }
                    }
                    if matches!(m, Message::Open(_)) && post != State::OpenSent {
                        return fail("OPEN sent but not in OpenSent");
                    }
                }
                Action::Connect => {
                    if post != State::Connect || fsm.config().passive {
                        return fail("Connect outside Connect or by a passive peer");
                    }
                }
                Action::Deliver(_) | Action::RouteRefreshRequested(_) => {
                    if pre != State::Established || post != State::Established {
                        return fail("Deliver outside Established");
                    }
                }
                Action::Established(n) => {
                    if Some(n) != fsm.negotiated() {
                        return fail("Established carries other parameters than negotiated()");
                    }
                }
                Action::CloseConnection => {}
            }
        }
        if cur != post {
            return fail("last StateChanged is not the current state");
        }

        // After ManualStop, until ManualStart: Idle, and at most refusing a connection.
        let quiet = post == State::Idle && actions.iter().all(|a| *a == Action::CloseConnection);
        if was_stopped && self.stopped && !quiet {
            return fail("activity after ManualStop");
        }

        // negotiated() exactly in OpenConfirm and Established.
        let negotiated_state = matches!(post, State::OpenConfirm | State::Established);
        if fsm.negotiated().is_some() != negotiated_state {
            return fail("negotiated() does not match the state");
        }

        // The timers the driver runs are the ones the state calls for.
        let expected: &[Timer] = match post {
            State::Idle => &[],
            State::Connect => &[],
            State::Active if fsm.config().passive => &[],
            State::Active => &[Timer::ConnectRetry],
            State::OpenSent => &[Timer::Hold],
            State::OpenConfirm | State::Established => {
                if fsm.negotiated().is_some_and(|n| n.hold_time > 0) {
                    &[Timer::Hold, Timer::Keepalive]
                } else {
                    &[]
                }
            }
        };
        let mut want: BTreeSet<Timer> = expected.iter().copied().collect();
        if post == State::Idle && self.timers.contains(&Timer::IdleHold) {
            want.insert(Timer::IdleHold);
        }
        if self.timers != want {
            return fail(&format!("timers {:?}, expected {want:?}", self.timers));
        }
        for t in Timer::ALL {
            if fsm.timer_running(t) != self.timers.contains(&t) {
                return fail("timer_running() disagrees with the actions");
            }
        }
        if let Some(n) = fsm.negotiated() {
            if n.hold_time != 0 && n.hold_time < 3 {
                return fail("negotiated an illegal hold time");
            }
            if n.keepalive != Duration::from_secs(u64::from(n.hold_time)) / 3 {
                return fail("keepalive is not hold/3");
            }
            if n.peer_as != fsm.config().remote_as {
                return fail("negotiated with the wrong peer AS");
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_event_sequences_keep_the_invariants((cfg, events) in scenario()) {
        let mut fsm = Fsm::new(cfg);
        let mut driver = Driver::default();
        for ev in events {
            if let Err(e) = driver.step(&mut fsm, ev) {
                prop_assert!(false, "{}", e);
            }
        }
    }
}

/// The generator must actually drive sessions through every state and down again, or the
/// property above would hold vacuously.
#[test]
fn generated_sequences_reach_every_state() {
    let mut runner = TestRunner::deterministic();
    let (mut visited, mut downs) = (BTreeSet::new(), 0);
    for _ in 0..64 {
        let (cfg, events) = scenario()
            .new_tree(&mut runner)
            .expect("strategy generates")
            .current();
        let mut fsm = Fsm::new(cfg);
        let mut driver = Driver::default();
        for ev in events {
            driver.step(&mut fsm, ev).unwrap();
        }
        visited.extend(driver.visited);
        downs += driver.downs;
    }
    let all: BTreeSet<State> = State::ALL.into();
    assert_eq!(visited, all);
    assert!(downs > 64, "only {downs} Downs");
}

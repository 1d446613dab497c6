//! Graceful restart (RFC 4724), sans-IO like the FSM: events in, actions out, timers as
//! actions the driver arms and expiries it reports back.
//!
//! [`GrHelper`] is the receiving speaker's procedure (§4.2) for one peer. It lives beside the
//! peer's sessions rather than in the [`Fsm`](crate::fsm::Fsm), because it spans them: it
//! starts when an Established session ends and ends in a later session (or never comes back).
//!
//! ```text
//! Normal     --session down without NOTIFICATION, GR negotiated-->     Restarting
//!              (retain the families of the peer's GR capability as stale, start Restart)
//! Normal     --any other session end-->                                Normal (routes removed)
//! Restarting --Restart expiry-->                                       Normal (stale swept)
//! Restarting --session up: families with F=0 or missing swept-->       Recovering (start Stale)
//!                                                                      or Normal (none left)
//! Recovering --End-of-RIB(f): sweep f-->                               Recovering / Normal
//! Recovering --Stale expiry: sweep all-->                              Normal
//! Recovering --session down without NOTIFICATION-->                    Restarting (still stale,
//!                                                                      plus what was re-learned)
//! ```
//!
//! Which endings are graceful: RFC 4724 keeps the routes when the TCP session terminates; a
//! NOTIFICATION sent or received ends graceful restart (RFC 8538 §1), and that includes the
//! Hold Timer Expired one. RFC 8538's N bit, which would keep routes across most
//! NOTIFICATIONs, is not implemented: podroute never sets it, so it never negotiates. The
//! driver reports a session end as graceful when the connection failed or was closed without
//! a NOTIFICATION, or when the peer opened a new session that replaced the Established one
//! (§4.2: "treat ... as if the TCP session had been terminated").
//!
//! [`deferral_complete`] is the restarting speaker's side (§4.1): when to end the selection
//! deferral.

use crate::wire::{Family, GracefulRestartCap};
use std::time::Duration;

/// Longest restart time we honour unless configured otherwise: a peer advertising more is
/// given this long (Calico's `maxRestartTime` default, 120 s).
pub const DEFAULT_MAX_RESTART_TIME: Duration = Duration::from_secs(120);

/// Selection deferral of a restarting speaker unless configured otherwise.
pub const DEFAULT_SELECTION_DEFERRAL: Duration = Duration::from_secs(5);

/// The helper's timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GrTimer {
    /// The peer's restart time (capped): how long to wait for it to come back.
    Restart,
    /// How long stale routes may wait for the peer's End-of-RIB once it is back (the
    /// optional "upper bound" timer of RFC 4724 §4.2).
    Stale,
}

impl GrTimer {
    pub const ALL: [GrTimer; 2] = [GrTimer::Restart, GrTimer::Stale];

    pub fn index(self) -> usize {
        match self {
            GrTimer::Restart => 0,
            GrTimer::Stale => 1,
        }
    }
}

/// Where the helper is with one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GrPhase {
    /// Nothing stale.
    Normal,
    /// The session is down and the peer's routes are kept as stale; the restart timer runs.
    Restarting,
    /// The session is back; stale routes wait for the peer's End-of-RIB (stale timer runs).
    Recovering,
}

impl std::fmt::Display for GrPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GrPhase::Normal => "normal",
            GrPhase::Restarting => "peer restarting",
            GrPhase::Recovering => "waiting for End-of-RIB",
        })
    }
}

/// The helper's settings for one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrHelperConfig {
    /// We advertise the graceful restart capability; without it we never retain routes.
    pub enabled: bool,
    /// Cap on the peer's advertised restart time.
    pub max_restart_time: Duration,
    /// Stale timer once the peer is back.
    pub stale_time: Duration,
}

impl Default for GrHelperConfig {
    fn default() -> Self {
        GrHelperConfig {
            enabled: true,
            max_restart_time: DEFAULT_MAX_RESTART_TIME,
            stale_time: DEFAULT_MAX_RESTART_TIME,
        }
    }
}

/// Inputs to the helper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrEvent {
    /// A session reached Established, with the peer's graceful restart capability from its
    /// OPEN and the families both sides negotiated.
    SessionUp {
        peer_cap: Option<GracefulRestartCap>,
        families: Vec<Family>,
    },
    /// An Established session ended; `graceful` when without a NOTIFICATION (see the module
    /// docs). Ignored unless a session is up.
    SessionDown {
        graceful: bool,
    },
    /// The peer sent End-of-RIB for this family.
    EndOfRib(Family),
    RestartTimerExpires,
    StaleTimerExpires,
}

impl GrEvent {
    fn expired_timer(&self) -> Option<GrTimer> {
        match self {
            GrEvent::RestartTimerExpires => Some(GrTimer::Restart),
            GrEvent::StaleTimerExpires => Some(GrTimer::Stale),
            _ => None,
        }
    }
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrAction {
    /// The session is down: keep the peer's routes of these families, marked stale, and
    /// remove all its other routes. Empty: remove everything (no graceful restart).
    PeerDown {
        retain: Vec<Family>,
    },
    /// Remove the peer's routes of these families that are still stale.
    Sweep(Vec<Family>),
    /// (Re)arm a timer, replacing any running instance.
    StartTimer(GrTimer, Duration),
    StopTimer(GrTimer),
}

/// The receiving speaker's graceful restart procedure for one peer. See the module docs.
#[derive(Clone, Debug)]
pub struct GrHelper {
    config: GrHelperConfig,
    phase: GrPhase,
    up: bool,
    /// The peer's capability from the OPEN of the current (or last) session.
    peer_cap: Option<GracefulRestartCap>,
    /// Families negotiated in the current (or last) session.
    families: Vec<Family>,
    /// Families that have stale routes.
    stale: Vec<Family>,
    running: [bool; 2],
}

impl GrHelper {
    pub fn new(config: GrHelperConfig) -> GrHelper {
        GrHelper {
            config,
            phase: GrPhase::Normal,
            up: false,
            peer_cap: None,
            families: Vec::new(),
            stale: Vec::new(),
            running: [false; 2],
        }
    }

    pub fn phase(&self) -> GrPhase {
        self.phase
    }

    /// The peer's graceful restart capability from its last OPEN.
    pub fn peer_cap(&self) -> Option<&GracefulRestartCap> {
        self.peer_cap.as_ref()
    }

    /// Families whose routes from this peer are (partly) stale.
    pub fn stale_families(&self) -> &[Family] {
        &self.stale
    }

    pub fn timer_running(&self, t: GrTimer) -> bool {
        self.running[t.index()]
    }

    /// How long the peer may take to come back: its advertised restart time, capped.
    pub fn restart_time(&self) -> Option<Duration> {
        self.peer_cap.as_ref().map(|c| {
            Duration::from_secs(u64::from(c.restart_time)).min(self.config.max_restart_time)
        })
    }

    /// Feeds one event; returns the actions to carry out, in order.
    #[must_use = "the driver must carry out the actions"]
    pub fn handle(&mut self, ev: GrEvent) -> Vec<GrAction> {
        let mut out = Vec::new();
        if let Some(t) = ev.expired_timer()
            && !std::mem::replace(&mut self.running[t.index()], false)
        {
            // A tick that raced with a stop.
            return out;
        }
        match ev {
            GrEvent::SessionUp { peer_cap, families } => {
                self.up = true;
                self.stop(GrTimer::Restart, &mut out);
                let mut keep = Vec::new();
                let mut sweep = Vec::new();
                for f in std::mem::take(&mut self.stale) {
                    // §4.2: keep a family's stale routes only if the new OPEN says its
                    // forwarding state was preserved; a missing capability or family, or
                    // F = 0, means drop them now.
                    let preserved = families.contains(&f)
                        && peer_cap.as_ref().is_some_and(|c| {
                            c.families
                                .iter()
                                .any(|g| g.family == f && g.forwarding_state)
                        });
                    if preserved {
                        keep.push(f);
                    } else {
                        sweep.push(f);
                    }
                }
                if !sweep.is_empty() {
                    out.push(GrAction::Sweep(sweep));
                }
                self.peer_cap = peer_cap;
                self.families = families;
                if keep.is_empty() {
                    self.stop(GrTimer::Stale, &mut out);
                    self.phase = GrPhase::Normal;
                } else {
                    self.stale = keep;
                    self.start(GrTimer::Stale, self.config.stale_time, &mut out);
                    self.phase = GrPhase::Recovering;
                }
            }
            GrEvent::SessionDown { graceful } => {
                if !self.up {
                    return out;
                }
                self.up = false;
                self.stop(GrTimer::Stale, &mut out);
                let retain: Vec<Family> = match (&self.peer_cap, self.restart_time()) {
                    (Some(cap), Some(t)) if graceful && self.config.enabled && !t.is_zero() => self
                        .families
                        .iter()
                        .copied()
                        .filter(|f| cap.families.iter().any(|g| g.family == *f))
                        .collect(),
                    _ => Vec::new(),
                };
                match self.restart_time() {
                    Some(t) if !retain.is_empty() => {
                        self.start(GrTimer::Restart, t, &mut out);
                        self.phase = GrPhase::Restarting;
                    }
                    _ => {
                        self.stop(GrTimer::Restart, &mut out);
                        self.phase = GrPhase::Normal;
                    }
                }
                self.stale = retain.clone();
                out.push(GrAction::PeerDown { retain });
            }
            GrEvent::EndOfRib(f) => {
                if self.up && self.stale.contains(&f) {
                    self.stale.retain(|s| *s != f);
                    out.push(GrAction::Sweep(vec![f]));
                    if self.stale.is_empty() {
                        self.stop(GrTimer::Stale, &mut out);
                        self.phase = GrPhase::Normal;
                    }
                }
            }
            GrEvent::RestartTimerExpires | GrEvent::StaleTimerExpires => {
                let stale = std::mem::take(&mut self.stale);
                if !stale.is_empty() {
                    out.push(GrAction::Sweep(stale));
                }
                for t in GrTimer::ALL {
                    self.stop(t, &mut out);
                }
                self.phase = GrPhase::Normal;
            }
        }
        out
    }

    fn start(&mut self, t: GrTimer, d: Duration, out: &mut Vec<GrAction>) {
        self.running[t.index()] = true;
        out.push(GrAction::StartTimer(t, d));
    }

    fn stop(&mut self, t: GrTimer, out: &mut Vec<GrAction>) {
        if std::mem::replace(&mut self.running[t.index()], false) {
            out.push(GrAction::StopTimer(t));
        }
    }
}

/// One configured peer as the selection deferral sees it.
#[derive(Clone, Copy, Debug)]
pub struct DeferralPeer<'a> {
    pub established: bool,
    /// The peer's graceful restart capability from its OPEN (when established).
    pub peer_cap: Option<&'a GracefulRestartCap>,
    /// Families negotiated with the peer.
    pub families: &'a [Family],
    /// Families the peer sent End-of-RIB for in the current session.
    pub end_of_rib: &'a [Family],
}

/// Whether a restarting speaker may end its selection deferral before the timer (RFC 4724
/// §4.1): every configured peer is Established, and each one that advertised graceful
/// restart without the Restart State bit sent End-of-RIB for every negotiated family. Peers
/// without the capability, or restarting themselves (R = 1, they wait for our End-of-RIB),
/// are not waited for once Established. A peer not Established yet might still come up, so
/// it is waited for; with no peer configured at all there is nothing to learn from yet, so
/// only the timer ends the deferral.
///
/// "Every configured peer" is every peer configured *now*: a caller that configures its
/// peers one at a time must not ask before the last one is in (the speaker asks only after
/// [`Speaker::initial_config_done`](crate::Speaker::initial_config_done) when
/// [`SpeakerConfig::initial_config_barrier`](crate::SpeakerConfig::initial_config_barrier)
/// is set).
pub fn deferral_complete<'a>(peers: impl IntoIterator<Item = DeferralPeer<'a>>) -> bool {
    let mut any = false;
    for p in peers {
        any = true;
        if !p.established {
            return false;
        }
        let waits = p.peer_cap.is_some_and(|c| !c.restart_state);
        if waits && !p.families.iter().all(|f| p.end_of_rib.contains(f)) {
            return false;
        }
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::GrFamily;

    const V4: Family = Family::IPV4_UNICAST;
    const V6: Family = Family::IPV6_UNICAST;

    fn cap(time: u16, fams: &[(Family, bool)]) -> GracefulRestartCap {
        GracefulRestartCap {
            restart_state: false,
            notification: false,
            restart_time: time,
            families: fams
                .iter()
                .map(|&(family, forwarding_state)| GrFamily {
                    family,
                    forwarding_state,
                })
                .collect(),
        }
    }

    fn up(h: &mut GrHelper, c: Option<GracefulRestartCap>) -> Vec<GrAction> {
        h.handle(GrEvent::SessionUp {
            peer_cap: c,
            families: vec![V4, V6],
        })
    }

    fn helper() -> GrHelper {
        GrHelper::new(GrHelperConfig {
            enabled: true,
            max_restart_time: Duration::from_secs(120),
            stale_time: Duration::from_secs(30),
        })
    }

    #[test]
    fn tcp_failure_retains_and_end_of_rib_sweeps_per_family() {
        let mut h = helper();
        assert!(up(&mut h, Some(cap(90, &[(V4, false), (V6, false)]))).is_empty());
        let a = h.handle(GrEvent::SessionDown { graceful: true });
        assert_eq!(
            a,
            vec![
                GrAction::StartTimer(GrTimer::Restart, Duration::from_secs(90)),
                GrAction::PeerDown {
                    retain: vec![V4, V6]
                }
            ]
        );
        assert_eq!(h.phase(), GrPhase::Restarting);
        let a = up(&mut h, Some(cap(90, &[(V4, true), (V6, true)])));
        assert_eq!(
            a,
            vec![
                GrAction::StopTimer(GrTimer::Restart),
                GrAction::StartTimer(GrTimer::Stale, Duration::from_secs(30))
            ]
        );
        assert_eq!(h.phase(), GrPhase::Recovering);
        assert_eq!(
            h.handle(GrEvent::EndOfRib(V4)),
            vec![GrAction::Sweep(vec![V4])]
        );
        assert_eq!(h.stale_families(), &[V6]);
        // A repeated End-of-RIB does nothing.
        assert!(h.handle(GrEvent::EndOfRib(V4)).is_empty());
        assert_eq!(
            h.handle(GrEvent::EndOfRib(V6)),
            vec![
                GrAction::Sweep(vec![V6]),
                GrAction::StopTimer(GrTimer::Stale)
            ]
        );
        assert_eq!(h.phase(), GrPhase::Normal);
    }

    #[test]
    fn notification_or_no_capability_removes_at_once() {
        let mut h = helper();
        let _ = up(&mut h, Some(cap(90, &[(V4, true)])));
        assert_eq!(
            h.handle(GrEvent::SessionDown { graceful: false }),
            vec![GrAction::PeerDown { retain: vec![] }]
        );
        let _ = up(&mut h, None);
        assert_eq!(
            h.handle(GrEvent::SessionDown { graceful: true }),
            vec![GrAction::PeerDown { retain: vec![] }]
        );
        // Not helping when we do not advertise the capability ourselves.
        let mut h = GrHelper::new(GrHelperConfig {
            enabled: false,
            ..GrHelperConfig::default()
        });
        let _ = up(&mut h, Some(cap(90, &[(V4, true)])));
        assert_eq!(
            h.handle(GrEvent::SessionDown { graceful: true }),
            vec![GrAction::PeerDown { retain: vec![] }]
        );
        // Restart time 0: nothing to wait for.
        let mut h = helper();
        let _ = up(&mut h, Some(cap(0, &[(V4, true)])));
        assert_eq!(
            h.handle(GrEvent::SessionDown { graceful: true }),
            vec![GrAction::PeerDown { retain: vec![] }]
        );
    }

    #[test]
    fn only_families_in_the_peer_capability_are_retained() {
        let mut h = helper();
        let _ = up(&mut h, Some(cap(60, &[(V6, false)])));
        let a = h.handle(GrEvent::SessionDown { graceful: true });
        assert_eq!(a.last(), Some(&GrAction::PeerDown { retain: vec![V6] }));
    }

    #[test]
    fn restart_time_is_capped_and_expiry_sweeps_everything() {
        let mut h = GrHelper::new(GrHelperConfig {
            max_restart_time: Duration::from_secs(10),
            ..GrHelperConfig::default()
        });
        let _ = up(&mut h, Some(cap(4000, &[(V4, true), (V6, true)])));
        let a = h.handle(GrEvent::SessionDown { graceful: true });
        assert_eq!(
            a[0],
            GrAction::StartTimer(GrTimer::Restart, Duration::from_secs(10))
        );
        assert_eq!(
            h.handle(GrEvent::RestartTimerExpires),
            vec![GrAction::Sweep(vec![V4, V6])]
        );
        assert_eq!(h.phase(), GrPhase::Normal);
        // A late tick is ignored.
        assert!(h.handle(GrEvent::RestartTimerExpires).is_empty());
    }

    #[test]
    fn forwarding_state_not_preserved_sweeps_on_reconnect() {
        let mut h = helper();
        let _ = up(&mut h, Some(cap(60, &[(V4, true), (V6, true)])));
        let _ = h.handle(GrEvent::SessionDown { graceful: true });
        // The new OPEN keeps IPv4 forwarding only.
        let a = up(&mut h, Some(cap(60, &[(V4, true), (V6, false)])));
        assert_eq!(
            a,
            vec![
                GrAction::StopTimer(GrTimer::Restart),
                GrAction::Sweep(vec![V6]),
                GrAction::StartTimer(GrTimer::Stale, Duration::from_secs(30))
            ]
        );
        let _ = h.handle(GrEvent::SessionDown { graceful: true });
        // No capability at all in the next OPEN: everything goes.
        let a = up(&mut h, None);
        assert_eq!(
            a,
            vec![
                GrAction::StopTimer(GrTimer::Restart),
                GrAction::Sweep(vec![V4, V6])
            ]
        );
        assert_eq!(h.phase(), GrPhase::Normal);
    }

    #[test]
    fn restart_while_recovering_keeps_routes_stale_and_stale_timer_sweeps() {
        let mut h = helper();
        let c = cap(60, &[(V4, true), (V6, true)]);
        let _ = up(&mut h, Some(c.clone()));
        let _ = h.handle(GrEvent::SessionDown { graceful: true });
        let _ = up(&mut h, Some(c.clone()));
        let _ = h.handle(GrEvent::EndOfRib(V4));
        // Down again before End-of-RIB for IPv6: both families are retained again (IPv4
        // routes re-learned in the meantime become stale too).
        let a = h.handle(GrEvent::SessionDown { graceful: true });
        assert_eq!(
            a,
            vec![
                GrAction::StopTimer(GrTimer::Stale),
                GrAction::StartTimer(GrTimer::Restart, Duration::from_secs(60)),
                GrAction::PeerDown {
                    retain: vec![V4, V6]
                }
            ]
        );
        // A failed connection attempt in between does not end the restart.
        assert!(
            h.handle(GrEvent::SessionDown { graceful: false })
                .is_empty()
        );
        let _ = up(&mut h, Some(c));
        assert_eq!(
            h.handle(GrEvent::StaleTimerExpires),
            vec![GrAction::Sweep(vec![V4, V6])]
        );
        assert_eq!(h.phase(), GrPhase::Normal);
    }

    #[test]
    fn deferral_waits_for_every_peer_end_of_rib() {
        let both = [V4, V6];
        let c = cap(120, &[(V4, true), (V6, true)]);
        let mut r = c.clone();
        r.restart_state = true;
        let peer = |established, cap, eor| DeferralPeer {
            established,
            peer_cap: cap,
            families: &both,
            end_of_rib: eor,
        };
        assert!(!deferral_complete([]));
        assert!(!deferral_complete([peer(false, None, &[])]));
        assert!(!deferral_complete([peer(true, Some(&c), &[V4])]));
        assert!(deferral_complete([peer(true, Some(&c), &[V6, V4])]));
        // No capability, or restarting itself: not waited for once up.
        assert!(deferral_complete([
            peer(true, None, &[]),
            peer(true, Some(&r), &[])
        ]));
        assert!(!deferral_complete([
            peer(true, None, &[]),
            peer(false, Some(&c), &[])
        ]));
    }
}

//! Routing information bases (RFC 4271 §3.2): per-peer Adj-RIB-In, one Loc-RIB with the
//! decision process of §9.1.2, and Adj-RIB-Out with the export rules of §9.1.3, RFC 4456
//! (route reflection) and §5.1 (attribute handling towards iBGP and eBGP peers).
//!
//! The Adj-RIB-Out is kept per *update group* (`update_group`): Established peers with the
//! same export policy share it, the export rules run once per group, and the speaker encodes
//! one UPDATE stream per group. A route reflector with a thousand clients thus does the work
//! of one client per change, not a thousand.
//!
//! Sans-IO like the codec: the speaker task owns one `Rib` and feeds it decoded UPDATEs and
//! session events; every call returns the best-path changes and, per update group, the
//! announcements and withdrawals to send, grouped by shared attribute set. Several UPDATEs can
//! be imported with [`Rib::import_update`] and their exports computed once by
//! [`Rib::finish`].

mod prefix_map;
mod update_group;

use crate::attrset::{AttrInterner, AttrSet, RouteAttrs};
use crate::policy::{Community, ExportRules, FilterAction, PrefixFilter};
use crate::wire::{Family, NextHop, PathAttrs, Update};
use ipnet::IpNet;
use prefix_map::{Paths, PrefixMap};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use update_group::{ExportPolicy, GroupExportBuilder, UpdateGroup};
pub use update_group::{GroupExport, GroupId, Segment};

/// A peer's index in the RIB. [`LOCAL`] is the speaker itself (locally originated routes).
pub type PeerId = u32;
pub const LOCAL: PeerId = 0;

/// LOCAL_PREF assumed when a route has none (eBGP-learned or omitted), as BIRD and GoBGP do.
pub const DEFAULT_LOCAL_PREF: u32 = 100;

/// What the RIB needs to know about a peer to import and export routes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RibPeer {
    pub addr: IpAddr,
    pub remote_as: u32,
    /// Our address on the session: the next hop we announce when we set next-hop-self.
    pub local_addr: IpAddr,
    /// IPv6 next hop to announce for IPv6 routes when we are the next hop; when absent, the
    /// session address (or its IPv4-mapped form on an IPv4 session).
    pub local_v6_next_hop: Option<Ipv6Addr>,
    /// The peer is our route-reflector client (RFC 4456).
    pub rr_client: bool,
    /// Set ourselves as next hop towards this iBGP peer (always done towards eBGP peers).
    pub next_hop_self: bool,
    /// Rules applied to the peer's announcements before they enter the Loc-RIB (a rejected
    /// route is kept aside like a looped one); no match = accepted.
    pub import_filter: Option<Arc<PrefixFilter>>,
    /// Rules applied before the speaker-wide [`ExportRules`] (see [`crate::policy`]).
    pub export_filter: Option<Arc<PrefixFilter>>,
    /// Our AS on this session when not the speaker's (BIRD `local as`, Calico
    /// `localASNumber`): decides iBGP/eBGP, loop detection and what is prepended.
    pub local_as: Option<u32>,
    /// Pass on the next hop unchanged also towards this eBGP peer (third-party next hop,
    /// RFC 4271 §5.1.3; Calico `nextHopMode: Keep`). Our own routes still carry ours.
    pub next_hop_keep: bool,
    /// How many times our AS may appear in a path from this peer before it is a loop
    /// (allowas-in; Calico `numAllowedLocalASNumbers`). 0: not at all (RFC 4271).
    pub allow_own_as: u8,
}

/// The Loc-RIB's best route for a prefix, as the agent consumes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BestRoute {
    pub peer: PeerId,
    pub peer_addr: Option<IpAddr>,
    pub next_hop: IpAddr,
    pub attrs: AttrSet,
    /// Retained from a peer whose session went down gracefully (RFC 4724 §4.2) and not yet
    /// re-announced by it. A stale route is still a best-path candidate like any other: it is
    /// kept so that forwarding goes on while the peer restarts.
    pub stale: bool,
}

/// A change of the best learned route of a prefix: `None` = no learned route any more (or a
/// locally originated route won).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BestChange {
    pub prefix: IpNet,
    pub best: Option<BestRoute>,
}

/// What to send to one peer (a full table, a ROUTE-REFRESH answer, or one member's view of a
/// [`GroupExport`]): announcements grouped by shared attributes (each group holds prefixes of
/// one family), and withdrawals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Export {
    pub announce: Vec<(AttrSet, Vec<IpNet>)>,
    pub withdraw: Vec<IpNet>,
}

impl Export {
    pub fn is_empty(&self) -> bool {
        self.announce.is_empty() && self.withdraw.is_empty()
    }

    pub fn prefix_count(&self) -> usize {
        self.announce.iter().map(|(_, p)| p.len()).sum::<usize>() + self.withdraw.len()
    }
}

/// The result of one RIB operation.
#[derive(Debug, Default)]
pub struct RibOutput {
    pub changes: Vec<BestChange>,
    /// What to send, per update group (groups with nothing to send are left out).
    pub exports: Vec<GroupExport>,
}

impl RibOutput {
    /// What `peer` is sent, whichever group it is in (empty exports left out of the result).
    pub fn export_for(&self, peer: PeerId) -> Option<Export> {
        self.exports
            .iter()
            .find(|g| g.members.contains(&peer))
            .map(|g| g.for_member(peer))
            .filter(|e| !e.is_empty())
    }

    /// The peers that are sent anything, sorted.
    pub fn peers_sent_to(&self) -> Vec<PeerId> {
        let mut v: Vec<PeerId> = self
            .exports
            .iter()
            .flat_map(|g| g.members.iter().copied())
            .filter(|p| self.export_for(*p).is_some())
            .collect();
        v.sort_unstable();
        v
    }
}

/// Best-path changes collected by [`Rib::import_update`] and not yet exported: hand them to
/// [`Rib::finish`].
#[derive(Debug, Default)]
pub struct Pending {
    changed: Vec<IpNet>,
}

impl Pending {
    /// How many best-path changes are waiting (a prefix may count more than once).
    pub fn len(&self) -> usize {
        self.changed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changed.is_empty()
    }
}

/// Per-UPDATE import statistics for the peer's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportStats {
    pub announced: usize,
    pub withdrawn: usize,
    /// Announcements refused by loop detection (AS_PATH, ORIGINATOR_ID, CLUSTER_LIST).
    pub rejected: usize,
    /// Announcements refused by the peer's import filter.
    pub filtered: usize,
}

/// One path of a prefix in the Loc-RIB. 16 bytes: most prefixes have one, kept inline.
#[derive(Clone, Debug)]
struct Candidate {
    peer: PeerId,
    /// Retained across a graceful restart of the peer and not re-announced since (RFC 4724
    /// §4.2).
    stale: bool,
    attrs: AttrSet,
}

#[derive(Debug)]
struct PeerRib {
    cfg: RibPeer,
    up: bool,
    ibgp: bool,
    /// The peer's BGP identifier, learned from its OPEN.
    router_id: Ipv4Addr,
    families: Vec<Family>,
    // Adj-RIB-In: the accepted routes are the peer's paths in the Loc-RIB (a peer has at
    // most one path per prefix), so only what loop detection refused is kept apart.
    /// Prefixes the peer announced and loop detection refused.
    rejected: HashSet<IpNet>,
    /// The peer's paths in the Loc-RIB.
    accepted: usize,
    /// How many of them are stale.
    stale: usize,
    /// The update group holding our Adj-RIB-Out towards the peer, while it is up.
    group: Option<GroupId>,
}

/// The RIBs of one speaker.
#[derive(Debug)]
pub struct Rib {
    local_as: u32,
    router_id: Ipv4Addr,
    cluster_id: Ipv4Addr,
    interner: AttrInterner,
    /// Loc-RIB: all candidate paths per prefix, best first.
    loc: PrefixMap<Paths>,
    peers: HashMap<PeerId, PeerRib>,
    /// Update groups with at least one member, in creation order.
    groups: BTreeMap<GroupId, UpdateGroup>,
    next_group: GroupId,
    /// Speaker-wide export policy; `None`: every route the protocol rules allow.
    export_rules: Option<Arc<ExportRules>>,
}

impl Rib {
    /// `cluster_id` defaults to the router ID (RFC 4456 §7) when `None`.
    pub fn new(local_as: u32, router_id: Ipv4Addr, cluster_id: Option<Ipv4Addr>) -> Rib {
        Rib {
            local_as,
            router_id,
            cluster_id: cluster_id.unwrap_or(router_id),
            interner: AttrInterner::default(),
            loc: PrefixMap::default(),
            peers: HashMap::new(),
            groups: BTreeMap::new(),
            next_group: 0,
            export_rules: None,
        }
    }

    /// Replace the speaker-wide export policy; what every peer was sent is brought in line
    /// with it (announcements of newly permitted routes, withdrawals of refused ones).
    pub fn set_export_rules(&mut self, rules: Option<ExportRules>) -> RibOutput {
        let rules = rules.map(Arc::new);
        if rules == self.export_rules {
            return RibOutput::default();
        }
        self.export_rules = rules;
        let prefixes: Vec<IpNet> = self.loc.keys().collect();
        let gids: Vec<GroupId> = self.groups.keys().copied().collect();
        let exports = gids
            .into_iter()
            .map(|gid| self.export_group(gid, &prefixes))
            .filter(|e| !e.is_empty())
            .collect();
        RibOutput {
            changes: Vec::new(),
            exports,
        }
    }

    /// The speaker-wide export policy in force.
    pub fn export_rules(&self) -> Option<&ExportRules> {
        self.export_rules.as_deref()
    }

    pub fn local_as(&self) -> u32 {
        self.local_as
    }

    /// Register a peer (session down). Replaces the configuration of a known peer; for a peer
    /// that is up, a change of export policy takes effect at the next [`Rib::resync`].
    pub fn add_peer(&mut self, id: PeerId, cfg: RibPeer) {
        let ibgp = cfg.remote_as == cfg.local_as.unwrap_or(self.local_as);
        match self.peers.get_mut(&id) {
            Some(p) => {
                p.cfg = cfg;
                p.ibgp = ibgp;
            }
            None => {
                self.peers.insert(
                    id,
                    PeerRib {
                        cfg,
                        up: false,
                        ibgp,
                        router_id: Ipv4Addr::UNSPECIFIED,
                        families: Vec::new(),
                        rejected: HashSet::new(),
                        accepted: 0,
                        stale: 0,
                        group: None,
                    },
                );
            }
        }
    }

    /// Forget a peer and everything it announced.
    pub fn remove_peer(&mut self, id: PeerId) -> RibOutput {
        let out = self.peer_down(id);
        self.peers.remove(&id);
        out
    }

    /// The session reached Established: returns the full table to send (the caller appends
    /// End-of-RIB per family).
    pub fn peer_up(&mut self, id: PeerId, router_id: Ipv4Addr, families: Vec<Family>) -> Export {
        self.leave_group(id);
        let Some(p) = self.peers.get_mut(&id) else {
            return Export::default();
        };
        p.up = true;
        p.router_id = router_id;
        p.families = families;
        self.join_group(id)
    }

    /// The session went down: its routes leave the Loc-RIB.
    pub fn peer_down(&mut self, id: PeerId) -> RibOutput {
        self.remove_paths(id, |_| true)
    }

    /// The session went down gracefully (RFC 4724 §4.2, receiving speaker): the peer's
    /// accepted routes of the `retain` families stay in the Loc-RIB, marked stale (those
    /// already stale stay so); everything else it announced is removed. Marking changes no
    /// best path, so only the removals produce changes and exports.
    pub fn peer_down_graceful(&mut self, id: PeerId, retain: &[Family]) -> RibOutput {
        let out = self.remove_paths(id, |c| !retain.contains(&Family::of(&c.0)));
        let mut marked = 0;
        for (prefix, _) in self.paths_of(id) {
            if let Some(c) = self
                .loc
                .get_mut(&prefix)
                .and_then(|paths| paths.as_mut_slice().iter_mut().find(|c| c.peer == id))
            {
                c.stale = true;
                marked += 1;
            }
        }
        if let Some(p) = self.peers.get_mut(&id) {
            p.stale = marked;
        }
        out
    }

    /// Remove the peer's routes of `families` that are still stale (End-of-RIB received,
    /// forwarding state not preserved, or a restart or stale timer expired).
    pub fn sweep_stale(&mut self, id: PeerId, families: &[Family]) -> RibOutput {
        if self.stale_count(id) == 0 {
            return RibOutput::default();
        }
        let sweep =
            |(prefix, stale): (IpNet, bool)| stale && families.contains(&Family::of(&prefix));
        let mut changed = Vec::new();
        for (prefix, _) in self.paths_of(id).filter(|c| sweep(*c)) {
            self.drop_path(id, prefix, &mut changed);
        }
        self.finish_changed(changed)
    }

    /// The peer's paths in the Loc-RIB: (prefix, stale). A scan of the whole Loc-RIB, done
    /// only when a session ends or stale routes are swept (BIRD prunes a table the same way).
    fn paths_of(&self, id: PeerId) -> std::vec::IntoIter<(IpNet, bool)> {
        let v: Vec<(IpNet, bool)> = self
            .loc
            .iter()
            .filter_map(|(prefix, paths)| {
                let c = paths.as_slice().iter().find(|c| c.peer == id)?;
                Some((prefix, c.stale))
            })
            .collect();
        v.into_iter()
    }

    /// The session is down: leave the update group, forget refused prefixes, and remove the
    /// paths for which `remove` holds.
    fn remove_paths(&mut self, id: PeerId, remove: impl Fn(&(IpNet, bool)) -> bool) -> RibOutput {
        self.leave_group(id);
        let Some(p) = self.peers.get_mut(&id) else {
            return RibOutput::default();
        };
        p.up = false;
        p.rejected = HashSet::new();
        let mut changed = Vec::new();
        for (prefix, _) in self.paths_of(id).filter(|c| remove(c)) {
            self.drop_path(id, prefix, &mut changed);
        }
        self.finish_changed(changed)
    }

    /// How many of the peer's routes are stale.
    pub fn stale_count(&self, id: PeerId) -> usize {
        self.peers.get(&id).map_or(0, |p| p.stale)
    }

    /// Forget what was announced to `id` and compute its full table again (the caller sends
    /// it, then End-of-RIB): used when a deferred initial advertisement is finally sent. Also
    /// moves the peer to the update group of its current configuration.
    pub fn resync(&mut self, id: PeerId) -> Export {
        if !self.peers.get(&id).is_some_and(|p| p.up) {
            return Export::default();
        }
        self.leave_group(id);
        self.join_group(id)
    }

    /// Apply an UPDATE received from `id` (already validated). RFC 7606 treat-as-withdraw
    /// turns its announcements into withdrawals.
    pub fn apply_update(&mut self, id: PeerId, update: &Update) -> (RibOutput, ImportStats) {
        let mut pending = Pending::default();
        let stats = self.import_update(id, update, &mut pending);
        (self.finish(pending), stats)
    }

    /// Import an UPDATE received from `id` (already validated) into the Loc-RIB without
    /// exporting yet: the best-path changes are added to `pending`, for one [`Rib::finish`]
    /// after several UPDATEs. RFC 7606 treat-as-withdraw turns announcements into withdrawals.
    pub fn import_update(
        &mut self,
        id: PeerId,
        update: &Update,
        pending: &mut Pending,
    ) -> ImportStats {
        let mut stats = ImportStats::default();
        let Some(peer) = self.peers.get(&id) else {
            return stats;
        };
        if !peer.up {
            return stats;
        }
        let ibgp = peer.ibgp;
        let looped = self.is_looped(&update.attrs, peer);
        let import_filter = peer.cfg.import_filter.clone();
        let refused = |p: &IpNet| {
            import_filter
                .as_ref()
                .is_some_and(|f| f.evaluate(p, true) == Some(FilterAction::Reject))
        };
        let changed = &mut pending.changed;
        let twd = update.treat_as_withdraw();
        let mut withdraw = |rib: &mut Rib, prefix: IpNet, changed: &mut Vec<IpNet>| {
            stats.withdrawn += 1;
            rib.withdraw_from(id, prefix, changed);
        };
        for p in &update.withdrawn {
            withdraw(self, *p, changed);
        }
        if let Some(u) = &update.mp_unreach {
            for p in &u.withdrawn {
                withdraw(self, *p, changed);
            }
        }
        if twd {
            for p in &update.nlri {
                withdraw(self, *p, changed);
            }
            if let Some(r) = &update.mp_reach {
                for p in &r.nlri {
                    withdraw(self, *p, changed);
                }
            }
            return stats;
        }

        let mut path = update.attrs.clone();
        if !ibgp {
            // LOCAL_PREF is ours to assign for eBGP routes (RFC 4271 §5.1.5).
            path.local_pref = None;
        }
        if !update.nlri.is_empty()
            && let Some(nh) = path.next_hop
        {
            let attrs = self.interner.intern(RouteAttrs {
                path: path.clone(),
                next_hop: NextHop::new(IpAddr::V4(nh)),
            });
            for p in &update.nlri {
                stats.announced += 1;
                if looped {
                    stats.rejected += 1;
                    self.reject_from(id, *p, changed);
                } else if refused(p) {
                    stats.filtered += 1;
                    self.reject_from(id, *p, changed);
                } else {
                    self.announce_from(id, *p, attrs.clone(), changed);
                }
            }
        }
        if let Some(r) = &update.mp_reach {
            let mut mp_path = path;
            mp_path.next_hop = None;
            let attrs = self.interner.intern(RouteAttrs {
                path: mp_path,
                next_hop: r.next_hop,
            });
            for p in &r.nlri {
                stats.announced += 1;
                if looped {
                    stats.rejected += 1;
                    self.reject_from(id, *p, changed);
                } else if refused(p) {
                    stats.filtered += 1;
                    self.reject_from(id, *p, changed);
                } else {
                    self.announce_from(id, *p, attrs.clone(), changed);
                }
            }
        }
        stats
    }

    /// Originate a route locally. `next_hop: None` means "ourselves" on every session.
    pub fn originate(
        &mut self,
        prefix: IpNet,
        next_hop: Option<IpAddr>,
        path: PathAttrs,
    ) -> RibOutput {
        let nh = next_hop.unwrap_or(match prefix {
            IpNet::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpNet::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        });
        let mut path = path;
        path.next_hop = match nh {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        };
        if path.origin.is_none() {
            path.origin = Some(crate::wire::Origin::Igp);
        }
        if path.as_path.is_none() {
            path.as_path = Some(Default::default());
        }
        let attrs = self.interner.intern(RouteAttrs {
            path,
            next_hop: NextHop::new(nh),
        });
        let mut changed = Vec::new();
        self.upsert_candidate(prefix, LOCAL, attrs, &mut changed);
        self.finish_changed(changed)
    }

    /// Withdraw a locally originated route.
    pub fn withdraw_local(&mut self, prefix: IpNet) -> RibOutput {
        let mut changed = Vec::new();
        if self.remove_candidate(prefix, LOCAL).1 {
            changed.push(prefix);
        }
        self.finish_changed(changed)
    }

    /// Re-send everything announced to `id` for `family` (ROUTE-REFRESH, RFC 2918).
    pub fn refresh(&self, id: PeerId, family: Family) -> Export {
        self.peers
            .get(&id)
            .and_then(|p| p.group)
            .and_then(|g| self.groups.get(&g))
            .map_or_else(Export::default, |g| g.dump(id, Some(family)))
    }

    /// The current best learned route of a prefix.
    pub fn best(&self, prefix: &IpNet) -> Option<BestRoute> {
        self.loc
            .get(prefix)
            .and_then(|paths| self.best_route(paths.best()))
    }

    /// Every prefix's best route, locally originated ones included (peer = LOCAL).
    pub fn loc_rib(&self) -> impl Iterator<Item = (IpNet, BestRoute)> + '_ {
        self.loc.iter().map(|(p, paths)| {
            let b = paths.best();
            (
                p,
                BestRoute {
                    peer: b.peer,
                    peer_addr: self.peers.get(&b.peer).map(|p| p.cfg.addr),
                    next_hop: b.attrs.next_hop.addr,
                    attrs: b.attrs.clone(),
                    stale: b.stale,
                },
            )
        })
    }

    pub fn loc_rib_len(&self) -> usize {
        self.loc.len()
    }

    /// (received, accepted, advertised) prefix counts of a peer.
    pub fn peer_counts(&self, id: PeerId) -> (usize, usize, usize) {
        self.peers.get(&id).map_or((0, 0, 0), |p| {
            let advertised = p
                .group
                .and_then(|g| self.groups.get(&g))
                .map_or(0, |g| g.advertised_to(id));
            (p.accepted + p.rejected.len(), p.accepted, advertised)
        })
    }

    pub fn interned_attr_sets(&self) -> usize {
        self.interner.len()
    }

    /// The update group `id` is in while it is up.
    pub fn group_of(&self, id: PeerId) -> Option<GroupId> {
        self.peers.get(&id).and_then(|p| p.group)
    }

    /// How many update groups there are (each with at least one member).
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    // ---- update groups ----

    fn policy_of(p: &PeerRib) -> ExportPolicy {
        ExportPolicy {
            remote_as: p.cfg.remote_as,
            ibgp: p.ibgp,
            rr_client: p.cfg.rr_client,
            next_hop_self: p.cfg.next_hop_self,
            local_addr: p.cfg.local_addr,
            local_v6_next_hop: p.cfg.local_v6_next_hop,
            families: p.families.clone(),
            export_filter: p.cfg.export_filter.clone(),
            local_as: p.cfg.local_as,
            next_hop_keep: p.cfg.next_hop_keep,
        }
    }

    /// Put an up peer into the group of its policy (created, with its Adj-RIB-Out computed
    /// from the whole Loc-RIB, if there is none) and return its full table.
    fn join_group(&mut self, id: PeerId) -> Export {
        let Some(p) = self.peers.get(&id) else {
            return Export::default();
        };
        let policy = Self::policy_of(p);
        let gid = match self.groups.iter().find(|(_, g)| g.policy == policy) {
            Some((gid, _)) => *gid,
            None => {
                let gid = self.next_group;
                self.next_group += 1;
                self.groups.insert(gid, UpdateGroup::new(policy));
                let prefixes: Vec<IpNet> = self.loc.keys().collect();
                // No members yet: nothing to send, only the Adj-RIB-Out to fill.
                self.export_group(gid, &prefixes);
                gid
            }
        };
        let Some(g) = self.groups.get_mut(&gid) else {
            return Export::default();
        };
        g.members.insert(id);
        if let Some(p) = self.peers.get_mut(&id) {
            p.group = Some(gid);
        }
        g.dump(id, None)
    }

    /// Take a peer out of its group; the last member out drops the group.
    fn leave_group(&mut self, id: PeerId) {
        let Some(gid) = self.peers.get_mut(&id).and_then(|p| p.group.take()) else {
            return;
        };
        if let Some(g) = self.groups.get_mut(&gid) {
            g.members.remove(&id);
            if g.members.is_empty() {
                self.groups.remove(&gid);
            }
        }
    }

    // ---- import ----

    fn is_looped(&self, path: &PathAttrs, peer: &PeerRib) -> bool {
        if !peer.ibgp {
            let ours = peer.cfg.local_as.unwrap_or(self.local_as);
            let seen = path.as_path.as_ref().map_or(0, |p| {
                // With a local-AS override the speaker's own AS is ours too.
                let mut n = p.count(ours);
                if ours != self.local_as {
                    n += p.count(self.local_as);
                }
                n
            });
            if seen > usize::from(peer.cfg.allow_own_as) {
                return true;
            }
        }
        // RFC 4456 §8: our own ORIGINATOR_ID or CLUSTER_ID means the route looped.
        path.originator_id == Some(self.router_id) || path.cluster_list.contains(&self.cluster_id)
    }

    fn announce_from(
        &mut self,
        id: PeerId,
        prefix: IpNet,
        attrs: AttrSet,
        changed: &mut Vec<IpNet>,
    ) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        if !p.rejected.is_empty() {
            p.rejected.remove(&prefix);
        }
        let old = self.upsert_candidate(prefix, id, attrs, changed);
        if let Some(p) = self.peers.get_mut(&id) {
            match old {
                None => p.accepted += 1,
                Some(c) if c.stale => p.stale -= 1,
                Some(_) => {}
            }
        }
    }

    fn reject_from(&mut self, id: PeerId, prefix: IpNet, changed: &mut Vec<IpNet>) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        p.rejected.insert(prefix);
        self.drop_path(id, prefix, changed);
    }

    fn withdraw_from(&mut self, id: PeerId, prefix: IpNet, changed: &mut Vec<IpNet>) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        if p.rejected.is_empty() || !p.rejected.remove(&prefix) {
            self.drop_path(id, prefix, changed);
        }
    }

    /// Remove a peer's path, keeping its counts; `changed` gets the prefix if the best path
    /// changed.
    fn drop_path(&mut self, id: PeerId, prefix: IpNet, changed: &mut Vec<IpNet>) {
        let (removed, best_changed) = self.remove_candidate(prefix, id);
        if best_changed {
            changed.push(prefix);
        }
        if let (Some(c), Some(p)) = (removed, self.peers.get_mut(&id)) {
            p.accepted -= 1;
            if c.stale {
                p.stale -= 1;
            }
        }
    }

    /// Add or replace `peer`'s path (not stale); returns the path replaced.
    fn upsert_candidate(
        &mut self,
        prefix: IpNet,
        peer: PeerId,
        attrs: AttrSet,
        changed: &mut Vec<IpNet>,
    ) -> Option<Candidate> {
        let new = Candidate {
            peer,
            stale: false,
            attrs,
        };
        let Some(paths) = self.loc.get_mut(&prefix) else {
            self.loc.insert(prefix, Paths::One(new));
            changed.push(prefix);
            return None;
        };
        let old_best = (paths.best().peer, Arc::as_ptr(&paths.best().attrs));
        let old = match paths.position(peer) {
            Some(i) => Some(std::mem::replace(&mut paths.as_mut_slice()[i], new)),
            None => {
                paths.push(new);
                None
            }
        };
        let best = best_index(&self.peers, paths.as_slice());
        paths.make_best(best);
        if (paths.best().peer, Arc::as_ptr(&paths.best().attrs)) != old_best {
            changed.push(prefix);
        }
        old
    }

    /// Remove `peer`'s path for `prefix`: the path removed, and whether the best path
    /// changed.
    fn remove_candidate(&mut self, prefix: IpNet, peer: PeerId) -> (Option<Candidate>, bool) {
        let Some(paths) = self.loc.get_mut(&prefix) else {
            return (None, false);
        };
        let Some(i) = paths.position(peer) else {
            return (None, false);
        };
        let (removed, any_left) = paths.swap_remove(i);
        if !any_left {
            self.loc.remove(&prefix);
            return (Some(removed), true);
        }
        if i == 0 {
            let best = best_index(&self.peers, paths.as_slice());
            paths.make_best(best);
            return (Some(removed), true);
        }
        (Some(removed), false)
    }

    // ---- export ----

    fn best_route(&self, c: &Candidate) -> Option<BestRoute> {
        if c.peer == LOCAL {
            return None;
        }
        Some(BestRoute {
            peer: c.peer,
            peer_addr: self.peers.get(&c.peer).map(|p| p.cfg.addr),
            next_hop: c.attrs.next_hop.addr,
            attrs: c.attrs.clone(),
            stale: c.stale,
        })
    }

    /// Export the best-path changes of imported UPDATEs (see [`Rib::import_update`]).
    pub fn finish(&mut self, pending: Pending) -> RibOutput {
        self.finish_changed(pending.changed)
    }

    fn finish_changed(&mut self, mut changed: Vec<IpNet>) -> RibOutput {
        if changed.is_empty() {
            return RibOutput::default();
        }
        changed.sort_unstable();
        changed.dedup();
        let changes = changed
            .iter()
            .map(|p| BestChange {
                prefix: *p,
                best: self
                    .loc
                    .get(p)
                    .and_then(|paths| self.best_route(paths.best())),
            })
            .collect();
        let gids: Vec<GroupId> = self.groups.keys().copied().collect();
        let exports = gids
            .into_iter()
            .map(|gid| self.export_group(gid, &changed))
            .filter(|e| !e.is_empty())
            .collect();
        RibOutput { changes, exports }
    }

    /// Bring a group's Adj-RIB-Out in line with the Loc-RIB for `prefixes`.
    fn export_group(&mut self, gid: GroupId, prefixes: &[IpNet]) -> GroupExport {
        let Some(mut g) = self.groups.remove(&gid) else {
            return GroupExport::default();
        };
        let mut msgs = GroupExportBuilder::default();
        // Export attributes depend on the source attributes and the source peer only.
        // ... and on the communities the export policy adds (the same for most prefixes).
        type CacheKey = (*const RouteAttrs, PeerId, Vec<Community>);
        let mut cache: HashMap<CacheKey, Option<AttrSet>> = HashMap::new();
        for prefix in prefixes {
            if !g.policy.families.contains(&Family::of(prefix)) {
                continue;
            }
            let best = self.loc.get(prefix).map(|paths| paths.best().clone());
            let desired = best.and_then(|b| {
                let communities = self.export_permits(&b, &g.policy, prefix)?;
                let key = (Arc::as_ptr(&b.attrs), b.peer, communities);
                let d = match cache.get(&key) {
                    Some(d) => d.clone(),
                    None => {
                        let d = self
                            .export_attrs(&b, &g.policy, prefix)
                            .map(|mut a| {
                                add_communities(&mut a.path, &key.2);
                                a
                            })
                            .map(|a| self.interner.intern(a));
                        cache.insert(key, d.clone());
                        d
                    }
                };
                d.map(|a| (a, b.peer))
            });
            g.set(*prefix, desired, &mut msgs);
        }
        let e = msgs.build(gid, &g.members);
        self.groups.insert(gid, g);
        e
    }

    /// The route policy's verdict on announcing `best` for `prefix` to peers of `target`
    /// (see [`crate::policy`]): `None` = refused, else the communities to add.
    fn export_permits(
        &self,
        best: &Candidate,
        target: &ExportPolicy,
        prefix: &IpNet,
    ) -> Option<Vec<Community>> {
        let from_peer = best.peer != LOCAL;
        match target
            .export_filter
            .as_ref()
            .and_then(|f| f.evaluate(prefix, from_peer))
        {
            Some(FilterAction::Accept) => return Some(Vec::new()),
            Some(FilterAction::Reject) => return None,
            None => {}
        }
        match &self.export_rules {
            None => Some(Vec::new()),
            Some(rules) => rules
                .decide(prefix)
                .ok()
                .map(|()| rules.communities_for(prefix)),
        }
    }

    /// The attributes `best` is announced with to peers of policy `target`, or `None` when
    /// the export rules forbid announcing it there. (Not sending a route back to the peer it
    /// came from is the update group's job.)
    fn export_attrs(
        &self,
        best: &Candidate,
        target: &ExportPolicy,
        prefix: &IpNet,
    ) -> Option<RouteAttrs> {
        let source = self.peers.get(&best.peer);
        let mut path = best.attrs.path.clone();
        let mut next_hop = best.attrs.next_hop;
        let from_local = best.peer == LOCAL;
        let self_nh = |t: &ExportPolicy| -> NextHop {
            match prefix {
                IpNet::V4(_) => match t.local_addr {
                    IpAddr::V4(a) => NextHop::new(IpAddr::V4(a)),
                    IpAddr::V6(_) => NextHop::new(IpAddr::V4(self.router_id)),
                },
                IpNet::V6(_) => NextHop::new(IpAddr::V6(t.local_v6_next_hop.unwrap_or(
                    match t.local_addr {
                        IpAddr::V6(a) => a,
                        IpAddr::V4(a) => a.to_ipv6_mapped(),
                    },
                ))),
            }
        };
        if target.ibgp {
            if let Some(src) = source.filter(|s| s.ibgp) {
                // RFC 4456 §6: reflect client routes to everyone, non-client routes to clients.
                if !(src.cfg.rr_client || target.rr_client) {
                    return None;
                }
                if path.originator_id.is_none() {
                    path.originator_id = Some(src.router_id);
                }
                path.cluster_list.insert(0, self.cluster_id);
            }
            if path.local_pref.is_none() {
                path.local_pref = Some(DEFAULT_LOCAL_PREF);
            }
            if target.next_hop_self || next_hop.addr.is_unspecified() {
                next_hop = self_nh(target);
            }
        } else {
            // RFC 4271 §5.1.2, §5.1.3, §5.1.4, §5.1.5: prepend our AS, we are the next hop
            // (unless the peer is configured for a third-party next hop), no LOCAL_PREF, and a
            // MED learned from another AS is not passed on.
            let mut as_path = path.as_path.take().unwrap_or_default();
            as_path.prepend(target.local_as.unwrap_or(self.local_as));
            path.as_path = Some(as_path);
            path.local_pref = None;
            path.originator_id = None;
            path.cluster_list.clear();
            if !from_local {
                path.med = None;
            }
            if !(target.next_hop_keep && !from_local && !next_hop.addr.is_unspecified()) {
                next_hop = self_nh(target);
            }
        }
        path.next_hop = match (prefix, next_hop.addr) {
            (IpNet::V4(_), IpAddr::V4(a)) => Some(a),
            _ => None,
        };
        Some(RouteAttrs { path, next_hop })
    }
}

/// Add communities to a path's COMMUNITIES / LARGE_COMMUNITIES, keeping each once and the
/// lists sorted (BIRD's `bgp_community.add` is a set operation too).
fn add_communities(path: &mut PathAttrs, add: &[Community]) {
    if add.is_empty() {
        return;
    }
    for c in add {
        match *c {
            Community::Standard(v) => path.communities.push(v),
            Community::Large(g, l1, l2) => path.large_communities.push((g, l1, l2)),
        }
    }
    path.communities.sort_unstable();
    path.communities.dedup();
    path.large_communities.sort_unstable();
    path.large_communities.dedup();
}

/// The index of the best of `cands` (RFC 4271 §9.1.2). A linear scan, not a sort: the MED
/// rule compares only routes from the same neighbour AS, so the preference is not a total
/// order.
fn best_index(peers: &HashMap<PeerId, PeerRib>, cands: &[Candidate]) -> usize {
    let mut best = 0;
    for i in 1..cands.len() {
        if prefer(peers, &cands[i], &cands[best]) {
            best = i;
        }
    }
    best
}

/// RFC 4271 §9.1.2.2 (with RFC 4456 §9): is `a` better than `b`?
fn prefer(peers: &HashMap<PeerId, PeerRib>, a: &Candidate, b: &Candidate) -> bool {
    use std::cmp::Ordering::*;
    // Locally originated routes win outright (as a router's own static routes do).
    if (a.peer == LOCAL) != (b.peer == LOCAL) {
        return a.peer == LOCAL;
    }
    let (pa, pb) = (&a.attrs.path, &b.attrs.path);
    let lp = |p: &PathAttrs| p.local_pref.unwrap_or(DEFAULT_LOCAL_PREF);
    match lp(pa).cmp(&lp(pb)) {
        Greater => return true,
        Less => return false,
        Equal => {}
    }
    let len = |p: &PathAttrs| p.as_path.as_ref().map_or(0, |x| x.path_len());
    match len(pa).cmp(&len(pb)) {
        Less => return true,
        Greater => return false,
        Equal => {}
    }
    match pa.origin.cmp(&pb.origin) {
        Less => return true,
        Greater => return false,
        Equal => {}
    }
    let neighbour = |p: &PathAttrs| p.as_path.as_ref().and_then(|x| x.first_as());
    if neighbour(pa) == neighbour(pb) {
        match pa.med.unwrap_or(0).cmp(&pb.med.unwrap_or(0)) {
            Less => return true,
            Greater => return false,
            Equal => {}
        }
    }
    let ebgp = |c: &Candidate| peers.get(&c.peer).is_some_and(|p| !p.ibgp);
    match (ebgp(a), ebgp(b)) {
        (true, false) => return true,
        (false, true) => return false,
        _ => {}
    }
    let rid = |c: &Candidate| {
        c.attrs.path.originator_id.unwrap_or_else(|| {
            peers
                .get(&c.peer)
                .map_or(Ipv4Addr::UNSPECIFIED, |p| p.router_id)
        })
    };
    match u32::from(rid(a)).cmp(&u32::from(rid(b))) {
        Less => return true,
        Greater => return false,
        Equal => {}
    }
    match pa.cluster_list.len().cmp(&pb.cluster_list.len()) {
        Less => return true,
        Greater => return false,
        Equal => {}
    }
    let addr = |c: &Candidate| peers.get(&c.peer).map(|p| p.cfg.addr);
    addr(a) < addr(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AsPath, MpReach, Origin};

    const AS: u32 = 64512;

    fn peer(addr: [u8; 4], remote_as: u32) -> RibPeer {
        RibPeer {
            addr: IpAddr::from(addr),
            remote_as,
            local_addr: IpAddr::from([10, 0, 0, 1]),
            local_v6_next_hop: None,
            rr_client: false,
            next_hop_self: false,
            import_filter: None,
            export_filter: None,
            local_as: None,
            next_hop_keep: false,
            allow_own_as: 0,
        }
    }

    fn v4() -> Vec<Family> {
        vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST]
    }

    fn rib_with(peers: &[(PeerId, RibPeer)]) -> Rib {
        let mut rib = Rib::new(AS, Ipv4Addr::new(10, 0, 0, 1), None);
        for (id, p) in peers {
            rib.add_peer(*id, p.clone());
            let rid = match p.addr {
                IpAddr::V4(a) => a,
                IpAddr::V6(_) => Ipv4Addr::new(9, 9, 9, 9),
            };
            rib.peer_up(*id, rid, v4());
        }
        rib
    }

    fn announce(prefixes: &[&str], nh: [u8; 4], path: &[u32]) -> Update {
        Update {
            attrs: PathAttrs {
                origin: Some(Origin::Igp),
                as_path: Some(AsPath::from_sequence(path.to_vec())),
                next_hop: Some(Ipv4Addr::from(nh)),
                ..Default::default()
            },
            nlri: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
            ..Default::default()
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn learned_route_becomes_best_and_is_withdrawn() {
        let mut rib = rib_with(&[(1, peer([10, 0, 0, 2], AS))]);
        let (out, stats) =
            rib.apply_update(1, &announce(&["172.16.196.128/26"], [10, 0, 0, 2], &[]));
        assert_eq!(stats.announced, 1);
        assert_eq!(out.changes.len(), 1);
        let best = out.changes[0].best.as_ref().unwrap();
        assert_eq!(best.next_hop, IpAddr::from([10, 0, 0, 2]));
        assert_eq!(rib.peer_counts(1), (1, 1, 0));
        let w = Update {
            withdrawn: vec![net("172.16.196.128/26")],
            ..Default::default()
        };
        let (out, _) = rib.apply_update(1, &w);
        assert_eq!(
            out.changes,
            vec![BestChange {
                prefix: net("172.16.196.128/26"),
                best: None
            }]
        );
        assert_eq!(rib.loc_rib_len(), 0);
    }

    #[test]
    fn ibgp_routes_are_not_reflected_to_other_ibgp_peers() {
        let mut rib = rib_with(&[(1, peer([10, 0, 0, 2], AS)), (2, peer([10, 0, 0, 3], AS))]);
        let (out, _) = rib.apply_update(1, &announce(&["172.16.0.0/26"], [10, 0, 0, 2], &[]));
        assert!(out.exports.is_empty(), "{:?}", out.exports);
    }

    #[test]
    fn route_reflector_reflects_client_routes_with_originator_and_cluster() {
        let mut client = peer([10, 0, 0, 2], AS);
        client.rr_client = true;
        let mut rib = rib_with(&[(1, client), (2, peer([10, 0, 0, 3], AS))]);
        let (out, _) = rib.apply_update(1, &announce(&["172.16.0.0/26"], [10, 0, 0, 2], &[]));
        assert_eq!(out.peers_sent_to(), vec![2]);
        let e = out.export_for(2).unwrap();
        let attrs = &e.announce[0].0;
        assert_eq!(attrs.path.originator_id, Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(attrs.path.cluster_list, vec![Ipv4Addr::new(10, 0, 0, 1)]);
        // iBGP keeps the next hop.
        assert_eq!(attrs.path.next_hop, Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(attrs.path.local_pref, Some(100));
        // Non-client route goes to the client only.
        let (out, _) = rib.apply_update(2, &announce(&["172.16.1.0/26"], [10, 0, 0, 3], &[]));
        assert_eq!(out.peers_sent_to(), vec![1]);
    }

    #[test]
    fn ebgp_export_prepends_as_sets_next_hop_self_and_drops_local_pref_and_med() {
        let mut rib = rib_with(&[
            (1, peer([10, 0, 0, 2], AS)),
            (2, peer([192, 0, 2, 1], 65001)),
        ]);
        let mut u = announce(&["172.16.0.0/26"], [10, 0, 0, 2], &[]);
        u.attrs.local_pref = Some(200);
        u.attrs.med = Some(5);
        let (out, _) = rib.apply_update(1, &u);
        assert_eq!(out.peers_sent_to(), vec![2]);
        let e = out.export_for(2).unwrap();
        let a = &e.announce[0].0;
        assert_eq!(a.path.as_path, Some(AsPath::from_sequence(vec![AS])));
        assert_eq!(a.path.next_hop, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(a.path.local_pref, None);
        assert_eq!(a.path.med, None);
    }

    #[test]
    fn ebgp_route_with_own_as_is_rejected_as_a_loop() {
        let mut rib = rib_with(&[(1, peer([192, 0, 2, 1], 65001))]);
        let (out, stats) = rib.apply_update(
            1,
            &announce(&["172.16.0.0/26"], [192, 0, 2, 1], &[65001, AS]),
        );
        assert_eq!(stats.rejected, 1);
        assert!(out.changes.is_empty());
        assert_eq!(rib.peer_counts(1), (1, 0, 0));
    }

    #[test]
    fn treat_as_withdraw_removes_the_previous_route() {
        let mut rib = rib_with(&[(1, peer([10, 0, 0, 2], AS))]);
        rib.apply_update(1, &announce(&["172.16.0.0/26"], [10, 0, 0, 2], &[]));
        let mut bad = announce(&["172.16.0.0/26"], [10, 0, 0, 2], &[]);
        bad.errors.push(crate::wire::AttrError {
            attr: 1,
            action: crate::wire::ErrorAction::TreatAsWithdraw,
            reason: "test",
        });
        let (out, _) = rib.apply_update(1, &bad);
        assert_eq!(out.changes[0].best, None);
    }

    #[test]
    fn decision_process_order() {
        let mut rib = rib_with(&[
            (1, peer([10, 0, 0, 2], AS)),
            (2, peer([10, 0, 0, 3], AS)),
            (3, peer([192, 0, 2, 1], 65001)),
        ]);
        let p = net("172.16.0.0/26");
        // Equal everything: lowest router ID wins (10.0.0.2).
        rib.apply_update(2, &announce(&["172.16.0.0/26"], [10, 0, 0, 3], &[]));
        rib.apply_update(1, &announce(&["172.16.0.0/26"], [10, 0, 0, 2], &[]));
        assert_eq!(rib.best(&p).unwrap().peer, 1);
        // Higher LOCAL_PREF beats everything after it.
        let mut u = announce(&["172.16.0.0/26"], [10, 0, 0, 3], &[65010, 65011]);
        u.attrs.local_pref = Some(150);
        rib.apply_update(2, &u);
        assert_eq!(rib.best(&p).unwrap().peer, 2);
        // Back to equal LOCAL_PREF: the shorter AS_PATH (peer 1, empty) wins.
        rib.apply_update(2, &announce(&["172.16.0.0/26"], [10, 0, 0, 3], &[65010]));
        assert_eq!(rib.best(&p).unwrap().peer, 1);
        // eBGP path of the same length beats iBGP.
        rib.apply_update(1, &announce(&["172.16.0.0/26"], [10, 0, 0, 2], &[65010]));
        rib.apply_update(3, &announce(&["172.16.0.0/26"], [192, 0, 2, 1], &[65001]));
        assert_eq!(rib.best(&p).unwrap().peer, 3);
        // Lower ORIGIN beats eBGP.
        let mut u = announce(&["172.16.0.0/26"], [10, 0, 0, 3], &[65010]);
        u.attrs.origin = Some(Origin::Igp);
        let mut e = announce(&["172.16.0.0/26"], [192, 0, 2, 1], &[65001]);
        e.attrs.origin = Some(Origin::Incomplete);
        rib.apply_update(3, &e);
        rib.apply_update(2, &u);
        assert_ne!(rib.best(&p).unwrap().peer, 3);
        // Withdrawing the best falls back to the next.
        let before = rib.best(&p).unwrap().peer;
        let (out, _) = rib.apply_update(
            before,
            &Update {
                withdrawn: vec![p],
                ..Default::default()
            },
        );
        assert_eq!(out.changes.len(), 1);
        assert_ne!(rib.best(&p).unwrap().peer, before);
    }

    #[test]
    fn med_compared_only_within_the_same_neighbour_as() {
        let mut rib = rib_with(&[
            (1, peer([192, 0, 2, 1], 65001)),
            (2, peer([192, 0, 2, 2], 65001)),
        ]);
        let p = net("172.16.0.0/26");
        let mut a = announce(&["172.16.0.0/26"], [192, 0, 2, 1], &[65001]);
        a.attrs.med = Some(50);
        let mut b = announce(&["172.16.0.0/26"], [192, 0, 2, 2], &[65001]);
        b.attrs.med = Some(10);
        rib.apply_update(1, &a);
        rib.apply_update(2, &b);
        assert_eq!(rib.best(&p).unwrap().peer, 2);
    }

    #[test]
    fn local_routes_export_with_self_next_hop_and_are_not_best_changes() {
        let mut rib = rib_with(&[(1, peer([10, 0, 0, 2], AS))]);
        let out = rib.originate(net("172.16.241.64/26"), None, PathAttrs::default());
        assert!(out.changes.iter().all(|c| c.best.is_none()));
        let e = out.export_for(1).unwrap();
        assert_eq!(
            e.announce[0].0.path.next_hop,
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
        assert_eq!(rib.peer_counts(1).2, 1);
        let out = rib.originate(net("fd00:10::/122"), None, PathAttrs::default());
        let e = out.export_for(1).unwrap();
        assert_eq!(
            e.announce[0].0.next_hop.addr,
            IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped())
        );
        let out = rib.withdraw_local(net("172.16.241.64/26"));
        assert_eq!(
            out.export_for(1).unwrap().withdraw,
            vec![net("172.16.241.64/26")]
        );
    }

    #[test]
    fn peer_down_removes_its_routes_and_shares_attribute_sets() {
        let mut rib = rib_with(&[(1, peer([10, 0, 0, 2], AS))]);
        let prefixes: Vec<String> = (0..200)
            .map(|i| format!("10.{}.{}.0/26", i / 4, (i % 4) * 64))
            .collect();
        let refs: Vec<&str> = prefixes.iter().map(String::as_str).collect();
        rib.apply_update(1, &announce(&refs, [10, 0, 0, 2], &[]));
        assert_eq!(rib.loc_rib_len(), 200);
        assert_eq!(rib.interned_attr_sets(), 1);
        let out = rib.peer_down(1);
        assert_eq!(out.changes.len(), 200);
        assert!(out.changes.iter().all(|c| c.best.is_none()));
        assert_eq!(rib.loc_rib_len(), 0);
    }

    fn v6_update(prefixes: &[&str]) -> Update {
        Update {
            attrs: PathAttrs {
                origin: Some(Origin::Igp),
                as_path: Some(AsPath::default()),
                ..Default::default()
            },
            mp_reach: Some(MpReach {
                family: Family::IPV6_UNICAST,
                next_hop: NextHop::new(IpAddr::V6("fd00::2".parse().unwrap())),
                nlri: prefixes.iter().map(|p| net(p)).collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn graceful_peer_down_keeps_routes_stale_without_changes() {
        let mut rib = rib_with(&[(1, peer([10, 0, 0, 2], AS)), (2, peer([10, 0, 0, 3], AS))]);
        rib.apply_update(
            1,
            &announce(&["10.1.0.0/26", "10.1.0.64/26"], [10, 0, 0, 2], &[]),
        );
        rib.apply_update(1, &v6_update(&["fd00:1::/122"]));
        // Retain IPv4 only: the IPv6 route goes, the IPv4 ones stay, stale, with no change.
        let out = rib.peer_down_graceful(1, &[Family::IPV4_UNICAST]);
        assert_eq!(
            out.changes,
            vec![BestChange {
                prefix: net("fd00:1::/122"),
                best: None
            }]
        );
        assert_eq!(rib.stale_count(1), 2);
        assert_eq!(rib.peer_counts(1), (2, 2, 0));
        let best = rib.best(&net("10.1.0.0/26")).unwrap();
        assert!(best.stale);
        assert!(rib.loc_rib().all(|(_, b)| b.stale));
        // Updates from a peer that is down are ignored.
        let (out, _) = rib.apply_update(1, &announce(&["10.1.1.0/26"], [10, 0, 0, 2], &[]));
        assert!(out.changes.is_empty());
        // Back up: a re-announcement clears the mark (same attributes: no change), and a
        // sweep removes only what is still stale.
        rib.peer_up(1, Ipv4Addr::new(10, 0, 0, 2), v4());
        let (out, _) = rib.apply_update(1, &announce(&["10.1.0.0/26"], [10, 0, 0, 2], &[]));
        assert!(out.changes.is_empty(), "{:?}", out.changes);
        assert!(!rib.best(&net("10.1.0.0/26")).unwrap().stale);
        assert_eq!(rib.stale_count(1), 1);
        let out = rib.sweep_stale(1, &[Family::IPV4_UNICAST]);
        assert_eq!(
            out.changes,
            vec![BestChange {
                prefix: net("10.1.0.64/26"),
                best: None
            }]
        );
        assert_eq!(rib.stale_count(1), 0);
        assert_eq!(rib.peer_counts(1), (1, 1, 0));
    }

    #[test]
    fn stale_route_stays_best_until_swept_then_the_alternative_wins() {
        let mut rib = rib_with(&[(1, peer([10, 0, 0, 2], AS)), (2, peer([10, 0, 0, 3], AS))]);
        let p = net("10.2.0.0/26");
        // Peer 1 wins on router ID; peer 2 has the same prefix.
        rib.apply_update(1, &announce(&["10.2.0.0/26"], [10, 0, 0, 2], &[]));
        rib.apply_update(2, &announce(&["10.2.0.0/26"], [10, 0, 0, 3], &[]));
        assert_eq!(rib.best(&p).unwrap().peer, 1);
        let out = rib.peer_down_graceful(1, &[Family::IPV4_UNICAST]);
        assert!(out.changes.is_empty());
        assert_eq!(
            rib.best(&p).unwrap().peer,
            1,
            "the stale route is still best"
        );
        // A withdrawal of a stale route by the peer after it is back removes it.
        rib.peer_up(1, Ipv4Addr::new(10, 0, 0, 2), v4());
        let out = rib.sweep_stale(1, &[Family::IPV4_UNICAST]);
        assert_eq!(out.changes.len(), 1);
        assert_eq!(out.changes[0].best.as_ref().unwrap().peer, 2);
        // A full peer_down clears stale state too.
        rib.apply_update(1, &announce(&["10.2.0.0/26"], [10, 0, 0, 2], &[]));
        rib.peer_down_graceful(1, &[Family::IPV4_UNICAST]);
        let out = rib.peer_down(1);
        assert_eq!(out.changes[0].best.as_ref().unwrap().peer, 2);
        assert_eq!(rib.stale_count(1), 0);
    }

    fn client(last: u8) -> RibPeer {
        let mut p = peer([10, 0, 0, last], AS);
        p.rr_client = true;
        p
    }

    /// Every prefix `e` announces, sorted.
    fn announced(e: &Export) -> Vec<IpNet> {
        let mut v: Vec<IpNet> = e.announce.iter().flat_map(|(_, p)| p.clone()).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn rr_clients_share_one_group_and_never_get_their_own_routes() {
        let ids: Vec<PeerId> = (1..=4).collect();
        let peers: Vec<(PeerId, RibPeer)> = ids.iter().map(|&i| (i, client(i as u8 + 1))).collect();
        let mut rib = rib_with(&peers);
        assert_eq!(rib.group_count(), 1);
        // All four UPDATEs imported, then exported once.
        let mut pending = Pending::default();
        for &i in &ids {
            let prefix = format!("10.{i}.0.0/26");
            rib.import_update(
                i,
                &announce(&[prefix.as_str()], [10, 0, 0, i as u8 + 1], &[]),
                &mut pending,
            );
        }
        let out = rib.finish(pending);
        assert_eq!(out.exports.len(), 1, "one group, one export");
        assert_eq!(out.exports[0].segments.len(), 4, "one segment per source");
        for &i in &ids {
            let e = out.export_for(i).unwrap();
            let others: Vec<IpNet> = ids
                .iter()
                .filter(|&&j| j != i)
                .map(|j| net(&format!("10.{j}.0.0/26")))
                .collect();
            assert_eq!(announced(&e), others, "peer {i}");
            assert!(e.withdraw.is_empty());
            for (attrs, prefixes) in &e.announce {
                let j = prefixes[0]
                    .addr()
                    .to_string()
                    .split('.')
                    .nth(1)
                    .unwrap()
                    .parse::<u8>();
                let src = Ipv4Addr::new(10, 0, 0, j.unwrap() + 1);
                assert_eq!(attrs.path.originator_id, Some(src));
                assert_eq!(attrs.path.cluster_list, vec![Ipv4Addr::new(10, 0, 0, 1)]);
                assert_eq!(attrs.path.next_hop, Some(src), "iBGP keeps the next hop");
            }
            assert_eq!(rib.peer_counts(i), (1, 1, 3));
        }
        // ROUTE-REFRESH answers with the member's view too.
        assert_eq!(
            announced(&rib.refresh(2, Family::IPV4_UNICAST)),
            vec![net("10.1.0.0/26"), net("10.3.0.0/26"), net("10.4.0.0/26")]
        );
        assert!(rib.refresh(2, Family::IPV6_UNICAST).is_empty());
    }

    #[test]
    fn best_path_moving_to_a_member_withdraws_what_it_had_received() {
        let peers: Vec<(PeerId, RibPeer)> = (1..=3).map(|i| (i, client(i as u8 + 1))).collect();
        let mut rib = rib_with(&peers);
        let p = net("10.9.0.0/26");
        rib.apply_update(1, &announce(&["10.9.0.0/26"], [10, 0, 0, 2], &[]));
        assert_eq!(rib.peer_counts(2).2, 1);
        // Peer 2's path wins (higher LOCAL_PREF): 2 loses what it had from 1, 1 and 3 get 2's.
        let mut u = announce(&["10.9.0.0/26"], [10, 0, 0, 3], &[]);
        u.attrs.local_pref = Some(200);
        let (out, _) = rib.apply_update(2, &u);
        let to2 = out.export_for(2).unwrap();
        assert_eq!(to2.withdraw, vec![p]);
        assert!(to2.announce.is_empty());
        for i in [1, 3] {
            let e = out.export_for(i).unwrap();
            assert_eq!(announced(&e), vec![p]);
            assert_eq!(
                e.announce[0].0.path.originator_id,
                Some(Ipv4Addr::new(10, 0, 0, 3))
            );
        }
        assert_eq!(
            (0..3).map(|i| rib.peer_counts(i + 1).2).collect::<Vec<_>>(),
            vec![1, 0, 1]
        );
        // Peer 2 withdraws: back to 1's path; 1 loses 2's, 2 and 3 get 1's.
        let (out, _) = rib.apply_update(
            2,
            &Update {
                withdrawn: vec![p],
                ..Default::default()
            },
        );
        assert_eq!(out.export_for(1).unwrap().withdraw, vec![p]);
        assert!(out.export_for(1).unwrap().announce.is_empty());
        for i in [2, 3] {
            let e = out.export_for(i).unwrap();
            assert_eq!(announced(&e), vec![p], "peer {i}");
            assert!(e.withdraw.is_empty());
        }
        // Peer 1 withdraws too: 2 and 3 lose it, 1 (which had nothing) is sent nothing.
        let (out, _) = rib.apply_update(
            1,
            &Update {
                withdrawn: vec![p],
                ..Default::default()
            },
        );
        assert_eq!(out.peers_sent_to(), vec![2, 3]);
        assert_eq!(out.export_for(3).unwrap().withdraw, vec![p]);
        assert_eq!(
            (1..=3).map(|i| rib.peer_counts(i).2).collect::<Vec<_>>(),
            vec![0, 0, 0]
        );
    }

    #[test]
    fn late_joiner_gets_the_table_without_its_own_stale_routes() {
        let peers: Vec<(PeerId, RibPeer)> = (1..=2).map(|i| (i, client(i as u8 + 1))).collect();
        let mut rib = rib_with(&peers);
        rib.apply_update(1, &announce(&["10.1.0.0/26"], [10, 0, 0, 2], &[]));
        rib.apply_update(2, &announce(&["10.2.0.0/26"], [10, 0, 0, 3], &[]));
        rib.originate(net("10.0.0.0/26"), None, PathAttrs::default());
        // A third client joins the existing group: the whole table.
        rib.add_peer(3, client(4));
        let e = rib.peer_up(3, Ipv4Addr::new(10, 0, 0, 4), v4());
        assert_eq!(rib.group_count(), 1);
        assert_eq!(rib.group_of(3), rib.group_of(1));
        assert_eq!(
            announced(&e),
            vec![net("10.0.0.0/26"), net("10.1.0.0/26"), net("10.2.0.0/26")]
        );
        assert_eq!(rib.peer_counts(3).2, 3);
        // Peer 1 restarts gracefully: its route stays (stale, best); when it is back, its
        // table leaves its own route out.
        rib.peer_down_graceful(1, &[Family::IPV4_UNICAST]);
        assert_eq!(rib.group_of(1), None);
        let e = rib.peer_up(1, Ipv4Addr::new(10, 0, 0, 2), v4());
        assert_eq!(announced(&e), vec![net("10.0.0.0/26"), net("10.2.0.0/26")]);
        assert_eq!(rib.peer_counts(1).2, 2);
        // The last member leaving drops the group; the next one recomputes it.
        for i in 1..=3 {
            rib.peer_down(i);
        }
        assert_eq!(rib.group_count(), 0);
        let e = rib.peer_up(3, Ipv4Addr::new(10, 0, 0, 4), v4());
        assert_eq!(announced(&e), vec![net("10.0.0.0/26")]);
    }

    #[test]
    fn removed_peer_routes_are_withdrawn_from_the_others() {
        let peers: Vec<(PeerId, RibPeer)> = (1..=3).map(|i| (i, client(i as u8 + 1))).collect();
        let mut rib = rib_with(&peers);
        for i in 1..=3u32 {
            let prefix = format!("10.{i}.0.0/26");
            rib.apply_update(
                i,
                &announce(&[prefix.as_str()], [10, 0, 0, i as u8 + 1], &[]),
            );
        }
        assert_eq!(rib.peer_counts(2).2, 2);
        let out = rib.remove_peer(1);
        assert_eq!(out.peers_sent_to(), vec![2, 3]);
        for i in [2, 3] {
            assert_eq!(
                out.export_for(i).unwrap().withdraw,
                vec![net("10.1.0.0/26")]
            );
            assert_eq!(rib.peer_counts(i).2, 1);
        }
        assert_eq!(rib.peer_counts(1), (0, 0, 0));
    }

    #[test]
    fn peers_with_different_policies_get_different_groups() {
        let mut nhs = peer([10, 0, 0, 5], AS);
        nhs.next_hop_self = true;
        let peers = vec![
            (1, client(2)),
            (2, client(3)),
            (3, peer([10, 0, 0, 4], AS)),
            (4, nhs),
            (5, peer([192, 0, 2, 1], 65001)),
            (6, peer([192, 0, 2, 2], 65002)),
        ];
        let mut rib = rib_with(&peers);
        // Clients together; the non-client, the next-hop-self peer and each eBGP AS apart.
        assert_eq!(rib.group_count(), 5);
        assert_eq!(rib.group_of(1), rib.group_of(2));
        let (out, _) = rib.apply_update(3, &announce(&["10.3.0.0/26"], [10, 0, 0, 4], &[]));
        // A non-client's route goes to the clients and the eBGP peers, not to iBGP
        // non-clients.
        assert_eq!(out.peers_sent_to(), vec![1, 2, 5, 6]);
        let (out, _) = rib.apply_update(1, &announce(&["10.1.0.0/26"], [10, 0, 0, 2], &[]));
        assert_eq!(out.peers_sent_to(), vec![2, 3, 4, 5, 6]);
        let e = out.export_for(4).unwrap();
        assert_eq!(
            e.announce[0].0.path.next_hop,
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
        let e = out.export_for(3).unwrap();
        assert_eq!(
            e.announce[0].0.path.next_hop,
            Some(Ipv4Addr::new(10, 0, 0, 2))
        );
        let e = out.export_for(6).unwrap();
        assert_eq!(
            e.announce[0].0.path.as_path,
            Some(AsPath::from_sequence(vec![AS]))
        );
    }

    #[test]
    fn refused_then_accepted_then_withdrawn_keeps_the_counts() {
        let mut rib = rib_with(&[(1, client(2)), (2, client(3))]);
        let mut looped = announce(&["10.1.0.0/26", "10.1.0.64/26"], [10, 0, 0, 2], &[]);
        looped.attrs.cluster_list = vec![Ipv4Addr::new(10, 0, 0, 1)];
        let (_, stats) = rib.apply_update(1, &looped);
        assert_eq!(stats.rejected, 2);
        assert_eq!(rib.peer_counts(1), (2, 0, 0));
        rib.apply_update(1, &announce(&["10.1.0.0/26"], [10, 0, 0, 2], &[]));
        assert_eq!(rib.peer_counts(1), (2, 1, 0));
        assert_eq!(rib.peer_counts(2), (0, 0, 1));
        // Refusing an accepted route removes it.
        let mut looped = announce(&["10.1.0.0/26"], [10, 0, 0, 2], &[]);
        looped.attrs.originator_id = Some(Ipv4Addr::new(10, 0, 0, 1));
        let (out, _) = rib.apply_update(1, &looped);
        assert_eq!(out.changes[0].best, None);
        assert_eq!(rib.peer_counts(1), (2, 0, 0));
        let (out, _) = rib.apply_update(
            1,
            &Update {
                withdrawn: vec![net("10.1.0.0/26"), net("10.1.0.64/26")],
                ..Default::default()
            },
        );
        assert!(out.changes.is_empty());
        assert_eq!(rib.peer_counts(1), (0, 0, 0));
    }

    mod model {
        //! Random sequences of RIB operations against what a route-reflector client must
        //! end up with: every route whose best path is not its own, reflected with the
        //! originator of that path, whichever update group and batch the messages came in.
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        const PEERS: u32 = 4;

        #[derive(Clone, Debug)]
        enum Op {
            Announce {
                peer: u32,
                prefix: u8,
                high_pref: bool,
            },
            Refused {
                peer: u32,
                prefix: u8,
            },
            Withdraw {
                peer: u32,
                prefix: u8,
            },
            Originate(u8),
            WithdrawLocal(u8),
            Down(u32),
            GracefulDown(u32),
            Up(u32),
            Sweep(u32),
            /// Export what the imports so far changed.
            Flush,
        }

        fn op() -> impl Strategy<Value = Op> {
            let peer = 1..=PEERS;
            let prefix = 0u8..6;
            prop_oneof![
                6 => (peer.clone(), prefix.clone(), any::<bool>())
                    .prop_map(|(peer, prefix, high_pref)| Op::Announce { peer, prefix, high_pref }),
                1 => (peer.clone(), prefix.clone()).prop_map(|(peer, prefix)| Op::Refused { peer, prefix }),
                3 => (peer.clone(), prefix.clone()).prop_map(|(peer, prefix)| Op::Withdraw { peer, prefix }),
                1 => prefix.clone().prop_map(Op::Originate),
                1 => prefix.prop_map(Op::WithdrawLocal),
                1 => peer.clone().prop_map(Op::Down),
                1 => peer.clone().prop_map(Op::GracefulDown),
                2 => peer.clone().prop_map(Op::Up),
                1 => peer.prop_map(Op::Sweep),
                2 => Just(Op::Flush),
            ]
        }

        fn pfx(i: u8) -> IpNet {
            net(&format!("10.7.{i}.0/26"))
        }

        fn rid(peer: u32) -> Ipv4Addr {
            Ipv4Addr::new(10, 0, 0, peer as u8 + 1)
        }

        /// What each up client was sent: prefix -> ORIGINATOR_ID.
        type Sent = BTreeMap<PeerId, BTreeMap<IpNet, Option<Ipv4Addr>>>;

        fn apply(sent: &mut Sent, out: &RibOutput) {
            for (m, table) in sent.iter_mut() {
                if let Some(e) = out.export_for(*m) {
                    for w in &e.withdraw {
                        assert!(
                            table.remove(w).is_some(),
                            "peer {m}: withdrawal of {w} it never had"
                        );
                    }
                    for (a, ps) in &e.announce {
                        for p in ps {
                            table.insert(*p, a.path.originator_id);
                        }
                    }
                }
            }
        }

        fn dump(e: &Export) -> BTreeMap<IpNet, Option<Ipv4Addr>> {
            assert!(e.withdraw.is_empty());
            e.announce
                .iter()
                .flat_map(|(a, ps)| ps.iter().map(|p| (*p, a.path.originator_id)))
                .collect()
        }

        fn check(rib: &Rib, sent: &Sent) {
            for (&m, table) in sent {
                let want: BTreeMap<IpNet, Option<Ipv4Addr>> = rib
                    .loc
                    .iter()
                    .filter(|(_, paths)| paths.best().peer != m)
                    .map(|(p, paths)| {
                        let b = paths.best();
                        (p, (b.peer != LOCAL).then(|| rid(b.peer)))
                    })
                    .collect();
                assert_eq!(table, &want, "what peer {m} was sent");
                assert_eq!(rib.peer_counts(m).2, table.len(), "peer {m} advertised");
                assert_eq!(dump(&rib.refresh(m, Family::IPV4_UNICAST)), want);
            }
            for id in 1..=PEERS {
                let paths: Vec<&Candidate> = rib
                    .loc
                    .iter()
                    .flat_map(|(_, p)| p.as_slice().iter())
                    .filter(|c| c.peer == id)
                    .collect();
                let p = &rib.peers[&id];
                assert_eq!(p.accepted, paths.len(), "peer {id} accepted");
                assert_eq!(
                    p.stale,
                    paths.iter().filter(|c| c.stale).count(),
                    "peer {id} stale"
                );
                if p.up {
                    assert!(sent.contains_key(&id));
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
            #[test]
            fn clients_are_sent_every_best_route_but_their_own(ops in proptest::collection::vec(op(), 1..60)) {
                let mut rib = Rib::new(AS, Ipv4Addr::new(10, 0, 0, 1), None);
                let mut sent: Sent = BTreeMap::new();
                for id in 1..=PEERS {
                    rib.add_peer(id, client(id as u8 + 1));
                }
                let mut pending = Pending::default();
                for op in ops {
                    // Anything but an import exports what is pending first, as the speaker does.
                    if !matches!(op, Op::Announce { .. } | Op::Refused { .. } | Op::Withdraw { .. }) {
                        let out = rib.finish(std::mem::take(&mut pending));
                        apply(&mut sent, &out);
                    }
                    match op {
                        Op::Announce { peer, prefix, high_pref } => {
                            let mut u = announce(&[&pfx(prefix).to_string()], [10, 0, 0, peer as u8 + 1], &[]);
                            u.attrs.local_pref = Some(if high_pref { 200 } else { 100 });
                            rib.import_update(peer, &u, &mut pending);
                        }
                        Op::Refused { peer, prefix } => {
                            let mut u = announce(&[&pfx(prefix).to_string()], [10, 0, 0, peer as u8 + 1], &[]);
                            u.attrs.originator_id = Some(Ipv4Addr::new(10, 0, 0, 1));
                            rib.import_update(peer, &u, &mut pending);
                        }
                        Op::Withdraw { peer, prefix } => {
                            let u = Update { withdrawn: vec![pfx(prefix)], ..Default::default() };
                            rib.import_update(peer, &u, &mut pending);
                        }
                        Op::Originate(i) => apply(&mut sent, &rib.originate(pfx(i), None, PathAttrs::default())),
                        Op::WithdrawLocal(i) => apply(&mut sent, &rib.withdraw_local(pfx(i))),
                        Op::Down(id) => {
                            sent.remove(&id);
                            let out = rib.peer_down(id);
                            apply(&mut sent, &out);
                        }
                        Op::GracefulDown(id) => {
                            sent.remove(&id);
                            let out = rib.peer_down_graceful(id, &[Family::IPV4_UNICAST]);
                            apply(&mut sent, &out);
                        }
                        Op::Up(id) => {
                            if let std::collections::btree_map::Entry::Vacant(v) = sent.entry(id) {
                                v.insert(dump(&rib.peer_up(id, rid(id), v4())));
                            }
                        }
                        Op::Sweep(id) => {
                            let out = rib.sweep_stale(id, &[Family::IPV4_UNICAST]);
                            apply(&mut sent, &out);
                        }
                        Op::Flush => {}
                    }
                    if pending.is_empty() {
                        check(&rib, &sent);
                    }
                }
                let out = rib.finish(pending);
                apply(&mut sent, &out);
                check(&rib, &sent);
            }
        }
    }

    #[test]
    fn resync_resends_the_full_table() {
        let mut rib = rib_with(&[(1, peer([10, 0, 0, 2], AS))]);
        rib.originate(net("10.3.0.0/26"), None, PathAttrs::default());
        assert_eq!(rib.peer_counts(1).2, 1);
        let e = rib.resync(1);
        assert_eq!(e.prefix_count(), 1);
        assert_eq!(e.announce[0].1, vec![net("10.3.0.0/26")]);
    }

    #[test]
    fn ipv6_routes_from_mp_reach() {
        let mut rib = rib_with(&[(1, peer([10, 0, 0, 2], AS))]);
        let nh: Ipv6Addr = "fd00::2".parse().unwrap();
        let u = Update {
            attrs: PathAttrs {
                origin: Some(Origin::Igp),
                as_path: Some(AsPath::default()),
                ..Default::default()
            },
            mp_reach: Some(MpReach {
                family: Family::IPV6_UNICAST,
                next_hop: NextHop::new(IpAddr::V6(nh)),
                nlri: vec![net("fd00:10::/122")],
            }),
            ..Default::default()
        };
        let (out, _) = rib.apply_update(1, &u);
        assert_eq!(
            out.changes[0].best.as_ref().unwrap().next_hop,
            IpAddr::V6(nh)
        );
    }

    // ---- route policy (crate::policy) ----

    /// Calico's export rules for a node holding 172.16.196.128/26 in pool 172.16.0.0/16.
    fn calico_rules() -> ExportRules {
        ExportRules {
            deny: vec![net("10.50.0.0/16")],
            aggregates: vec![net("172.16.196.128/26")],
            allow: vec![net("172.16.0.0/16")],
            communities: vec![],
        }
    }

    /// The transit bug: routes from one eBGP ToR must not reach the other ToR nor the mesh.
    #[test]
    fn export_rules_stop_transit_between_tors() {
        let mut rib = rib_with(&[
            (1, peer([192, 0, 2, 1], 65010)), // ToR-A
            (2, peer([192, 0, 2, 2], 65020)), // ToR-B
            (3, peer([10, 0, 0, 2], AS)),     // mesh node
        ]);
        rib.set_export_rules(Some(calico_rules()));
        let (out, _) = rib.apply_update(
            1,
            &announce(&["0.0.0.0/0", "198.51.100.0/24"], [192, 0, 2, 1], &[65010]),
        );
        // Learned and best (imports stay "import all")...
        assert_eq!(out.changes.len(), 2);
        // ...but sent to nobody.
        assert!(out.exports.is_empty(), "{:?}", out.exports);
        let out = rib.originate(net("172.16.196.128/26"), None, PathAttrs::default());
        assert_eq!(out.peers_sent_to(), vec![1, 2, 3]);
        // A pod /32 inside the own block is aggregated away; a disableBGPExport pool is not
        // announced; another node's block inside the pool is (route reflection).
        let out = rib.originate(net("172.16.196.130/32"), None, PathAttrs::default());
        assert!(out.exports.is_empty());
        let out = rib.originate(net("10.50.0.0/26"), None, PathAttrs::default());
        assert!(out.exports.is_empty());
        let (out, _) = rib.apply_update(1, &announce(&["172.16.5.0/26"], [192, 0, 2, 1], &[65010]));
        assert_eq!(out.peers_sent_to(), vec![2, 3]);
        for id in [1, 2, 3] {
            let (_, _, adv) = rib.peer_counts(id);
            assert_eq!(adv, if id == 1 { 1 } else { 2 }, "peer {id}");
        }
    }

    #[test]
    fn changing_export_rules_announces_and_withdraws_the_difference() {
        let mut rib = rib_with(&[
            (1, peer([192, 0, 2, 1], 65010)),
            (2, peer([192, 0, 2, 2], 65020)),
        ]);
        rib.apply_update(1, &announce(&["0.0.0.0/0"], [192, 0, 2, 1], &[65010]));
        rib.originate(net("172.16.196.128/26"), None, PathAttrs::default());
        // Without rules ToR-B has the default route (plain RFC 4271 behaviour).
        assert_eq!(rib.peer_counts(2).2, 2);
        let out = rib.set_export_rules(Some(calico_rules()));
        let e = out.export_for(2).unwrap();
        assert_eq!(e.withdraw, vec![net("0.0.0.0/0")]);
        assert!(e.announce.is_empty());
        assert_eq!(rib.peer_counts(2).2, 1);
        // The same rules again change nothing.
        assert!(
            rib.set_export_rules(Some(calico_rules()))
                .exports
                .is_empty()
        );
        // A new peer joining gets only what the rules allow.
        rib.add_peer(3, peer([10, 0, 0, 3], AS));
        let full = rib.peer_up(3, Ipv4Addr::new(10, 0, 0, 3), v4());
        assert_eq!(announced(&full), vec![net("172.16.196.128/26")]);
        // Dropping the rules gives the default route back.
        let out = rib.set_export_rules(None);
        assert_eq!(
            announced(&out.export_for(2).unwrap()),
            vec![net("0.0.0.0/0")]
        );
    }

    #[test]
    fn export_rules_add_communities() {
        let mut rib = rib_with(&[(1, peer([192, 0, 2, 1], 65010))]);
        let mut rules = calico_rules();
        rules.communities = vec![crate::policy::CommunityRule {
            cidr: net("172.16.196.0/24"),
            communities: vec![
                Community::Standard(0xfc00_0001),
                Community::Large(64512, 7, 9),
            ],
        }];
        rib.set_export_rules(Some(rules));
        let attrs = PathAttrs {
            communities: vec![0xfc00_0001, 5],
            ..Default::default()
        };
        let out = rib.originate(net("172.16.196.128/26"), None, attrs);
        let e = out.export_for(1).unwrap();
        assert_eq!(e.announce[0].0.path.communities, vec![5, 0xfc00_0001]);
        assert_eq!(e.announce[0].0.path.large_communities, vec![(64512, 7, 9)]);
        // Outside the CIDR: none added.
        let (out, _) = rib.apply_update(1, &announce(&["172.16.5.0/26"], [192, 0, 2, 1], &[65010]));
        assert!(out.export_for(1).is_none(), "not sent back to its source");
        rib.add_peer(2, peer([192, 0, 2, 2], 65020));
        let full = rib.peer_up(2, Ipv4Addr::new(192, 0, 2, 2), v4());
        let other = full
            .announce
            .iter()
            .find(|(_, p)| p.contains(&net("172.16.5.0/26")))
            .unwrap();
        assert!(other.0.path.communities.is_empty());
    }

    #[test]
    fn peer_filters_import_and_export() {
        use crate::policy::{FilterRule, MatchOperator};
        let rule = |cidr: &str, op, action| FilterRule {
            cidr: Some(net(cidr)),
            operator: op,
            prefix_length: None,
            only_remote_peers: false,
            action,
        };
        let mut tor = peer([192, 0, 2, 1], 65010);
        tor.import_filter = Some(Arc::new(PrefixFilter {
            v4: vec![rule(
                "0.0.0.0/0",
                MatchOperator::Equal,
                FilterAction::Reject,
            )],
            v6: vec![],
        }));
        let mut tor_b = peer([192, 0, 2, 2], 65020);
        // Export filter accepts 198.51.100.0/24 (beyond the Calico rules) and rejects one block.
        tor_b.export_filter = Some(Arc::new(PrefixFilter {
            v4: vec![
                rule("198.51.100.0/24", MatchOperator::In, FilterAction::Accept),
                rule(
                    "172.16.196.128/26",
                    MatchOperator::Equal,
                    FilterAction::Reject,
                ),
            ],
            v6: vec![],
        }));
        let mut rib = rib_with(&[(1, tor), (2, tor_b), (3, peer([10, 0, 0, 2], AS))]);
        rib.set_export_rules(Some(calico_rules()));
        let (out, stats) = rib.apply_update(
            1,
            &announce(&["0.0.0.0/0", "198.51.100.0/24"], [192, 0, 2, 1], &[65010]),
        );
        assert_eq!(stats.filtered, 1);
        assert_eq!(out.changes.len(), 1, "the default route is not imported");
        assert!(rib.best(&net("0.0.0.0/0")).is_none());
        assert_eq!(rib.peer_counts(1), (2, 1, 0));
        // Only ToR-B's filter lets the external /24 out.
        assert_eq!(out.peers_sent_to(), vec![2]);
        let out = rib.originate(net("172.16.196.128/26"), None, PathAttrs::default());
        assert_eq!(out.peers_sent_to(), vec![1, 3]);
        // Peers with different filters are in different update groups.
        assert_ne!(rib.group_of(1), rib.group_of(2));
    }

    #[test]
    fn per_peer_local_as_allowas_in_and_next_hop_keep() {
        // ToR-A speaks to us as AS 65100 (local-AS override); ToR-B keeps third-party next
        // hops; ToR-C accepts paths carrying our AS once.
        let mut a = peer([192, 0, 2, 1], 65010);
        a.local_as = Some(65100);
        let mut b = peer([192, 0, 2, 2], 65020);
        b.next_hop_keep = true;
        let mut c = peer([192, 0, 2, 3], 65030);
        c.allow_own_as = 1;
        let mut rib = rib_with(&[(1, a), (2, b), (3, c)]);
        // A path with our AS once: a loop for A and B, accepted from C.
        let (_, stats) = rib.apply_update(
            1,
            &announce(&["198.51.100.0/24"], [192, 0, 2, 1], &[65010, AS]),
        );
        assert_eq!(stats.rejected, 1);
        let (_, stats) = rib.apply_update(
            1,
            &announce(&["198.51.100.0/24"], [192, 0, 2, 1], &[65010, 65100]),
        );
        assert_eq!(stats.rejected, 1, "the override AS is ours too");
        let (out, stats) = rib.apply_update(
            3,
            &announce(&["198.51.101.0/24"], [192, 0, 2, 3], &[65030, AS]),
        );
        assert_eq!(stats.rejected, 0);
        // Twice is still a loop.
        let (_, stats) = rib.apply_update(
            3,
            &announce(
                &["198.51.102.0/24"],
                [192, 0, 2, 3],
                &[65030, AS, 65031, AS],
            ),
        );
        assert_eq!(stats.rejected, 1);
        // What C's route looks like at A (override prepended) and at B (next hop kept).
        let at_a = out.export_for(1).unwrap();
        assert_eq!(
            at_a.announce[0].0.path.as_path,
            Some(AsPath::from_sequence(vec![65100, 65030, AS]))
        );
        assert_eq!(
            at_a.announce[0].0.path.next_hop,
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
        let at_b = out.export_for(2).unwrap();
        assert_eq!(
            at_b.announce[0].0.path.next_hop,
            Some(Ipv4Addr::new(192, 0, 2, 3))
        );
        // Our own routes carry our next hop even to B.
        let out = rib.originate(net("172.16.0.0/26"), None, PathAttrs::default());
        assert_eq!(
            out.export_for(2).unwrap().announce[0].0.path.next_hop,
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
        // A local-AS override equal to the peer's AS makes the session iBGP.
        let mut d = peer([10, 0, 0, 9], 65100);
        d.local_as = Some(65100);
        rib.add_peer(4, d);
        rib.peer_up(4, Ipv4Addr::new(10, 0, 0, 9), v4());
        let out = rib.originate(net("172.16.0.64/26"), None, PathAttrs::default());
        let at_d = out.export_for(4).unwrap();
        assert_eq!(at_d.announce[0].0.path.local_pref, Some(DEFAULT_LOCAL_PREF));
        assert_eq!(at_d.announce[0].0.path.as_path, Some(AsPath::default()));
    }
}

//! Update groups: peers with the same export policy share one Adj-RIB-Out and one export
//! computation, and the speaker encodes one UPDATE stream for all of them (the idea behind
//! FRR's update groups, GoBGP's peer groups and BIRD's per-channel buckets).
//!
//! The one rule that is not a property of the policy is "never send a route back to the peer
//! it was learned from" (BIRD's `bgp_preexport` rejects a route whose source is the target
//! peer; RFC 4456 route reflection needs it as much as plain iBGP). The group therefore keeps,
//! per prefix, the attributes *and* the source peer, and a member's Adj-RIB-Out is defined as
//!
//! > the group's entries whose source is not that member.
//!
//! Every message the group sends is tagged with the source it must not go to (a
//! [`Segment`]'s `exclude`); a member whose own route becomes the best of a prefix it had
//! received from someone else gets a withdrawal of its own ([`GroupExport::member_withdraw`]).
//! With these two, what each member actually received always equals that definition, so
//! per-member counts are `group size - routes sourced by the member`.

use super::prefix_map::PrefixMap;
use super::{Export, PeerId};
use crate::attrset::{AttrSet, RouteAttrs};
use crate::policy::PrefixFilter;
use crate::wire::Family;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

/// An update group's index in the RIB.
pub type GroupId = u32;

/// Everything about a target peer that the export rules look at: peers with equal policies
/// get equal exports (apart from their own routes). Encoding differences (4-octet AS) are the
/// speaker's business: it encodes once per distinct codec among a group's members.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ExportPolicy {
    pub remote_as: u32,
    pub ibgp: bool,
    pub rr_client: bool,
    pub next_hop_self: bool,
    pub local_addr: IpAddr,
    pub local_v6_next_hop: Option<Ipv6Addr>,
    pub families: Vec<Family>,
    /// The peer's own export rules (shared: peers with the same filter list stay together).
    pub export_filter: Option<Arc<PrefixFilter>>,
    /// Our AS on the session when it is not the speaker's.
    pub local_as: Option<u32>,
    /// Third-party next hop towards eBGP peers.
    pub next_hop_keep: bool,
}

/// One entry of a group's Adj-RIB-Out.
#[derive(Clone, Debug)]
pub(crate) struct OutRoute {
    pub attrs: AttrSet,
    /// The peer the route was learned from ([`super::LOCAL`] for our own): the one member
    /// that does not have this entry.
    pub source: PeerId,
}

#[derive(Debug)]
pub(crate) struct UpdateGroup {
    pub policy: ExportPolicy,
    /// Established peers in the group.
    pub members: BTreeSet<PeerId>,
    /// The shared Adj-RIB-Out.
    pub out: PrefixMap<OutRoute>,
    /// How many entries of `out` each source has.
    by_source: HashMap<PeerId, usize>,
}

/// What one group sends for one RIB operation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupExport {
    pub group: GroupId,
    /// The members, sorted: each gets every segment except the one excluding it, then its
    /// entry of `member_withdraw`.
    pub members: Vec<PeerId>,
    /// Sorted by `exclude`, at most one per value.
    pub segments: Vec<Segment>,
    /// Withdrawals for single members, sorted by peer: the member's own route became the
    /// best, so what it had received for the prefix must go.
    pub member_withdraw: Vec<(PeerId, Vec<IpNet>)>,
}

/// Messages for every member of a group except `exclude` (the source of these routes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub exclude: PeerId,
    pub withdraw: Vec<IpNet>,
    /// Announcements grouped by shared attributes, each group of one family.
    pub announce: Vec<(AttrSet, Vec<IpNet>)>,
}

impl GroupExport {
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty() && self.member_withdraw.is_empty()
    }

    /// What `member` receives, as one per-peer export.
    pub fn for_member(&self, member: PeerId) -> Export {
        let mut e = Export::default();
        if !self.members.contains(&member) {
            return e;
        }
        for s in self.segments.iter().filter(|s| s.exclude != member) {
            e.withdraw.extend_from_slice(&s.withdraw);
            e.announce.extend(s.announce.iter().cloned());
        }
        if let Ok(i) = self.member_withdraw.binary_search_by_key(&member, |m| m.0) {
            e.withdraw.extend_from_slice(&self.member_withdraw[i].1);
        }
        e
    }
}

/// Collects one group's messages while its Adj-RIB-Out is brought in line.
#[derive(Default)]
pub(crate) struct GroupExportBuilder {
    segments: BTreeMap<PeerId, SegmentBuilder>,
    member_withdraw: BTreeMap<PeerId, Vec<IpNet>>,
}

#[derive(Default)]
struct SegmentBuilder {
    withdraw: Vec<IpNet>,
    announce: HashMap<(*const RouteAttrs, Family), (AttrSet, Vec<IpNet>)>,
}

impl GroupExportBuilder {
    pub fn build(self, group: GroupId, members: &BTreeSet<PeerId>) -> GroupExport {
        let segments = self
            .segments
            .into_iter()
            .map(|(exclude, s)| {
                let mut announce: Vec<(AttrSet, Vec<IpNet>)> = s.announce.into_values().collect();
                announce.sort_by(|a, b| a.1.first().cmp(&b.1.first()));
                Segment {
                    exclude,
                    withdraw: s.withdraw,
                    announce,
                }
            })
            .collect();
        GroupExport {
            group,
            members: members.iter().copied().collect(),
            segments,
            member_withdraw: self.member_withdraw.into_iter().collect(),
        }
    }
}

impl UpdateGroup {
    pub fn new(policy: ExportPolicy) -> UpdateGroup {
        UpdateGroup {
            policy,
            members: BTreeSet::new(),
            out: PrefixMap::default(),
            by_source: HashMap::new(),
        }
    }

    /// How many prefixes `member` has been sent (its Adj-RIB-Out size).
    pub fn advertised_to(&self, member: PeerId) -> usize {
        self.out.len() - self.by_source.get(&member).copied().unwrap_or(0)
    }

    /// Set the group's entry for `prefix` to `desired` (attributes and source), recording
    /// what the members must be sent.
    pub fn set(
        &mut self,
        prefix: IpNet,
        desired: Option<(AttrSet, PeerId)>,
        msgs: &mut GroupExportBuilder,
    ) {
        let old = self.out.get(&prefix);
        match (desired, old) {
            (None, None) => {}
            (Some((a, s)), Some(o)) if o.source == s && Arc::ptr_eq(&o.attrs, &a) => {}
            (None, Some(_)) => {
                if let Some(o) = self.out.remove(&prefix) {
                    self.uncount(o.source);
                    // The source never had it: everyone else gets the withdrawal.
                    msgs.segments
                        .entry(o.source)
                        .or_default()
                        .withdraw
                        .push(prefix);
                }
            }
            (Some((attrs, source)), _) => {
                let family = Family::of(&prefix);
                let key = (Arc::as_ptr(&attrs), family);
                msgs.segments
                    .entry(source)
                    .or_default()
                    .announce
                    .entry(key)
                    .or_insert_with(|| (attrs.clone(), Vec::new()))
                    .1
                    .push(prefix);
                *self.by_source.entry(source).or_insert(0) += 1;
                if let Some(o) = self.out.insert(prefix, OutRoute { attrs, source }) {
                    self.uncount(o.source);
                    if o.source != source && self.members.contains(&source) {
                        // The new source had received the old route: take it back.
                        msgs.member_withdraw.entry(source).or_default().push(prefix);
                    }
                }
            }
        }
    }

    fn uncount(&mut self, source: PeerId) {
        if let Some(n) = self.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&source);
            }
        }
    }

    /// `member`'s whole Adj-RIB-Out (of `family`, or of every family), for an initial
    /// advertisement or a ROUTE-REFRESH.
    pub fn dump(&self, member: PeerId, family: Option<Family>) -> Export {
        let mut groups: HashMap<(*const RouteAttrs, Family), (AttrSet, Vec<IpNet>)> =
            HashMap::new();
        for (prefix, o) in self.out.iter() {
            let f = Family::of(&prefix);
            if o.source == member || family.is_some_and(|want| want != f) {
                continue;
            }
            groups
                .entry((Arc::as_ptr(&o.attrs), f))
                .or_insert_with(|| (o.attrs.clone(), Vec::new()))
                .1
                .push(prefix);
        }
        let mut announce: Vec<(AttrSet, Vec<IpNet>)> = groups
            .into_values()
            .map(|(a, mut p)| {
                p.sort_unstable();
                (a, p)
            })
            .collect();
        announce.sort_by(|a, b| a.1.first().cmp(&b.1.first()));
        Export {
            announce,
            withdraw: Vec::new(),
        }
    }
}

//! Path attributes (RFC 4271 §4.3, §5) with RFC 6793 (AS4_PATH, AS4_AGGREGATOR), RFC 1997
//! (COMMUNITIES), RFC 4456 (ORIGINATOR_ID, CLUSTER_LIST), RFC 8092 (LARGE_COMMUNITIES) and
//! RFC 4760 (MP_REACH_NLRI, MP_UNREACH_NLRI, decoded in `update.rs`).
//!
//! Every attribute is framed as:
//!
//! ```text
//!  0                   1
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |O|T|P|E|  0    | Attr. Type Code|
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | Length (1 octet, or 2 if E)   |  value ...
//! ```
//! O = optional, T = transitive, P = partial, E = extended length.
//!
//! Decoding never fails on a bad attribute value: RFC 7606 §7 assigns each attribute an action
//! (treat-as-withdraw or attribute discard), which is recorded as an [`AttrError`]. Only errors
//! that make the rest of the message unreadable end the session (handled by the caller).

use super::CodecContext;
use super::open::AS_TRANS;
use bytes::{BufMut, Bytes, BytesMut};
use std::net::Ipv4Addr;

pub(crate) mod flag {
    pub const OPTIONAL: u8 = 0x80;
    pub const TRANSITIVE: u8 = 0x40;
    pub const PARTIAL: u8 = 0x20;
    pub const EXTENDED: u8 = 0x10;
}

pub(crate) mod attr_code {
    pub const ORIGIN: u8 = 1;
    pub const AS_PATH: u8 = 2;
    pub const NEXT_HOP: u8 = 3;
    pub const MED: u8 = 4;
    pub const LOCAL_PREF: u8 = 5;
    pub const ATOMIC_AGGREGATE: u8 = 6;
    pub const AGGREGATOR: u8 = 7;
    pub const COMMUNITIES: u8 = 8;
    pub const ORIGINATOR_ID: u8 = 9;
    pub const CLUSTER_LIST: u8 = 10;
    pub const MP_REACH_NLRI: u8 = 14;
    pub const MP_UNREACH_NLRI: u8 = 15;
    pub const AS4_PATH: u8 = 17;
    pub const AS4_AGGREGATOR: u8 = 18;
    pub const LARGE_COMMUNITIES: u8 = 32;
}
use attr_code as ac;

/// ORIGIN (type 1): IGP, EGP or INCOMPLETE. Lower is preferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Origin {
    #[default]
    Igp = 0,
    Egp = 1,
    Incomplete = 2,
}

/// AS_PATH (type 2) held with 4-octet AS numbers whatever the peer speaks.
///
/// ```text
/// segment: | type (1: AS_SET, 2: AS_SEQUENCE, 3: CONFED_SEQUENCE, 4: CONFED_SET) |
///          | count of ASes (1) | ASes (2 or 4 octets each) |
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AsPath {
    pub segments: Vec<AsSegment>,
}

/// One AS_PATH segment.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AsSegment {
    Set(Vec<u32>),
    Sequence(Vec<u32>),
    ConfedSequence(Vec<u32>),
    ConfedSet(Vec<u32>),
}

impl AsSegment {
    fn kind(&self) -> u8 {
        match self {
            AsSegment::Set(_) => 1,
            AsSegment::Sequence(_) => 2,
            AsSegment::ConfedSequence(_) => 3,
            AsSegment::ConfedSet(_) => 4,
        }
    }

    pub fn asns(&self) -> &[u32] {
        match self {
            AsSegment::Set(v)
            | AsSegment::Sequence(v)
            | AsSegment::ConfedSequence(v)
            | AsSegment::ConfedSet(v) => v,
        }
    }

    /// Length for path selection (RFC 4271 §9.1.2.2: a set counts 1; RFC 5065: confederation
    /// segments count 0).
    fn path_len(&self) -> usize {
        match self {
            AsSegment::Sequence(v) => v.len(),
            AsSegment::Set(_) => 1,
            _ => 0,
        }
    }
}

impl AsPath {
    pub fn from_sequence(asns: impl Into<Vec<u32>>) -> Self {
        let asns = asns.into();
        if asns.is_empty() {
            return AsPath::default();
        }
        AsPath {
            segments: vec![AsSegment::Sequence(asns)],
        }
    }

    /// Length used by the decision process.
    pub fn path_len(&self) -> usize {
        self.segments.iter().map(AsSegment::path_len).sum()
    }

    /// The leftmost AS of the first AS_SEQUENCE, i.e. the neighbour AS (RFC 4271 §9.1.2.2 c).
    pub fn first_as(&self) -> Option<u32> {
        match self.segments.first() {
            Some(AsSegment::Sequence(v)) => v.first().copied(),
            _ => None,
        }
    }

    pub fn contains(&self, asn: u32) -> bool {
        self.segments.iter().any(|s| s.asns().contains(&asn))
    }

    /// How many times `asn` occurs (for allowas-in: a path may carry our AS a configured
    /// number of times).
    pub fn count(&self, asn: u32) -> usize {
        self.segments
            .iter()
            .map(|s| s.asns().iter().filter(|a| **a == asn).count())
            .sum()
    }

    /// Prepend `asn` (RFC 4271 §5.1.2, eBGP export).
    pub fn prepend(&mut self, asn: u32) {
        match self.segments.first_mut() {
            Some(AsSegment::Sequence(v)) if v.len() < 255 => v.insert(0, asn),
            _ => self.segments.insert(0, AsSegment::Sequence(vec![asn])),
        }
    }

    fn needs_as4(&self) -> bool {
        self.segments
            .iter()
            .any(|s| s.asns().iter().any(|&a| a > u16::MAX as u32))
    }

    fn encode(&self, four_octet: bool, out: &mut BytesMut) {
        for seg in &self.segments {
            // A segment holds at most 255 ASes; longer ones are split.
            for chunk in seg.asns().chunks(255) {
                out.put_u8(seg.kind());
                out.put_u8(chunk.len() as u8);
                for &a in chunk {
                    if four_octet {
                        out.put_u32(a);
                    } else {
                        out.put_u16(u16::try_from(a).unwrap_or(AS_TRANS));
                    }
                }
            }
        }
    }

    /// Structural decode; `None` when malformed (RFC 7606 §7.2).
    fn decode(mut buf: &[u8], as_len: usize) -> Option<AsPath> {
        let mut segments = Vec::new();
        while !buf.is_empty() {
            if buf.len() < 2 {
                return None;
            }
            let kind = buf[0];
            let count = buf[1] as usize;
            let n = count * as_len;
            if count == 0 || buf.len() < 2 + n {
                return None;
            }
            let asns: Vec<u32> = buf[2..2 + n]
                .chunks_exact(as_len)
                .map(|c| {
                    if as_len == 4 {
                        u32::from_be_bytes([c[0], c[1], c[2], c[3]])
                    } else {
                        u16::from_be_bytes([c[0], c[1]]) as u32
                    }
                })
                .collect();
            segments.push(match kind {
                1 => AsSegment::Set(asns),
                2 => AsSegment::Sequence(asns),
                3 => AsSegment::ConfedSequence(asns),
                4 => AsSegment::ConfedSet(asns),
                _ => return None,
            });
            buf = &buf[2 + n..];
        }
        Some(AsPath { segments })
    }

    /// RFC 6793 §4.2.3: rebuild the 4-octet path from a 2-octet AS_PATH and AS4_PATH.
    fn merge_as4(self, as4: AsPath) -> AsPath {
        let len = self.path_len();
        let len4 = as4.path_len();
        if len < len4 {
            return self;
        }
        let mut keep = len - len4;
        let mut segments = Vec::new();
        for seg in self.segments {
            match seg {
                // Confederation segments count 0 and never appear in AS4_PATH: the leading
                // ones are kept from AS_PATH, or the merge would lose them.
                AsSegment::ConfedSequence(_) | AsSegment::ConfedSet(_) => segments.push(seg),
                _ if keep == 0 => break,
                AsSegment::Sequence(mut v) => {
                    v.truncate(keep);
                    keep -= v.len();
                    segments.push(AsSegment::Sequence(v));
                }
                AsSegment::Set(v) => {
                    keep -= 1;
                    segments.push(AsSegment::Set(v));
                }
            }
        }
        segments.extend(as4.segments);
        AsPath { segments }
    }
}

/// AGGREGATOR (type 7): the AS and router that formed the aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Aggregator {
    pub asn: u32,
    pub addr: Ipv4Addr,
}

/// An attribute podroute does not interpret, kept to be passed on (optional transitive).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RawAttr {
    pub flags: u8,
    pub code: u8,
    pub value: Bytes,
}

/// The path attributes of a route, interned and shared between routes by the RIB.
///
/// `next_hop` holds the NEXT_HOP attribute for IPv4 NLRI; MP_REACH_NLRI next hops travel in
/// [`super::MpReach`] and are folded into a per-family copy by the RIB.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PathAttrs {
    pub origin: Option<Origin>,
    pub as_path: Option<AsPath>,
    pub next_hop: Option<Ipv4Addr>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub atomic_aggregate: bool,
    pub aggregator: Option<Aggregator>,
    pub communities: Vec<u32>,
    /// LARGE_COMMUNITIES (RFC 8092 §3): `(global administrator, local data 1, local data 2)`,
    /// each value twelve octets on the wire:
    ///
    /// ```text
    /// +---------------------------------------------------------------+
    /// |                      Global Administrator                     |
    /// +---------------------------------------------------------------+
    /// |                       Local Data Part 1                       |
    /// +---------------------------------------------------------------+
    /// |                       Local Data Part 2                       |
    /// +---------------------------------------------------------------+
    /// ```
    pub large_communities: Vec<(u32, u32, u32)>,
    pub originator_id: Option<Ipv4Addr>,
    pub cluster_list: Vec<Ipv4Addr>,
    /// Unrecognised optional transitive attributes, in the order received.
    pub unknown: Vec<RawAttr>,
}

/// What RFC 7606 says to do about a malformed attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorAction {
    /// RFC 7606 §2: the attribute is dropped and the route kept.
    AttributeDiscard,
    /// RFC 7606 §2: every NLRI in the UPDATE is handled as a withdrawal.
    TreatAsWithdraw,
}

/// A malformed attribute found while decoding an UPDATE, with the RFC 7606 action taken.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AttrError {
    /// Attribute type code (0 when the error concerns the attribute list as a whole).
    pub attr: u8,
    pub action: ErrorAction,
    pub reason: &'static str,
}

impl std::fmt::Display for AttrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let action = match self.action {
            ErrorAction::AttributeDiscard => "attribute discarded",
            ErrorAction::TreatAsWithdraw => "treated as withdraw",
        };
        write!(f, "attribute {}: {} ({action})", self.attr, self.reason)
    }
}

/// Errors during attribute decoding that end the session (RFC 7606 §3 j, §5.3).
pub(crate) enum AttrFatal {
    /// MP_REACH/MP_UNREACH malformed or repeated: NOTIFICATION UPDATE / Malformed Attribute List
    /// or Optional Attribute Error.
    Malformed(u8, Bytes),
    /// An unrecognised well-known attribute: UPDATE / Unrecognized Well-known Attribute.
    UnrecognizedWellKnown(Bytes),
}

/// The raw MP attributes found by [`decode_attrs`], parsed by the UPDATE decoder.
#[derive(Default)]
pub(crate) struct MpRaw<'a> {
    pub reach: Option<&'a [u8]>,
    pub unreach: Option<&'a [u8]>,
}

/// Flags an attribute must carry, ignoring Partial and Extended Length.
fn expected_flags(code: u8) -> Option<u8> {
    Some(match code {
        ac::ORIGIN | ac::AS_PATH | ac::NEXT_HOP | ac::LOCAL_PREF | ac::ATOMIC_AGGREGATE => {
            flag::TRANSITIVE
        }
        ac::MED
        | ac::ORIGINATOR_ID
        | ac::CLUSTER_LIST
        | ac::MP_REACH_NLRI
        | ac::MP_UNREACH_NLRI => flag::OPTIONAL,
        ac::AGGREGATOR
        | ac::COMMUNITIES
        | ac::AS4_PATH
        | ac::AS4_AGGREGATOR
        | ac::LARGE_COMMUNITIES => flag::OPTIONAL | flag::TRANSITIVE,
        _ => return None,
    })
}

/// The RFC 7606 §7 action for a malformed known attribute.
fn malformed_action(code: u8) -> ErrorAction {
    match code {
        ac::ATOMIC_AGGREGATE | ac::AGGREGATOR | ac::AS4_PATH | ac::AS4_AGGREGATOR => {
            ErrorAction::AttributeDiscard
        }
        _ => ErrorAction::TreatAsWithdraw,
    }
}

/// Decode the Path Attributes field of an UPDATE.
pub(crate) fn decode_attrs<'a>(
    mut buf: &'a [u8],
    ctx: CodecContext,
    errors: &mut Vec<AttrError>,
) -> Result<(PathAttrs, MpRaw<'a>), AttrFatal> {
    let mut attrs = PathAttrs::default();
    let mut mp = MpRaw::default();
    let mut seen = [false; 256];
    let mut as4_path: Option<AsPath> = None;
    let mut as4_aggregator: Option<Aggregator> = None;
    let as_len = if ctx.four_octet_as { 4 } else { 2 };

    while !buf.is_empty() {
        if buf.len() < 3 {
            errors.push(AttrError {
                attr: 0,
                action: ErrorAction::TreatAsWithdraw,
                reason: "attribute header truncated",
            });
            break;
        }
        let flags = buf[0];
        let code = buf[1];
        let (len, hdr) = if flags & flag::EXTENDED != 0 {
            if buf.len() < 4 {
                errors.push(AttrError {
                    attr: code,
                    action: ErrorAction::TreatAsWithdraw,
                    reason: "attribute header truncated",
                });
                break;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        } else {
            (buf[2] as usize, 3)
        };
        let Some(value) = buf.get(hdr..hdr + len) else {
            // RFC 7606 §4: an attribute overrunning the attribute field; MP attributes cannot
            // be located any more, so the rest is unreadable.
            if code == ac::MP_REACH_NLRI || code == ac::MP_UNREACH_NLRI {
                return Err(AttrFatal::Malformed(
                    super::update_err::ATTRIBUTE_LENGTH_ERROR,
                    Bytes::new(),
                ));
            }
            errors.push(AttrError {
                attr: code,
                action: ErrorAction::TreatAsWithdraw,
                reason: "attribute length overruns the path attributes field",
            });
            break;
        };
        let whole = &buf[..hdr + len];
        buf = &buf[hdr + len..];

        if seen[code as usize] {
            // RFC 7606 §3 g: repeated MP attributes reset the session, others are discarded.
            if code == ac::MP_REACH_NLRI || code == ac::MP_UNREACH_NLRI {
                return Err(AttrFatal::Malformed(
                    super::update_err::MALFORMED_ATTRIBUTE_LIST,
                    Bytes::new(),
                ));
            }
            errors.push(AttrError {
                attr: code,
                action: ErrorAction::AttributeDiscard,
                reason: "repeated attribute",
            });
            continue;
        }
        seen[code as usize] = true;

        let Some(expected) = expected_flags(code) else {
            if flags & flag::OPTIONAL == 0 {
                return Err(AttrFatal::UnrecognizedWellKnown(Bytes::copy_from_slice(
                    whole,
                )));
            }
            if flags & flag::TRANSITIVE != 0 {
                attrs.unknown.push(RawAttr {
                    flags: flags & !flag::EXTENDED,
                    code,
                    value: Bytes::copy_from_slice(value),
                });
            }
            // Unrecognised optional non-transitive attributes are quietly ignored (§5).
            continue;
        };
        let flags_ok = flags & (flag::OPTIONAL | flag::TRANSITIVE) == expected
            && (flags & flag::PARTIAL == 0 || expected == flag::OPTIONAL | flag::TRANSITIVE);
        if !flags_ok {
            if code == ac::MP_REACH_NLRI || code == ac::MP_UNREACH_NLRI {
                return Err(AttrFatal::Malformed(
                    super::update_err::ATTRIBUTE_FLAGS_ERROR,
                    Bytes::copy_from_slice(whole),
                ));
            }
            errors.push(AttrError {
                attr: code,
                action: malformed_action(code),
                reason: "wrong attribute flags",
            });
            continue;
        }

        let bad = |reason: &'static str| AttrError {
            attr: code,
            action: malformed_action(code),
            reason,
        };
        match code {
            ac::ORIGIN => match value {
                [0] => attrs.origin = Some(Origin::Igp),
                [1] => attrs.origin = Some(Origin::Egp),
                [2] => attrs.origin = Some(Origin::Incomplete),
                [_] => errors.push(bad("undefined ORIGIN value")),
                _ => errors.push(bad("ORIGIN length is not 1")),
            },
            ac::AS_PATH => match AsPath::decode(value, as_len) {
                // RFC 7607 §2: AS 0 makes AS_PATH malformed (RFC 7606 §7.2 action).
                Some(p) if p.contains(0) => errors.push(bad("AS_PATH contains AS 0")),
                Some(p) => attrs.as_path = Some(p),
                None => errors.push(bad("malformed AS_PATH")),
            },
            ac::NEXT_HOP => match value {
                [a, b, c, d] => attrs.next_hop = Some(Ipv4Addr::new(*a, *b, *c, *d)),
                _ => errors.push(bad("NEXT_HOP length is not 4")),
            },
            ac::MED => match read_u32(value) {
                Some(v) => attrs.med = Some(v),
                None => errors.push(bad("MULTI_EXIT_DISC length is not 4")),
            },
            ac::LOCAL_PREF => match read_u32(value) {
                Some(v) => attrs.local_pref = Some(v),
                None => errors.push(bad("LOCAL_PREF length is not 4")),
            },
            ac::ATOMIC_AGGREGATE => {
                if value.is_empty() {
                    attrs.atomic_aggregate = true;
                } else {
                    errors.push(bad("ATOMIC_AGGREGATE length is not 0"));
                }
            }
            ac::AGGREGATOR => match decode_aggregator(value, as_len) {
                Some(a) if a.asn == 0 => errors.push(bad("AGGREGATOR AS is 0")),
                Some(a) => attrs.aggregator = Some(a),
                None => errors.push(bad("AGGREGATOR has the wrong length")),
            },
            ac::COMMUNITIES => {
                if value.len() % 4 != 0 || value.is_empty() {
                    errors.push(bad("COMMUNITIES length is not a non-zero multiple of 4"));
                } else {
                    attrs.communities = value
                        .chunks_exact(4)
                        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                }
            }
            // RFC 8092 §6: a length that is not a non-zero multiple of 12 is treat-as-withdraw.
            ac::LARGE_COMMUNITIES => {
                if value.len() % 12 != 0 || value.is_empty() {
                    errors.push(bad(
                        "LARGE_COMMUNITIES length is not a non-zero multiple of 12",
                    ));
                } else {
                    let word = |c: &[u8]| u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
                    attrs.large_communities = value
                        .chunks_exact(12)
                        .map(|c| (word(&c[0..4]), word(&c[4..8]), word(&c[8..12])))
                        .collect();
                }
            }
            ac::ORIGINATOR_ID => match value {
                [a, b, c, d] => attrs.originator_id = Some(Ipv4Addr::new(*a, *b, *c, *d)),
                _ => errors.push(bad("ORIGINATOR_ID length is not 4")),
            },
            ac::CLUSTER_LIST => {
                if value.len() % 4 != 0 || value.is_empty() {
                    errors.push(bad("CLUSTER_LIST length is not a non-zero multiple of 4"));
                } else {
                    attrs.cluster_list = value
                        .chunks_exact(4)
                        .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
                        .collect();
                }
            }
            ac::MP_REACH_NLRI => mp.reach = Some(value),
            ac::MP_UNREACH_NLRI => mp.unreach = Some(value),
            ac::AS4_PATH => {
                // RFC 6793 §6: malformed AS4_PATH is discarded; from a 4-octet peer it must
                // not appear at all and is ignored.
                if !ctx.four_octet_as {
                    // RFC 6793 §6: confederation segments in AS4_PATH are discarded, the
                    // rest of the attribute is used.
                    match AsPath::decode(value, 4) {
                        Some(p) if p.contains(0) => errors.push(bad("AS4_PATH contains AS 0")),
                        Some(mut p) => {
                            p.segments.retain(|s| {
                                matches!(s, AsSegment::Set(_) | AsSegment::Sequence(_))
                            });
                            as4_path = Some(p);
                        }
                        None => errors.push(bad("malformed AS4_PATH")),
                    }
                }
            }
            ac::AS4_AGGREGATOR => {
                if !ctx.four_octet_as {
                    match decode_aggregator(value, 4) {
                        Some(a) if a.asn == 0 => errors.push(bad("AS4_AGGREGATOR AS is 0")),
                        Some(a) => as4_aggregator = Some(a),
                        None => errors.push(bad("AS4_AGGREGATOR length is not 8")),
                    }
                }
            }
            _ => unreachable_known(code),
        }
    }

    // RFC 6793 §4.2.3: reconcile the 4-octet view when the peer speaks 2-octet ASes.
    if !ctx.four_octet_as {
        // Only when AGGREGATOR (not AS_TRANS) and AS4_AGGREGATOR are both present are the
        // AS4 attributes ignored: an OLD speaker aggregated after they were attached. Without
        // AS4_AGGREGATOR, AS4_PATH is merged as in every other case.
        let agg_is_trans = attrs.aggregator.map(|a| a.asn == AS_TRANS as u32);
        let ignore_as4 = agg_is_trans == Some(false) && as4_aggregator.is_some();
        if !ignore_as4 {
            if let (Some(a4), Some(agg)) = (as4_aggregator, attrs.aggregator.as_mut()) {
                *agg = a4;
            }
            if let (Some(p4), Some(p)) = (as4_path, attrs.as_path.as_mut()) {
                *p = std::mem::take(p).merge_as4(p4);
            }
        }
    }
    Ok((attrs, mp))
}

/// `expected_flags` and the match above list the same codes; a code reaching here is a bug in
/// this file, not bad input, and is ignored rather than panicking.
fn unreachable_known(code: u8) {
    tracing::error!(code, "attribute code has flags but no decoder");
}

fn read_u32(v: &[u8]) -> Option<u32> {
    match v {
        [a, b, c, d] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

fn decode_aggregator(v: &[u8], as_len: usize) -> Option<Aggregator> {
    if v.len() != as_len + 4 {
        return None;
    }
    let asn = if as_len == 4 {
        u32::from_be_bytes([v[0], v[1], v[2], v[3]])
    } else {
        u16::from_be_bytes([v[0], v[1]]) as u32
    };
    let a = &v[as_len..];
    Some(Aggregator {
        asn,
        addr: Ipv4Addr::new(a[0], a[1], a[2], a[3]),
    })
}

fn put_attr(out: &mut BytesMut, flags: u8, code: u8, value: &[u8]) {
    if value.len() > 255 {
        out.put_u8(flags | flag::EXTENDED);
        out.put_u8(code);
        out.put_u16(value.len() as u16);
    } else {
        out.put_u8(flags & !flag::EXTENDED);
        out.put_u8(code);
        out.put_u8(value.len() as u8);
    }
    out.put_slice(value);
}

impl PathAttrs {
    /// Encode every attribute except MP_REACH/MP_UNREACH (which the UPDATE encoder puts first),
    /// in type-code order. Towards a 2-octet peer AS numbers above 65535 become AS_TRANS and
    /// AS4_PATH / AS4_AGGREGATOR carry the real values (RFC 6793 §4.2.2). Unknown optional
    /// transitive attributes are passed on with the Partial bit set (RFC 4271 §5).
    pub fn encode(&self, ctx: CodecContext, out: &mut BytesMut) {
        let t = flag::TRANSITIVE;
        let o = flag::OPTIONAL;
        let mut scratch = BytesMut::new();
        // RFC 4271 §5: attributes SHOULD be in ascending type order, passed-on unknown ones
        // included; `unknown` keeps arrival order, so write them through a sorted view.
        let mut unknown: Vec<&RawAttr> = self.unknown.iter().collect();
        unknown.sort_by_key(|r| r.code);
        let mut unknown = unknown.into_iter().peekable();
        let mut unknown_below = |code: u8, out: &mut BytesMut| {
            while let Some(raw) = unknown.next_if(|r| r.code < code) {
                put_attr(out, raw.flags | flag::PARTIAL, raw.code, &raw.value);
            }
        };
        unknown_below(ac::ORIGIN, out);
        if let Some(origin) = self.origin {
            put_attr(out, t, ac::ORIGIN, &[origin as u8]);
        }
        unknown_below(ac::AS_PATH, out);
        let empty = AsPath::default();
        let as_path = self.as_path.as_ref().unwrap_or(&empty);
        if self.as_path.is_some() {
            as_path.encode(ctx.four_octet_as, &mut scratch);
            put_attr(out, t, ac::AS_PATH, &scratch);
            scratch.clear();
        }
        unknown_below(ac::NEXT_HOP, out);
        if let Some(nh) = self.next_hop {
            put_attr(out, t, ac::NEXT_HOP, &nh.octets());
        }
        unknown_below(ac::MED, out);
        if let Some(med) = self.med {
            put_attr(out, o, ac::MED, &med.to_be_bytes());
        }
        unknown_below(ac::LOCAL_PREF, out);
        if let Some(lp) = self.local_pref {
            put_attr(out, t, ac::LOCAL_PREF, &lp.to_be_bytes());
        }
        unknown_below(ac::ATOMIC_AGGREGATE, out);
        if self.atomic_aggregate {
            put_attr(out, t, ac::ATOMIC_AGGREGATE, &[]);
        }
        unknown_below(ac::AGGREGATOR, out);
        if let Some(agg) = self.aggregator {
            if ctx.four_octet_as {
                scratch.put_u32(agg.asn);
            } else {
                scratch.put_u16(u16::try_from(agg.asn).unwrap_or(AS_TRANS));
            }
            scratch.put_slice(&agg.addr.octets());
            put_attr(out, o | t, ac::AGGREGATOR, &scratch);
            scratch.clear();
        }
        unknown_below(ac::COMMUNITIES, out);
        if !self.communities.is_empty() {
            for c in &self.communities {
                scratch.put_u32(*c);
            }
            put_attr(out, o | t, ac::COMMUNITIES, &scratch);
            scratch.clear();
        }
        unknown_below(ac::ORIGINATOR_ID, out);
        if let Some(id) = self.originator_id {
            put_attr(out, o, ac::ORIGINATOR_ID, &id.octets());
        }
        unknown_below(ac::CLUSTER_LIST, out);
        if !self.cluster_list.is_empty() {
            for c in &self.cluster_list {
                scratch.put_slice(&c.octets());
            }
            put_attr(out, o, ac::CLUSTER_LIST, &scratch);
            scratch.clear();
        }
        if !ctx.four_octet_as {
            unknown_below(ac::AS4_PATH, out);
            if as_path.needs_as4() {
                // RFC 6793 §4.2.2: confederation segments are never put in AS4_PATH.
                let as4 = AsPath {
                    segments: as_path
                        .segments
                        .iter()
                        .filter(|s| matches!(s, AsSegment::Set(_) | AsSegment::Sequence(_)))
                        .cloned()
                        .collect(),
                };
                as4.encode(true, &mut scratch);
                put_attr(out, o | t, ac::AS4_PATH, &scratch);
                scratch.clear();
            }
            unknown_below(ac::AS4_AGGREGATOR, out);
            if let Some(agg) = self.aggregator.filter(|a| a.asn > u16::MAX as u32) {
                scratch.put_u32(agg.asn);
                scratch.put_slice(&agg.addr.octets());
                put_attr(out, o | t, ac::AS4_AGGREGATOR, &scratch);
                scratch.clear();
            }
        }
        unknown_below(ac::LARGE_COMMUNITIES, out);
        if !self.large_communities.is_empty() {
            for (g, l1, l2) in &self.large_communities {
                scratch.put_u32(*g);
                scratch.put_u32(*l1);
                scratch.put_u32(*l2);
            }
            put_attr(out, o | t, ac::LARGE_COMMUNITIES, &scratch);
            scratch.clear();
        }
        for raw in unknown {
            put_attr(out, raw.flags | flag::PARTIAL, raw.code, &raw.value);
        }
    }
}

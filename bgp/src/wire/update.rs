//! UPDATE (RFC 4271 §4.3) with MP_REACH_NLRI / MP_UNREACH_NLRI (RFC 4760 §3, §4) and
//! End-of-RIB markers (RFC 4724 §2).
//!
//! ```text
//! +-----------------------------------------------------+
//! |   Withdrawn Routes Length (2 octets)                |
//! +-----------------------------------------------------+
//! |   Withdrawn Routes (variable)                       |
//! +-----------------------------------------------------+
//! |   Total Path Attribute Length (2 octets)            |
//! +-----------------------------------------------------+
//! |   Path Attributes (variable)                        |
//! +-----------------------------------------------------+
//! |   Network Layer Reachability Information (variable) |
//! +-----------------------------------------------------+
//!
//! MP_REACH_NLRI value:                     MP_UNREACH_NLRI value:
//! | AFI (2) | SAFI (1) | NH len (1) |      | AFI (2) | SAFI (1) |
//! | Next Hop (NH len) | Reserved (1) |     | Withdrawn Routes (variable) |
//! | NLRI (variable) |
//! ```

use super::attr::{self, AttrError, AttrFatal, ErrorAction, PathAttrs, attr_code, flag};
use super::header::{MAX_MESSAGE_LEN, MessageType, finish_header, put_header};
use super::nlri::{PrefixError, decode_prefixes, encode_prefix, prefix_wire_len};
use super::notification::{code, update_err};
use super::{CodecContext, DecodeError, Family};
use bytes::{BufMut, Bytes, BytesMut};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv6Addr};

/// An UPDATE message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// IPv4 unicast prefixes in the Withdrawn Routes field.
    pub withdrawn: Vec<IpNet>,
    pub attrs: PathAttrs,
    /// IPv4 unicast prefixes in the NLRI field.
    pub nlri: Vec<IpNet>,
    pub mp_reach: Option<MpReach>,
    pub mp_unreach: Option<MpUnreach>,
    /// RFC 7606 findings while decoding; empty for a clean message. Never encoded.
    pub errors: Vec<AttrError>,
}

/// MP_REACH_NLRI (type 14).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MpReach {
    pub family: Family,
    pub next_hop: NextHop,
    pub nlri: Vec<IpNet>,
}

/// MP_UNREACH_NLRI (type 15).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MpUnreach {
    pub family: Family,
    pub withdrawn: Vec<IpNet>,
}

/// The next hop of MP_REACH_NLRI: one address, plus an IPv6 link-local one when the length is 32
/// (RFC 2545 §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NextHop {
    pub addr: IpAddr,
    pub link_local: Option<Ipv6Addr>,
}

impl NextHop {
    pub fn new(addr: IpAddr) -> Self {
        NextHop {
            addr,
            link_local: None,
        }
    }

    fn wire_len(&self) -> usize {
        match self.addr {
            IpAddr::V4(_) => 4,
            IpAddr::V6(_) => 16 + if self.link_local.is_some() { 16 } else { 0 },
        }
    }

    fn encode(&self, out: &mut BytesMut) {
        match self.addr {
            IpAddr::V4(a) => out.put_slice(&a.octets()),
            IpAddr::V6(a) => {
                out.put_slice(&a.octets());
                if let Some(ll) = self.link_local {
                    out.put_slice(&ll.octets());
                }
            }
        }
    }

    fn decode(family: Family, v: &[u8]) -> Option<NextHop> {
        let v6 =
            |s: &[u8]| -> Option<Ipv6Addr> { <[u8; 16]>::try_from(s).ok().map(Ipv6Addr::from) };
        match (family.afi, v.len()) {
            (1, 4) => Some(NextHop::new(IpAddr::from(<[u8; 4]>::try_from(v).ok()?))),
            (2, 16) => Some(NextHop::new(IpAddr::V6(v6(v)?))),
            (2, 32) => Some(NextHop {
                addr: IpAddr::V6(v6(&v[..16])?),
                link_local: Some(v6(&v[16..])?),
            }),
            // RFC 8950 style IPv4 next hop for IPv6 NLRI is not negotiated by podroute.
            _ => None,
        }
    }
}

impl Update {
    /// An End-of-RIB marker for `family` (RFC 4724 §2): an empty UPDATE for IPv4 unicast, an
    /// UPDATE with only an empty MP_UNREACH_NLRI otherwise.
    pub fn end_of_rib(family: Family) -> Update {
        if family == Family::IPV4_UNICAST {
            Update::default()
        } else {
            Update {
                mp_unreach: Some(MpUnreach {
                    family,
                    withdrawn: Vec::new(),
                }),
                ..Update::default()
            }
        }
    }

    /// The family this UPDATE marks End-of-RIB for, if it is such a marker.
    pub fn end_of_rib_family(&self) -> Option<Family> {
        if !self.withdrawn.is_empty() || !self.nlri.is_empty() || self.mp_reach.is_some() {
            return None;
        }
        match &self.mp_unreach {
            None if self.attrs == PathAttrs::default() && self.errors.is_empty() => {
                Some(Family::IPV4_UNICAST)
            }
            Some(u) if u.withdrawn.is_empty() && self.attrs == PathAttrs::default() => {
                Some(u.family)
            }
            _ => None,
        }
    }

    /// RFC 7606: whether the announced NLRI must be handled as withdrawn.
    pub fn treat_as_withdraw(&self) -> bool {
        self.errors
            .iter()
            .any(|e| e.action == ErrorAction::TreatAsWithdraw)
    }

    pub(crate) fn decode_body(body: &[u8], ctx: CodecContext) -> Result<Update, DecodeError> {
        let malformed_list = || {
            DecodeError::new(
                code::UPDATE_MESSAGE,
                update_err::MALFORMED_ATTRIBUTE_LIST,
                Bytes::new(),
            )
        };
        let invalid_network = || {
            DecodeError::new(
                code::UPDATE_MESSAGE,
                update_err::INVALID_NETWORK_FIELD,
                Bytes::new(),
            )
        };
        if body.len() < 4 {
            return Err(malformed_list());
        }
        let wlen = u16::from_be_bytes([body[0], body[1]]) as usize;
        let withdrawn_field = body.get(2..2 + wlen).ok_or_else(malformed_list)?;
        let rest = &body[2 + wlen..];
        if rest.len() < 2 {
            return Err(malformed_list());
        }
        let alen = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let attr_field = rest.get(2..2 + alen).ok_or_else(malformed_list)?;
        let nlri_field = &rest[2 + alen..];

        let mut u = Update::default();
        decode_prefixes(Family::IPV4_UNICAST, withdrawn_field, &mut u.withdrawn)
            .map_err(|_| invalid_network())?;
        decode_prefixes(Family::IPV4_UNICAST, nlri_field, &mut u.nlri)
            .map_err(|_| invalid_network())?;

        let (attrs, mp) =
            attr::decode_attrs(attr_field, ctx, &mut u.errors).map_err(|f| match f {
                AttrFatal::Malformed(sub, data) => {
                    DecodeError::new(code::UPDATE_MESSAGE, sub, data)
                }
                AttrFatal::UnrecognizedWellKnown(data) => DecodeError::new(
                    code::UPDATE_MESSAGE,
                    update_err::UNRECOGNIZED_WELL_KNOWN_ATTRIBUTE,
                    data,
                ),
            })?;
        u.attrs = attrs;
        if let Some(v) = mp.reach {
            u.mp_reach = decode_mp_reach(v)?;
        }
        if let Some(v) = mp.unreach {
            u.mp_unreach = decode_mp_unreach(v)?;
        }

        // RFC 7606 §3 d: a missing well-known mandatory attribute means treat-as-withdraw.
        let announces =
            !u.nlri.is_empty() || u.mp_reach.as_ref().is_some_and(|r| !r.nlri.is_empty());
        if announces {
            let missing = |what| AttrError {
                attr: 0,
                action: ErrorAction::TreatAsWithdraw,
                reason: what,
            };
            if u.attrs.origin.is_none() && !u.errors.iter().any(|e| e.attr == attr_code::ORIGIN) {
                u.errors
                    .push(missing("missing well-known attribute ORIGIN"));
            }
            if u.attrs.as_path.is_none() && !u.errors.iter().any(|e| e.attr == attr_code::AS_PATH) {
                u.errors
                    .push(missing("missing well-known attribute AS_PATH"));
            }
            if !u.nlri.is_empty()
                && u.attrs.next_hop.is_none()
                && !u.errors.iter().any(|e| e.attr == attr_code::NEXT_HOP)
            {
                u.errors
                    .push(missing("missing well-known attribute NEXT_HOP"));
            }
        }
        Ok(u)
    }

    /// Encode as exactly one UPDATE message (header included). The caller keeps it within
    /// 4096 octets; [`UpdateEncoder`] splits large announcements.
    pub fn encode(&self, ctx: CodecContext, out: &mut BytesMut) {
        let start = out.len();
        put_header(out, MessageType::Update);
        let wpos = out.len();
        out.put_u16(0);
        for p in &self.withdrawn {
            encode_prefix(p, out);
        }
        let wlen = out.len() - wpos - 2;
        out[wpos..wpos + 2].copy_from_slice(&(wlen as u16).to_be_bytes());
        let apos = out.len();
        out.put_u16(0);
        // RFC 7606 §5.1: MP_REACH_NLRI / MP_UNREACH_NLRI are encoded first.
        if let Some(r) = &self.mp_reach {
            let mut v = BytesMut::new();
            encode_mp_reach_head(r.family, &r.next_hop, &mut v);
            for p in &r.nlri {
                encode_prefix(p, &mut v);
            }
            put_mp(out, attr_code::MP_REACH_NLRI, &v);
        }
        if let Some(w) = &self.mp_unreach {
            let mut v = BytesMut::new();
            v.put_u16(w.family.afi);
            v.put_u8(w.family.safi);
            for p in &w.withdrawn {
                encode_prefix(p, &mut v);
            }
            put_mp(out, attr_code::MP_UNREACH_NLRI, &v);
        }
        self.attrs.encode(ctx, out);
        let alen = out.len() - apos - 2;
        out[apos..apos + 2].copy_from_slice(&(alen as u16).to_be_bytes());
        for p in &self.nlri {
            encode_prefix(p, out);
        }
        finish_header(out, start);
    }
}

fn put_mp(out: &mut BytesMut, code: u8, value: &[u8]) {
    // Always extended length: the size is not known up front when NLRI are appended.
    out.put_u8(flag::OPTIONAL | flag::EXTENDED);
    out.put_u8(code);
    out.put_u16(value.len() as u16);
    out.put_slice(value);
}

fn encode_mp_reach_head(family: Family, nh: &NextHop, out: &mut BytesMut) {
    out.put_u16(family.afi);
    out.put_u8(family.safi);
    out.put_u8(nh.wire_len() as u8);
    nh.encode(out);
    out.put_u8(0);
}

fn mp_error(e: PrefixError) -> DecodeError {
    let sub = match e {
        PrefixError::BadLength(_) | PrefixError::Truncated => update_err::OPTIONAL_ATTRIBUTE_ERROR,
        PrefixError::UnsupportedFamily => update_err::OPTIONAL_ATTRIBUTE_ERROR,
    };
    DecodeError::new(code::UPDATE_MESSAGE, sub, Bytes::new())
}

/// RFC 7606 §7.11: a malformed MP_REACH_NLRI resets the session. Families podroute cannot
/// parse (not IPv4/IPv6 unicast) are ignored: they were not negotiated.
fn decode_mp_reach(v: &[u8]) -> Result<Option<MpReach>, DecodeError> {
    let opt_err = || {
        DecodeError::new(
            code::UPDATE_MESSAGE,
            update_err::OPTIONAL_ATTRIBUTE_ERROR,
            Bytes::new(),
        )
    };
    if v.len() < 5 {
        return Err(opt_err());
    }
    let family = Family {
        afi: u16::from_be_bytes([v[0], v[1]]),
        safi: v[2],
    };
    let nh_len = v[3] as usize;
    let nh_bytes = v.get(4..4 + nh_len).ok_or_else(opt_err)?;
    // One reserved octet follows the next hop.
    let nlri = v.get(5 + nh_len..).ok_or_else(opt_err)?;
    if !family.is_supported() {
        return Ok(None);
    }
    let next_hop = NextHop::decode(family, nh_bytes).ok_or_else(opt_err)?;
    let mut prefixes = Vec::new();
    decode_prefixes(family, nlri, &mut prefixes).map_err(mp_error)?;
    Ok(Some(MpReach {
        family,
        next_hop,
        nlri: prefixes,
    }))
}

fn decode_mp_unreach(v: &[u8]) -> Result<Option<MpUnreach>, DecodeError> {
    if v.len() < 3 {
        return Err(DecodeError::new(
            code::UPDATE_MESSAGE,
            update_err::OPTIONAL_ATTRIBUTE_ERROR,
            Bytes::new(),
        ));
    }
    let family = Family {
        afi: u16::from_be_bytes([v[0], v[1]]),
        safi: v[2],
    };
    if !family.is_supported() {
        return Ok(None);
    }
    let mut withdrawn = Vec::new();
    decode_prefixes(family, &v[3..], &mut withdrawn).map_err(mp_error)?;
    Ok(Some(MpUnreach { family, withdrawn }))
}

/// Writes announcements and withdrawals as UPDATE messages, as many as the 4096-octet limit
/// needs, each carrying the attributes once and as many prefixes as fit.
#[derive(Clone, Copy, Debug, Default)]
pub struct UpdateEncoder {
    pub ctx: CodecContext,
}

impl UpdateEncoder {
    pub fn new(ctx: CodecContext) -> Self {
        UpdateEncoder { ctx }
    }

    /// Announce `prefixes` (all of one family) with `attrs`. IPv4 unicast uses the NLRI field
    /// and `attrs.next_hop`; other families use MP_REACH_NLRI with `mp_next_hop` (and
    /// `attrs.next_hop` is not sent). Returns the number of messages written.
    pub fn announce(
        &self,
        attrs: &PathAttrs,
        mp_next_hop: Option<NextHop>,
        prefixes: &[IpNet],
        out: &mut BytesMut,
    ) -> usize {
        let Some(first) = prefixes.first() else {
            return 0;
        };
        let family = Family::of(first);
        let mut messages = 0;
        let mut rest = prefixes;
        if family == Family::IPV4_UNICAST {
            let mut encoded = BytesMut::new();
            attrs.encode(self.ctx, &mut encoded);
            while !rest.is_empty() {
                let start = out.len();
                put_header(out, MessageType::Update);
                out.put_u16(0);
                out.put_u16(encoded.len() as u16);
                out.put_slice(&encoded);
                let room = MAX_MESSAGE_LEN.saturating_sub(out.len() - start);
                rest = pack(rest, room, out);
                finish_header(out, start);
                messages += 1;
            }
        } else {
            let nh = mp_next_hop.unwrap_or(NextHop::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED)));
            let mut plain = attrs.clone();
            plain.next_hop = None;
            let mut encoded = BytesMut::new();
            plain.encode(self.ctx, &mut encoded);
            let mut head = BytesMut::new();
            encode_mp_reach_head(family, &nh, &mut head);
            while !rest.is_empty() {
                let start = out.len();
                put_header(out, MessageType::Update);
                out.put_u16(0);
                let apos = out.len();
                out.put_u16(0);
                out.put_u8(flag::OPTIONAL | flag::EXTENDED);
                out.put_u8(attr_code::MP_REACH_NLRI);
                let lpos = out.len();
                out.put_u16(0);
                out.put_slice(&head);
                let room = MAX_MESSAGE_LEN.saturating_sub(out.len() - start + encoded.len());
                let before = out.len();
                rest = pack(rest, room, out);
                let mp_len = head.len() + (out.len() - before);
                out[lpos..lpos + 2].copy_from_slice(&(mp_len as u16).to_be_bytes());
                out.put_slice(&encoded);
                let alen = out.len() - apos - 2;
                out[apos..apos + 2].copy_from_slice(&(alen as u16).to_be_bytes());
                finish_header(out, start);
                messages += 1;
            }
        }
        messages
    }

    /// Withdraw `prefixes` (all of one family). Returns the number of messages written.
    pub fn withdraw(&self, prefixes: &[IpNet], out: &mut BytesMut) -> usize {
        let Some(first) = prefixes.first() else {
            return 0;
        };
        let family = Family::of(first);
        let mut messages = 0;
        let mut rest = prefixes;
        while !rest.is_empty() {
            let start = out.len();
            put_header(out, MessageType::Update);
            if family == Family::IPV4_UNICAST {
                let wpos = out.len();
                out.put_u16(0);
                let room = MAX_MESSAGE_LEN - (out.len() - start) - 2;
                rest = pack(rest, room, out);
                let wlen = out.len() - wpos - 2;
                out[wpos..wpos + 2].copy_from_slice(&(wlen as u16).to_be_bytes());
                out.put_u16(0);
            } else {
                out.put_u16(0);
                let apos = out.len();
                out.put_u16(0);
                out.put_u8(flag::OPTIONAL | flag::EXTENDED);
                out.put_u8(attr_code::MP_UNREACH_NLRI);
                let lpos = out.len();
                out.put_u16(0);
                out.put_u16(family.afi);
                out.put_u8(family.safi);
                let room = MAX_MESSAGE_LEN - (out.len() - start);
                rest = pack(rest, room, out);
                let mp_len = out.len() - lpos - 2;
                out[lpos..lpos + 2].copy_from_slice(&(mp_len as u16).to_be_bytes());
                let alen = out.len() - apos - 2;
                out[apos..apos + 2].copy_from_slice(&(alen as u16).to_be_bytes());
            }
            finish_header(out, start);
            messages += 1;
        }
        messages
    }

    /// Write an End-of-RIB marker for `family`.
    pub fn end_of_rib(&self, family: Family, out: &mut BytesMut) {
        Update::end_of_rib(family).encode(self.ctx, out);
    }
}

/// Append prefixes while they fit in `room` octets; returns the ones left over. At least one
/// prefix is always written so the caller makes progress.
fn pack<'a>(prefixes: &'a [IpNet], mut room: usize, out: &mut BytesMut) -> &'a [IpNet] {
    for (i, p) in prefixes.iter().enumerate() {
        let n = prefix_wire_len(p);
        if n > room && i > 0 {
            return &prefixes[i..];
        }
        encode_prefix(p, out);
        room = room.saturating_sub(n);
    }
    &[]
}

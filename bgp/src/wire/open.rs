//! OPEN (RFC 4271 §4.2) and capabilities (RFC 5492): multiprotocol (RFC 4760), route refresh
//! (RFC 2918), graceful restart (RFC 4724), 4-octet AS (RFC 6793), ADD-PATH (RFC 7911).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+
//! |    Version    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |     My Autonomous System      |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |           Hold Time           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                         BGP Identifier                        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | Opt Parm Len  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |             Optional Parameters (variable)                    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//!
//! Optional parameter: | Parm. Type (1) | Parm. Length (1) | Value |; type 2 = capabilities,
//! each | Capability Code (1) | Capability Length (1) | Capability Value |.
//! ```

use super::notification::{code, header_err, open_err};
use super::{DecodeError, Family};
use bytes::{BufMut, Bytes, BytesMut};
use std::net::Ipv4Addr;

/// AS_TRANS (RFC 6793): the 2-octet stand-in for a 4-octet AS number.
pub const AS_TRANS: u16 = 23456;

/// An OPEN message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    pub version: u8,
    /// The 2-octet "My Autonomous System" field (AS_TRANS when the AS needs 4 octets).
    pub my_as: u16,
    pub hold_time: u16,
    pub bgp_id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
}

/// A capability (RFC 5492). Unknown ones are kept as bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capability {
    /// Code 1 (RFC 4760): | AFI (2) | Reserved (1) | SAFI (1) |
    Multiprotocol(Family),
    /// Code 2 (RFC 2918), no value.
    RouteRefresh,
    /// Code 64 (RFC 4724).
    GracefulRestart(GracefulRestartCap),
    /// Code 65 (RFC 6793): the 4-octet AS number.
    FourOctetAs(u32),
    /// Code 69 (RFC 7911): per family, 1 = receive, 2 = send, 3 = both.
    AddPath(Vec<(Family, u8)>),
    /// Any other code, value kept verbatim.
    Unknown { code: u8, value: Bytes },
}

/// Graceful Restart capability value (RFC 4724 §3):
///
/// ```text
/// +--------------------------------------------------+
/// | Restart Flags (4 bits) | Restart Time in s (12)  |
/// +--------------------------------------------------+
/// | AFI (16 bits) | SAFI (8 bits) | Flags for AFI/SAFI (8 bits) |  repeated
/// +--------------------------------------------------+
/// ```
/// Restart flag bit 0x8 = Restart State (R), 0x4 = Graceful Notification (N, RFC 8538);
/// family flag bit 0x80 = Forwarding State (F).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GracefulRestartCap {
    pub restart_state: bool,
    pub notification: bool,
    /// 12 bits, seconds.
    pub restart_time: u16,
    pub families: Vec<GrFamily>,
}

/// One family of the Graceful Restart capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrFamily {
    pub family: Family,
    pub forwarding_state: bool,
}

mod cap_code {
    pub const MULTIPROTOCOL: u8 = 1;
    pub const ROUTE_REFRESH: u8 = 2;
    pub const GRACEFUL_RESTART: u8 = 64;
    pub const FOUR_OCTET_AS: u8 = 65;
    pub const ADD_PATH: u8 = 69;
}

const PARAM_CAPABILITIES: u8 = 2;

impl Open {
    /// An OPEN for `asn`, with the 4-octet AS capability always present and AS_TRANS in the
    /// 2-octet field when `asn` does not fit.
    pub fn new(
        asn: u32,
        hold_time: u16,
        bgp_id: Ipv4Addr,
        mut capabilities: Vec<Capability>,
    ) -> Self {
        if !capabilities
            .iter()
            .any(|c| matches!(c, Capability::FourOctetAs(_)))
        {
            capabilities.push(Capability::FourOctetAs(asn));
        }
        Open {
            version: 4,
            my_as: u16::try_from(asn).unwrap_or(AS_TRANS),
            hold_time,
            bgp_id,
            capabilities,
        }
    }

    /// The speaker's AS: from the 4-octet AS capability if present, else the 2-octet field.
    pub fn asn(&self) -> u32 {
        self.four_octet_as().unwrap_or(self.my_as as u32)
    }

    pub fn four_octet_as(&self) -> Option<u32> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::FourOctetAs(a) => Some(*a),
            _ => None,
        })
    }

    /// Families announced with the multiprotocol capability. RFC 4760 §8: a speaker that
    /// sends no multiprotocol capability at all supports IPv4 unicast only.
    pub fn families(&self) -> Vec<Family> {
        let v: Vec<Family> = self
            .capabilities
            .iter()
            .filter_map(|c| match c {
                Capability::Multiprotocol(f) => Some(*f),
                _ => None,
            })
            .collect();
        if v.is_empty() {
            vec![Family::IPV4_UNICAST]
        } else {
            v
        }
    }

    pub fn route_refresh(&self) -> bool {
        self.capabilities
            .iter()
            .any(|c| matches!(c, Capability::RouteRefresh))
    }

    pub fn graceful_restart(&self) -> Option<&GracefulRestartCap> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::GracefulRestart(g) => Some(g),
            _ => None,
        })
    }

    pub(crate) fn decode_body(body: &[u8]) -> Result<Open, DecodeError> {
        let bad_len = || {
            let len = (super::HEADER_LEN + body.len()) as u16;
            DecodeError::new(
                code::MESSAGE_HEADER,
                header_err::BAD_MESSAGE_LENGTH,
                len.to_be_bytes().to_vec(),
            )
        };
        if body.len() < 10 {
            return Err(bad_len());
        }
        let version = body[0];
        if version != 4 {
            // RFC 4271 §6.2: data is the largest supported version, 2 octets.
            return Err(DecodeError::new(
                code::OPEN_MESSAGE,
                open_err::UNSUPPORTED_VERSION,
                vec![0, 4],
            ));
        }
        let my_as = u16::from_be_bytes([body[1], body[2]]);
        let hold_time = u16::from_be_bytes([body[3], body[4]]);
        let bgp_id = Ipv4Addr::new(body[5], body[6], body[7], body[8]);
        let mut opt_len = body[9] as usize;
        let mut rest = &body[10..];
        let malformed = || DecodeError::new(code::OPEN_MESSAGE, 0, Bytes::new());
        // RFC 9072 §2: when the one-octet length is non-zero, a first parameter type of 255
        // (Non-Ext OP Type) selects the extended encoding, whatever the one-octet length says.
        let extended = opt_len != 0 && rest.first() == Some(&255);
        if extended {
            if rest.len() < 3 {
                return Err(malformed());
            }
            opt_len = u16::from_be_bytes([rest[1], rest[2]]) as usize;
            rest = &rest[3..];
        }
        if rest.len() != opt_len {
            return Err(malformed());
        }
        let mut capabilities = Vec::new();
        while !rest.is_empty() {
            let hdr = if extended { 3 } else { 2 };
            if rest.len() < hdr {
                return Err(malformed());
            }
            let ptype = rest[0];
            let plen = if extended {
                u16::from_be_bytes([rest[1], rest[2]]) as usize
            } else {
                rest[1] as usize
            };
            let Some(value) = rest.get(hdr..hdr + plen) else {
                return Err(malformed());
            };
            if ptype != PARAM_CAPABILITIES {
                return Err(DecodeError::new(
                    code::OPEN_MESSAGE,
                    open_err::UNSUPPORTED_OPTIONAL_PARAMETER,
                    Bytes::new(),
                ));
            }
            decode_capabilities(value, &mut capabilities).map_err(|_| malformed())?;
            rest = &rest[hdr + plen..];
        }
        let open = Open {
            version,
            my_as,
            hold_time,
            bgp_id,
            capabilities,
        };
        // Checks that need no session context, in RFC 4271 §6.2 order. Whether the AS is the
        // configured peer AS, and the collision with our own identifier, are the FSM's.
        if open.asn() == 0 {
            // RFC 7607 §2: AS 0 in an OPEN.
            return Err(DecodeError::new(
                code::OPEN_MESSAGE,
                open_err::BAD_PEER_AS,
                Bytes::new(),
            ));
        }
        if hold_time == 1 || hold_time == 2 {
            // RFC 4271 §6.2: hold times of one or two seconds MUST be rejected.
            return Err(DecodeError::new(
                code::OPEN_MESSAGE,
                open_err::UNACCEPTABLE_HOLD_TIME,
                Bytes::new(),
            ));
        }
        if bgp_id.is_unspecified() {
            // RFC 6286 §2.2: a BGP Identifier of zero is a Bad BGP Identifier.
            return Err(DecodeError::new(
                code::OPEN_MESSAGE,
                open_err::BAD_BGP_IDENTIFIER,
                Bytes::new(),
            ));
        }
        Ok(open)
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u8(self.version);
        out.put_u16(self.my_as);
        out.put_u16(self.hold_time);
        out.put_slice(&self.bgp_id.octets());
        let mut caps = BytesMut::new();
        for c in &self.capabilities {
            c.encode(&mut caps);
        }
        if caps.is_empty() {
            out.put_u8(0);
            return;
        }
        // All capabilities in one Capabilities optional parameter, as BIRD and GoBGP send
        // them (RFC 5492 §4 allows one or several); over 255 octets, the RFC 9072 extended
        // encoding: Non-Ext OP Len 255, Non-Ext OP Type 255, 2-octet lengths.
        if caps.len() + 2 <= 255 {
            out.put_u8((caps.len() + 2) as u8);
            out.put_u8(PARAM_CAPABILITIES);
            out.put_u8(caps.len() as u8);
        } else {
            out.put_u8(255);
            out.put_u8(255);
            out.put_u16((caps.len() + 3) as u16);
            out.put_u8(PARAM_CAPABILITIES);
            out.put_u16(caps.len() as u16);
        }
        out.put_slice(&caps);
    }
}

struct CapError;

fn decode_capabilities(mut buf: &[u8], out: &mut Vec<Capability>) -> Result<(), CapError> {
    while !buf.is_empty() {
        if buf.len() < 2 {
            return Err(CapError);
        }
        let code = buf[0];
        let len = buf[1] as usize;
        let value = buf.get(2..2 + len).ok_or(CapError)?;
        buf = &buf[2 + len..];
        let cap = match code {
            cap_code::MULTIPROTOCOL if len == 4 => Capability::Multiprotocol(Family {
                afi: u16::from_be_bytes([value[0], value[1]]),
                safi: value[3],
            }),
            cap_code::ROUTE_REFRESH if len == 0 => Capability::RouteRefresh,
            cap_code::FOUR_OCTET_AS if len == 4 => Capability::FourOctetAs(u32::from_be_bytes([
                value[0], value[1], value[2], value[3],
            ])),
            cap_code::GRACEFUL_RESTART if len >= 2 && (len - 2).is_multiple_of(4) => {
                let flags_time = u16::from_be_bytes([value[0], value[1]]);
                let families = value[2..]
                    .chunks_exact(4)
                    .map(|c| GrFamily {
                        family: Family {
                            afi: u16::from_be_bytes([c[0], c[1]]),
                            safi: c[2],
                        },
                        forwarding_state: c[3] & 0x80 != 0,
                    })
                    .collect();
                Capability::GracefulRestart(GracefulRestartCap {
                    restart_state: flags_time & 0x8000 != 0,
                    notification: flags_time & 0x4000 != 0,
                    restart_time: flags_time & 0x0fff,
                    families,
                })
            }
            cap_code::ADD_PATH if len.is_multiple_of(4) => Capability::AddPath(
                value
                    .chunks_exact(4)
                    .map(|c| {
                        (
                            Family {
                                afi: u16::from_be_bytes([c[0], c[1]]),
                                safi: c[2],
                            },
                            c[3],
                        )
                    })
                    .collect(),
            ),
            // A known code with a wrong length is kept as unknown rather than failing the
            // OPEN: the capability is then simply not used.
            _ => Capability::Unknown {
                code,
                value: Bytes::copy_from_slice(value),
            },
        };
        out.push(cap);
    }
    Ok(())
}

impl Capability {
    fn encode(&self, out: &mut BytesMut) {
        match self {
            Capability::Multiprotocol(f) => {
                out.put_slice(&[cap_code::MULTIPROTOCOL, 4]);
                out.put_u16(f.afi);
                out.put_u8(0);
                out.put_u8(f.safi);
            }
            Capability::RouteRefresh => out.put_slice(&[cap_code::ROUTE_REFRESH, 0]),
            Capability::FourOctetAs(a) => {
                out.put_slice(&[cap_code::FOUR_OCTET_AS, 4]);
                out.put_u32(*a);
            }
            Capability::GracefulRestart(g) => {
                // At most 63 families fit the one-octet length (2 + 4 * 63 = 254).
                out.put_u8(cap_code::GRACEFUL_RESTART);
                out.put_u8((2 + 4 * g.families.len().min(63)) as u8);
                let mut ft = g.restart_time & 0x0fff;
                if g.restart_state {
                    ft |= 0x8000;
                }
                if g.notification {
                    ft |= 0x4000;
                }
                out.put_u16(ft);
                for f in g.families.iter().take(63) {
                    out.put_u16(f.family.afi);
                    out.put_u8(f.family.safi);
                    out.put_u8(if f.forwarding_state { 0x80 } else { 0 });
                }
            }
            Capability::AddPath(v) => {
                out.put_u8(cap_code::ADD_PATH);
                out.put_u8((4 * v.len().min(63)) as u8);
                for (f, sr) in v.iter().take(63) {
                    out.put_u16(f.afi);
                    out.put_u8(f.safi);
                    out.put_u8(*sr);
                }
            }
            Capability::Unknown { code, value } => {
                out.put_u8(*code);
                let n = value.len().min(255);
                out.put_u8(n as u8);
                out.put_slice(&value[..n]);
            }
        }
    }
}

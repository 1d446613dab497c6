//! IP pools: the address ranges pods get their blocks from, and how traffic to them is
//! encapsulated.

use std::fmt;

use ipnet::IpNet;
use k8s_openapi::jiff::Timestamp;

use super::cidr::parse_masked_cidr;
use super::crd::IPPool;
use super::error::{Kind, Reason, Rejection};

/// Default `blockSize` of an IPv4 pool.
pub const DEFAULT_BLOCK_SIZE_V4: u8 = 26;
/// Default `blockSize` of an IPv6 pool.
pub const DEFAULT_BLOCK_SIZE_V6: u8 = 122;

/// `ipipMode` / `vxlanMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EncapMode {
    /// No encapsulation (also the meaning of an empty or absent field).
    #[default]
    Never,
    /// Always encapsulate traffic to other nodes.
    Always,
    /// Encapsulate only when the other node is outside the local node's subnet.
    CrossSubnet,
}

impl EncapMode {
    /// Parses a field value; `""` means `Never`.
    pub fn parse(field: &'static str, value: &str) -> Result<Self, Reason> {
        match value {
            "" | "Never" => Ok(EncapMode::Never),
            "Always" => Ok(EncapMode::Always),
            "CrossSubnet" => Ok(EncapMode::CrossSubnet),
            other => Err(Reason::BadEncapMode {
                field,
                value: other.to_string(),
            }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EncapMode::Never => "Never",
            EncapMode::Always => "Always",
            EncapMode::CrossSubnet => "CrossSubnet",
        }
    }

    /// Whether the mode encapsulates at all.
    pub fn is_on(self) -> bool {
        self != EncapMode::Never
    }
}

impl fmt::Display for EncapMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated `IPPool`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pool {
    pub name: String,
    /// The pool's network (host bits are zero).
    pub cidr: IpNet,
    /// Prefix length of the pool's blocks.
    pub block_size: u8,
    pub ipip_mode: EncapMode,
    pub vxlan_mode: EncapMode,
    pub nat_outgoing: bool,
    pub disabled: bool,
    pub disable_bgp_export: bool,
    /// Calico selector text, not evaluated here.
    pub node_selector: Option<String>,
    /// `metadata.creationTimestamp`, used to decide which of two overlapping pools wins.
    pub created: Option<Timestamp>,
}

impl Pool {
    /// Validates one `IPPool` on its own (overlaps are decided by [`resolve_overlaps`]).
    pub fn from_resource(obj: &IPPool) -> Result<Pool, Rejection> {
        let name = obj.name();
        let reject = |reason| Rejection::new(Kind::IPPool, name, reason);
        if name.is_empty() {
            return Err(reject(Reason::NoName));
        }
        let spec = &obj.spec;
        let cidr = match spec.cidr.as_deref() {
            None | Some("") => return Err(reject(Reason::CidrMissing)),
            Some(text) => parse_masked_cidr(text).map_err(reject)?,
        };
        let (range, lo, hi, default) = match cidr {
            IpNet::V4(_) => ("20..=32", 20, 32, DEFAULT_BLOCK_SIZE_V4),
            IpNet::V6(_) => ("116..=128", 116, 128, DEFAULT_BLOCK_SIZE_V6),
        };
        let block_size = match spec.block_size {
            None => default,
            Some(size) if size < i64::from(lo) || size > i64::from(hi) => {
                return Err(reject(Reason::BlockSizeOutOfRange { size, range }));
            }
            Some(size) => u8::try_from(size)
                .map_err(|_| reject(Reason::BlockSizeOutOfRange { size, range }))?,
        };
        if block_size < cidr.prefix_len() {
            return Err(reject(Reason::BlockSizeSmallerThanPool {
                size: block_size,
                prefix: cidr.prefix_len(),
            }));
        }
        let ipip_mode = EncapMode::parse("ipipMode", spec.ipip_mode.as_deref().unwrap_or(""))
            .map_err(reject)?;
        let vxlan_mode = EncapMode::parse("vxlanMode", spec.vxlan_mode.as_deref().unwrap_or(""))
            .map_err(reject)?;
        if ipip_mode.is_on() && vxlan_mode.is_on() {
            return Err(reject(Reason::BothEncapsulations {
                ipip: ipip_mode.to_string(),
                vxlan: vxlan_mode.to_string(),
            }));
        }
        if ipip_mode.is_on() && matches!(cidr, IpNet::V6(_)) {
            return Err(reject(Reason::IpipOnIpv6 {
                mode: ipip_mode.to_string(),
            }));
        }
        Ok(Pool {
            name: name.to_string(),
            cidr,
            block_size,
            ipip_mode,
            vxlan_mode,
            nat_outgoing: spec.nat_outgoing.unwrap_or(false),
            disabled: spec.disabled.unwrap_or(false),
            disable_bgp_export: spec.disable_bgp_export.unwrap_or(false),
            node_selector: spec.node_selector.clone().filter(|s| !s.is_empty()),
            created: obj.metadata.creation_timestamp.as_ref().map(|t| t.0),
        })
    }
}

/// Drops pools that overlap an earlier one, returning the survivors (sorted by name) and one
/// rejection per dropped pool.
///
/// Precedence is deterministic: the pool created first wins; pools without a creation time
/// (YAML files) come after those with one; ties are broken by name. This keeps an existing
/// pool in force when a new overlapping one is applied.
pub fn resolve_overlaps(mut pools: Vec<Pool>) -> (Vec<Pool>, Vec<Rejection>) {
    pools.sort_by(|a, b| {
        let ka = (a.created.is_none(), a.created, &a.name);
        let kb = (b.created.is_none(), b.created, &b.name);
        ka.cmp(&kb)
    });
    let mut kept: Vec<Pool> = Vec::with_capacity(pools.len());
    let mut rejected = Vec::new();
    for pool in pools {
        let clash = kept
            .iter()
            .find(|k| k.cidr.contains(&pool.cidr) || pool.cidr.contains(&k.cidr));
        match clash {
            Some(winner) => rejected.push(Rejection::new(
                Kind::IPPool,
                pool.name.clone(),
                Reason::OverlappingPool {
                    cidr: pool.cidr.to_string(),
                    other: winner.name.clone(),
                    other_cidr: winner.cidr.to_string(),
                },
            )),
            None => kept.push(pool),
        }
    }
    kept.sort_by(|a, b| a.name.cmp(&b.name));
    (kept, rejected)
}

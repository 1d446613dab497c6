//! IPAM blocks and block affinities: which node owns which /26 (or /122), and which pod
//! holds which address inside it.

use std::net::IpAddr;

use ipnet::IpNet;

use super::cidr::{cidr_from_block_name, nth_address, parse_masked_cidr};
use super::crd::{BlockAffinity, IPAMBlock};
use super::error::{Kind, Reason, Rejection};
use super::workload::workload_interface_name;

/// `IPAMBlock.spec.affinity`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Affinity {
    /// `host:<node>`: the block belongs to that node.
    Host(String),
    /// `virtual:<name>`: the block belongs to something that is not a node.
    Virtual(String),
}

impl Affinity {
    /// Parses `host:<node>` / `virtual:<name>`.
    pub fn parse(value: &str) -> Result<Self, Reason> {
        let bad = || Reason::BadAffinity {
            value: value.to_string(),
        };
        if let Some(node) = value.strip_prefix("host:") {
            if node.is_empty() {
                return Err(bad());
            }
            Ok(Affinity::Host(node.to_string()))
        } else if let Some(name) = value.strip_prefix("virtual:") {
            if name.is_empty() {
                return Err(bad());
            }
            Ok(Affinity::Virtual(name.to_string()))
        } else {
            Err(bad())
        }
    }
}

/// One allocated address of a block.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Allocation {
    /// Position inside the block.
    pub ordinal: u32,
    pub ip: IpAddr,
    pub handle_id: Option<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    /// The node the address is used on; differs from the block's host for a borrowed IP.
    pub node: Option<String>,
    /// `secondary.type`, e.g. `ipipTunnelAddress` for a node's tunnel address.
    pub attr_type: Option<String>,
}

impl Allocation {
    /// The host-side interface of the pod holding this address, when it is a pod's.
    pub fn interface_name(&self) -> Option<String> {
        match (&self.namespace, &self.pod) {
            (Some(ns), Some(pod)) => Some(workload_interface_name(ns, pod)),
            _ => None,
        }
    }
}

/// A validated `IPAMBlock`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Block {
    pub name: String,
    pub cidr: IpNet,
    pub affinity: Option<Affinity>,
    /// Allocated addresses only, in ordinal order. Empty when the object lists none.
    pub allocations: Vec<Allocation>,
    /// Calico's internal "being deleted" marker (`deleted`, or legacy `Deleted`).
    pub deleted: bool,
}

impl Block {
    /// The node this block is affine to (`host:<node>`).
    pub fn host(&self) -> Option<&str> {
        match &self.affinity {
            Some(Affinity::Host(node)) => Some(node),
            _ => None,
        }
    }

    /// Allocations used on a node other than the block's host: each needs its own /32
    /// (or /128) route to that node.
    pub fn borrowed(&self) -> impl Iterator<Item = &Allocation> {
        let host = self.host();
        self.allocations
            .iter()
            .filter(move |a| matches!((&a.node, host), (Some(n), Some(h)) if n != h))
    }

    /// Validates one `IPAMBlock`.
    pub fn from_resource(obj: &IPAMBlock) -> Result<Block, Rejection> {
        let name = obj.name();
        let reject = |reason| Rejection::new(Kind::IPAMBlock, name, reason);
        if name.is_empty() {
            return Err(reject(Reason::NoName));
        }
        let spec = &obj.spec;
        let cidr = match spec.cidr.as_deref() {
            Some(text) if !text.is_empty() => parse_masked_cidr(text).map_err(reject)?,
            _ => match cidr_from_block_name(name) {
                Some(net) if net.trunc() == net => net,
                _ => return Err(reject(Reason::BlockNameNotCidr)),
            },
        };
        let affinity = match spec.affinity.as_deref() {
            None | Some("") => None,
            Some(value) => Some(Affinity::parse(value).map_err(reject)?),
        };
        let attributes = spec.attributes.as_deref().unwrap_or(&[]);
        let mut allocations = Vec::new();
        if let Some(slots) = &spec.allocations {
            let host_bits = cidr.max_prefix_len() - cidr.prefix_len();
            let expected = 1u128.checked_shl(u32::from(host_bits)).unwrap_or(u128::MAX);
            if slots.len() as u128 != expected {
                return Err(reject(Reason::AllocationsLength {
                    len: slots.len(),
                    prefix: cidr.prefix_len(),
                    expected,
                }));
            }
            for (ordinal, slot) in slots.iter().enumerate() {
                let Some(index) = *slot else { continue };
                let attr = usize::try_from(index)
                    .ok()
                    .and_then(|i| attributes.get(i))
                    .ok_or_else(|| {
                        reject(Reason::AllocationIndexOutOfRange {
                            ordinal,
                            index,
                            attributes: attributes.len(),
                        })
                    })?;
                // The length check above bounds `ordinal` by the block size, which fits u32
                // for every block whose allocation list can be held in memory.
                let (Ok(ord), Some(ip)) = (
                    u32::try_from(ordinal),
                    u32::try_from(ordinal)
                        .ok()
                        .and_then(|o| nth_address(&cidr, o)),
                ) else {
                    continue;
                };
                let secondary = attr.secondary.as_ref();
                let get = |key: &str| {
                    secondary
                        .and_then(|s| s.get(key))
                        .filter(|v| !v.is_empty())
                        .cloned()
                };
                allocations.push(Allocation {
                    ordinal: ord,
                    ip,
                    handle_id: attr.handle_id.clone(),
                    namespace: get("namespace"),
                    pod: get("pod"),
                    node: get("node"),
                    attr_type: get("type"),
                });
            }
        }
        Ok(Block {
            name: name.to_string(),
            cidr,
            affinity,
            allocations,
            deleted: spec.deleted.unwrap_or(false) || spec.deleted_legacy.unwrap_or(false),
        })
    }
}

/// A validated `BlockAffinity`: a node's claim on a block.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockClaim {
    pub name: String,
    pub cidr: IpNet,
    pub node: String,
    /// `confirmed`, `pending` or `pendingDeletion`.
    pub state: String,
    pub deleted: bool,
}

impl BlockClaim {
    /// Validates one `BlockAffinity`.
    pub fn from_resource(obj: &BlockAffinity) -> Result<BlockClaim, Rejection> {
        let name = obj.name();
        let reject = |reason| Rejection::new(Kind::BlockAffinity, name, reason);
        if name.is_empty() {
            return Err(reject(Reason::NoName));
        }
        let spec = &obj.spec;
        let cidr = match spec.cidr.as_deref() {
            None | Some("") => return Err(reject(Reason::CidrMissing)),
            Some(text) => parse_masked_cidr(text).map_err(reject)?,
        };
        let node = match spec.node.as_deref() {
            None | Some("") => return Err(reject(Reason::NodeMissing)),
            Some(node) => node.to_string(),
        };
        Ok(BlockClaim {
            name: name.to_string(),
            cidr,
            node,
            state: spec.state.clone().unwrap_or_default(),
            deleted: spec.deleted.as_ref().is_some_and(|d| d.is_true()),
        })
    }
}

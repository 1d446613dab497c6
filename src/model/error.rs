//! Why an object was not taken into the cluster state.
//!
//! Every message names the object (`IPPool "pool-a": ...`) and says what is wrong in terms of
//! the fields a user edits, so that the single log line printed for a skipped object is
//! enough to fix it.

use std::fmt;

/// The kinds of objects the datastores read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Node,
    IPPool,
    IPAMBlock,
    BlockAffinity,
    BGPPeer,
    BGPConfiguration,
    BGPFilter,
    /// Kubernetes `Service` (service IP advertisement).
    Service,
    /// `discovery.k8s.io/v1` `EndpointSlice` (service IP advertisement).
    EndpointSlice,
}

impl Kind {
    /// All kinds, in the order the state is built.
    pub const ALL: [Kind; 9] = [
        Kind::Node,
        Kind::IPPool,
        Kind::IPAMBlock,
        Kind::BlockAffinity,
        Kind::BGPPeer,
        Kind::BGPConfiguration,
        Kind::BGPFilter,
        Kind::Service,
        Kind::EndpointSlice,
    ];

    /// The `kind:` string of the object.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::IPPool => "IPPool",
            Kind::IPAMBlock => "IPAMBlock",
            Kind::BlockAffinity => "BlockAffinity",
            Kind::BGPPeer => "BGPPeer",
            Kind::BGPConfiguration => "BGPConfiguration",
            Kind::BGPFilter => "BGPFilter",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }

    /// Index into per-kind arrays (counters).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An object that was skipped, and why. Displays as `IPPool "pool-a": blockSize 33 is
/// outside 20..=32`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: {reason}")]
pub struct Rejection {
    pub kind: Kind,
    pub name: String,
    pub reason: Reason,
}

impl Rejection {
    pub fn new(kind: Kind, name: impl Into<String>, reason: Reason) -> Self {
        Self {
            kind,
            name: name.into(),
            reason,
        }
    }
}

/// What is wrong with an object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("metadata.name is missing")]
    NoName,
    #[error("cannot be read: {0}")]
    Malformed(String),
    #[error("cidr is missing")]
    CidrMissing,
    #[error("cidr {value:?} is not a valid CIDR (expected e.g. 172.16.0.0/16)")]
    CidrUnparseable { value: String },
    #[error("cidr {value} has host bits set; write the network address {masked}")]
    CidrNotMasked { value: String, masked: String },
    #[error("blockSize {size} is outside {range}")]
    BlockSizeOutOfRange { size: i64, range: &'static str },
    #[error(
        "blockSize {size} is smaller than the pool's prefix length {prefix}: a block cannot be larger than its pool"
    )]
    BlockSizeSmallerThanPool { size: u8, prefix: u8 },
    #[error("{field} {value:?} is not one of Never, Always, CrossSubnet")]
    BadEncapMode { field: &'static str, value: String },
    #[error("ipipMode {ipip} and vxlanMode {vxlan} are both on; enable at most one encapsulation")]
    BothEncapsulations { ipip: String, vxlan: String },
    #[error("ipipMode {mode} is not allowed on an IPv6 pool (IPIP carries IPv4 only); use Never")]
    IpipOnIpv6 { mode: String },
    #[error(
        "cidr {cidr} overlaps IPPool {other:?} ({other_cidr}), which takes precedence (created earlier, or by name order); this pool is ignored"
    )]
    OverlappingPool {
        cidr: String,
        other: String,
        other_cidr: String,
    },
    #[error(
        "spec.cidr is missing and the name is not a CIDR written with dashes (e.g. 172-16-196-128-26)"
    )]
    BlockNameNotCidr,
    #[error(
        "cidr {cidr} is inside no IPPool: the block is ignored (no blackhole, no route); create a pool that contains it or delete the block"
    )]
    BlockOutsidePools { cidr: String },
    #[error("affinity {value:?} must be \"host:<node>\" or \"virtual:<name>\"")]
    BadAffinity { value: String },
    #[error("allocations has {len} entries but a /{prefix} block has {expected} addresses")]
    AllocationsLength {
        len: usize,
        prefix: u8,
        expected: u128,
    },
    #[error(
        "allocations[{ordinal}] = {index} is out of range of attributes ({attributes} entries)"
    )]
    AllocationIndexOutOfRange {
        ordinal: usize,
        index: i64,
        attributes: usize,
    },
    #[error("node is missing")]
    NodeMissing,
    #[error("peerIP {value:?} is not an IP address, IPv4:port or [IPv6]:port")]
    BadPeerIp { value: String },
    #[error("peerIP and peerSelector are both set; use one of them")]
    PeerIpAndSelector,
    #[error("neither peerIP nor peerSelector is set")]
    NoPeerTarget,
    #[error("node and nodeSelector are both set; use one of them")]
    NodeAndNodeSelector,
    #[error("asNumber {value} is outside 1..=4294967295")]
    AsNumberOutOfRange { value: i64 },
    #[error("listenPort {value} is outside 1..=65535")]
    ListenPortOutOfRange { value: i64 },
    #[error("{field} {value:?} is not a duration such as 120s or 2m30s")]
    BadDuration { field: &'static str, value: String },
    #[error(
        "community {value:?} is neither a standard community aa:nn (16-bit numbers) nor a large community aa:nn:mm (32-bit numbers), nor the name of an entry of spec.communities"
    )]
    BadCommunity { value: String },
    #[error("{list}[{index}]: {problem}")]
    BadFilterRule {
        list: &'static str,
        index: usize,
        problem: String,
    },
    #[error("{field} {value:?} is not one of {expected}")]
    BadEnum {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{field} {value:?} is not an IP address")]
    BadServiceIp { field: &'static str, value: String },
    #[error("annotation {annotation} {value:?} is not {expected}")]
    BadAnnotation {
        annotation: &'static str,
        value: String,
        expected: &'static str,
    },
}

//! The node's tunnel addresses (IPIP, IPv4 VXLAN, IPv6 VXLAN; see [`TunnelKind`]),
//! allocated in Calico IPAM as calico-node allocates them (kubernetes datastore only).
//!
//! When a pool needs `tunl0` and the local Node has no `projectcalico.org/IPv4IPIPTunnelAddr`,
//! one address of one of the node's own blocks is allocated for it:
//!
//! 1. the `IPAMBlock` is updated by compare-and-swap on its `resourceVersion` (a `PUT` of the
//!    object read, so a concurrent writer such as the CNI plugin makes it fail with 409
//!    Conflict; it is then read again and the allocation retried): the first ordinal of
//!    `unallocated` gets a new `attributes[]` entry with `handle_id: ipip-tunnel-addr-<node>`
//!    and `secondary: {node: <node>, type: ipipTunnelAddress}`, leaves `unallocated`, and is
//!    stamped in `sequenceNumberForAllocation`; `sequenceNumber` goes up by one;
//! 2. the `IPAMHandle` `ipip-tunnel-addr-<node>` records the block (`spec.block: {CIDR: 1}`);
//! 3. the annotation is written.
//!
//! An existing annotation is honoured unchanged (calico-node's allocation, or one set by hand).
//! Each step is idempotent: after a crash between them the next run finds the block's
//! allocation by its handle and finishes. [`release`] undoes all three when no pool needs IPIP
//! any more. The block is edited as JSON ([`BlockEdit`]), so fields podroute does not model
//! survive the write.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject};
use serde_json::{Value, json};
use thiserror::Error;
use tracing::{debug, info};

use crate::model::crd::{IPAMBlock, IPAMHandle, IPAMHandleSpec};
use crate::model::node::{
    ANNOTATION_IPIP_TUNNEL_ADDR, ANNOTATION_VXLAN_TUNNEL_ADDR, ANNOTATION_VXLAN_TUNNEL_ADDR_V6,
    ANNOTATION_VXLAN_TUNNEL_MAC, ANNOTATION_VXLAN_TUNNEL_MAC_V6,
};
use crate::plan::tunnels::default_vtep_mac;

/// `attributes[].secondary.type` of an IPIP tunnel address.
pub const ATTRIBUTE_TYPE_IPIP: &str = "ipipTunnelAddress";
/// `attributes[].secondary.type` of a VXLAN tunnel address.
pub const ATTRIBUTE_TYPE_VXLAN: &str = "vxlanTunnelAddress";
/// `attributes[].secondary.type` of an IPv6 VXLAN tunnel address.
pub const ATTRIBUTE_TYPE_VXLAN_V6: &str = "vxlanV6TunnelAddress";

/// Which of the node's tunnel addresses: calico-node allocates one per encapsulation in use,
/// each with its own handle, attribute type and annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelKind {
    /// `tunl0`'s: handle `ipip-tunnel-addr-<node>`, `projectcalico.org/IPv4IPIPTunnelAddr`.
    Ipip,
    /// `vxlan.calico`'s: handle `vxlan-tunnel-addr-<node>`,
    /// `projectcalico.org/IPv4VXLANTunnelAddr` (and the VTEP MAC in
    /// `projectcalico.org/IPv4VXLANTunnelMACAddr`, written with it when missing).
    Vxlan,
    /// `vxlan-v6.calico`'s, in an IPv6 block: handle `vxlan-v6-tunnel-addr-<node>` (the
    /// `-v6-` in the middle, as calico-node names it), attribute type
    /// `vxlanV6TunnelAddress`, `projectcalico.org/IPv6VXLANTunnelAddr` (and
    /// `projectcalico.org/IPv6VXLANTunnelMACAddr`).
    VxlanV6,
}

impl TunnelKind {
    pub fn handle_id(self, node: &str) -> String {
        match self {
            TunnelKind::Ipip => format!("ipip-tunnel-addr-{node}"),
            TunnelKind::Vxlan => format!("vxlan-tunnel-addr-{node}"),
            TunnelKind::VxlanV6 => format!("vxlan-v6-tunnel-addr-{node}"),
        }
    }

    pub fn attribute_type(self) -> &'static str {
        match self {
            TunnelKind::Ipip => ATTRIBUTE_TYPE_IPIP,
            TunnelKind::Vxlan => ATTRIBUTE_TYPE_VXLAN,
            TunnelKind::VxlanV6 => ATTRIBUTE_TYPE_VXLAN_V6,
        }
    }

    pub fn annotation(self) -> &'static str {
        match self {
            TunnelKind::Ipip => ANNOTATION_IPIP_TUNNEL_ADDR,
            TunnelKind::Vxlan => ANNOTATION_VXLAN_TUNNEL_ADDR,
            TunnelKind::VxlanV6 => ANNOTATION_VXLAN_TUNNEL_ADDR_V6,
        }
    }

    /// The VTEP MAC annotation written with the address (VXLAN only).
    pub fn mac_annotation(self) -> Option<&'static str> {
        match self {
            TunnelKind::Ipip => None,
            TunnelKind::Vxlan => Some(ANNOTATION_VXLAN_TUNNEL_MAC),
            TunnelKind::VxlanV6 => Some(ANNOTATION_VXLAN_TUNNEL_MAC_V6),
        }
    }

    /// The address family of the tunnel address (and of the blocks it is allocated in).
    pub fn is_ipv6(self) -> bool {
        self == TunnelKind::VxlanV6
    }

    fn label(self) -> &'static str {
        match self {
            TunnelKind::Ipip => "IPIP",
            TunnelKind::Vxlan => "VXLAN",
            TunnelKind::VxlanV6 => "IPv6 VXLAN",
        }
    }
}

/// How often a block write is retried after 409 Conflict before giving up (for now: the agent
/// tries again at its next attempt).
pub const MAX_CONFLICT_RETRIES: usize = 10;

/// The IPAM handle of node `node`'s IPIP tunnel address, as calico-node names it.
pub fn handle_id(node: &str) -> String {
    TunnelKind::Ipip.handle_id(node)
}

/// The `IPAMBlock` object name of a block: the CIDR with dashes (`172-16-241-64-26`,
/// `fd00-10---122`).
pub fn block_name(cidr: impl Into<IpNet>) -> String {
    cidr.into().to_string().replace(['.', ':', '/'], "-")
}

/// Why the tunnel address could not be allocated or released.
#[derive(Debug, Error)]
pub enum TunnelIpamError {
    #[error("cannot {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("IPAMBlock {block}: {problem}; the tunnel address is not allocated in it")]
    BadBlock { block: String, problem: String },
    #[error(
        "IPAMBlock {block} kept changing ({MAX_CONFLICT_RETRIES} conflicts in a row); retrying later"
    )]
    Contended { block: String },
    #[error("node {0} not found; is NODENAME right?")]
    NodeNotFound(String),
}

fn api_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> TunnelIpamError {
    let what = what.into();
    move |source| TunnelIpamError::Api { what, source }
}

/// A block's `spec` as JSON, edited in place.
#[derive(Debug)]
pub struct BlockEdit<'a> {
    spec: &'a mut Value,
}

impl<'a> BlockEdit<'a> {
    /// Wraps `spec`, checking the fields an allocation needs.
    pub fn new(block: &str, spec: &'a mut Value, size: usize) -> Result<Self, TunnelIpamError> {
        let bad = |problem: String| TunnelIpamError::BadBlock {
            block: block.to_string(),
            problem,
        };
        if !spec.is_object() {
            return Err(bad("spec is not an object".into()));
        }
        match spec.get("allocations").and_then(Value::as_array) {
            Some(a) if a.len() == size => {}
            Some(a) => {
                return Err(bad(format!(
                    "allocations has {} entries, the CIDR {size} addresses",
                    a.len()
                )));
            }
            None => return Err(bad("no allocations list".into())),
        }
        Ok(Self { spec })
    }

    fn allocations(&self) -> &[Value] {
        self.spec
            .get("allocations")
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }

    fn attributes(&self) -> &[Value] {
        self.spec
            .get("attributes")
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }

    /// Ordinals whose attribute carries `handle`.
    pub fn ordinals_of(&self, handle: &str) -> Vec<usize> {
        let attributes = self.attributes();
        self.allocations()
            .iter()
            .enumerate()
            .filter_map(|(ordinal, a)| {
                let index = usize::try_from(a.as_u64()?).ok()?;
                (attributes.get(index)?.get("handle_id")?.as_str()? == handle).then_some(ordinal)
            })
            .collect()
    }

    /// The ordinal Calico IPAM would hand out next: the first of `unallocated` that is free
    /// in `allocations` (or, when `unallocated` is missing, the lowest free ordinal).
    pub fn next_free(&self) -> Option<usize> {
        let allocations = self.allocations();
        let free = |o: usize| allocations.get(o).is_some_and(Value::is_null);
        match self.spec.get("unallocated").and_then(Value::as_array) {
            Some(list) => list
                .iter()
                .filter_map(|o| usize::try_from(o.as_u64()?).ok())
                .find(|o| free(*o)),
            None => (0..allocations.len()).find(|o| free(*o)),
        }
    }

    /// Allocates `ordinal` to `handle` with `secondary` attributes.
    pub fn allocate(&mut self, ordinal: usize, handle: &str, secondary: Value) {
        let spec = &mut *self.spec;
        let attrs = spec
            .as_object_mut()
            .map(|o| o.entry("attributes").or_insert_with(|| json!([])));
        let Some(attrs) = attrs else { return };
        if !attrs.is_array() {
            *attrs = json!([]);
        }
        let Some(list) = attrs.as_array_mut() else {
            return;
        };
        list.push(json!({ "handle_id": handle, "secondary": secondary }));
        let index = list.len() - 1;
        if let Some(slot) = spec
            .get_mut("allocations")
            .and_then(Value::as_array_mut)
            .and_then(|a| a.get_mut(ordinal))
        {
            *slot = json!(index);
        }
        if let Some(list) = spec.get_mut("unallocated").and_then(Value::as_array_mut) {
            list.retain(|o| o.as_u64() != Some(ordinal as u64));
        }
        let sequence = spec
            .get("sequenceNumber")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if let Some(obj) = spec.as_object_mut() {
            let stamps = obj
                .entry("sequenceNumberForAllocation")
                .or_insert_with(|| json!({}));
            if !stamps.is_object() {
                *stamps = json!({});
            }
            stamps[ordinal.to_string()] = json!(sequence);
            obj.insert("sequenceNumber".into(), json!(sequence + 1));
        }
    }

    /// Frees every ordinal of `handle`: `allocations[o]` null, `o` back at the end of
    /// `unallocated`, its sequence stamp dropped, attributes no allocation uses any more
    /// removed (the other allocations' indices renumbered). Returns the ordinals freed.
    pub fn release(&mut self, handle: &str) -> Vec<usize> {
        let freed = self.ordinals_of(handle);
        if freed.is_empty() {
            return freed;
        }
        let spec = &mut *self.spec;
        if let Some(allocations) = spec.get_mut("allocations").and_then(Value::as_array_mut) {
            for o in &freed {
                if let Some(slot) = allocations.get_mut(*o) {
                    *slot = Value::Null;
                }
            }
        }
        if let Some(obj) = spec.as_object_mut() {
            let unallocated = obj.entry("unallocated").or_insert_with(|| json!([]));
            if let Some(list) = unallocated.as_array_mut() {
                list.extend(freed.iter().map(|o| json!(o)));
            }
            if let Some(stamps) = obj
                .get_mut("sequenceNumberForAllocation")
                .and_then(Value::as_object_mut)
            {
                for o in &freed {
                    stamps.remove(&o.to_string());
                }
            }
            let sequence = obj
                .get("sequenceNumber")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            obj.insert("sequenceNumber".into(), json!(sequence + 1));
        }
        self.drop_unused_attributes();
        freed
    }

    fn drop_unused_attributes(&mut self) {
        let used: Vec<usize> = self
            .allocations()
            .iter()
            .filter_map(|a| usize::try_from(a.as_u64()?).ok())
            .collect();
        let count = self.attributes().len();
        // New index of each kept attribute.
        let mut renumber = vec![None; count];
        let mut next = 0usize;
        for (i, slot) in renumber.iter_mut().enumerate() {
            if used.contains(&i) {
                *slot = Some(next);
                next += 1;
            }
        }
        if let Some(list) = self
            .spec
            .get_mut("attributes")
            .and_then(Value::as_array_mut)
        {
            let mut i = 0;
            list.retain(|_| {
                let keep = renumber.get(i).is_some_and(Option::is_some);
                i += 1;
                keep
            });
        }
        if let Some(allocations) = self
            .spec
            .get_mut("allocations")
            .and_then(Value::as_array_mut)
        {
            for a in allocations.iter_mut() {
                if let Some(new) = a
                    .as_u64()
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| renumber.get(i).copied().flatten())
                {
                    *a = json!(new);
                }
            }
        }
    }
}

/// The address of `ordinal` in `cidr`.
fn ordinal_addr(cidr: IpNet, ordinal: usize) -> Option<IpAddr> {
    let offset = u128::try_from(ordinal).ok()?;
    let addr = match cidr {
        IpNet::V4(n) => {
            let offset = u32::try_from(offset).ok()?;
            IpAddr::V4(u32::from(n.network()).checked_add(offset)?.into())
        }
        IpNet::V6(n) => IpAddr::V6(u128::from(n.network()).checked_add(offset)?.into()),
    };
    cidr.contains(&addr).then_some(addr)
}

/// The number of addresses of block `cidr`; `None` for a prefix too short to be a block
/// (more than 2^20 addresses: Calico's smallest IPv6 block size is /116).
fn block_size(cidr: IpNet) -> Option<usize> {
    let bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len());
    (bits <= 20).then(|| 1usize << bits)
}

fn sized_edit<'a>(
    name: &str,
    spec: &'a mut Value,
    cidr: IpNet,
) -> Result<BlockEdit<'a>, TunnelIpamError> {
    let size = block_size(cidr).ok_or_else(|| TunnelIpamError::BadBlock {
        block: name.to_string(),
        problem: format!("{cidr} is too large for an IPAM block"),
    })?;
    BlockEdit::new(name, spec, size)
}

fn block_api(client: &kube::Client) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &ApiResource::erase::<IPAMBlock>(&()))
}

/// Allocates `handle` one address in block `cidr` (or finds the one it has): read, edit,
/// write with the read resourceVersion, again after each conflict. `None` when the block has
/// no free address.
async fn allocate_in_block(
    blocks: &Api<DynamicObject>,
    cidr: IpNet,
    handle: &str,
    node: &str,
    kind: TunnelKind,
) -> Result<Option<IpAddr>, TunnelIpamError> {
    let name = block_name(cidr);
    for _ in 0..MAX_CONFLICT_RETRIES {
        let Some(mut block) = blocks
            .get_opt(&name)
            .await
            .map_err(api_error(format!("read IPAMBlock {name}")))?
        else {
            return Ok(None);
        };
        let spec = block
            .data
            .get_mut("spec")
            .ok_or_else(|| TunnelIpamError::BadBlock {
                block: name.clone(),
                problem: "no spec".into(),
            })?;
        let mut edit = sized_edit(&name, spec, cidr)?;
        if let Some(ordinal) = edit.ordinals_of(handle).first() {
            debug!(block = name, ordinal, "tunnel address already allocated");
            return Ok(ordinal_addr(cidr, *ordinal));
        }
        let Some(ordinal) = edit.next_free() else {
            return Ok(None);
        };
        edit.allocate(
            ordinal,
            handle,
            json!({ "node": node, "type": kind.attribute_type() }),
        );
        // `block.metadata.resourceVersion` is the one read: a PUT is a compare-and-swap.
        match blocks.replace(&name, &PostParams::default(), &block).await {
            Ok(_) => return Ok(ordinal_addr(cidr, ordinal)),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                debug!(
                    block = name,
                    "IPAMBlock changed since it was read; reading it again"
                );
            }
            Err(source) => {
                return Err(TunnelIpamError::Api {
                    what: format!("update IPAMBlock {name}"),
                    source,
                });
            }
        }
    }
    Err(TunnelIpamError::Contended { block: name })
}

/// Frees `handle`'s addresses in block `name`; returns whether the block held any.
async fn release_in_block(
    blocks: &Api<DynamicObject>,
    name: &str,
    cidr: IpNet,
    handle: &str,
) -> Result<bool, TunnelIpamError> {
    for _ in 0..MAX_CONFLICT_RETRIES {
        let Some(mut block) = blocks
            .get_opt(name)
            .await
            .map_err(api_error(format!("read IPAMBlock {name}")))?
        else {
            return Ok(false);
        };
        let Some(spec) = block.data.get_mut("spec") else {
            return Ok(false);
        };
        let mut edit = sized_edit(name, spec, cidr)?;
        if edit.release(handle).is_empty() {
            return Ok(false);
        }
        match blocks.replace(name, &PostParams::default(), &block).await {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                debug!(
                    block = name,
                    "IPAMBlock changed since it was read; reading it again"
                );
            }
            Err(source) => {
                return Err(TunnelIpamError::Api {
                    what: format!("update IPAMBlock {name}"),
                    source,
                });
            }
        }
    }
    Err(TunnelIpamError::Contended {
        block: name.to_string(),
    })
}

/// Makes the handle object record exactly `cidr` (created, or deleted and created again when
/// it names other blocks: only get/create/delete are granted).
async fn ensure_handle(
    client: &kube::Client,
    handle: &str,
    cidr: IpNet,
) -> Result<(), TunnelIpamError> {
    let handles: Api<IPAMHandle> = Api::all(client.clone());
    let wanted = IPAMHandleSpec {
        handle_id: Some(handle.to_string()),
        block: Some([(cidr.to_string(), 1)].into_iter().collect()),
        deleted: Some(false),
    };
    if let Some(existing) = handles
        .get_opt(handle)
        .await
        .map_err(api_error(format!("read IPAMHandle {handle}")))?
    {
        if existing.spec.block == wanted.block {
            return Ok(());
        }
        handles
            .delete(handle, &DeleteParams::default())
            .await
            .map_err(api_error(format!("replace IPAMHandle {handle}")))?;
    }
    // Created through the dynamic API so that the body carries apiVersion and kind, which the
    // API server requires of a created object.
    let resource = ApiResource::erase::<IPAMHandle>(&());
    let object = DynamicObject::new(handle, &resource).data(json!({ "spec": wanted }));
    let creator: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    match creator.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(()),
        // Another writer created it meanwhile; the next attempt checks its blocks.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(source) => Err(TunnelIpamError::Api {
            what: format!("create IPAMHandle {handle}"),
            source,
        }),
    }
}

async fn patch_annotation(
    client: &kube::Client,
    node: &str,
    value: Option<String>,
    kind: TunnelKind,
) -> Result<(), TunnelIpamError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut annotations = serde_json::Map::new();
    annotations.insert(kind.annotation().into(), json!(value));
    if let Some(mac_key) = kind.mac_annotation() {
        // The VTEP MAC goes with the address (the one every node derives for this node when
        // it has none); an existing MAC annotation is kept while the address is.
        let existing = node_annotation(client, node, mac_key).await?;
        let mac = match (&value, existing) {
            (None, _) => None,
            (Some(_), Some(mac)) => Some(mac),
            (Some(_), None) => Some(default_vtep_mac(node, !kind.is_ipv6()).to_string()),
        };
        annotations.insert(mac_key.into(), json!(mac));
    }
    let body = json!({ "metadata": { "annotations": annotations } });
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .map(|_| ())
        .map_err(api_error(format!("annotate node {node}")))
}

/// Reads node `node`'s tunnel address annotation.
async fn annotation(
    client: &kube::Client,
    node: &str,
    kind: TunnelKind,
) -> Result<Option<String>, TunnelIpamError> {
    node_annotation(client, node, kind.annotation()).await
}

/// Reads one of node `node`'s annotations.
async fn node_annotation(
    client: &kube::Client,
    node: &str,
    key: &str,
) -> Result<Option<String>, TunnelIpamError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let found = nodes
        .get_opt(node)
        .await
        .map_err(api_error(format!("read node {node}")))?
        .ok_or_else(|| TunnelIpamError::NodeNotFound(node.to_string()))?;
    Ok(found.metadata.annotations.and_then(|mut a| a.remove(key)))
}

/// What [`ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// The Node already had an annotation: left as it is.
    Existing(String),
    /// An address was allocated (or a previous allocation finished) and annotated.
    Allocated(IpAddr),
    /// No own block has a free address (or the node has no block yet).
    NoFreeAddress,
}

/// Makes node `node` carry an IPIP tunnel address allocated in one of `own_blocks` (tried in
/// the given order), unless it carries one already.
pub async fn ensure(
    client: &kube::Client,
    node: &str,
    own_blocks: &[impl Into<IpNet> + Copy],
) -> Result<Ensured, TunnelIpamError> {
    ensure_kind(client, node, own_blocks, TunnelKind::Ipip).await
}

/// [`ensure`] for the tunnel address of `kind`; blocks of the other address family are
/// skipped.
pub async fn ensure_kind(
    client: &kube::Client,
    node: &str,
    own_blocks: &[impl Into<IpNet> + Copy],
    kind: TunnelKind,
) -> Result<Ensured, TunnelIpamError> {
    if let Some(existing) = annotation(client, node, kind).await? {
        if let Some(mac_key) = kind.mac_annotation()
            && node_annotation(client, node, mac_key).await?.is_none()
        {
            // An address without its MAC (set by hand): the MAC every node assumes goes with
            // it, so that Felix on the other nodes sees the VTEP too.
            patch_annotation(client, node, Some(existing.clone()), kind).await?;
        }
        return Ok(Ensured::Existing(existing));
    }
    let handle = kind.handle_id(node);
    let blocks = block_api(client);
    let family = own_blocks
        .iter()
        .map(|b| (*b).into())
        .filter(|b: &IpNet| b.addr().is_ipv6() == kind.is_ipv6());
    for cidr in family {
        let Some(addr) = allocate_in_block(&blocks, cidr, &handle, node, kind).await? else {
            continue;
        };
        ensure_handle(client, &handle, cidr).await?;
        patch_annotation(client, node, Some(addr.to_string()), kind).await?;
        info!(node, %addr, block = %cidr, handle, "{} tunnel address allocated in IPAM", kind.label());
        return Ok(Ensured::Allocated(addr));
    }
    Ok(Ensured::NoFreeAddress)
}

/// Releases node `node`'s IPIP tunnel address: frees its handle's allocations in `own_blocks`
/// and in the blocks its `IPAMHandle` names, deletes the handle, removes the annotation.
/// Returns whether anything was there to release.
pub async fn release(
    client: &kube::Client,
    node: &str,
    own_blocks: &[impl Into<IpNet> + Copy],
) -> Result<bool, TunnelIpamError> {
    release_kind(client, node, own_blocks, TunnelKind::Ipip).await
}

/// [`release`] for the tunnel address of `kind`.
pub async fn release_kind(
    client: &kube::Client,
    node: &str,
    own_blocks: &[impl Into<IpNet> + Copy],
    kind: TunnelKind,
) -> Result<bool, TunnelIpamError> {
    let handle = kind.handle_id(node);
    let handles: Api<IPAMHandle> = Api::all(client.clone());
    let recorded = handles
        .get_opt(&handle)
        .await
        .map_err(api_error(format!("read IPAMHandle {handle}")))?;
    let mut cidrs: Vec<IpNet> = own_blocks.iter().map(|b| (*b).into()).collect();
    if let Some(h) = &recorded {
        cidrs.extend(
            h.spec
                .block
                .iter()
                .flatten()
                .filter_map(|(cidr, _)| cidr.parse::<IpNet>().ok()),
        );
    }
    cidrs.retain(|c| c.addr().is_ipv6() == kind.is_ipv6());
    cidrs.sort();
    cidrs.dedup();
    let blocks = block_api(client);
    let mut released = false;
    for cidr in cidrs {
        released |= release_in_block(&blocks, &block_name(cidr), cidr, &handle).await?;
    }
    if recorded.is_some() {
        match handles.delete(&handle, &DeleteParams::default()).await {
            Ok(_) => released = true,
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(source) => {
                return Err(TunnelIpamError::Api {
                    what: format!("delete IPAMHandle {handle}"),
                    source,
                });
            }
        }
    }
    if annotation(client, node, kind).await?.is_some() {
        patch_annotation(client, node, None, kind).await?;
        released = true;
    }
    if released {
        info!(
            node,
            handle,
            "{} tunnel address released (no pool uses it)",
            kind.label()
        );
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(allocations: Value, unallocated: Value, attributes: Value) -> Value {
        json!({
            "cidr": "10.0.0.0/30",
            "affinity": "host:n1",
            "allocations": allocations,
            "unallocated": unallocated,
            "attributes": attributes,
            "sequenceNumber": 7,
            "strictAffinity": false,
            "futureField": "kept",
        })
    }

    #[test]
    fn allocation_takes_the_first_unallocated_ordinal_in_calicos_shape() {
        let mut s = spec(
            json!([0, null, null, null]),
            json!([2, 1, 3]),
            json!([{ "handle_id": "k8s-pod-network.abc", "secondary": { "pod": "p" } }]),
        );
        let mut edit = BlockEdit::new("b", &mut s, 4).unwrap();
        assert_eq!(edit.next_free(), Some(2));
        edit.allocate(
            2,
            "ipip-tunnel-addr-n1",
            json!({ "node": "n1", "type": "ipipTunnelAddress" }),
        );
        assert_eq!(edit.ordinals_of("ipip-tunnel-addr-n1"), [2]);
        assert_eq!(s["allocations"], json!([0, null, 1, null]));
        assert_eq!(s["unallocated"], json!([1, 3]));
        assert_eq!(
            s["attributes"][1],
            json!({ "handle_id": "ipip-tunnel-addr-n1", "secondary": { "node": "n1", "type": "ipipTunnelAddress" } })
        );
        assert_eq!(s["sequenceNumberForAllocation"], json!({ "2": 7 }));
        assert_eq!(s["sequenceNumber"], json!(8));
        assert_eq!(s["futureField"], json!("kept"));
    }

    #[test]
    fn release_frees_and_renumbers_attributes() {
        let mut s = spec(
            json!([1, 0, null, null]),
            json!([2, 3]),
            json!([
                { "handle_id": "ipip-tunnel-addr-n1", "secondary": { "node": "n1" } },
                { "handle_id": "pod", "secondary": { "pod": "p" } },
            ]),
        );
        let mut edit = BlockEdit::new("b", &mut s, 4).unwrap();
        assert_eq!(edit.release("ipip-tunnel-addr-n1"), [1]);
        assert_eq!(s["allocations"], json!([0, null, null, null]));
        assert_eq!(s["unallocated"], json!([2, 3, 1]));
        assert_eq!(
            s["attributes"],
            json!([{ "handle_id": "pod", "secondary": { "pod": "p" } }])
        );
        let mut edit = BlockEdit::new("b", &mut s, 4).unwrap();
        assert!(edit.release("ipip-tunnel-addr-n1").is_empty());
    }

    #[test]
    fn full_or_malformed_blocks_are_refused_not_guessed() {
        let mut s = spec(json!([0, 0, 0, 0]), json!([]), json!([{}]));
        assert_eq!(BlockEdit::new("b", &mut s, 4).unwrap().next_free(), None);
        let mut s = spec(json!([null]), json!([0]), json!([]));
        let err = BlockEdit::new("b", &mut s, 4).unwrap_err().to_string();
        assert!(err.contains("allocations has 1 entries"), "{err}");
        // No `unallocated`: the lowest free ordinal.
        let mut s = json!({ "allocations": [0, null, null, null] });
        assert_eq!(BlockEdit::new("b", &mut s, 4).unwrap().next_free(), Some(1));
    }

    #[test]
    fn names_and_addresses() {
        let cidr: IpNet = "172.16.241.64/26".parse().unwrap();
        assert_eq!(block_name(cidr), "172-16-241-64-26");
        assert_eq!(block_size(cidr), Some(64));
        assert_eq!(
            ordinal_addr(cidr, 0),
            Some("172.16.241.64".parse().unwrap())
        );
        assert_eq!(
            ordinal_addr(cidr, 63),
            Some("172.16.241.127".parse().unwrap())
        );
        assert_eq!(ordinal_addr(cidr, 64), None);
        assert_eq!(handle_id("master01"), "ipip-tunnel-addr-master01");
        // IPv6: Calico's names and a /122 block of 64 addresses.
        let v6: IpNet = "fd00:10::40/122".parse().unwrap();
        assert_eq!(block_name(v6), "fd00-10--40-122");
        assert_eq!(block_size(v6), Some(64));
        assert_eq!(ordinal_addr(v6, 1), Some("fd00:10::41".parse().unwrap()));
        assert_eq!(ordinal_addr(v6, 63), Some("fd00:10::7f".parse().unwrap()));
        assert_eq!(ordinal_addr(v6, 64), None);
        assert_eq!(
            block_size("fd00:10::/64".parse().unwrap()),
            None,
            "not a block"
        );
        let kind = TunnelKind::VxlanV6;
        assert_eq!(kind.handle_id("master01"), "vxlan-v6-tunnel-addr-master01");
        assert_eq!(kind.attribute_type(), "vxlanV6TunnelAddress");
        assert_eq!(kind.annotation(), "projectcalico.org/IPv6VXLANTunnelAddr");
        assert_eq!(
            kind.mac_annotation(),
            Some("projectcalico.org/IPv6VXLANTunnelMACAddr")
        );
    }
}

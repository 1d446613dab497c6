//! A fast reader for the documents that grow with the cluster (`IPAMBlock`, `BlockAffinity`
//! and `Node`), as `kubectl get -o yaml` and Calico print them: block mappings and
//! sequences, plain or simply quoted scalars, flow sequences of plain scalars, flow mappings
//! of plain or simply quoted scalars (`- {type: Ready, status: "True"}`).
//!
//! The YAML directory of a 5,000-node cluster holds 45,000 such documents; the general YAML
//! parser spends most of an agent's start reading them. A `Node` is read only when it holds
//! nothing but what the agent reads (name, labels, annotations, `spec.podCIDR(s)`,
//! `spec.providerID`, `status.addresses`, `status.conditions`): a Node with capacity, images,
//! taints and the like takes the general parser. This reader accepts a strict subset
//! of YAML and builds the same typed object as the general parser would; anything outside
//! the subset (comments, anchors, tags, flow mappings, block scalars, multi-line scalars,
//! escapes, duplicate keys, values it cannot type exactly as the general parser does, metadata
//! fields it does not know) returns `None` and the caller takes the general parser, so the
//! outcome (object or error) never depends on which path read a document.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::Deserialize;

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus};

use super::crd::{
    AllocationAttribute, BlockAffinity, BlockAffinitySpec, BoolOrString, IPAMBlock, IPAMBlockSpec,
};

/// A scalar as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scalar<'a> {
    /// Plain (unquoted); may be empty (a key with no value: null).
    Plain(&'a str),
    /// Quoted, without escapes: the text between the quotes.
    Quoted(&'a str),
}

#[derive(Debug)]
enum Tree<'a> {
    Scalar(Scalar<'a>),
    /// `[a, b, c]` of plain scalars.
    Flow(Vec<&'a str>),
    /// `{a: b, c: "d"}` (read into `Map`).
    Map(Vec<(&'a str, Tree<'a>)>),
    Seq(Vec<Tree<'a>>),
}

/// One logical line.
#[derive(Debug, Clone, Copy)]
enum Line<'a> {
    /// `- ` at this column; its content follows as the next logical line, 2 columns deeper.
    Dash(usize),
    /// `key: value` (value `None`: `key:` with the value on the next lines, or null).
    Entry(usize, &'a str, Option<Tree2<'a>>),
    /// A scalar item of a sequence (`- value`), or a flow mapping (`- {a: b}`).
    Item(usize, Tree2<'a>),
}

/// A value written on the line of its key.
#[derive(Debug, Clone, Copy)]
enum Tree2<'a> {
    Scalar(Scalar<'a>),
    Flow(&'a str),
    /// The inside of `{...}`.
    FlowMap(&'a str),
}

fn plain_ok(v: &str) -> bool {
    // Indicators that start something else than a plain scalar, and sequences that end one.
    !v.is_empty()
        && !v.starts_with([
            '[', ']', '{', '}', ',', '&', '*', '!', '|', '>', '%', '@', '`', '?', '"', '\'', '#',
        ])
        && !(v.starts_with('-') && (v.len() == 1 || v[1..].starts_with(' ')))
        && !(v.starts_with(':') && (v.len() == 1 || v[1..].starts_with(' ')))
        && !v.contains(": ")
        && !v.ends_with(':')
        && !v.contains('#')
        && v.trim() == v
        && v != "---"
        && v != "..."
}

fn value<'a>(v: &'a str) -> Option<Tree2<'a>> {
    if let Some(inner) = v.strip_prefix('[') {
        let inner = inner.strip_suffix(']')?;
        return Some(Tree2::Flow(inner));
    }
    if let Some(inner) = v.strip_prefix('{') {
        let inner = inner.strip_suffix('}')?;
        return Some(Tree2::FlowMap(inner));
    }
    for quote in ['"', '\''] {
        if let Some(rest) = v.strip_prefix(quote) {
            let inner = rest.strip_suffix(quote)?;
            if inner.contains(['"', '\'', '\\']) {
                return None;
            }
            return Some(Tree2::Scalar(Scalar::Quoted(inner)));
        }
    }
    plain_ok(v).then_some(Tree2::Scalar(Scalar::Plain(v)))
}

fn key_ok(k: &str) -> bool {
    !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'))
        && !k.starts_with('-')
}

/// The logical lines of `text`, `None` when a line is outside the subset.
fn lines(text: &str) -> Option<Vec<Line<'_>>> {
    let mut out = Vec::new();
    let mut first = true;
    for raw in text.split('\n') {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if first && line == "---" {
            first = false;
            continue;
        }
        first = false;
        if !line.is_empty() && line.bytes().all(|b| b == b' ') {
            continue;
        }
        if line.is_empty() {
            continue;
        }
        // Printable characters only, no other line breaks (YAML also breaks lines at CR, NEL,
        // LS and PS, and refuses control characters): anything else takes the general path.
        let printable = |c: char| {
            (' '..='~').contains(&c)
                || (c >= '\u{a0}'
                    && !matches!(
                        c,
                        '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
                    ))
        };
        if line.contains('#') || !line.chars().all(printable) {
            return None;
        }
        let mut rest = line.trim_start_matches(' ');
        let mut col = line.len() - rest.len();
        while let Some(after) = rest.strip_prefix("- ") {
            out.push(Line::Dash(col));
            let trimmed = after.trim_start_matches(' ');
            col += 2 + (after.len() - trimmed.len());
            rest = trimmed;
        }
        if rest == "-" {
            return None;
        }
        // A flow mapping as a sequence item (`- {a: b}`).
        let flow_item = rest.starts_with('{');
        match (!flow_item)
            .then(|| rest.find(": "))
            .flatten()
            .or_else(|| (!flow_item && rest.ends_with(':')).then(|| rest.len() - 1))
        {
            Some(at) => {
                let key = &rest[..at];
                if !key_ok(key) {
                    return None;
                }
                let v = rest[at + 1..].trim_matches(' ');
                let v = if v.is_empty() { None } else { Some(value(v)?) };
                out.push(Line::Entry(col, key, v));
            }
            None => {
                // A scalar item of a sequence; anywhere else, a multi-line scalar.
                if !matches!(out.last(), Some(Line::Dash(c)) if c + 2 == col) {
                    return None;
                }
                match value(rest)? {
                    Tree2::Flow(_) => return None,
                    v => out.push(Line::Item(col, v)),
                }
            }
        }
    }
    Some(out)
}

fn flow(inner: &str) -> Option<Vec<&str>> {
    if inner.trim().is_empty() {
        return Some(Vec::new());
    }
    inner
        .split(',')
        .map(|item| {
            let item = item.trim_matches(' ');
            (plain_ok(item) && !item.contains(['[', ']', '{', '}', '"', '\''])).then_some(item)
        })
        .collect()
}

/// The entries of a flow mapping `{k: v, ...}`: keys as in block mappings, values plain or
/// simply quoted scalars without flow indicators or commas; no duplicate keys.
fn flow_map(inner: &str) -> Option<Tree<'_>> {
    let mut entries: Vec<(&str, Tree)> = Vec::new();
    if inner.trim_matches(' ').is_empty() {
        return Some(Tree::Map(entries));
    }
    for item in inner.split(',') {
        let item = item.trim_matches(' ');
        let (key, v) = item.split_once(": ")?;
        let v = v.trim_matches(' ');
        if !key_ok(key)
            || v.contains(['[', ']', '{', '}'])
            || entries.iter().any(|(k, _)| *k == key)
        {
            return None;
        }
        match value(v)? {
            Tree2::Scalar(s) => entries.push((key, Tree::Scalar(s))),
            _ => return None,
        }
    }
    Some(Tree::Map(entries))
}

struct Parser<'a> {
    lines: Vec<Line<'a>>,
    at: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<Line<'a>> {
        self.lines.get(self.at).copied()
    }

    /// The mapping whose entries are at column `col`.
    fn map(&mut self, col: usize) -> Option<Tree<'a>> {
        let mut entries: Vec<(&str, Tree)> = Vec::new();
        while let Some(Line::Entry(c, key, v)) = self.peek() {
            if c != col {
                break;
            }
            self.at += 1;
            if entries.iter().any(|(k, _)| *k == key) {
                return None;
            }
            let tree = match v {
                Some(Tree2::Scalar(s)) => Tree::Scalar(s),
                Some(Tree2::Flow(inner)) => Tree::Flow(flow(inner)?),
                Some(Tree2::FlowMap(inner)) => flow_map(inner)?,
                None => match self.peek() {
                    Some(Line::Dash(c)) if c >= col => self.seq(c)?,
                    Some(Line::Entry(c, ..)) if c > col => self.map(c)?,
                    _ => Tree::Scalar(Scalar::Plain("")),
                },
            };
            entries.push((key, tree));
        }
        Some(Tree::Map(entries))
    }

    /// The block sequence whose dashes are at column `col`.
    fn seq(&mut self, col: usize) -> Option<Tree<'a>> {
        let mut items = Vec::new();
        while let Some(Line::Dash(c)) = self.peek() {
            if c != col {
                break;
            }
            self.at += 1;
            let item = match self.peek()? {
                Line::Entry(c, ..) if c == col + 2 => self.map(c)?,
                Line::Item(c, v) if c == col + 2 => {
                    self.at += 1;
                    match v {
                        Tree2::Scalar(s) => Tree::Scalar(s),
                        Tree2::FlowMap(inner) => flow_map(inner)?,
                        Tree2::Flow(_) => return None,
                    }
                }
                Line::Dash(c) if c == col + 2 => self.seq(c)?,
                _ => return None,
            };
            items.push(item);
        }
        Some(Tree::Seq(items))
    }
}

fn tree(text: &str) -> Option<Tree<'_>> {
    let mut parser = Parser {
        lines: lines(text)?,
        at: 0,
    };
    let root = match parser.peek()? {
        Line::Entry(0, ..) => parser.map(0)?,
        _ => return None,
    };
    (parser.at == parser.lines.len()).then_some(root)
}

fn is_null(s: &str) -> bool {
    matches!(s, "" | "null" | "Null" | "NULL" | "~")
}

fn opt_string(t: &Tree) -> Option<Option<String>> {
    match t {
        Tree::Scalar(Scalar::Plain(s)) if is_null(s) => Some(None),
        Tree::Scalar(Scalar::Plain(s) | Scalar::Quoted(s)) => Some(Some(s.to_string())),
        _ => None,
    }
}

fn string(t: &Tree) -> Option<String> {
    match t {
        Tree::Scalar(Scalar::Plain(s)) if !is_null(s) => Some(s.to_string()),
        Tree::Scalar(Scalar::Quoted(s)) => Some(s.to_string()),
        _ => None,
    }
}

/// A decimal integer as the general parser reads it (no sign, base prefix or leading zero:
/// those take the general path).
fn int(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return None;
    }
    s.parse().ok()
}

fn opt<T>(t: &Tree, f: impl Fn(&Tree) -> Option<T>) -> Option<Option<T>> {
    match t {
        Tree::Scalar(Scalar::Plain(s)) if is_null(s) => Some(None),
        other => f(other).map(Some),
    }
}

fn opt_int(t: &Tree) -> Option<Option<i64>> {
    opt(t, |t| match t {
        Tree::Scalar(Scalar::Plain(s)) => int(s),
        _ => None,
    })
}

fn opt_bool(t: &Tree) -> Option<Option<bool>> {
    opt(t, |t| match t {
        Tree::Scalar(Scalar::Plain("true")) => Some(true),
        Tree::Scalar(Scalar::Plain("false")) => Some(false),
        _ => None,
    })
}

fn string_map(t: &Tree) -> Option<BTreeMap<String, String>> {
    match t {
        Tree::Map(entries) => entries
            .iter()
            .map(|(k, v)| Some((k.to_string(), string(v)?)))
            .collect(),
        _ => None,
    }
}

fn opt_string_map(t: &Tree) -> Option<Option<BTreeMap<String, String>>> {
    opt(t, string_map)
}

fn metadata(t: &Tree) -> Option<ObjectMeta> {
    let Tree::Map(entries) = t else { return None };
    let mut meta = ObjectMeta::default();
    for (key, v) in entries {
        match *key {
            "name" => meta.name = opt_string(v)?,
            "namespace" => meta.namespace = opt_string(v)?,
            "resourceVersion" => meta.resource_version = opt_string(v)?,
            "uid" => meta.uid = opt_string(v)?,
            "generation" => meta.generation = opt_int(v)?,
            "labels" => meta.labels = opt_string_map(v)?,
            "annotations" => meta.annotations = opt_string_map(v)?,
            "creationTimestamp" => {
                meta.creation_timestamp = match opt_string(v)? {
                    None => None,
                    Some(text) => Some(Time(
                        k8s_openapi::jiff::Timestamp::deserialize(
                            serde::de::value::StrDeserializer::<serde::de::value::Error>::new(
                                &text,
                            ),
                        )
                        .ok()?,
                    )),
                }
            }
            // Fields this reader does not know (owner references, managed fields, ...).
            _ => return None,
        }
    }
    Some(meta)
}

/// The top-level mapping: `apiVersion` and `kind` as given, `metadata`, `spec`; other
/// top-level keys are ignored, as the general parser ignores them.
fn object<'t, 'a>(
    t: &'t Tree<'a>,
    kind: &str,
    api_version: &str,
) -> Option<(ObjectMeta, Option<&'t Tree<'a>>)> {
    let Tree::Map(entries) = t else { return None };
    let mut meta = ObjectMeta::default();
    let mut spec = None;
    for (key, v) in entries {
        match *key {
            "kind" if *v == Tree::Scalar(Scalar::Plain(kind)) => {}
            "apiVersion" if *v == Tree::Scalar(Scalar::Plain(api_version)) => {}
            "kind" | "apiVersion" => return None,
            "metadata" => meta = metadata(v)?,
            "spec" => spec = Some(v),
            _ => {}
        }
    }
    Some((meta, spec))
}

impl PartialEq for Tree<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Tree::Scalar(a), Tree::Scalar(b)) => a == b,
            _ => false,
        }
    }
}

/// The spec mapping's entries (none when the spec is missing).
fn spec_entries<'t, 'a>(spec: Option<&'t Tree<'a>>) -> Option<&'t [(&'a str, Tree<'a>)]> {
    match spec {
        None => Some(&[]),
        Some(Tree::Map(entries)) => Some(entries),
        // A null spec is an error for the general parser (a default applies only to a
        // missing one): declined, like any other shape.
        Some(_) => None,
    }
}

fn attribute(t: &Tree) -> Option<AllocationAttribute> {
    let Tree::Map(entries) = t else { return None };
    let mut attr = AllocationAttribute::default();
    for (key, v) in entries {
        match *key {
            "handle_id" => attr.handle_id = opt_string(v)?,
            "secondary" => attr.secondary = opt_string_map(v)?,
            _ => {}
        }
    }
    Some(attr)
}

/// An `IPAMBlock` (apiVersion `crd.projectcalico.org/v1`), or `None`: take the general parser.
pub fn ipam_block(text: &str) -> Option<IPAMBlock> {
    let root = tree(text)?;
    let (metadata, spec) = object(&root, "IPAMBlock", super::crd::API_VERSION)?;
    let mut s = IPAMBlockSpec::default();
    for (key, v) in spec_entries(spec)? {
        match *key {
            "cidr" => s.cidr = opt_string(v)?,
            "affinity" => s.affinity = opt_string(v)?,
            "allocations" => {
                s.allocations = opt(v, |t| match t {
                    Tree::Flow(items) => items
                        .iter()
                        .map(|i| {
                            if is_null(i) {
                                Some(None)
                            } else {
                                int(i).map(Some)
                            }
                        })
                        .collect(),
                    _ => None,
                })?
            }
            "attributes" => {
                s.attributes = opt(v, |t| match t {
                    Tree::Seq(items) => items.iter().map(attribute).collect(),
                    Tree::Flow(items) if items.is_empty() => Some(Vec::new()),
                    _ => None,
                })?
            }
            "deleted" => s.deleted = opt_bool(v)?,
            "Deleted" => s.deleted_legacy = opt_bool(v)?,
            "strictAffinity" => s.strict_affinity = opt_bool(v)?,
            "unallocated" => {
                s.unallocated = opt(v, |t| match t {
                    Tree::Flow(items) => items.iter().map(|i| int(i)).collect(),
                    _ => None,
                })?
            }
            "sequenceNumber" => s.sequence_number = opt_int(v)?,
            _ => {}
        }
    }
    Some(IPAMBlock { metadata, spec: s })
}

/// A `BlockAffinity` (apiVersion `crd.projectcalico.org/v1`), or `None`: take the general
/// parser.
pub fn block_affinity(text: &str) -> Option<BlockAffinity> {
    let root = tree(text)?;
    let (metadata, spec) = object(&root, "BlockAffinity", super::crd::API_VERSION)?;
    let mut s = BlockAffinitySpec::default();
    for (key, v) in spec_entries(spec)? {
        match *key {
            "cidr" => s.cidr = opt_string(v)?,
            "node" => s.node = opt_string(v)?,
            "state" => s.state = opt_string(v)?,
            "type" => s.affinity_type = opt_string(v)?,
            "deleted" => {
                s.deleted = opt(v, |t| match t {
                    Tree::Scalar(Scalar::Plain("true")) => Some(BoolOrString::Bool(true)),
                    Tree::Scalar(Scalar::Plain("false")) => Some(BoolOrString::Bool(false)),
                    Tree::Scalar(Scalar::Quoted(s)) => Some(BoolOrString::String(s.to_string())),
                    // Other plain scalars may resolve to numbers or booleans: general path.
                    _ => None,
                })?
            }
            _ => {}
        }
    }
    Some(BlockAffinity { metadata, spec: s })
}

fn time(t: &Tree) -> Option<Option<Time>> {
    match opt_string(t)? {
        None => Some(None),
        Some(text) => Some(Some(Time(
            k8s_openapi::jiff::Timestamp::deserialize(serde::de::value::StrDeserializer::<
                serde::de::value::Error,
            >::new(&text))
            .ok()?,
        ))),
    }
}

fn node_address(t: &Tree) -> Option<NodeAddress> {
    let Tree::Map(entries) = t else { return None };
    let (mut address, mut type_) = (None, None);
    for (key, v) in entries {
        match *key {
            "address" => address = Some(string(v)?),
            "type" => type_ = Some(string(v)?),
            _ => return None,
        }
    }
    Some(NodeAddress {
        address: address?,
        type_: type_?,
    })
}

fn node_condition(t: &Tree) -> Option<NodeCondition> {
    let Tree::Map(entries) = t else { return None };
    let mut c = NodeCondition::default();
    let (mut type_, mut status) = (None, None);
    for (key, v) in entries {
        match *key {
            "type" => type_ = Some(string(v)?),
            "status" => status = Some(string(v)?),
            "reason" => c.reason = opt_string(v)?,
            "message" => c.message = opt_string(v)?,
            "lastHeartbeatTime" => c.last_heartbeat_time = time(v)?,
            "lastTransitionTime" => c.last_transition_time = time(v)?,
            _ => return None,
        }
    }
    c.type_ = type_?;
    c.status = status?;
    Some(c)
}

fn seq_of<T>(t: &Tree, f: impl Fn(&Tree) -> Option<T>) -> Option<Option<Vec<T>>> {
    opt(t, |t| match t {
        Tree::Seq(items) => items.iter().map(&f).collect(),
        Tree::Flow(items) if items.is_empty() => Some(Vec::new()),
        _ => None,
    })
}

/// A `Node` (apiVersion `v1`) holding only the fields the agent reads (see the module doc),
/// or `None`: take the general parser.
pub fn node(text: &str) -> Option<Node> {
    let root = tree(text)?;
    let Tree::Map(entries) = &root else {
        return None;
    };
    let mut node = Node::default();
    for (key, v) in entries {
        match *key {
            "kind" if *v == Tree::Scalar(Scalar::Plain("Node")) => {}
            "apiVersion" if *v == Tree::Scalar(Scalar::Plain("v1")) => {}
            "metadata" => node.metadata = metadata(v)?,
            "spec" => {
                node.spec = opt(v, |t| {
                    let Tree::Map(entries) = t else { return None };
                    let mut spec = NodeSpec::default();
                    for (key, v) in entries {
                        match *key {
                            "podCIDR" => spec.pod_cidr = opt_string(v)?,
                            "podCIDRs" => spec.pod_cidrs = seq_of(v, string)?,
                            "providerID" => spec.provider_id = opt_string(v)?,
                            _ => return None,
                        }
                    }
                    Some(spec)
                })?
            }
            "status" => {
                node.status = opt(v, |t| {
                    let Tree::Map(entries) = t else { return None };
                    let mut status = NodeStatus::default();
                    for (key, v) in entries {
                        match *key {
                            "addresses" => status.addresses = seq_of(v, node_address)?,
                            "conditions" => status.conditions = seq_of(v, node_condition)?,
                            _ => return None,
                        }
                    }
                    Some(status)
                })?
            }
            // Other top-level keys (a Node has none but these) are declined.
            _ => return None,
        }
    }
    Some(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: &str = "---\napiVersion: crd.projectcalico.org/v1\nkind: IPAMBlock\nmetadata:\n  \
        name: 100-64-0-0-26\n  resourceVersion: \"7\"\n  creationTimestamp: \
        \"2024-05-01T10:00:00Z\"\n  labels:\n    a: b\nspec:\n  affinity: host:ghost-00000\n  \
        allocations: [0, 1, null, null]\n  attributes:\n  - handle_id: k8s-pod-network.abc\n    \
        secondary:\n      namespace: team-0\n      node: ghost-00000\n      pod: app-0\n      \
        timestamp: 2024-05-01 10:00:00.000000000 +0000 UTC\n  - handle_id: ipip-tunnel-addr-x\n  \
        cidr: 100.64.0.0/26\n  deleted: false\n  sequenceNumber: 1714557600000000000\n  \
        strictAffinity: false\n  unallocated: [2, 3]\n";

    const AFFINITY: &str = "apiVersion: crd.projectcalico.org/v1\nkind: BlockAffinity\n\
        metadata:\n  name: ghost-00000-100-64-0-0-26\nspec:\n  cidr: 100.64.0.0/26\n  deleted: \
        \"false\"\n  node: ghost-00000\n  state: confirmed\n";

    fn general<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_calico_documents_as_the_general_parser_does() {
        let fast = ipam_block(BLOCK).expect("in the subset");
        assert_eq!(Ok(fast.clone()), general::<IPAMBlock>(BLOCK));
        assert_eq!(fast.spec.allocations.as_ref().map(Vec::len), Some(4));
        assert_eq!(fast.spec.attributes.as_ref().map(Vec::len), Some(2));
        let fast = block_affinity(AFFINITY).expect("in the subset");
        assert_eq!(Ok(fast), general::<BlockAffinity>(AFFINITY));
    }

    /// Variants the fast reader takes must read the same as with the general parser; the
    /// others must be declined (`None`), never read differently.
    #[test]
    fn never_disagrees_with_the_general_parser() {
        let block_edits: &[(&str, &str)] = &[
            ("deleted: false", "deleted: true"),
            ("deleted: false", "deleted: True"),
            ("deleted: false", "deleted:"),
            ("deleted: false", "deleted: null"),
            ("deleted: false", "deleted: ~"),
            ("deleted: false", "deleted: 'false'"),
            ("deleted: false", "Deleted: false"),
            ("deleted: false", "deleted: false\n  deleted: true"),
            ("cidr: 100.64.0.0/26", "cidr: \"100.64.0.0/26\""),
            ("cidr: 100.64.0.0/26", "cidr: '100.64.0.0/26'"),
            ("cidr: 100.64.0.0/26", "cidr: null"),
            ("cidr: 100.64.0.0/26", "cidr: 100.64.0.0/26 # comment"),
            ("cidr: 100.64.0.0/26", "cidr: &a 100.64.0.0/26"),
            ("cidr: 100.64.0.0/26", "cidr: !!str 100.64.0.0/26"),
            ("cidr: 100.64.0.0/26", "cidr: |\n    100.64.0.0/26"),
            ("cidr: 100.64.0.0/26", "cidr: 100.64.0.0\n    /26"),
            ("cidr: 100.64.0.0/26", "cidr: \"100.64.0.0\\x2f26\""),
            ("cidr: 100.64.0.0/26", "cidr: 12"),
            ("cidr: 100.64.0.0/26", "cidr: [a]"),
            (
                "allocations: [0, 1, null, null]",
                "allocations: [0, 1, ~, Null]",
            ),
            (
                "allocations: [0, 1, null, null]",
                "allocations: [0, 01, null, null]",
            ),
            (
                "allocations: [0, 1, null, null]",
                "allocations: [0, +1, null, null]",
            ),
            (
                "allocations: [0, 1, null, null]",
                "allocations: [0, 0x1, null, null]",
            ),
            (
                "allocations: [0, 1, null, null]",
                "allocations: [0, -1, null, null]",
            ),
            (
                "allocations: [0, 1, null, null]",
                "allocations: [0, 1.5, null, null]",
            ),
            (
                "allocations: [0, 1, null, null]",
                "allocations: [0, \"1\", null, null]",
            ),
            (
                "allocations: [0, 1, null, null]",
                "allocations: [0, 1, null, null",
            ),
            ("allocations: [0, 1, null, null]", "allocations: []"),
            (
                "allocations: [0, 1, null, null]",
                "allocations: [0, 99999999999999999999]",
            ),
            (
                "allocations: [0, 1, null, null]",
                "allocations:\n  - 0\n  - null",
            ),
            ("allocations: [0, 1, null, null]", "allocations: {a: 1}"),
            ("allocations: [0, 1, null, null]", "allocations: [0, [1]]"),
            (
                "sequenceNumber: 1714557600000000000",
                "sequenceNumber: \"1\"",
            ),
            ("sequenceNumber: 1714557600000000000", "sequenceNumber: 1e3"),
            ("name: 100-64-0-0-26", "name: \"100-64-0-0-26\""),
            ("name: 100-64-0-0-26", "name: null"),
            (
                "name: 100-64-0-0-26",
                "name: 100-64-0-0-26\n  uid: abc\n  generation: 3",
            ),
            (
                "name: 100-64-0-0-26",
                "name: 100-64-0-0-26\n  ownerReferences: []",
            ),
            ("resourceVersion: \"7\"", "resourceVersion: 7"),
            ("resourceVersion: \"7\"", "resourceVersion: \"7"),
            (
                "creationTimestamp: \"2024-05-01T10:00:00Z\"",
                "creationTimestamp: yesterday",
            ),
            ("a: b", "a: null"),
            ("a: b", "a: 'b'"),
            ("a: b", "a: b\n    a: c"),
            ("node: ghost-00000", "node: null"),
            ("node: ghost-00000", "node: 5"),
            ("node: ghost-00000", "node:"),
            ("node: ghost-00000", "node: {x: y}"),
            (
                "- handle_id: ipip-tunnel-addr-x",
                "- handle_id: ipip-tunnel-addr-x\n    other: 1",
            ),
            (
                "- handle_id: ipip-tunnel-addr-x",
                "-  handle_id: ipip-tunnel-addr-x",
            ),
            (
                "- handle_id: ipip-tunnel-addr-x",
                "- - handle_id: ipip-tunnel-addr-x",
            ),
            ("- handle_id: ipip-tunnel-addr-x", "- plain"),
            ("- handle_id: ipip-tunnel-addr-x", "-"),
            ("  - handle_id: k8s", "    - handle_id: k8s"),
            ("strictAffinity: false", "strictAffinity: yes"),
            ("strictAffinity: false", "status: {}\nextra: [1]"),
            ("kind: IPAMBlock", "kind: IPAMBlock\nkind: IPAMBlock"),
            ("spec:\n", "spec: null\nother:\n"),
            ("spec:\n", "spec:\nother:\n"),
            ("metadata:\n", "metadata: null\nother:\n"),
            ("metadata:\n", "metadata: {}\nother:\n"),
            ("\n", "\r\n"),
            ("team-0", "team\r0"),
            ("team-0", "team\u{85}0"),
            ("team-0", "team\u{1}0"),
            ("team-0", "tëam-0"),
            ("\n", "\n\n"),
            ("\n  ", "\n\t"),
        ];
        for (from, to) in block_edits {
            let text = BLOCK.replacen(from, to, 1);
            if let Some(fast) = ipam_block(&text) {
                assert_eq!(Ok(fast), general::<IPAMBlock>(&text), "{text}");
            }
        }
        for (from, to) in [
            ("deleted: \"false\"", "deleted: false"),
            ("deleted: \"false\"", "deleted: true"),
            ("deleted: \"false\"", "deleted: True"),
            ("deleted: \"false\"", "deleted: 'true'"),
            ("deleted: \"false\"", "deleted: 1"),
            ("deleted: \"false\"", "deleted: maybe"),
            ("deleted: \"false\"", "deleted:"),
            ("state: confirmed", "state: 'pending'"),
            ("state: confirmed", "type: host"),
            ("state: confirmed", "state:\n    nested: map"),
            ("kind: BlockAffinity", "kind: IPAMBlock"),
            ("apiVersion: crd.projectcalico.org/v1", "apiVersion: v1"),
            ("spec:\n", "spec: []\nx:\n"),
        ] {
            let text = AFFINITY.replacen(from, to, 1);
            if let Some(fast) = block_affinity(&text) {
                assert_eq!(Ok(fast), general::<BlockAffinity>(&text), "{text}");
            }
        }
    }

    const NODE: &str = "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: ghost-00001\n  \
        labels:\n    kubernetes.io/hostname: ghost-00001\n    kubernetes.io/os: linux\n  \
        annotations:\n    projectcalico.org/IPv4Address: 10.96.0.2/16\n    \
        node.alpha.kubernetes.io/ttl: \"0\"\nspec:\n  podCIDR: 10.244.1.0/24\n  podCIDRs:\n  \
        - 10.244.1.0/24\n  providerID: kind://docker/kind/ghost\nstatus:\n  addresses:\n  \
        - {type: InternalIP, address: 10.96.0.2}\n  - address: ghost-00001\n    type: Hostname\n  \
        conditions:\n  - {type: Ready, status: \"True\"}\n  - lastHeartbeatTime: \
        \"2024-05-01T10:00:00Z\"\n    lastTransitionTime: \"2024-05-01T09:00:00Z\"\n    \
        message: kubelet has sufficient memory available\n    reason: KubeletHasSufficientMemory\n    \
        status: \"False\"\n    type: MemoryPressure\n";

    #[test]
    fn reads_nodes_as_the_general_parser_does() {
        let fast = node(NODE).expect("in the subset");
        assert_eq!(Ok(fast.clone()), general::<Node>(NODE));
        let status = fast.status.as_ref().unwrap();
        assert_eq!(status.addresses.as_ref().map(Vec::len), Some(2));
        assert_eq!(status.conditions.as_ref().map(Vec::len), Some(2));
        assert_eq!(super::super::node::node_ready(&fast), Some(true));
        // Through the document reader, as the datastore reads it.
        let mut got = Vec::new();
        super::super::decode_documents_each(NODE, |r| got.push(r.map_err(|e| e.to_string())))
            .unwrap();
        assert!(
            matches!(got.as_slice(), [Ok(super::super::Object::Node(n))] if **n == fast),
            "{got:?}"
        );
    }

    /// Edited Nodes: the fast reader reads them as the general parser does, or declines.
    #[test]
    fn never_disagrees_with_the_general_parser_on_nodes() {
        let edits: &[(&str, &str)] = &[
            ("status: \"True\"", "status: True"),
            ("status: \"True\"", "status: true"),
            ("status: \"True\"", "status: 'True'"),
            ("status: \"True\"", "status: null"),
            ("status: \"True\"", "status: \"Unknown\""),
            ("{type: Ready, status: \"True\"}", "{type: Ready}"),
            ("{type: Ready, status: \"True\"}", "{}"),
            (
                "{type: Ready, status: \"True\"}",
                "{type: Ready, status: \"True\", x: 1}",
            ),
            (
                "{type: Ready, status: \"True\"}",
                "{type: Ready, type: Ready}",
            ),
            (
                "{type: Ready, status: \"True\"}",
                "{type: Ready,status: \"True\"}",
            ),
            (
                "{type: Ready, status: \"True\"}",
                "{type: Ready, status: \"a,b\"}",
            ),
            (
                "{type: Ready, status: \"True\"}",
                "{type: Ready, status: [x]}",
            ),
            (
                "{type: Ready, status: \"True\"}",
                "{type: Ready, status: {x: y}}",
            ),
            (
                "{type: Ready, status: \"True\"}",
                "{type: Ready, status: \"True\"",
            ),
            (
                "{type: Ready, status: \"True\"}",
                "{type: Ready, status: \"True\"} # c",
            ),
            (
                "{type: Ready, status: \"True\"}",
                "{type: Ready, status: &a x}",
            ),
            (
                "{type: InternalIP, address: 10.96.0.2}",
                "{type: InternalIP}",
            ),
            (
                "{type: InternalIP, address: 10.96.0.2}",
                "{type: InternalIP, address: 5}",
            ),
            (
                "{type: InternalIP, address: 10.96.0.2}",
                "{type: InternalIP, address: null}",
            ),
            (
                "{type: InternalIP, address: 10.96.0.2}",
                "{type: InternalIP, address: ''}",
            ),
            (
                "{type: InternalIP, address: 10.96.0.2}",
                "{address: 10.96.0.2, type: InternalIP}",
            ),
            (
                "{type: InternalIP, address: 10.96.0.2}",
                "{type: InternalIP, address: 10.96.0.2:1}",
            ),
            (
                "{type: InternalIP, address: 10.96.0.2}",
                "{type: InternalIP, address: - x}",
            ),
            ("address: ghost-00001", "address: null"),
            ("address: ghost-00001", "address:"),
            ("type: Hostname", "type: Hostname\n    extra: x"),
            (
                "lastHeartbeatTime: \"2024-05-01T10:00:00Z\"",
                "lastHeartbeatTime: null",
            ),
            (
                "lastHeartbeatTime: \"2024-05-01T10:00:00Z\"",
                "lastHeartbeatTime: 2024-05-01T10:00:00Z",
            ),
            (
                "lastHeartbeatTime: \"2024-05-01T10:00:00Z\"",
                "lastHeartbeatTime: soon",
            ),
            (
                "message: kubelet has sufficient memory available",
                "message: 12",
            ),
            (
                "message: kubelet has sufficient memory available",
                "message: a: b",
            ),
            ("reason: KubeletHasSufficientMemory", "reason: ~"),
            ("podCIDR: 10.244.1.0/24", "podCIDR: null"),
            ("podCIDR: 10.244.1.0/24", "podCIDR: [a]"),
            ("podCIDRs:\n  - 10.244.1.0/24", "podCIDRs: []"),
            (
                "podCIDRs:\n  - 10.244.1.0/24",
                "podCIDRs: [10.244.1.0/24, fd00::/64]",
            ),
            ("podCIDRs:\n  - 10.244.1.0/24", "podCIDRs: null"),
            ("podCIDRs:\n  - 10.244.1.0/24", "podCIDRs:\n  - null"),
            ("podCIDRs:\n  - 10.244.1.0/24", "podCIDRs: 10.244.1.0/24"),
            (
                "providerID: kind://docker/kind/ghost",
                "unschedulable: true",
            ),
            ("providerID: kind://docker/kind/ghost", "taints: []"),
            ("spec:\n", "spec: null\nx:\n"),
            ("spec:\n", "spec: {}\nx:\n"),
            ("status:\n", "status: null\nx:\n"),
            (
                "  addresses:\n",
                "  capacity:\n    cpu: \"4\"\n  addresses:\n",
            ),
            ("  addresses:\n", "  addresses: []\n  x:\n"),
            ("  conditions:\n", "  conditions: null\n  x:\n"),
            ("name: ghost-00001\n", "name: null\n"),
            ("name: ghost-00001\n", "name: ghost-00001\n  uid: x\n"),
            (
                "name: ghost-00001\n",
                "name: ghost-00001\n  managedFields: []\n",
            ),
            (
                "projectcalico.org/IPv4Address: 10.96.0.2/16",
                "projectcalico.org/IPv4Address: null",
            ),
            (
                "projectcalico.org/IPv4Address: 10.96.0.2/16",
                "projectcalico.org/IPv4Address: 1",
            ),
            (
                "node.alpha.kubernetes.io/ttl: \"0\"",
                "node.alpha.kubernetes.io/ttl: 0",
            ),
            ("kubernetes.io/os: linux", "kubernetes.io/os: true"),
            ("kind: Node", "kind: Node\nkind: Node"),
            ("apiVersion: v1", "apiVersion: v2"),
            ("apiVersion: v1", "apiVersion: \"v1\""),
            ("\nstatus:", "\nextra: 1\nstatus:"),
            ("\n", "\r\n"),
        ];
        let mut read = 0;
        for (from, to) in edits {
            let text = NODE.replacen(from, to, 1);
            assert_ne!(text, NODE, "edit {from:?} does not apply");
            if let Some(fast) = node(&text) {
                read += 1;
                assert_eq!(Ok(fast), general::<Node>(&text), "{text}");
            }
        }
        // The subset is not empty: most edits that keep the shape are read fast.
        assert!(
            read >= 20,
            "only {read} edited Nodes read by the fast reader"
        );
        // Some are declined for sure (outside the subset).
        for (from, to) in [
            (
                "  addresses:\n",
                "  capacity:\n    cpu: \"4\"\n  addresses:\n",
            ),
            ("providerID: kind://docker/kind/ghost", "taints: []"),
            (
                "{type: Ready, status: \"True\"}",
                "{type: Ready, status: \"True\"} # c",
            ),
            ("{type: Ready, status: \"True\"}", "{type: Ready}"),
        ] {
            assert!(node(&NODE.replacen(from, to, 1)).is_none(), "{to}");
        }
    }

    /// Each construct outside the subset is declined, not read some other way.
    #[test]
    fn declines_what_it_does_not_know() {
        for (from, to) in [
            ("cidr: 100.64.0.0/26", "cidr: 100.64.0.0/26 # comment"),
            ("cidr: 100.64.0.0/26", "cidr: &a 100.64.0.0/26"),
            ("cidr: 100.64.0.0/26", "cidr: |\n    100.64.0.0/26"),
            ("cidr: 100.64.0.0/26", "cidr: 100.64.0.0\n    /26"),
            ("deleted: false", "deleted: True"),
            ("deleted: false", "deleted: false\n  deleted: true"),
            (
                "allocations: [0, 1, null, null]",
                "allocations: [0, 01, null, null]",
            ),
            ("allocations: [0, 1, null, null]", "allocations: {a: 1}"),
            (
                "name: 100-64-0-0-26",
                "name: 100-64-0-0-26\n  ownerReferences: []",
            ),
            ("kind: IPAMBlock", "kind: BlockAffinity"),
        ] {
            let text = BLOCK.replacen(from, to, 1);
            assert!(ipam_block(&text).is_none(), "{text}");
        }
    }
}

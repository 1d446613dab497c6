//! Reading objects from YAML or JSON text: one object, several `---`-separated documents,
//! or a `kind: List` as printed by `kubectl get ... -o yaml`.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use super::crd::{
    API_VERSION, BGPConfiguration, BGPFilter, BGPPeer, BlockAffinity, IPAMBlock, IPPool,
};
use super::error::Kind;

/// Any object the datastores understand.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Node(Box<Node>),
    IPPool(IPPool),
    IPAMBlock(IPAMBlock),
    BlockAffinity(BlockAffinity),
    BGPPeer(BGPPeer),
    BGPConfiguration(BGPConfiguration),
    BGPFilter(BGPFilter),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
}

/// `apiVersion` of `EndpointSlice`.
const DISCOVERY_V1: &str = "discovery.k8s.io/v1";

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Node(_) => Kind::Node,
            Object::IPPool(_) => Kind::IPPool,
            Object::IPAMBlock(_) => Kind::IPAMBlock,
            Object::BlockAffinity(_) => Kind::BlockAffinity,
            Object::BGPPeer(_) => Kind::BGPPeer,
            Object::BGPConfiguration(_) => Kind::BGPConfiguration,
            Object::BGPFilter(_) => Kind::BGPFilter,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
        }
    }

    /// `metadata.name`, empty when absent.
    pub fn name(&self) -> &str {
        match self {
            Object::Node(n) => n.metadata.name.as_deref().unwrap_or(""),
            Object::IPPool(o) => o.name(),
            Object::IPAMBlock(o) => o.name(),
            Object::BlockAffinity(o) => o.name(),
            Object::BGPPeer(o) => o.name(),
            Object::BGPConfiguration(o) => o.name(),
            Object::BGPFilter(o) => o.name(),
            Object::Service(o) => o.metadata.name.as_deref().unwrap_or(""),
            Object::EndpointSlice(o) => o.metadata.name.as_deref().unwrap_or(""),
        }
    }
}

/// Why text or one document of it could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not valid YAML: {0}")]
    Syntax(String),
    #[error("document {index}: {kind} {name:?} cannot be read: {message}")]
    Object {
        index: usize,
        kind: String,
        name: String,
        message: String,
    },
    #[error("document {index}: kind is missing")]
    NoKind { index: usize },
    /// flannel's ConfigMap `kube-flannel-cfg`: flannel mode reads its `net-conf.json` itself
    /// ([`crate::agent::flannel`]); the datastore skips it without a warning.
    #[error(
        "document {index}: ConfigMap {name:?} is flannel's network config, read by flannel mode"
    )]
    FlannelConfig { index: usize, name: String },
    #[error(
        "document {index}: {api_version}/{kind} is not a kind podroute reads (Node and crd.projectcalico.org/v1 IPPool, IPAMBlock, BlockAffinity, BGPPeer, BGPConfiguration, BGPFilter; v1 Service, discovery.k8s.io/v1 EndpointSlice)"
    )]
    UnknownKind {
        index: usize,
        api_version: String,
        kind: String,
    },
}

/// Decodes every document of `text`. The outer error means the text as a whole is broken
/// (bad YAML syntax); inner errors concern one document each, the others still decode.
/// Empty documents are skipped; objects of other kinds are reported as
/// [`DecodeError::UnknownKind`].
pub fn decode_documents(text: &str) -> Result<Vec<Result<Object, DecodeError>>, DecodeError> {
    let mut out = Vec::new();
    decode_documents_each(text, |document| out.push(document))?;
    Ok(out)
}

/// The fields read before a document is decoded as a whole: enough to skip a document of
/// another kind without building it in memory.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    #[serde(default)]
    kind: Option<Value>,
    #[serde(default)]
    api_version: Option<Value>,
    #[serde(default)]
    metadata: Option<HeaderMeta>,
}

#[derive(Deserialize)]
struct HeaderMeta {
    #[serde(default)]
    name: Option<Value>,
}

fn scalar(value: Option<&Value>) -> String {
    value
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// The kinds [`typed_object`] builds, as `(kind, apiVersion)`.
const READ_KINDS: [(&str, &str); 9] = [
    ("Node", "v1"),
    ("IPPool", API_VERSION),
    ("IPAMBlock", API_VERSION),
    ("BlockAffinity", API_VERSION),
    ("BGPPeer", API_VERSION),
    ("BGPConfiguration", API_VERSION),
    ("BGPFilter", API_VERSION),
    ("Service", "v1"),
    ("EndpointSlice", DISCOVERY_V1),
];

/// `kind` and `apiVersion` of a document written as `kubectl get -o yaml` writes it: each
/// exactly once, on a line of its own at column 0 (a key of the top-level mapping: nested
/// content is indented) with a plain value, naming a kind podroute reads. `None` for
/// anything else (quoted or commented values, flow style, other kinds): the caller then parses
/// the header as YAML.
fn plain_header(chunk: &str) -> Option<(String, String)> {
    let plain = |v: &str| {
        !v.is_empty()
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'/' | b'-' | b'_'))
    };
    let (mut kind, mut api_version) = (None, None);
    for line in chunk.lines() {
        let line = line.trim_end_matches('\r');
        for (key, slot) in [("kind:", &mut kind), ("apiVersion:", &mut api_version)] {
            if let Some(rest) = line.strip_prefix(key) {
                let value = rest.trim_matches([' ', '\t']);
                if slot.is_some() || !plain(value) {
                    return None;
                }
                *slot = Some(value);
            }
        }
    }
    let (kind, api_version) = (kind?, api_version?);
    READ_KINDS
        .contains(&(kind, api_version))
        .then(|| (kind.to_string(), api_version.to_string()))
}

/// Splits multi-document YAML at its `---` / `...` marker lines. A marker at column 0 cannot
/// occur inside a Kubernetes object (a mapping: nested content is indented, and YAML forbids
/// document markers inside flow scalars), so this matches the parser's own split.
fn split_documents(text: &str) -> Vec<&str> {
    let mut documents = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = bare == "..."
            || bare == "---"
            || bare.starts_with("--- ")
            || bare.starts_with("---\t")
            || bare.starts_with("... ");
        if marker && offset > start {
            documents.push(&text[start..offset]);
            start = offset;
        }
        offset += line.len();
        if bare == "..." || bare.starts_with("... ") {
            // The end marker belongs to no document.
            start = offset;
        }
    }
    if offset > start {
        documents.push(&text[start..offset]);
    }
    documents
}

/// Like [`decode_documents`], but hands each document's result to `each` as soon as it is
/// decoded, so that a file of many documents is never held decoded at once. Each document's
/// `kind` and `apiVersion` are read first (a small struct); a document of another kind is
/// skipped without being built. Results handed out before an outer error are to be dropped
/// by the caller (the text as a whole is broken).
pub fn decode_documents_each(
    text: &str,
    mut each: impl FnMut(Result<Object, DecodeError>),
) -> Result<(), DecodeError> {
    let mut index = 0;
    for chunk in split_documents(text) {
        index += 1;
        // The common case costs one parse, not two: the header's plain `kind:` and
        // `apiVersion:` lines name a kind podroute reads and the typed parse succeeds. Anything
        // else (an error included) takes the general path below, so the outcome is the same.
        if let Some((kind, api_version)) = plain_header(chunk) {
            // The kinds that grow with the cluster: a reader of their usual form builds the
            // same object without a general YAML parse (it declines anything else).
            let fast = match kind.as_str() {
                "IPAMBlock" => super::fast_yaml::ipam_block(chunk).map(Object::IPAMBlock),
                "BlockAffinity" => {
                    super::fast_yaml::block_affinity(chunk).map(Object::BlockAffinity)
                }
                "Node" => super::fast_yaml::node(chunk).map(|n| Object::Node(Box::new(n))),
                _ => None,
            };
            if let Some(object) = fast {
                each(Ok(object));
                continue;
            }
            if let Ok(object) = typed_object(
                index,
                kind,
                api_version,
                String::new(),
                Document::Text(chunk),
            ) {
                each(Ok(object));
                continue;
            }
        }
        let header = match serde_yaml_ng::from_str::<Option<Header>>(chunk) {
            Ok(None) => continue,
            Ok(Some(header)) => header,
            // Not a mapping of the expected shape (or bad syntax): the general path below
            // tells the two apart.
            Err(_) => {
                let value: Value = serde_yaml_ng::from_str(chunk)
                    .map_err(|e| DecodeError::Syntax(format!("document {index}: {e}")))?;
                decode_value_document(index, value, &mut each);
                continue;
            }
        };
        let kind = scalar(header.kind.as_ref());
        let api_version = scalar(header.api_version.as_ref());
        let name = scalar(header.metadata.as_ref().and_then(|m| m.name.as_ref()));
        if kind == "List" || kind.ends_with("List") {
            let value: Value = serde_yaml_ng::from_str(chunk)
                .map_err(|e| DecodeError::Syntax(format!("document {index}: {e}")))?;
            decode_value_document(index, value, &mut each);
            continue;
        }
        if kind.is_empty() {
            each(Err(DecodeError::NoKind { index }));
            continue;
        }
        let result = typed_object(index, kind, api_version, name, Document::Text(chunk));
        each(result);
    }
    Ok(())
}

/// A document read as a generic YAML value: an object, or a `kind: List` of objects.
fn decode_value_document(
    index: usize,
    value: Value,
    each: &mut impl FnMut(Result<Object, DecodeError>),
) {
    if value.is_null() {
        return;
    }
    let kind = str_field(&value, "kind");
    if kind == "List" || (kind.ends_with("List") && value.get("items").is_some()) {
        let items = match value {
            Value::Mapping(mut map) => match map.remove("items") {
                Some(Value::Sequence(items)) => items,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        for item in items {
            each(decode_value(index, item));
        }
    } else {
        each(decode_value(index, value));
    }
}

fn str_field(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn decode_value(index: usize, value: Value) -> Result<Object, DecodeError> {
    let kind = str_field(&value, "kind");
    let api_version = str_field(&value, "apiVersion");
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if kind.is_empty() {
        return Err(DecodeError::NoKind { index });
    }
    typed_object(index, kind, api_version, name, Document::Value(value))
}

/// One document, as text or as an already parsed value.
enum Document<'a> {
    Text(&'a str),
    Value(Value),
}

impl Document<'_> {
    fn into_typed<T: DeserializeOwned>(self) -> Result<T, serde_yaml_ng::Error> {
        match self {
            Document::Text(text) => serde_yaml_ng::from_str(text),
            Document::Value(value) => serde_yaml_ng::from_value(value),
        }
    }
}

/// The one table of the kinds podroute reads: `(kind, apiVersion)` to [`Object`].
fn typed_object(
    index: usize,
    kind: String,
    api_version: String,
    name: String,
    doc: Document<'_>,
) -> Result<Object, DecodeError> {
    let error = |e: serde_yaml_ng::Error| DecodeError::Object {
        index,
        kind: kind.clone(),
        name: name.clone(),
        message: e.to_string(),
    };
    fn typed<T: DeserializeOwned>(doc: Document<'_>) -> Result<T, serde_yaml_ng::Error> {
        doc.into_typed()
    }
    let calico = api_version == API_VERSION;
    match (kind.as_str(), calico) {
        ("Node", _) if api_version == "v1" || api_version.is_empty() => {
            typed(doc).map_err(error).map(|n| Object::Node(Box::new(n)))
        }
        ("IPPool", true) => typed(doc).map_err(error).map(Object::IPPool),
        ("IPAMBlock", true) => typed(doc).map_err(error).map(Object::IPAMBlock),
        ("BlockAffinity", true) => typed(doc).map_err(error).map(Object::BlockAffinity),
        ("BGPPeer", true) => typed(doc).map_err(error).map(Object::BGPPeer),
        ("BGPConfiguration", true) => typed(doc).map_err(error).map(Object::BGPConfiguration),
        ("BGPFilter", true) => typed(doc).map_err(error).map(Object::BGPFilter),
        ("Service", _) if api_version == "v1" => typed(doc)
            .map_err(error)
            .map(|s| Object::Service(Box::new(s))),
        ("EndpointSlice", _) if api_version == DISCOVERY_V1 => typed(doc)
            .map_err(error)
            .map(|s| Object::EndpointSlice(Box::new(s))),
        ("ConfigMap", _)
            if api_version == "v1" && name == crate::model::flannel::CONFIGMAP_NAME =>
        {
            Err(DecodeError::FlannelConfig { index, name })
        }
        _ => Err(DecodeError::UnknownKind {
            index,
            api_version,
            kind,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: &str = "apiVersion: crd.projectcalico.org/v1\nkind: IPAMBlock\nmetadata:\n  \
        name: 10-0-0-0-26\nspec:\n  cidr: 10.0.0.0/26\n  affinity: host:n1\n  \
        allocations: [null]\n  unallocated: [0]\n  attributes: []\n";

    fn each(text: &str) -> Vec<Result<Object, String>> {
        let mut out = Vec::new();
        decode_documents_each(text, |r| out.push(r.map_err(|e| e.to_string())))
            .map_err(|e| e.to_string())
            .unwrap();
        out
    }

    #[test]
    fn plain_header_reads_kubectl_style_headers_only() {
        assert_eq!(
            plain_header(BLOCK),
            Some(("IPAMBlock".into(), API_VERSION.into()))
        );
        let node = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n";
        assert_eq!(plain_header(node), Some(("Node".into(), "v1".into())));
        for other in [
            // quoted, commented, nested, duplicated, flow style, not read, missing
            "apiVersion: v1\nkind: \"Node\"\n",
            "apiVersion: v1\nkind: Node # a node\n",
            "apiVersion: v1\nspec:\n  kind: Node\n",
            "apiVersion: v1\nkind: Node\nkind: Node\n",
            "{apiVersion: v1, kind: Node}\n",
            "apiVersion: v1\nkind: ConfigMap\n",
            "kind: Node\n",
        ] {
            assert_eq!(plain_header(other), None, "{other:?}");
        }
    }

    /// The one-parse path and the general path agree, on good and on broken documents.
    #[test]
    fn documents_decode_the_same_with_or_without_a_plain_header() {
        let quoted = BLOCK.replace("kind: IPAMBlock", "kind: 'IPAMBlock'");
        assert_eq!(plain_header(&quoted), None);
        let fast = each(BLOCK);
        assert!(
            matches!(fast.as_slice(), [Ok(Object::IPAMBlock(_))]),
            "{fast:?}"
        );
        assert_eq!(fast, each(&quoted));
        // A typed error names the object, as the general path does.
        let bad = BLOCK.replace("cidr: 10.0.0.0/26", "cidr: [1, 2]");
        let got = each(&bad);
        assert_eq!(
            got,
            each(&bad.replace("kind: IPAMBlock", "kind: 'IPAMBlock'"))
        );
        assert!(
            matches!(&got[..], [Err(e)] if e.contains("10-0-0-0-26")),
            "{got:?}"
        );
    }
}

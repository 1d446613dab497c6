//! Reading objects from YAML or JSON text: one object, several `---`-separated documents,
//! or a `kind: List` as printed by `kubectl get ... -o yaml`.

use k8s_openapi::api::core::v1::Node;
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
}

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
    #[error(
        "document {index}: {api_version}/{kind} is not a kind podroute reads (Node and crd.projectcalico.org/v1 IPPool, IPAMBlock, BlockAffinity, BGPPeer, BGPConfiguration, BGPFilter)"
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
    let mut values = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Value::deserialize(document).map_err(|e| DecodeError::Syntax(e.to_string()))?;
        values.push(value);
    }
    let mut out = Vec::new();
    let mut index = 0;
    for value in values {
        index += 1;
        if value.is_null() {
            continue;
        }
        let kind = str_field(&value, "kind");
        if kind == "List" || (kind.ends_with("List") && value.get("items").is_some()) {
            let items = match value.get("items") {
                Some(Value::Sequence(items)) => items.clone(),
                _ => Vec::new(),
            };
            for item in items {
                out.push(decode_value(index, item));
            }
        } else {
            out.push(decode_value(index, value));
        }
    }
    Ok(out)
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
    fn typed<T: DeserializeOwned>(
        index: usize,
        kind: &str,
        name: &str,
        value: Value,
    ) -> Result<T, DecodeError> {
        serde_yaml_ng::from_value(value).map_err(|e| DecodeError::Object {
            index,
            kind: kind.to_string(),
            name: name.to_string(),
            message: e.to_string(),
        })
    }
    let calico = api_version == API_VERSION;
    match (kind.as_str(), calico) {
        ("Node", _) if api_version == "v1" || api_version.is_empty() => {
            typed(index, &kind, &name, value).map(|n| Object::Node(Box::new(n)))
        }
        ("IPPool", true) => typed(index, &kind, &name, value).map(Object::IPPool),
        ("IPAMBlock", true) => typed(index, &kind, &name, value).map(Object::IPAMBlock),
        ("BlockAffinity", true) => typed(index, &kind, &name, value).map(Object::BlockAffinity),
        ("BGPPeer", true) => typed(index, &kind, &name, value).map(Object::BGPPeer),
        ("BGPConfiguration", true) => {
            typed(index, &kind, &name, value).map(Object::BGPConfiguration)
        }
        ("BGPFilter", true) => typed(index, &kind, &name, value).map(Object::BGPFilter),
        _ => Err(DecodeError::UnknownKind {
            index,
            api_version,
            kind,
        }),
    }
}

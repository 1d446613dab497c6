//! BGP passwords: the Secret keys a `BGPPeer.spec.password.secretKeyRef` names, read when
//! needed (not watched: the agent needs `get` on Secrets of its own namespace only, as
//! calico-node does).
//!
//! - Kubernetes datastore: `GET` the Secret in the agent's namespace (`POD_NAMESPACE`, else
//!   the service account's namespace file, else `podroute-system`).
//! - YAML directory: a `v1` `Secret` document in the directory (`data` base64 or
//!   `stringData`), so a lab or a test can carry its passwords next to its BGPPeers.
//!
//! Values are cached for [`CACHE_TTL`], so a rotated password is picked up within that time
//! (the session is then re-keyed and restarted) without an API request per datastore change.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;

use crate::model::crd::SecretKeyRef;

/// How long a read password (or a failure to read it) is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(30);
/// Namespace when neither `POD_NAMESPACE` nor the service account says.
pub const DEFAULT_NAMESPACE: &str = "podroute-system";
/// Largest YAML file scanned for Secrets.
const MAX_FILE: u64 = 4 << 20;

/// Why a password could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("Secret {namespace}/{name} not found")]
    NoSecret { namespace: String, name: String },
    #[error("Secret {namespace}/{name} has no key {key:?}")]
    NoKey {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("cannot read Secret {namespace}/{name}: {message}")]
    Read {
        namespace: String,
        name: String,
        message: String,
    },
    #[error("this datastore has no Secrets")]
    Unsupported,
}

/// Where Secrets come from.
#[derive(Clone)]
pub enum SecretSource {
    Kube {
        client: kube::Client,
        namespace: String,
    },
    Dir(PathBuf),
    None,
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Kube { namespace, .. } => write!(f, "Kube({namespace})"),
            SecretSource::Dir(p) => write!(f, "Dir({})", p.display()),
            SecretSource::None => f.write_str("None"),
        }
    }
}

/// The agent's namespace, as calico-node finds it.
pub fn own_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                .ok()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
}

impl SecretSource {
    fn namespace(&self) -> &str {
        match self {
            SecretSource::Kube { namespace, .. } => namespace,
            _ => "",
        }
    }

    async fn read(&self, r: &SecretKeyRef) -> Result<Vec<u8>, SecretError> {
        let namespace = self.namespace().to_string();
        let secret = match self {
            SecretSource::None => return Err(SecretError::Unsupported),
            SecretSource::Kube { client, namespace } => {
                let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
                match api.get_opt(&r.name).await {
                    Ok(Some(s)) => s,
                    Ok(None) => {
                        return Err(SecretError::NoSecret {
                            namespace: namespace.clone(),
                            name: r.name.clone(),
                        });
                    }
                    Err(e) => {
                        return Err(SecretError::Read {
                            namespace: namespace.clone(),
                            name: r.name.clone(),
                            message: e.to_string(),
                        });
                    }
                }
            }
            SecretSource::Dir(dir) => {
                let dir = dir.clone();
                let name = r.name.clone();
                tokio::task::spawn_blocking(move || secret_in_dir(&dir, &name))
                    .await
                    .ok()
                    .flatten()
                    .ok_or_else(|| SecretError::NoSecret {
                        namespace: namespace.clone(),
                        name: r.name.clone(),
                    })?
            }
        };
        value_of(&secret, &r.key).ok_or_else(|| SecretError::NoKey {
            namespace,
            name: r.name.clone(),
            key: r.key.clone(),
        })
    }
}

fn value_of(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.as_bytes().to_vec())
        })
}

/// The first `v1` `Secret` named `name` in the directory's YAML/JSON files.
fn secret_in_dir(dir: &std::path::Path, name: &str) -> Option<Secret> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(default)]
        kind: String,
        #[serde(default)]
        metadata: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() <= MAX_FILE))
        .collect();
    files.sort();
    for path in files {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if !text.contains("Secret") {
            continue;
        }
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let Ok(value) = serde_yaml_ng::Value::deserialize(doc) else {
                break;
            };
            let Ok(head) = serde_yaml_ng::from_value::<Head>(value.clone()) else {
                continue;
            };
            if head.kind == "Secret"
                && head.metadata.and_then(|m| m.name).as_deref() == Some(name)
                && let Ok(secret) = serde_yaml_ng::from_value::<Secret>(value)
            {
                return Some(secret);
            }
        }
    }
    None
}

/// A password read (or why not), by `(secret, key)`.
type Password = Result<Arc<[u8]>, SecretError>;

/// Passwords by `(secret, key)`, cached.
#[derive(Debug)]
pub struct PasswordCache {
    source: SecretSource,
    entries: HashMap<(String, String), (Password, Instant)>,
}

/// What [`PasswordCache::resolve`] found, by `(secret, key)`.
pub type Passwords = HashMap<(String, String), Password>;

impl PasswordCache {
    pub fn new(source: SecretSource) -> Self {
        Self {
            source,
            entries: HashMap::new(),
        }
    }

    /// The passwords of `refs`, read again when older than [`CACHE_TTL`]; entries not asked
    /// for are forgotten.
    pub async fn resolve<'a>(
        &mut self,
        refs: impl IntoIterator<Item = &'a SecretKeyRef>,
    ) -> Passwords {
        let now = Instant::now();
        let mut out = Passwords::new();
        for r in refs {
            let k = (r.name.clone(), r.key.clone());
            if out.contains_key(&k) {
                continue;
            }
            let fresh = self
                .entries
                .get(&k)
                .filter(|(_, at)| now.duration_since(*at) < CACHE_TTL)
                .map(|(v, _)| v.clone());
            let v = match fresh {
                Some(v) => v,
                None => {
                    let v = self.source.read(r).await.map(Arc::<[u8]>::from);
                    self.entries.insert(k.clone(), (v.clone(), now));
                    v
                }
            };
            out.insert(k, v);
        }
        self.entries.retain(|k, _| out.contains_key(k));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn secrets_from_a_yaml_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("secret.yaml"),
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: bgp\n  namespace: podroute-system\n\
             data:\n  tor-a: czNjcmV0\nstringData:\n  tor-b: plain-text\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bgp\n",
        )
        .unwrap();
        let mut cache = PasswordCache::new(SecretSource::Dir(dir.path().to_path_buf()));
        let r = |name: &str, key: &str| SecretKeyRef {
            name: name.into(),
            key: key.into(),
            optional: None,
        };
        let refs = [
            r("bgp", "tor-a"),
            r("bgp", "tor-b"),
            r("bgp", "nope"),
            r("other", "x"),
        ];
        let got = cache.resolve(refs.iter()).await;
        assert_eq!(
            got[&("bgp".into(), "tor-a".into())].as_deref().unwrap(),
            b"s3cret"
        );
        assert_eq!(
            got[&("bgp".into(), "tor-b".into())].as_deref().unwrap(),
            b"plain-text"
        );
        assert!(matches!(
            got[&("bgp".into(), "nope".into())],
            Err(SecretError::NoKey { .. })
        ));
        assert!(matches!(
            got[&("other".into(), "x".into())],
            Err(SecretError::NoSecret { .. })
        ));
    }
}

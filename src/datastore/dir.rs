//! The YAML-directory datastore (`--datastore dir:PATH`): the lab's and Kubernetes-less
//! users' source of objects.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory (hidden files
//! ignored, no recursion) is read as multi-document YAML; `kind: List` documents as printed
//! by `kubectl get ... -o yaml` are unpacked. The directory is polled (default: every
//! second) and a file is decoded again only when its bytes changed. A file that is not
//! valid YAML is reported and its previously read objects stay in force; a document that
//! cannot be read is reported and the other documents are used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::{DatastoreHandle, Inputs, RejectCounters, StateBuilder};
use crate::model::{DecodeError, Kind, Object, Reason, Rejection, decode_documents};
use crate::state::state_channel;

/// How often the directory is checked for changes unless told otherwise.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What was read from one file.
#[derive(Debug, Default)]
struct FileEntry {
    bytes: Vec<u8>,
    /// Objects from the last readable version of the file.
    objects: Vec<Object>,
    /// Documents of the current version that could not be read.
    unreadable: Vec<Rejection>,
    /// File-level problem of the current version.
    error: Option<String>,
}

/// Reads and re-reads one directory; owned by the datastore task.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    dir_error: Option<String>,
    counters: Arc<RejectCounters>,
}

impl DirSource {
    pub fn new(dir: impl Into<PathBuf>, counters: Arc<RejectCounters>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            dir_error: None,
            counters,
        }
    }

    /// Re-reads the directory. Returns `Ok(true)` when anything changed, `Err` when the
    /// directory itself cannot be listed (the previous contents stay in force).
    pub fn poll(&mut self) -> Result<bool, String> {
        let listing = match list_files(&self.dir) {
            Ok(listing) => {
                if self.dir_error.take().is_some() {
                    info!(dir = %self.dir.display(), "directory readable again");
                }
                listing
            }
            Err(error) => {
                let message = format!("{}: cannot list directory: {error}", self.dir.display());
                if self.dir_error.as_deref() != Some(&message) {
                    warn!("{message}; keeping the objects read before");
                    self.dir_error = Some(message.clone());
                }
                return Err(message);
            }
        };
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|path, _| listing.contains(path));
        if self.files.len() != before {
            changed = true;
        }
        for path in listing {
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                // Removed between listing and reading, or unreadable: try again next poll.
                Err(error) => {
                    warn!(file = %path.display(), %error, "cannot read file");
                    continue;
                }
            };
            let entry = self.files.entry(path.clone()).or_default();
            if entry.bytes == bytes {
                continue;
            }
            changed = true;
            decode_file(&path, &bytes, entry, &self.counters);
            entry.bytes = bytes;
        }
        Ok(changed)
    }

    /// All objects and problems, for the builder. A later file (by path) wins when two
    /// files define the same object.
    pub fn inputs(&self) -> Inputs {
        let mut seen: BTreeMap<(Kind, String), (&Path, &Object)> = BTreeMap::new();
        let mut inputs = Inputs::default();
        for (path, entry) in &self.files {
            for object in &entry.objects {
                let key = (object.kind(), object.name().to_string());
                if let Some((other, _)) = seen.insert(key, (path, object)) {
                    inputs.source_errors.push(format!(
                        "{} {:?} is defined in both {} and {}; using {}",
                        object.kind(),
                        object.name(),
                        other.display(),
                        path.display(),
                        path.display()
                    ));
                }
            }
            inputs.unreadable.extend(entry.unreadable.iter().cloned());
            if let Some(error) = &entry.error {
                inputs.source_errors.push(error.clone());
            }
        }
        if let Some(error) = &self.dir_error {
            inputs.source_errors.push(error.clone());
        }
        for (_, object) in seen.into_values() {
            match object {
                Object::Node(o) => inputs.nodes.push(Arc::new((**o).clone())),
                Object::IPPool(o) => inputs.pools.push(Arc::new(o.clone())),
                Object::IPAMBlock(o) => inputs.blocks.push(Arc::new(o.clone())),
                Object::BlockAffinity(o) => inputs.affinities.push(Arc::new(o.clone())),
                Object::BGPPeer(o) => inputs.peers.push(Arc::new(o.clone())),
                Object::BGPConfiguration(o) => inputs.bgp_configurations.push(Arc::new(o.clone())),
                Object::BGPFilter(o) => inputs.filters.push(Arc::new(o.clone())),
            }
        }
        inputs
    }
}

fn list_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let wanted = !name.starts_with('.')
            && (name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json"));
        if wanted && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn kind_from_str(kind: &str) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| k.as_str() == kind)
}

fn decode_file(path: &Path, bytes: &[u8], entry: &mut FileEntry, counters: &RejectCounters) {
    let file = path.display();
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(_) => {
            let message = format!("{file}: not UTF-8 text; keeping the objects read before");
            warn!("{message}");
            counters.record_unreadable();
            entry.error = Some(message);
            entry.unreadable.clear();
            return;
        }
    };
    let documents = match decode_documents(text) {
        Ok(documents) => documents,
        Err(error) => {
            let message = format!("{file}: {error}; keeping the objects read before");
            warn!("{message}");
            counters.record_unreadable();
            entry.error = Some(message);
            entry.unreadable.clear();
            return;
        }
    };
    entry.error = None;
    entry.objects.clear();
    entry.unreadable.clear();
    for document in documents {
        match document {
            Ok(object) => entry.objects.push(object),
            Err(DecodeError::Object {
                kind,
                name,
                message,
                index,
            }) if kind_from_str(&kind).is_some() && !name.is_empty() => {
                // Reported (logged and counted) by the builder like any invalid object.
                if let Some(kind) = kind_from_str(&kind) {
                    entry.unreadable.push(Rejection::new(
                        kind,
                        name,
                        Reason::Malformed(format!("{file} document {index}: {message}")),
                    ));
                }
            }
            Err(error) => {
                warn!("{file}: {error}; document skipped");
                counters.record_unreadable();
            }
        }
    }
}

/// Starts reading `dir`, checking it every `poll` for changes.
pub fn spawn(
    dir: impl Into<PathBuf>,
    local_node: impl Into<String>,
    poll: Duration,
) -> DatastoreHandle {
    let counters = Arc::new(RejectCounters::default());
    let (publisher, state) = state_channel();
    let mut source = DirSource::new(dir, counters.clone());
    let mut builder = StateBuilder::new(local_node, counters.clone());
    let task = tokio::spawn(async move {
        let mut interval = tokio::time::interval(poll);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut synced = false;
        loop {
            interval.tick().await;
            let changed = match source.poll() {
                Ok(changed) => changed,
                // The directory cannot be listed: keep the last state; before the first
                // successful read there is nothing to publish (not ready).
                Err(_) if !synced => continue,
                Err(_) => true,
            };
            if !changed && synced {
                continue;
            }
            let next = builder.build(&source.inputs());
            let unchanged = publisher
                .latest()
                .is_some_and(|current| Arc::ptr_eq(&current, &next));
            if !unchanged {
                publisher.publish(next);
            }
            synced = true;
        }
    });
    DatastoreHandle::new(state, counters, vec![task])
}

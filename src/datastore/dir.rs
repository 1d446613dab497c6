//! The YAML-directory datastore (`--datastore dir:PATH`): the lab's and Kubernetes-less
//! users' source of objects.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory (hidden files
//! ignored, no recursion) is read as multi-document YAML; `kind: List` documents as printed
//! by `kubectl get ... -o yaml` are unpacked. The directory is polled (default: every
//! second). A file is read only once it has stopped changing: its size, mtime, ctime and
//! inode the same at two polls in a row, so a file caught mid-write is never taken as it
//! is. A file that is not valid YAML is reported and its previously read objects stay in
//! force; a document that cannot be read is reported and the other documents are used.
//!
//! Bounded by construction: a file over `--datastore-max-file-size` (default 4 MiB) is not
//! read (one line; its previous objects stay); the text of a file is not kept after it is
//! decoded; documents of other kinds are skipped after reading their `kind` and counted in
//! one line per file and reason; the objects kept are reduced to the fields podroute reads
//! ([`crate::model::compact`]), and Nodes, IPAMBlocks and BlockAffinities (the kinds that
//! grow with the cluster) are validated as they are read and kept only in their small
//! validated form, one `Arc` shared with every state built from them (other nodes'
//! BlockAffinities are not kept): memory follows the objects, not the size of the text.
//!
//! A file that still exists but suddenly holds no object (emptied, truncated to a blank
//! prefix) is suspect: its previous objects stay in force, and the state says so (not
//! ready), until it has stayed empty for the wipe-confirm time.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::builder::DEFAULT_WIPE_CONFIRM;
use super::{DatastoreHandle, Input, Inputs, RejectCounters, StateBuilder};
use crate::model::compact::{compact_valid_block, slim_meta, slim_node};
use crate::model::service::{slim_endpoint_slice, slim_service};
use crate::model::{
    Block, BlockClaim, DecodeError, Kind, NodeInfo, Object, Reason, Rejection,
    decode_documents_each,
};
use crate::state::{Suspect, state_channel};

/// How often the directory is checked for changes unless told otherwise.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Files larger than this are not read unless told otherwise.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 4 << 20;

/// How the directory is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirOptions {
    /// How often the directory is checked for changes.
    pub poll: Duration,
    /// Files larger than this many bytes are refused.
    pub max_file_size: u64,
    /// How long a wipe (a whole kind gone, this node's `Node` gone, a file emptied) must last
    /// before it is applied.
    pub wipe_confirm: Duration,
}

impl Default for DirOptions {
    fn default() -> Self {
        Self {
            poll: DEFAULT_POLL_INTERVAL,
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            wipe_confirm: DEFAULT_WIPE_CONFIRM,
        }
    }
}

/// What `stat` says about a file: when any of it changes, the file changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    inode: u64,
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            inode: meta.ino(),
        }
    }
}

/// What was read from one file. The file's text is not kept: its fingerprint and a hash of
/// its bytes tell whether it changed.
#[derive(Debug, Default)]
struct FileEntry {
    /// The file as seen at the previous poll (a file is read once this stays the same).
    seen: Option<Fingerprint>,
    /// The file as last read (readable or not).
    read: Option<Fingerprint>,
    /// Hash of the bytes last read.
    hash: u64,
    /// Objects from the last readable version of the file, reduced to what podroute reads.
    objects: Vec<Stored>,
    /// Documents of the current version that could not be read.
    unreadable: Vec<Rejection>,
    /// File-level problem of the current version.
    error: Option<String>,
    /// Since when the file has held no object while `objects` (kept) are its previous ones.
    emptied_since: Option<Instant>,
}

/// An object as kept between polls: shared with every [`Inputs`] built from it and every
/// state that holds it (no copy per build), and only as large as its own kind. Nodes, blocks
/// and affinities (the kinds that grow with the cluster) are validated as they are read and
/// kept in their small validated form; one that does not validate is kept as read, so that
/// the builder reports it.
#[derive(Debug, Clone)]
enum Stored {
    Node(Input<k8s_openapi::api::core::v1::Node, NodeInfo>),
    IPPool(Arc<crate::model::crd::IPPool>),
    IPAMBlock(Input<crate::model::crd::IPAMBlock, Block>),
    BlockAffinity(Input<crate::model::crd::BlockAffinity, BlockClaim>),
    BGPPeer(Arc<crate::model::crd::BGPPeer>),
    BGPConfiguration(Arc<crate::model::crd::BGPConfiguration>),
    BGPFilter(Arc<crate::model::crd::BGPFilter>),
    Service(Arc<k8s_openapi::api::core::v1::Service>),
    EndpointSlice(Arc<k8s_openapi::api::discovery::v1::EndpointSlice>),
}

impl Stored {
    fn kind(&self) -> Kind {
        match self {
            Stored::Node(_) => Kind::Node,
            Stored::IPPool(_) => Kind::IPPool,
            Stored::IPAMBlock(_) => Kind::IPAMBlock,
            Stored::BlockAffinity(_) => Kind::BlockAffinity,
            Stored::BGPPeer(_) => Kind::BGPPeer,
            Stored::BGPConfiguration(_) => Kind::BGPConfiguration,
            Stored::BGPFilter(_) => Kind::BGPFilter,
            Stored::Service(_) => Kind::Service,
            Stored::EndpointSlice(_) => Kind::EndpointSlice,
        }
    }

    fn name(&self) -> &str {
        match self {
            Stored::Node(Input::Valid(n)) => &n.name,
            Stored::Node(Input::Raw(n)) => n.metadata.name.as_deref().unwrap_or(""),
            Stored::IPPool(o) => o.name(),
            Stored::IPAMBlock(Input::Valid(o)) => &o.name,
            Stored::IPAMBlock(Input::Raw(o)) => o.name(),
            Stored::BlockAffinity(Input::Valid(o)) => &o.name,
            Stored::BlockAffinity(Input::Raw(o)) => o.name(),
            Stored::BGPPeer(o) => o.name(),
            Stored::BGPConfiguration(o) => o.name(),
            Stored::BGPFilter(o) => o.name(),
            Stored::Service(o) => o.metadata.name.as_deref().unwrap_or(""),
            Stored::EndpointSlice(o) => o.metadata.name.as_deref().unwrap_or(""),
        }
    }

    /// `metadata.namespace` of a namespaced object, empty otherwise.
    fn namespace(&self) -> &str {
        match self {
            Stored::Service(o) => o.metadata.namespace.as_deref().unwrap_or(""),
            Stored::EndpointSlice(o) => o.metadata.namespace.as_deref().unwrap_or(""),
            _ => "",
        }
    }
}

impl Stored {
    /// Keeps `object` reduced to the fields podroute reads, validated when it is of a kind
    /// that grows with the cluster (blocks of other nodes than `local_node` without their
    /// local allocations). `None`: of no use to this node (another node's valid
    /// BlockAffinity), not kept.
    fn keep(object: Object, local_node: Option<&str>) -> Option<Self> {
        Some(match object {
            Object::Node(mut node) => match NodeInfo::from_node(&node) {
                Ok(info) => Stored::Node(Input::Valid(Arc::new(info))),
                Err(_) => {
                    slim_node(&mut node);
                    Stored::Node(Input::Raw(Arc::new(*node)))
                }
            },
            Object::IPAMBlock(mut raw) => match Block::from_resource(&raw) {
                Ok(mut block) => {
                    if let Some(local) = local_node {
                        compact_valid_block(&mut block, local);
                    }
                    Stored::IPAMBlock(Input::Valid(Arc::new(block)))
                }
                Err(_) => {
                    slim_meta(&mut raw.metadata);
                    Stored::IPAMBlock(Input::Raw(Arc::new(raw)))
                }
            },
            Object::BlockAffinity(mut raw) => match BlockClaim::from_resource(&raw) {
                // Another node's valid claim decides nothing here (the builder drops it too):
                // not kept.
                Ok(claim) if local_node.is_some_and(|local| claim.node != local) => return None,
                Ok(claim) => Stored::BlockAffinity(Input::Valid(Arc::new(claim))),
                Err(_) => {
                    slim_meta(&mut raw.metadata);
                    Stored::BlockAffinity(Input::Raw(Arc::new(raw)))
                }
            },
            Object::IPPool(mut o) => {
                slim_meta(&mut o.metadata);
                Stored::IPPool(Arc::new(o))
            }
            Object::BGPPeer(mut o) => {
                slim_meta(&mut o.metadata);
                Stored::BGPPeer(Arc::new(o))
            }
            Object::BGPConfiguration(mut o) => {
                slim_meta(&mut o.metadata);
                Stored::BGPConfiguration(Arc::new(o))
            }
            Object::BGPFilter(mut o) => {
                slim_meta(&mut o.metadata);
                Stored::BGPFilter(Arc::new(o))
            }
            Object::Service(mut o) => {
                slim_service(&mut o);
                Stored::Service(Arc::new(*o))
            }
            Object::EndpointSlice(mut o) => {
                // Without knowing the local node every endpoint is kept.
                if let Some(local) = local_node {
                    slim_endpoint_slice(&mut o, local);
                }
                Stored::EndpointSlice(Arc::new(*o))
            }
        })
    }
}

/// A file whose last change is at least this old is read without waiting for a second
/// poll to see it unchanged.
const QUIET_AFTER: Duration = Duration::from_millis(500);

/// Reads and re-reads one directory; owned by the datastore task.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    dir_error: Option<String>,
    counters: Arc<RejectCounters>,
    /// Blocks of other nodes are kept without their local allocations.
    local_node: Option<String>,
    options: DirOptions,
}

impl DirSource {
    pub fn new(dir: impl Into<PathBuf>, counters: Arc<RejectCounters>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            dir_error: None,
            counters,
            local_node: None,
            options: DirOptions::default(),
        }
    }

    /// Keeps other nodes' blocks reduced (see [`crate::model::compact`]).
    pub fn with_local_node(mut self, node: impl Into<String>) -> Self {
        self.local_node = Some(node.into());
        self
    }

    /// Sets the file-size limit and the wipe-confirm time.
    pub fn with_options(mut self, options: DirOptions) -> Self {
        self.options = options;
        self
    }

    /// Whether every file listed at the last poll has been read at least once (the first
    /// state is published only then, so it never lacks a file that is still being written).
    pub fn settled(&self) -> bool {
        self.files.values().all(|entry| entry.read.is_some())
    }

    /// Whether an emptied file is being held back (the caller polls on even without change).
    pub fn holding_back(&self) -> bool {
        self.files
            .values()
            .any(|entry| entry.emptied_since.is_some())
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
        // A set: a directory of thousands of files is not compared path by path.
        let listed: std::collections::BTreeSet<&PathBuf> = listing.iter().collect();
        self.files.retain(|path, _| listed.contains(path));
        drop(listed);
        if self.files.len() != before {
            changed = true;
        }
        let now = Instant::now();
        for path in listing {
            let fingerprint = match std::fs::metadata(&path) {
                Ok(meta) => Fingerprint::of(&meta),
                // Removed between listing and reading: seen as removed next poll.
                Err(error) => {
                    warn!(file = %path.display(), %error, "cannot stat file");
                    continue;
                }
            };
            let entry = self.files.entry(path.clone()).or_default();
            if let Some(since) = entry.emptied_since
                && now.saturating_duration_since(since) >= self.options.wipe_confirm
            {
                warn!(
                    file = %path.display(),
                    objects = entry.objects.len(),
                    "file has stayed empty for {:?}; applying the deletion of its objects",
                    self.options.wipe_confirm
                );
                entry.objects.clear();
                entry.emptied_since = None;
                changed = true;
            }
            if entry.read == Some(fingerprint) {
                continue;
            }
            let stable = entry.seen == Some(fingerprint);
            entry.seen = Some(fingerprint);
            // Not written for a while: nobody is writing it now (at start, and for a file
            // renamed into the directory, this saves a poll; a restarting agent has its state
            // at once).
            let quiet = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= QUIET_AFTER);
            if !stable && !quiet {
                // Changing now, or new: read it once it has stayed the same for a poll.
                continue;
            }
            entry.read = Some(fingerprint);
            if fingerprint.len > self.options.max_file_size {
                let message = format!(
                    "{}: {} bytes is over the limit of {} bytes (--datastore-max-file-size); \
                     not read, keeping the objects read before",
                    path.display(),
                    fingerprint.len,
                    self.options.max_file_size
                );
                warn!("{message}");
                self.counters.record_unreadable();
                entry.error = Some(message);
                entry.unreadable.clear();
                changed = true;
                continue;
            }
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                // Removed between listing and reading, or unreadable: try again next poll.
                Err(error) => {
                    warn!(file = %path.display(), %error, "cannot read file");
                    entry.read = None;
                    continue;
                }
            };
            let mut hasher = DefaultHasher::new();
            hasher.write(&bytes);
            let hash = hasher.finish();
            if hash == entry.hash && !entry.objects.is_empty() && entry.error.is_none() {
                continue;
            }
            entry.hash = hash;
            changed = true;
            decode_file(
                &path,
                &bytes,
                entry,
                &self.counters,
                self.local_node.as_deref(),
                now,
            );
        }
        Ok(changed)
    }

    /// All objects and problems, for the builder. A later file (by path) wins when two
    /// files define the same object.
    pub fn inputs(&self) -> Inputs {
        let mut seen: BTreeMap<(Kind, &str, &str), (&Path, &Stored)> = BTreeMap::new();
        let mut inputs = Inputs::default();
        for (path, entry) in &self.files {
            for object in &entry.objects {
                let key = (object.kind(), object.namespace(), object.name());
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
            if entry.emptied_since.is_some() {
                inputs.suspect.push(Suspect {
                    kind: None,
                    message: format!(
                        "{} suddenly holds no objects (emptied or truncated?); keeping its {} \
                         previous objects until it has stayed so for {:?}",
                        path.display(),
                        entry.objects.len(),
                        self.options.wipe_confirm
                    ),
                });
            }
        }
        if let Some(error) = &self.dir_error {
            inputs.source_errors.push(error.clone());
        }
        for (_, object) in seen.into_values() {
            match object {
                Stored::Node(o) => inputs.nodes.push(o.clone()),
                Stored::IPPool(o) => inputs.pools.push(o.clone()),
                Stored::IPAMBlock(o) => inputs.blocks.push(o.clone()),
                Stored::BlockAffinity(o) => inputs.affinities.push(o.clone()),
                Stored::BGPPeer(o) => inputs.peers.push(o.clone()),
                Stored::BGPConfiguration(o) => inputs.bgp_configurations.push(o.clone()),
                Stored::BGPFilter(o) => inputs.filters.push(o.clone()),
                Stored::Service(o) => inputs.services.push(o.clone()),
                Stored::EndpointSlice(o) => inputs.endpoint_slices.push(o.clone()),
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

fn decode_file(
    path: &Path,
    bytes: &[u8],
    entry: &mut FileEntry,
    counters: &RejectCounters,
    local_node: Option<&str>,
    now: Instant,
) {
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
    let mut objects = Vec::new();
    // Objects read, kept or not (another node's BlockAffinity is read but not kept).
    let mut documents = 0usize;
    let mut unreadable = Vec::new();
    // Documents skipped, by reason: one line per file and reason.
    let mut skipped: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let decoded = decode_documents_each(text, |document| match document {
        Ok(object) => {
            documents += 1;
            objects.extend(Stored::keep(object, local_node));
        }
        Err(DecodeError::Object {
            kind,
            name,
            message,
            index,
        }) if kind_from_str(&kind).is_some() && !name.is_empty() => {
            // Reported (logged and counted) by the builder like any invalid object.
            if let Some(kind) = kind_from_str(&kind) {
                unreadable.push(Rejection::new(
                    kind,
                    name,
                    Reason::Malformed(format!("{file} document {index}: {message}")),
                ));
            }
        }
        // flannel mode reads its ConfigMap itself.
        Err(DecodeError::FlannelConfig { .. }) => {}
        Err(error) => {
            counters.record_unreadable();
            let reason = match &error {
                DecodeError::UnknownKind {
                    api_version, kind, ..
                } => format!("{api_version}/{kind} is not a kind podroute reads"),
                DecodeError::NoKind { .. } => "kind is missing".to_string(),
                other => other.to_string(),
            };
            let slot = skipped.entry(reason).or_insert((0, String::new()));
            if slot.0 == 0 {
                slot.1 = error.to_string();
            }
            slot.0 += 1;
        }
    });
    if let Err(error) = decoded {
        let message = format!("{file}: {error}; keeping the objects read before");
        warn!("{message}");
        counters.record_unreadable();
        entry.error = Some(message);
        entry.unreadable.clear();
        return;
    }
    for (reason, (count, first)) in skipped {
        if count == 1 {
            warn!("{file}: {first}; document skipped");
        } else {
            warn!(
                documents = count,
                "{file}: {count} documents skipped: {reason} (first: {first})"
            );
        }
    }
    entry.error = None;
    entry.unreadable = unreadable;
    if documents == 0 && entry.unreadable.is_empty() && !entry.objects.is_empty() {
        // Emptied or truncated to nothing: suspect, the previous objects stay for now.
        if entry.emptied_since.is_none() {
            warn!(
                file = %file,
                objects = entry.objects.len(),
                "file suddenly holds no objects; keeping its previous objects until it has \
                 stayed so for the wipe-confirm time"
            );
            entry.emptied_since = Some(now);
        }
        return;
    }
    if entry.emptied_since.take().is_some() {
        info!(file = %file, "file holds objects again");
    }
    entry.objects = objects;
}

/// Starts reading `dir`, checking it every `poll` for changes (other options default).
pub fn spawn(
    dir: impl Into<PathBuf>,
    local_node: impl Into<String>,
    poll: Duration,
) -> DatastoreHandle {
    spawn_with(
        dir,
        local_node,
        DirOptions {
            poll,
            ..DirOptions::default()
        },
    )
}

/// Starts reading `dir` with `options`.
pub fn spawn_with(
    dir: impl Into<PathBuf>,
    local_node: impl Into<String>,
    options: DirOptions,
) -> DatastoreHandle {
    let local_node = local_node.into();
    let counters = Arc::new(RejectCounters::default());
    let (publisher, state) = state_channel();
    let poll = options.poll;
    let wipe_confirm = options.wipe_confirm;
    let mut source = DirSource::new(dir, counters.clone())
        .with_local_node(local_node.clone())
        .with_options(options);
    let mut builder =
        StateBuilder::new(local_node, counters.clone()).with_wipe_confirm(wipe_confirm);
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
            if !synced && !source.settled() {
                continue;
            }
            // A held-back wipe is applied by a build once its time has come.
            let due = builder
                .next_deadline()
                .is_some_and(|deadline| deadline <= Instant::now());
            if !changed && synced && !due {
                continue;
            }
            let next = builder.build(&source.inputs());
            let unchanged = publisher
                .latest()
                .is_some_and(|current| Arc::ptr_eq(&current, &next));
            if !unchanged {
                publisher.publish(next);
                // The previous state and the decoded files' garbage are free now.
                super::trim_heap();
            }
            synced = true;
        }
    });
    DatastoreHandle::new(state, counters, vec![task])
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use super::*;

    /// Captures log lines.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn unknown_kinds_are_skipped_with_one_line_per_file_and_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for i in 0..1000 {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i}}}\n"
            ));
        }
        text.push_str("---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n");
        text.push_str("---\napiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.0.0.0/16}\n");
        std::fs::write(tmp.path().join("mixed.yaml"), text).unwrap();
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let counters = Arc::new(RejectCounters::default());
        let mut source = DirSource::new(tmp.path(), counters.clone());
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(source.poll(), Ok(false), "first sight: not read yet");
            assert_eq!(source.poll(), Ok(true), "unchanged for a poll: read");
        });
        let log = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let warnings: Vec<_> = log.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(warnings.len(), 2, "{log}");
        assert!(
            warnings
                .iter()
                .any(|l| l
                    .contains("1000 documents skipped: v1/ConfigMap is not a kind podroute reads")),
            "{log}"
        );
        assert!(
            warnings.iter().any(|l| l.contains("apps/v1/Deployment")),
            "{log}"
        );
        assert_eq!(counters.unreadable(), 1001);
        let inputs = source.inputs();
        assert_eq!(inputs.pools.len(), 1);
        assert!(inputs.source_errors.is_empty());
    }
}

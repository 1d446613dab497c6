//! Where the cluster model comes from: the Kubernetes API (watch) or a directory of YAML
//! files. Either way a single task builds every [`ClusterState`](crate::state::ClusterState)
//! with [`StateBuilder`] and publishes it on a [`StateRx`].

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::state::StateRx;

pub mod builder;
pub mod dir;
pub mod kube;
pub mod node_condition;
pub mod secrets;
pub mod tunnel_ipam;

pub use builder::{Input, Inputs, RejectCounters, StateBuilder};

/// Returns the heap's free memory to the kernel after a build that replaced a large state:
/// glibc keeps freed small chunks in its arena otherwise, and a rebuild of a 20,000-block
/// cluster frees megabytes at once. A no-op elsewhere than glibc.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases glibc's own free lists; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `--datastore` value: `kubernetes` or `dir:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatastoreSpec {
    Kubernetes,
    Dir(PathBuf),
}

/// A `--datastore` value that is neither `kubernetes` nor `dir:PATH`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("datastore {0:?} is not \"kubernetes\" or \"dir:PATH\"")]
pub struct BadDatastoreSpec(pub String);

impl FromStr for DatastoreSpec {
    type Err = BadDatastoreSpec;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kubernetes" | "kube" | "k8s" => Ok(DatastoreSpec::Kubernetes),
            _ => match s.strip_prefix("dir:") {
                Some(path) if !path.is_empty() => Ok(DatastoreSpec::Dir(PathBuf::from(path))),
                _ => Err(BadDatastoreSpec(s.to_string())),
            },
        }
    }
}

/// A running datastore. Dropping it stops its tasks.
#[derive(Debug)]
pub struct DatastoreHandle {
    /// Newest snapshot and change notification; `None` until the initial sync is done.
    pub state: StateRx,
    /// Rejected-object counters for the metrics layer.
    pub counters: Arc<RejectCounters>,
    tasks: Vec<JoinHandle<()>>,
}

impl DatastoreHandle {
    pub(crate) fn new(
        state: StateRx,
        counters: Arc<RejectCounters>,
        tasks: Vec<JoinHandle<()>>,
    ) -> Self {
        Self {
            state,
            counters,
            tasks,
        }
    }

    /// Stops the datastore tasks and waits for them to end.
    pub async fn shutdown(mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for DatastoreHandle {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datastore_spec_parses() {
        assert_eq!(
            "kubernetes".parse::<DatastoreSpec>(),
            Ok(DatastoreSpec::Kubernetes)
        );
        assert_eq!(
            "dir:/etc/podroute".parse::<DatastoreSpec>(),
            Ok(DatastoreSpec::Dir(PathBuf::from("/etc/podroute")))
        );
        assert_eq!(
            "dir:".parse::<DatastoreSpec>().unwrap_err().to_string(),
            "datastore \"dir:\" is not \"kubernetes\" or \"dir:PATH\""
        );
    }
}

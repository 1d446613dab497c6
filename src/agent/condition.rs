//! Keeps the Node's `NetworkUnavailable` condition in step with readiness (kubernetes
//! datastore): `False` the first time the agent is ready (every known block routed), `True`
//! on a deliberate shutdown when `--shutdown-condition` is on. Writes run in their own task so
//! the event loop never waits for the API server; a failed write is tried again after
//! [`RETRY_AFTER`].

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::datastore::node_condition::{self, NetworkCondition};

/// Wait before writing again after a failed write.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// Longest wait for the `True` write at shutdown.
pub const SHUTDOWN_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The condition writer of one node.
pub struct ConditionReporter {
    client: Option<kube::Client>,
    node: String,
    /// The condition last written successfully.
    written: Option<NetworkCondition>,
    /// A write in flight and what it writes.
    in_flight: Option<(NetworkCondition, JoinHandle<bool>)>,
    last_failure: Option<Instant>,
}

impl ConditionReporter {
    /// `client` is `None` with the YAML-directory datastore: nothing is written.
    pub fn new(client: Option<kube::Client>, node: String) -> Self {
        if client.is_none() {
            debug!(
                "no Kubernetes API (YAML-directory datastore): the Node's NetworkUnavailable condition is not written"
            );
        }
        Self {
            client,
            node,
            written: None,
            in_flight: None,
            last_failure: None,
        }
    }

    /// Called after every readiness evaluation: once ready, `NetworkUnavailable=False` is
    /// written (again after a failure). Losing readiness later does not set it `True`: the
    /// routes of the previous state stay in the kernel.
    pub fn observe(&mut self, ready: bool) {
        let Some(client) = &self.client else { return };
        if let Some((condition, task)) = &self.in_flight {
            if !task.is_finished() {
                return;
            }
            let condition = *condition;
            let Some((_, task)) = self.in_flight.take() else {
                return;
            };
            // A finished task's result is ready; `now_or_never` does not wait.
            match futures::FutureExt::now_or_never(task) {
                Some(Ok(true)) => self.written = Some(condition),
                _ => self.last_failure = Some(Instant::now()),
            }
        }
        if !ready || self.written == Some(NetworkCondition::Up) {
            return;
        }
        if self
            .last_failure
            .is_some_and(|at| at.elapsed() < RETRY_AFTER)
        {
            return;
        }
        let (client, node) = (client.clone(), self.node.clone());
        let task = tokio::spawn(async move {
            match node_condition::set(client, &node, NetworkCondition::Up).await {
                Ok(()) => {
                    info!(
                        node,
                        "Node condition NetworkUnavailable=False (PodrouteIsUp)"
                    );
                    true
                }
                Err(e) => {
                    warn!(error = %e, "retrying in {RETRY_AFTER:?}");
                    false
                }
            }
        });
        self.in_flight = Some((NetworkCondition::Up, task));
    }

    /// At a deliberate shutdown: writes `NetworkUnavailable=True` (waiting at most
    /// [`SHUTDOWN_WRITE_TIMEOUT`]) when `enabled`.
    pub async fn shutdown(&mut self, enabled: bool) {
        if let Some((_, task)) = self.in_flight.take() {
            task.abort();
        }
        let Some(client) = &self.client else { return };
        if !enabled {
            debug!("--shutdown-condition=false: NetworkUnavailable left as it is");
            return;
        }
        let write = node_condition::set(client.clone(), &self.node, NetworkCondition::Down);
        match tokio::time::timeout(SHUTDOWN_WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => {
                self.written = Some(NetworkCondition::Down);
                info!(
                    node = self.node,
                    "Node condition NetworkUnavailable=True (PodrouteIsDown)"
                );
            }
            Ok(Err(e)) => warn!(error = %e, "at shutdown"),
            Err(_) => warn!(
                node = self.node,
                "the API server did not answer within {SHUTDOWN_WRITE_TIMEOUT:?}; \
                 NetworkUnavailable not set at shutdown"
            ),
        }
    }

    /// The condition last written, if any.
    pub fn written(&self) -> Option<NetworkCondition> {
        self.written
    }
}

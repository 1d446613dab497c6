//! The best-path changes from the speaker's core to its user, coalesced per prefix.
//!
//! The core must never wait on its user (the agent calls the speaker's API and waits for the
//! answers: a core blocked on a full queue towards it would deadlock both), and an unbounded
//! queue of batches grows with every UPDATE a slow user has not read yet. This channel keeps
//! every change in order while fewer than [`EXACT_CHANGES`] wait (a user that keeps up sees
//! each one, e.g. a withdrawal and the re-announcement after it); beyond that a change for a
//! prefix already waiting replaces that prefix's latest entry in place (latest state wins).
//! What waits is then bounded by [`EXACT_CHANGES`] plus the RIB's prefixes, whatever the
//! churn, and the user still sees every prefix whose best path changed, ending with its
//! current best.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use ipnet::IpNet;
use tokio::sync::Notify;

use crate::rib::BestChange;

/// Changes kept one by one before changes of the same prefix are merged.
pub const EXACT_CHANGES: usize = 1 << 16;

#[derive(Debug, Default)]
struct Pending {
    /// In order.
    changes: Vec<BestChange>,
    /// Position of each prefix's latest entry in `changes`.
    index: HashMap<IpNet, usize>,
    /// Entries kept one by one before merging ([`EXACT_CHANGES`]).
    exact: usize,
    /// The sender is gone.
    closed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Pending>,
    notify: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves plain data behind; keep going with it.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The core's end: never blocks.
#[derive(Debug)]
pub(crate) struct BestChangeSender {
    shared: Arc<Shared>,
}

/// The user's end ([`crate::Speaker::start`]).
#[derive(Debug)]
pub struct BestChanges {
    shared: Arc<Shared>,
}

/// Why [`BestChanges::try_recv`] returned nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TryRecvError {
    #[error("no best-path change waiting")]
    Empty,
    #[error("the speaker stopped")]
    Disconnected,
}

/// A new channel.
pub(crate) fn channel() -> (BestChangeSender, BestChanges) {
    channel_merging_after(EXACT_CHANGES)
}

/// A new channel that merges changes of one prefix once `exact` entries wait.
fn channel_merging_after(exact: usize) -> (BestChangeSender, BestChanges) {
    let shared = Arc::new(Shared::default());
    shared.lock().exact = exact;
    (
        BestChangeSender {
            shared: shared.clone(),
        },
        BestChanges { shared },
    )
}

impl BestChangeSender {
    /// Queues `batch`, replacing what waits for the same prefixes.
    ///
    /// A batch sent to an empty queue becomes the queue (no copy of it, no second list); the
    /// index of prefixes is built only once [`EXACT_CHANGES`] entries wait, when changes start
    /// to be merged: a user that keeps up costs no index at all.
    pub(crate) fn send(&self, batch: Vec<BestChange>) {
        if batch.is_empty() {
            return;
        }
        {
            let mut guard = self.shared.lock();
            let p = &mut *guard;
            if p.changes.is_empty() && batch.len() <= p.exact {
                // Fewer than `exact` entries after it: nothing would be merged.
                p.changes = batch;
            } else {
                for change in batch {
                    if p.changes.len() >= p.exact {
                        if p.index.is_empty() {
                            // Later entries overwrite earlier ones: each prefix's latest.
                            p.index = p
                                .changes
                                .iter()
                                .enumerate()
                                .map(|(i, c)| (c.prefix, i))
                                .collect();
                        }
                        if let Some(&i) = p.index.get(&change.prefix) {
                            p.changes[i] = change;
                            continue;
                        }
                        p.index.insert(change.prefix, p.changes.len());
                    }
                    p.changes.push(change);
                }
            }
        }
        self.shared.notify.notify_one();
    }

    /// Entries in the prefix index (tests).
    #[cfg(test)]
    fn indexed(&self) -> usize {
        self.shared.lock().index.len()
    }
}

impl Drop for BestChangeSender {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.notify.notify_one();
    }
}

impl BestChanges {
    /// Every change waiting, at least one; `None` once the speaker stopped and nothing waits.
    pub async fn recv(&mut self) -> Option<Vec<BestChange>> {
        loop {
            match self.try_recv() {
                Ok(batch) => return Some(batch),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => self.shared.notify.notified().await,
            }
        }
    }

    /// Every change waiting, without waiting.
    pub fn try_recv(&mut self) -> Result<Vec<BestChange>, TryRecvError> {
        let mut p = self.shared.lock();
        if p.changes.is_empty() {
            return Err(if p.closed {
                TryRecvError::Disconnected
            } else {
                TryRecvError::Empty
            });
        }
        // Not kept at its largest: it is built again only when a queue grows that long.
        p.index = HashMap::new();
        Ok(std::mem::take(&mut p.changes))
    }

    /// Changes waiting.
    pub fn len(&self) -> usize {
        self.shared.lock().changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attrset::RouteAttrs;
    use crate::rib::BestRoute;
    use crate::wire::{NextHop, PathAttrs};

    fn change(prefix: &str, best: Option<&str>) -> BestChange {
        BestChange {
            prefix: prefix.parse().unwrap(),
            best: best.map(|nh| {
                let next_hop: std::net::IpAddr = nh.parse().unwrap();
                BestRoute {
                    peer: 1,
                    peer_addr: Some(next_hop),
                    next_hop,
                    attrs: Arc::new(RouteAttrs {
                        path: PathAttrs::default(),
                        next_hop: NextHop::new(next_hop),
                    }),
                    stale: false,
                }
            }),
        }
    }

    fn hops(batch: &[BestChange]) -> Vec<(String, Option<String>)> {
        batch
            .iter()
            .map(|c| {
                (
                    c.prefix.to_string(),
                    c.best.as_ref().map(|b| b.next_hop.to_string()),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn every_change_is_kept_while_few_wait() {
        let (tx, mut rx) = channel();
        tx.send(vec![change("10.0.1.0/26", Some("192.168.0.1"))]);
        tx.send(vec![change("10.0.1.0/26", None)]);
        tx.send(vec![change("10.0.1.0/26", Some("192.168.0.2"))]);
        assert_eq!(
            hops(&rx.try_recv().unwrap()),
            vec![
                ("10.0.1.0/26".into(), Some("192.168.0.1".into())),
                ("10.0.1.0/26".into(), None),
                ("10.0.1.0/26".into(), Some("192.168.0.2".into())),
            ]
        );
    }

    #[tokio::test]
    async fn beyond_the_limit_a_prefix_keeps_only_its_latest_best_path() {
        let (tx, mut rx) = channel_merging_after(2);
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
        tx.send(vec![change("10.0.1.0/26", Some("192.168.0.1"))]);
        tx.send(vec![
            change("10.0.2.0/26", Some("192.168.0.2")),
            change("10.0.1.0/26", Some("192.168.0.3")),
        ]);
        tx.send(vec![change("10.0.2.0/26", None)]);
        for i in 0..1000 {
            tx.send(vec![change(
                "10.0.2.0/26",
                Some(&format!("192.168.1.{}", i % 250)),
            )]);
        }
        tx.send(vec![change("10.0.2.0/26", None)]);
        assert_eq!(rx.len(), 2, "one entry per prefix, however many changes");
        let batch = rx.recv().await.unwrap();
        assert_eq!(
            hops(&batch),
            vec![
                ("10.0.1.0/26".into(), Some("192.168.0.3".into())),
                ("10.0.2.0/26".into(), None),
            ]
        );
        assert!(rx.is_empty());
        tx.send(vec![change("10.0.1.0/26", None)]);
        assert_eq!(
            hops(&rx.try_recv().unwrap()).len(),
            1,
            "taken again after a recv"
        );
    }

    /// The index is built only when merging starts, and then from every entry waiting: a
    /// prefix queued twice before the limit is merged into its latest entry after it.
    #[tokio::test]
    async fn the_prefix_index_is_built_when_merging_starts() {
        let (tx, mut rx) = channel_merging_after(3);
        tx.send(vec![
            change("10.0.1.0/26", Some("192.168.0.1")),
            change("10.0.2.0/26", Some("192.168.0.1")),
        ]);
        assert_eq!(tx.indexed(), 0, "below the limit: no index");
        tx.send(vec![change("10.0.1.0/26", Some("192.168.0.2"))]);
        assert_eq!(tx.indexed(), 0, "at the limit only after this one");
        tx.send(vec![
            change("10.0.1.0/26", Some("192.168.0.3")),
            change("10.0.3.0/26", None),
        ]);
        assert_eq!(tx.indexed(), 3);
        assert_eq!(
            hops(&rx.try_recv().unwrap()),
            vec![
                ("10.0.1.0/26".into(), Some("192.168.0.1".into())),
                ("10.0.2.0/26".into(), Some("192.168.0.1".into())),
                ("10.0.1.0/26".into(), Some("192.168.0.3".into())),
                ("10.0.3.0/26".into(), None),
            ]
        );
        assert_eq!(tx.indexed(), 0, "dropped with the queue");
        // A batch longer than the limit sent to an empty queue is merged too.
        tx.send(vec![
            change("10.0.1.0/26", Some("192.168.0.1")),
            change("10.0.2.0/26", None),
            change("10.0.3.0/26", None),
            change("10.0.1.0/26", Some("192.168.0.4")),
            change("10.0.3.0/26", Some("192.168.0.4")),
        ]);
        assert_eq!(
            hops(&rx.try_recv().unwrap()),
            vec![
                ("10.0.1.0/26".into(), Some("192.168.0.4".into())),
                ("10.0.2.0/26".into(), None),
                ("10.0.3.0/26".into(), Some("192.168.0.4".into())),
            ]
        );
    }

    #[tokio::test]
    async fn recv_waits_for_a_change_and_ends_after_the_sender_when_drained() {
        let (tx, mut rx) = channel();
        let waiter = tokio::spawn(async move {
            let first = rx.recv().await;
            let second = rx.recv().await;
            (
                first.map(|b| b.len()),
                second.map(|b| b.len()),
                rx.recv().await,
            )
        });
        tokio::task::yield_now().await;
        tx.send(vec![change("10.0.1.0/26", Some("192.168.0.1"))]);
        tokio::task::yield_now().await;
        tx.send(vec![change("10.0.2.0/26", Some("192.168.0.1"))]);
        drop(tx);
        let (first, second, end) = waiter.await.unwrap();
        assert_eq!(first.unwrap_or(0) + second.unwrap_or(0), 2, "nothing lost");
        assert!(
            end.is_none() || second.is_none(),
            "None once drained and closed"
        );
    }
}

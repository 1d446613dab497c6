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
//!
//! A change waits in 32 bytes (`Waiting`: the prefix, the attribute set it shares with the
//! RIB, and an index into a small table of (peer, peer address, next hop, stale), which few
//! routes differ in) rather than as a 72-byte [`BestChange`]: while the kernel is programmed,
//! a burst of 100,000 changes waits here. [`BestChanges::recv_batch`] hands them over as
//! they wait and builds each `BestChange` only as the user iterates.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use ipnet::IpNet;
use tokio::sync::Notify;

use crate::attrset::AttrSet;
use crate::rib::{BestChange, BestRoute, PeerId};

/// Changes kept one by one before changes of the same prefix are merged.
pub const EXACT_CHANGES: usize = 1 << 16;

/// What a best route says besides its attributes; see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Source {
    peer: PeerId,
    peer_addr: Option<IpAddr>,
    next_hop: IpAddr,
    stale: bool,
}

/// One change as it waits; see the module doc.
#[derive(Debug, Clone)]
struct Waiting {
    prefix: IpNet,
    /// Into the batch's sources; meaningless when `attrs` is `None` (no best route).
    source: u32,
    attrs: Option<AttrSet>,
}

/// Changes taken from the channel, in order ([`BestChanges::recv_batch`]).
#[derive(Debug, Default)]
pub struct BestChangeBatch {
    changes: Vec<Waiting>,
    sources: Vec<Source>,
}

impl BestChangeBatch {
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    fn change(sources: &[Source], w: Waiting) -> BestChange {
        BestChange {
            prefix: w.prefix,
            best: w.attrs.map(|attrs| {
                let s = sources[w.source as usize];
                BestRoute {
                    peer: s.peer,
                    peer_addr: s.peer_addr,
                    next_hop: s.next_hop,
                    attrs,
                    stale: s.stale,
                }
            }),
        }
    }
}

impl IntoIterator for BestChangeBatch {
    type Item = BestChange;
    type IntoIter = Box<dyn Iterator<Item = BestChange> + Send>;

    /// The changes in order, each built as it is reached.
    fn into_iter(self) -> Self::IntoIter {
        let sources = self.sources;
        Box::new(
            self.changes
                .into_iter()
                .map(move |w| BestChangeBatch::change(&sources, w)),
        )
    }
}

#[derive(Debug, Default)]
struct Pending {
    /// In order.
    changes: Vec<Waiting>,
    /// What the waiting best routes say besides their attributes, each once.
    sources: Vec<Source>,
    source_index: HashMap<Source, u32>,
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

impl Pending {
    fn waiting(&mut self, change: BestChange) -> Waiting {
        let Some(best) = change.best else {
            return Waiting {
                prefix: change.prefix,
                source: 0,
                attrs: None,
            };
        };
        let source = Source {
            peer: best.peer,
            peer_addr: best.peer_addr,
            next_hop: best.next_hop,
            stale: best.stale,
        };
        let sources = &mut self.sources;
        let index = *self.source_index.entry(source).or_insert_with(|| {
            sources.push(source);
            // As many sources as changes at most: fewer than 2^32.
            u32::try_from(sources.len() - 1).unwrap_or(u32::MAX)
        });
        Waiting {
            prefix: change.prefix,
            source: index,
            attrs: Some(best.attrs),
        }
    }
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
    /// The index of prefixes is built only once [`EXACT_CHANGES`] entries wait, when changes
    /// start to be merged: a user that keeps up costs no index at all.
    pub(crate) fn send(&self, batch: Vec<BestChange>) {
        if batch.is_empty() {
            return;
        }
        {
            let mut guard = self.shared.lock();
            let p = &mut *guard;
            for change in batch {
                let change = p.waiting(change);
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
        self.recv_batch().await.map(|b| b.into_iter().collect())
    }

    /// Every change waiting, without waiting.
    pub fn try_recv(&mut self) -> Result<Vec<BestChange>, TryRecvError> {
        self.try_recv_batch().map(|b| b.into_iter().collect())
    }

    /// As [`BestChanges::recv`], the changes as they wait (built as they are iterated).
    pub async fn recv_batch(&mut self) -> Option<BestChangeBatch> {
        loop {
            match self.try_recv_batch() {
                Ok(batch) => return Some(batch),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => self.shared.notify.notified().await,
            }
        }
    }

    /// As [`BestChanges::try_recv`], the changes as they wait.
    pub fn try_recv_batch(&mut self) -> Result<BestChangeBatch, TryRecvError> {
        let mut p = self.shared.lock();
        if p.changes.is_empty() {
            return Err(if p.closed {
                TryRecvError::Disconnected
            } else {
                TryRecvError::Empty
            });
        }
        // Not kept at their largest: built again only when a queue grows that long.
        p.index = HashMap::new();
        p.source_index = HashMap::new();
        Ok(BestChangeBatch {
            changes: std::mem::take(&mut p.changes),
            sources: std::mem::take(&mut p.sources),
        })
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

    /// Changes come out as they went in, best routes of several sources mixed, through the
    /// batch's iterator as through `try_recv`.
    #[tokio::test]
    async fn a_waiting_change_is_the_change_sent() {
        assert!(std::mem::size_of::<Waiting>() <= 32);
        let mut sent = vec![
            change("10.0.1.0/26", Some("192.168.0.1")),
            change("fd00::/122", Some("fd00::1")),
            change("10.0.2.0/26", None),
            change("10.0.3.0/26", Some("192.168.0.1")),
        ];
        let mut other = change("10.0.4.0/26", Some("192.168.0.1"));
        if let Some(b) = other.best.as_mut() {
            b.peer = 2;
            b.stale = true;
            b.peer_addr = None;
        }
        sent.push(other);
        // A next hop other than the attributes' is kept as sent.
        let mut odd = change("10.0.5.0/26", Some("192.168.0.1"));
        if let Some(b) = odd.best.as_mut() {
            b.next_hop = "192.168.0.9".parse().unwrap();
        }
        sent.push(odd);
        let (tx, mut rx) = channel();
        tx.send(sent[..2].to_vec());
        tx.send(sent[2..].to_vec());
        let batch = rx.try_recv_batch().unwrap();
        assert_eq!(batch.len(), sent.len());
        assert_eq!(batch.into_iter().collect::<Vec<_>>(), sent);
        assert_eq!(rx.try_recv_batch().unwrap_err(), TryRecvError::Empty);
        tx.send(sent.clone());
        assert_eq!(rx.try_recv().unwrap(), sent);
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

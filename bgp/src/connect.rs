//! Turns for outbound connection attempts: the speaker-wide bound on attempts in flight, and
//! the order in which waiting peers get a turn.
//!
//! A session takes a `ConnectTurn` before it calls `connect` and gives it back when the
//! attempt ends (or is abandoned), so thousands of unreachable peers hold at most `limit`
//! half-open sockets between them. Who gets a free turn:
//!
//! 1. the waiter with the best [`ConnectPriority`] (peers likely to answer first, so that a
//!    mesh of thousands of silent nodes cannot keep the few live ones waiting for a whole
//!    pass of connect timeouts);
//! 2. within a priority, a first attempt before a retry (a peer whose previous attempt
//!    failed);
//! 3. then first come, first served.
//!
//! Retries hold at most half of the turns, so dead peers backing off can never keep a live
//! peer waiting more than one attempt's time.
//!
//! A waiter is either a task awaiting `ConnectLimiter::turn` or a peer without a session
//! task (`ConnectLimiter::request`): its turn is sent to the speaker core on the grant
//! channel, which then starts the peer's session with the turn in hand. That is what lets a
//! never-connected peer wait for its turn as a few bytes in a queue instead of a task.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot};

use crate::rib::PeerId;

/// How likely a peer is to answer, which orders connection attempts while the bound on
/// attempts in flight is reached (see the module docs). Changing it never restarts a session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConnectPriority {
    /// Expected to answer (a Node whose kubelet reports Ready, an explicitly configured
    /// peer): connects before the others.
    High,
    /// Nothing is known.
    #[default]
    Normal,
    /// Expected not to answer (a Node reported not Ready): connects after the others.
    Low,
}

/// A place in the queue: priority, then first attempts before retries, then arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct WaitKey {
    priority: ConnectPriority,
    retrying: bool,
    seq: u64,
}

enum Waiter {
    Task(oneshot::Sender<ConnectTurn>),
    Peer(PeerId),
}

#[derive(Default)]
struct Queue {
    in_flight: usize,
    retries_in_flight: usize,
    in_flight_max: usize,
    seq: u64,
    /// First attempts and retries apart, so that the retries' cap costs no scan.
    fresh: BTreeMap<WaitKey, Waiter>,
    retries: BTreeMap<WaitKey, Waiter>,
}

/// The speaker-wide bound on outbound connection attempts in flight (see the module docs).
pub(crate) struct ConnectLimiter {
    queue: Mutex<Queue>,
    limit: usize,
    retry_limit: usize,
    attempts: AtomicU64,
    /// Turns granted to peers without a session task go to the speaker core here.
    grants: mpsc::UnboundedSender<(PeerId, ConnectTurn)>,
}

impl std::fmt::Debug for ConnectLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectLimiter")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// What [`ConnectLimiter`] reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ConnectCounts {
    pub limit: usize,
    pub in_flight: usize,
    pub waiting: usize,
    pub in_flight_max: usize,
    pub attempts: u64,
}

impl ConnectLimiter {
    /// At most `limit` attempts in flight (at least 1); turns for peers without a session
    /// task are sent on `grants`.
    pub(crate) fn new(
        limit: usize,
        grants: mpsc::UnboundedSender<(PeerId, ConnectTurn)>,
    ) -> ConnectLimiter {
        let limit = limit.max(1);
        ConnectLimiter {
            queue: Mutex::new(Queue::default()),
            limit,
            retry_limit: (limit / 2).max(1),
            attempts: AtomicU64::new(0),
            grants,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock; a poisoned queue is still consistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn counts(&self) -> ConnectCounts {
        let q = self.lock();
        ConnectCounts {
            limit: self.limit,
            in_flight: q.in_flight,
            waiting: q.fresh.len() + q.retries.len(),
            in_flight_max: q.in_flight_max,
            attempts: self.attempts.load(Ordering::Relaxed),
        }
    }

    fn enqueue(self: &Arc<Self>, w: Waiter, priority: ConnectPriority, retrying: bool) -> WaitKey {
        let mut q = self.lock();
        q.seq += 1;
        let key = WaitKey {
            priority,
            retrying,
            seq: q.seq,
        };
        if retrying {
            q.retries.insert(key, w);
        } else {
            q.fresh.insert(key, w);
        }
        self.dispatch(&mut q);
        key
    }

    /// Wait for a turn (see the module docs for the order). The turn ends when the returned
    /// guard is dropped; dropping the future gives up the place in the queue.
    pub(crate) async fn turn(
        self: &Arc<Self>,
        priority: ConnectPriority,
        retrying: bool,
    ) -> std::io::Result<ConnectTurn> {
        let (tx, rx) = oneshot::channel();
        let key = self.enqueue(Waiter::Task(tx), priority, retrying);
        let _leave = LeaveOnDrop(self.clone(), key);
        rx.await
            .map_err(|_| std::io::Error::other("connection limiter closed"))
    }

    /// Queue `peer` (which has no session task) for a turn; it is sent on the grant channel.
    pub(crate) fn request(
        self: &Arc<Self>,
        peer: PeerId,
        priority: ConnectPriority,
        retrying: bool,
    ) -> WaitKey {
        self.enqueue(Waiter::Peer(peer), priority, retrying)
    }

    /// Leave the queue (no effect once the turn was granted).
    pub(crate) fn cancel(&self, key: WaitKey) {
        let mut q = self.lock();
        if key.retrying {
            q.retries.remove(&key);
        } else {
            q.fresh.remove(&key);
        }
    }

    fn release(self: &Arc<Self>, retrying: bool) {
        let mut q = self.lock();
        q.in_flight = q.in_flight.saturating_sub(1);
        if retrying {
            q.retries_in_flight = q.retries_in_flight.saturating_sub(1);
        }
        self.dispatch(&mut q);
    }

    /// Grant free turns to the best waiters.
    fn dispatch(self: &Arc<Self>, q: &mut Queue) {
        while q.in_flight < self.limit {
            let fresh = q.fresh.first_key_value().map(|(k, _)| *k);
            let retry = (q.retries_in_flight < self.retry_limit)
                .then(|| q.retries.first_key_value().map(|(k, _)| *k))
                .flatten();
            let key = match (fresh, retry) {
                (Some(f), Some(r)) => f.min(r),
                (Some(k), None) | (None, Some(k)) => k,
                (None, None) => return,
            };
            let waiter = if key.retrying {
                q.retries.remove(&key)
            } else {
                q.fresh.remove(&key)
            };
            let Some(waiter) = waiter else { return };
            q.in_flight += 1;
            if key.retrying {
                q.retries_in_flight += 1;
            }
            let turn = ConnectTurn {
                limiter: Some(self.clone()),
                retrying: key.retrying,
            };
            let refused = match waiter {
                Waiter::Task(tx) => tx.send(turn).err(),
                Waiter::Peer(id) => self.grants.send((id, turn)).err().map(|e| e.0.1),
            };
            match refused {
                Some(mut turn) => {
                    // The waiter is gone: take the turn back without re-entering here.
                    turn.limiter = None;
                    q.in_flight -= 1;
                    if key.retrying {
                        q.retries_in_flight -= 1;
                    }
                }
                None => {
                    q.in_flight_max = q.in_flight_max.max(q.in_flight);
                    self.attempts.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Removes a task's place in the queue when its wait is abandoned.
struct LeaveOnDrop(Arc<ConnectLimiter>, WaitKey);

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        self.0.cancel(self.1);
    }
}

/// One attempt's turn; dropping it gives the turn to the next waiter.
pub(crate) struct ConnectTurn {
    limiter: Option<Arc<ConnectLimiter>>,
    retrying: bool,
}

impl std::fmt::Debug for ConnectTurn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectTurn")
            .field("retrying", &self.retrying)
            .finish()
    }
}

impl Drop for ConnectTurn {
    fn drop(&mut self) {
        if let Some(l) = self.limiter.take() {
            l.release(self.retrying);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConnectPriority::{High, Low, Normal};

    fn limiter(
        limit: usize,
    ) -> (
        Arc<ConnectLimiter>,
        mpsc::UnboundedReceiver<(PeerId, ConnectTurn)>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(ConnectLimiter::new(limit, tx)), rx)
    }

    /// Peers queued while the only turn is taken get it best priority first, first attempts
    /// before retries, then in arrival order; a FIFO queue would give it to peer 1 first.
    #[tokio::test]
    async fn turns_go_by_priority_then_first_attempts_then_arrival() {
        let (l, mut grants) = limiter(1);
        let held = l.request(100, Normal, false);
        let (first, turn) = grants.try_recv().expect("a free turn is granted at once");
        assert_eq!(first, 100);
        let _ = held;
        for (id, p, retrying) in [
            (1, Low, false),
            (2, Normal, true),
            (3, Normal, false),
            (4, High, true),
            (5, High, false),
            (6, Normal, false),
        ] {
            l.request(id, p, retrying);
        }
        assert!(grants.try_recv().is_err(), "the bound is 1");
        assert_eq!(l.counts().waiting, 6);
        let mut order = Vec::new();
        let mut turn = Some(turn);
        while let Some(t) = turn.take() {
            drop(t);
            if let Ok((id, t)) = grants.try_recv() {
                order.push(id);
                turn = Some(t);
            }
        }
        assert_eq!(order, vec![5, 4, 3, 6, 2, 1]);
        let c = l.counts();
        assert_eq!((c.in_flight, c.waiting, c.in_flight_max), (0, 0, 1));
        assert_eq!(c.attempts, 7);
    }

    #[tokio::test]
    async fn retries_hold_at_most_half_the_turns() {
        let (l, mut grants) = limiter(4);
        for id in 0..6 {
            l.request(id, High, true);
        }
        let mut held = Vec::new();
        while let Ok(g) = grants.try_recv() {
            held.push(g);
        }
        assert_eq!(held.len(), 2, "4 turns, retries get 2");
        // A first attempt of a lower priority still gets one of the other turns at once.
        l.request(10, Low, false);
        let (id, _t) = grants.try_recv().expect("a turn for the first attempt");
        assert_eq!(id, 10);
        assert_eq!(l.counts().in_flight, 3);
    }

    #[tokio::test]
    async fn an_abandoned_wait_or_a_cancelled_peer_loses_no_turn() {
        let (l, mut grants) = limiter(1);
        let t = l.turn(Normal, false).await.expect("free turn");
        // A task gives up waiting; a queued peer is cancelled; the next waiter gets the turn.
        let waiting = tokio::spawn({
            let l = l.clone();
            async move { l.turn(High, false).await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        let key = l.request(7, High, false);
        l.request(8, Low, false);
        assert_eq!(l.counts().waiting, 3);
        waiting.abort();
        let _ = waiting.await;
        l.cancel(key);
        drop(t);
        let (id, t) = grants.try_recv().expect("the turn went on");
        assert_eq!(id, 8);
        drop(t);
        drop(grants);
        // With the grant channel gone, a peer's turn comes straight back.
        l.request(9, High, false);
        let c = l.counts();
        assert_eq!((c.in_flight, c.waiting), (0, 0));
        assert!(l.turn(Low, false).await.is_ok());
    }
}

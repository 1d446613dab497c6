//! A future on its own OS thread, with its own `current_thread` tokio runtime.
//!
//! The agent runs [`super::Dataplane::run`] this way ([`spawn`] with the thread name
//! `dataplane`): its netlink calls block in `sendmsg` while the kernel inserts routes, and on
//! a worker of the agent's runtime they held that worker, so the BGP sessions, the speaker and
//! the agent's loop waited behind them (tasks woken by the blocked worker sat in its LIFO
//! slot). On its own thread the kernel's work overlaps theirs.
//!
//! Everything the future spawns (rtnetlink connections of the tunnel code, the IPIP
//! forwarder's control task, `spawn_blocking`) lives on the thread's runtime and ends with it.
//! The thread inherits the calling thread's network namespace (threads share the creator's
//! namespaces when they are made), so sockets the future opens are where the caller's are.
//!
//! The thread ends when the future returns or panics, or when it is asked to stop: by
//! [`RuntimeThread::stop`] (which waits for the end) or by dropping the [`RuntimeThread`]
//! (which does not). Awaiting the [`RuntimeThread`] gives the future's output, or why there is
//! none ([`ThreadEnded`]: a panic, with its message, is logged and returned, never silent).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::Instrument;

/// How long the runtime's blocking tasks (a request to the IPIP forwarder: at most 2 s) are
/// waited for when the thread ends; longer ones are left to finish on their own.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);

/// Why a [`RuntimeThread`] gave no output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ThreadEnded {
    #[error("thread {thread:?} panicked: {message}")]
    Panicked { thread: String, message: String },
    #[error("thread {thread:?} was stopped")]
    Stopped { thread: String },
}

/// The handle of a future running on its own thread ([`spawn`]). Await it for the future's
/// output; drop it to stop the thread without waiting.
#[derive(Debug)]
pub struct RuntimeThread<T> {
    name: String,
    result: oneshot::Receiver<Result<T, ThreadEnded>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Runs `task` on a new OS thread named `name`, on a `current_thread` runtime with IO and
/// timers. The runtime is built here, so a failure to build it or to start the thread is
/// returned at once. `task` runs in the caller's current tracing span.
pub fn spawn<T, F>(name: &str, task: F) -> std::io::Result<RuntimeThread<T>>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        // `spawn_blocking`'s threads (Linux keeps 15 bytes of a thread's name).
        .thread_name(format!("{name}-blk"))
        .build()?;
    let (result_tx, result) = oneshot::channel();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = task.instrument(tracing::Span::current());
    let thread_name = name.to_string();
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                runtime.block_on(async move {
                    tokio::select! {
                        biased;
                        output = task => Some(output),
                        // Asked to stop, or the handle dropped.
                        _ = stop_rx => None,
                    }
                })
            }));
            // Tasks the future spawned end here (they are dropped with the runtime).
            runtime.shutdown_timeout(SHUTDOWN_WAIT);
            let result = match outcome {
                Ok(Some(output)) => Ok(output),
                Ok(None) => Err(ThreadEnded::Stopped {
                    thread: thread_name,
                }),
                Err(payload) => {
                    let message = panic_message(payload.as_ref());
                    tracing::error!(thread = thread_name, message, "thread panicked");
                    Err(ThreadEnded::Panicked {
                        thread: thread_name,
                        message,
                    })
                }
            };
            let _ = result_tx.send(result);
        })?;
    Ok(RuntimeThread {
        name: name.to_string(),
        result,
        stop: Some(stop),
        thread: Some(thread),
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

impl<T> RuntimeThread<T> {
    /// Asks the future to stop (it is dropped at its next `.await`), waits until the thread
    /// ended and joins it. Returns the output if the future had finished first.
    pub async fn stop(mut self) -> Result<T, ThreadEnded> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = (&mut self.result).await.unwrap_or_else(|_| {
            Err(ThreadEnded::Stopped {
                thread: self.name.clone(),
            })
        });
        // The thread's last step was sending the result: it is ending now.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        result
    }

    /// The thread has ended (its result is ready).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl<T> Future for RuntimeThread<T> {
    type Output = Result<T, ThreadEnded>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match std::task::ready!(Pin::new(&mut self.result).poll(cx)) {
            Ok(result) => Poll::Ready(result),
            // The sender is dropped unsent only if the thread itself died.
            Err(_) => Poll::Ready(Err(ThreadEnded::Panicked {
                thread: self.name.clone(),
                message: "the thread ended without a result".into(),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_output_comes_from_the_named_thread_and_its_own_runtime() {
        let caller = tokio::runtime::Handle::current().id();
        let thread = spawn("rt-test", async move {
            // IO and timers work; spawned tasks run on this thread's runtime.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let inner = tokio::spawn(async { std::thread::current().name().map(String::from) });
            let name = inner.await.unwrap();
            (name, tokio::runtime::Handle::current().id())
        })
        .unwrap();
        let (name, runtime) = thread.await.unwrap();
        assert_eq!(name.as_deref(), Some("rt-test"));
        assert_ne!(runtime, caller);
    }

    #[tokio::test]
    async fn a_panic_is_returned_with_its_message() {
        let thread = spawn("rt-panic", async {
            tokio::task::yield_now().await;
            if true {
                panic!("netlink went away");
            }
        })
        .unwrap();
        assert_eq!(
            thread.await,
            Err(ThreadEnded::Panicked {
                thread: "rt-panic".into(),
                message: "netlink went away".into()
            })
        );
    }

    #[tokio::test]
    async fn stop_ends_a_future_that_never_returns_and_its_tasks() {
        let (alive_tx, mut alive_rx) = tokio::sync::mpsc::channel::<()>(1);
        let thread = spawn("rt-stop", async move {
            // A task spawned on the thread's runtime holds the sender until it is dropped.
            tokio::spawn(async move {
                let _alive = alive_tx;
                std::future::pending::<()>().await
            });
            std::future::pending::<()>().await
        })
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!thread.is_finished());
        assert_eq!(
            thread.stop().await,
            Err(ThreadEnded::Stopped {
                thread: "rt-stop".into()
            })
        );
        assert_eq!(alive_rx.recv().await, None, "the spawned task was dropped");
    }

    #[tokio::test]
    async fn dropping_the_handle_ends_the_thread() {
        let (alive_tx, mut alive_rx) = tokio::sync::mpsc::channel::<()>(1);
        let thread = spawn("rt-drop", async move {
            let _alive = alive_tx;
            std::future::pending::<()>().await
        })
        .unwrap();
        drop(thread);
        let ended = tokio::time::timeout(Duration::from_secs(5), alive_rx.recv()).await;
        assert_eq!(ended, Ok(None));
    }
}

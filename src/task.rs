//! A spawned task that is cancelled when its handle is dropped.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Owns one background task and its cancellation token. Dropping it cancels the task (which
/// then closes its sockets on its own); [`OwnedTask::close`] also waits for it, up to a grace.
pub struct OwnedTask {
    cancel: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl OwnedTask {
    /// Spawns the future made by `run` from a fresh cancellation token.
    pub fn spawn<F, Fut>(run: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(cancel.clone()));
        Self {
            cancel,
            task: Mutex::new(Some(task)),
        }
    }

    /// Cancels the task and waits up to `grace` for it to finish.
    pub async fn close(&self, grace: Duration) {
        self.cancel.cancel();
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = tokio::time::timeout(grace, task).await;
        }
    }
}

impl Drop for OwnedTask {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

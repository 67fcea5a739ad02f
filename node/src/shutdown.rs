//! Graceful shutdown: one small type handed to every task instead of a global flag.
//!
//! `crm-node run` creates a [`ShutdownTrigger`] and gives each task a [`Shutdown`] clone.
//! On SIGTERM/SIGINT the trigger fires; the router stops pulling, each shard worker finishes
//! its batch (apply, flush, ack) and returns, and the process exits once all tasks are done.

use std::sync::Arc;
use tokio::sync::watch;

/// Fires the shutdown for every [`Shutdown`] made from it; clones share one trigger.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger {
    sender: Arc<watch::Sender<bool>>,
}

/// A task's view of the shutdown: cheap to clone, awaitable.
#[derive(Debug, Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

/// A new trigger and the first listener.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (sender, receiver) = watch::channel(false);
    (
        ShutdownTrigger {
            sender: Arc::new(sender),
        },
        Shutdown { receiver },
    )
}

impl ShutdownTrigger {
    /// Asks every task to stop after its current unit of work.
    pub fn fire(&self) {
        self.sender.send_replace(true);
    }

    /// Another listener.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            receiver: self.sender.subscribe(),
        }
    }
}

impl Shutdown {
    /// Has shutdown been asked for?
    pub fn is_triggered(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Waits until shutdown is asked for (returns at once if it was).
    pub async fn wait(&mut self) {
        // An error means the trigger is gone, which is a shutdown too.
        let _ = self.receiver.wait_for(|fired| *fired).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_listener_sees_the_shutdown() {
        let (trigger, mut first) = channel();
        let mut second = trigger.subscribe();
        assert!(!first.is_triggered());
        trigger.fire();
        first.wait().await;
        second.wait().await;
        assert!(second.is_triggered());
    }
}

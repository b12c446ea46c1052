//! Supervision of a member's long-lived tasks.
//!
//! Contract:
//! - Every long-lived task (the lessor and its renewers, the watch feed, the
//!   monitors, the membership reconciler, ...) is spawned through a [`Supervisor`]
//!   under a name. A task that panics, or that returns although it is meant to run
//!   for the member's life, is a failure: it is logged with the task's name and
//!   reported on [`Supervisor::failed`], on which the server stops with a non-zero
//!   exit. A member never keeps serving without its lessor or its watch feed.
//! - Tasks that finish by design (publishing this member's attributes) are spawned
//!   with [`Supervisor::spawn_finite`]: for them only a panic is a failure.
//! - Once the member is stopping ([`Supervisor::stop`]), tasks that end as the Raft
//!   core shuts down are expected, not failures.
//! - Short-lived tasks (one per request, connection or proposal) are not supervised:
//!   their failure is their caller's error.
//! - Fault injection for tests: with `CONCORD_INJECT_PANIC=<task name>` in its
//!   environment, the member makes that task panic [`INJECTED_PANIC_AFTER`] after
//!   it starts (see `tests/supervision.rs`).

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::watch;

/// The environment variable that names a task to panic (tests only).
pub const INJECT_PANIC_ENV: &str = "CONCORD_INJECT_PANIC";
/// How long an injected panic waits after its task starts.
pub const INJECTED_PANIC_AFTER: Duration = Duration::from_secs(1);

/// Owns a member's long-lived tasks (cheap to clone: clones share the same record).
#[derive(Clone)]
pub struct Supervisor {
    /// The first failure; later ones are only logged.
    first_failure: Arc<watch::Sender<Option<String>>>,
    /// The task named in [`INJECT_PANIC_ENV`], if any.
    inject_panic: Option<Arc<str>>,
    /// Set once the member shuts down: tasks ending then are not failures.
    stopping: Arc<AtomicBool>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor::new()
    }
}

impl Supervisor {
    /// A supervisor with no tasks yet; reads [`INJECT_PANIC_ENV`].
    pub fn new() -> Supervisor {
        Supervisor {
            first_failure: Arc::new(watch::Sender::new(None)),
            inject_panic: std::env::var(INJECT_PANIC_ENV).ok().map(Arc::from),
            stopping: Arc::default(),
        }
    }

    /// The member is shutting down: from now on tasks may end.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Spawns `task`, which must run for the member's life: its end is a failure.
    pub fn spawn(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.start(name, task, true);
    }

    /// Spawns `task`, which may finish: only a panic is a failure.
    pub fn spawn_finite(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.start(name, task, false);
    }

    fn start(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static, forever: bool) {
        let this = self.clone();
        let inject = self.inject_panic.as_deref() == Some(name);
        tokio::spawn(async move {
            let injected = async move {
                if inject {
                    tokio::time::sleep(INJECTED_PANIC_AFTER).await;
                    panic!("panic injected by {INJECT_PANIC_ENV}={name}");
                }
                std::future::pending::<()>().await
            };
            let run = async move {
                tokio::select! {
                    () = task => {}
                    () = injected => {}
                }
            };
            match AssertUnwindSafe(run).catch_unwind().await {
                Ok(()) if !forever => {}
                Ok(()) => this.fail(format!("background task {name} ended unexpectedly")),
                Err(panic) => this.fail(format!("background task {name} panicked: {}", panic_message(&*panic))),
            }
        });
    }

    fn fail(&self, why: String) {
        if self.stopping.load(Ordering::Acquire) {
            tracing::debug!("while stopping: {why}");
            return;
        }
        tracing::error!("{why}");
        self.first_failure.send_if_modified(|first| {
            if first.is_some() {
                return false;
            }
            *first = Some(why);
            true
        });
    }

    /// Resolves with the first failure of a supervised task.
    pub async fn failed(&self) -> String {
        let mut rx = self.first_failure.subscribe();
        let first = match rx.wait_for(Option::is_some).await {
            Ok(first) => first.clone(),
            // The sender lives in `self`: it cannot be gone while we hold it.
            Err(_) => None,
        };
        match first {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_or_ending_task_is_reported_by_name_and_a_finished_finite_one_is_not() {
        let s = Supervisor { inject_panic: None, ..Supervisor::new() };
        s.spawn_finite("done", async {});
        s.spawn("forever", std::future::pending());
        tokio::task::yield_now().await;
        assert!(s.first_failure.borrow().is_none());
        s.spawn("boom", async { panic!("kaput") });
        assert_eq!(s.failed().await, "background task boom panicked: kaput");
        s.spawn("quits", async {});
        tokio::task::yield_now().await;
        // Only the first failure is kept.
        assert_eq!(s.failed().await, "background task boom panicked: kaput");

        let s = Supervisor { inject_panic: None, ..Supervisor::new() };
        s.spawn("quits", async {});
        assert_eq!(s.failed().await, "background task quits ended unexpectedly");
    }

    #[tokio::test(start_paused = true)]
    async fn an_injected_panic_hits_only_the_named_task() {
        let s = Supervisor { inject_panic: Some(Arc::from("victim")), ..Supervisor::new() };
        s.spawn("bystander", std::future::pending());
        s.spawn("victim", std::future::pending());
        let why = s.failed().await;
        assert_eq!(why, format!("background task victim panicked: panic injected by {INJECT_PANIC_ENV}=victim"));
    }
}

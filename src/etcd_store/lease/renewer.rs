//! Keep-alives, many to a batch.
//!
//! A [`Renewer`] gathers the keep-alives that arrive on one member while earlier
//! batches are in flight and hands them on together to its `send` step: the
//! leader's renewer proposes them as one [`crate::consensus::Command::LeaseRenewBatch`]
//! log entry; a follower's renewer forwards them to the leader in one peer request
//! (see `crate::etcd_store::lease` for which keep-alives need a log entry at all).
//!
//! Contract:
//! - A batch carries at most [`MAX_RENEW_BATCH`] leases, and at most
//!   [`RENEW_BATCHES_IN_FLIGHT`] batches are being sent at once. Under load a batch
//!   carries every client waiting on this member; alone, a keep-alive is its own
//!   batch and waits for nothing.
//! - Bounded: at most [`RENEW_QUEUE`] keep-alives wait per renewer; beyond that a
//!   caller waits for room (its keep-alive stream stops being read), as any other
//!   stream does under back-pressure.

use std::sync::Arc;

use openraft::base::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::consensus::ConsensusError;
use crate::etcd_store::ApplyError;
use crate::supervisor::Supervisor;

/// Most leases renewed by one batch.
pub const MAX_RENEW_BATCH: usize = 1024;
/// Most keep-alives waiting for a batch on one renewer.
pub const RENEW_QUEUE: usize = 8192;
/// Batches being sent at once per renewer. More than one, so that a batch gathers
/// while others are answered; a handful, so that batches stay large under load.
pub const RENEW_BATCHES_IN_FLIGHT: usize = 4;

/// Why a renewal was not made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RenewError {
    Consensus(ConsensusError),
    Apply(ApplyError),
}

/// Each lease's outcome in a batch, in order: its TTL in seconds (0: no such lease,
/// or expired), or why it was not renewed.
pub type Renewals = Vec<Result<i64, RenewError>>;

/// Sends one batch of lease ids; answers each lease's outcome, or one error for
/// the whole batch.
pub type SendBatch = Arc<dyn Fn(Vec<i64>) -> BoxFuture<'static, Result<Renewals, RenewError>> + Send + Sync>;

type Waiter = (i64, oneshot::Sender<Result<i64, RenewError>>);

/// One member's keep-alive batcher.
pub struct Renewer {
    queue: mpsc::Sender<Waiter>,
}

impl Renewer {
    /// Starts the batching task (supervised as `name`); every batch goes to `send`.
    pub fn start(send: SendBatch, supervisor: &Supervisor, name: &'static str) -> Renewer {
        let (queue, rx) = mpsc::channel(RENEW_QUEUE);
        supervisor.spawn(name, run(send, rx));
        Renewer { queue }
    }

    /// Renews lease `id` together with whatever other keep-alives this renewer
    /// has waiting; answers its TTL in seconds (0: no such lease).
    pub async fn renew(&self, id: i64) -> Result<i64, RenewError> {
        let (reply, answer) = oneshot::channel();
        let gone = || RenewError::Consensus(ConsensusError::Fatal("the lease renewer stopped".into()));
        self.queue.send((id, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run(send: SendBatch, mut rx: mpsc::Receiver<Waiter>) {
    let slots = Arc::new(Semaphore::new(RENEW_BATCHES_IN_FLIGHT));
    loop {
        // The slot is taken before the batch is gathered: while every slot is busy,
        // keep-alives pile up for the next batch.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let Some(first) = rx.recv().await else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_RENEW_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let send = send.clone();
        tokio::spawn(async move {
            let ids: Vec<i64> = batch.iter().map(|(id, _)| *id).collect();
            let outcome = send(ids).await;
            answer(batch, outcome);
            drop(slot);
        });
    }
}

/// Hands each waiter its part of a batch's outcome.
fn answer(batch: Vec<Waiter>, outcome: Result<Renewals, RenewError>) {
    let outcome = outcome.and_then(|each| {
        if each.len() == batch.len() {
            Ok(each)
        } else {
            let why = format!("{} renewals answered for {} leases", each.len(), batch.len());
            Err(RenewError::Apply(ApplyError::Malformed(why)))
        }
    });
    match outcome {
        Ok(each) => {
            for ((_, reply), outcome) in batch.into_iter().zip(each) {
                let _ = reply.send(outcome);
            }
        }
        Err(e) => {
            for (_, reply) in batch {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

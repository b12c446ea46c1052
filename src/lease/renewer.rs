//! Keep-alives, many to a log entry.
//!
//! Contract:
//! - A keep-alive is answered only once the renewal is committed by a quorum and
//!   applied here: what a client is told is what every member will count down from,
//!   so a renewed lease's TTL survives any leader change, exactly (no grace period,
//!   no early revoke). etcd renews on the leader in memory and resets every lease to
//!   its full TTL when leadership moves; concord keeps the durability and pays one
//!   entry per batch instead of one per keep-alive.
//! - Each member gathers its own clients' keep-alives: the ones that arrive while
//!   earlier batches are in flight go together in the next [`Command::LeaseRenewBatch`]
//!   (at most [`MAX_RENEW_BATCH`] leases, at most [`RENEW_BATCHES_IN_FLIGHT`] batches
//!   proposing at once). Under load a batch carries every client waiting on this
//!   member; alone, a keep-alive is its own batch and waits for nothing.
//! - Bounded: at most [`RENEW_QUEUE`] keep-alives wait per member; beyond that a
//!   caller waits for room (its keep-alive stream stops being read), as any other
//!   stream does under back-pressure.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::consensus::state_machine::LeaseRenewals;
use crate::consensus::{ApplyError, Command, CommandResult, ConsensusError, Group};

/// Most leases renewed by one log entry.
pub const MAX_RENEW_BATCH: usize = 1024;
/// Most keep-alives waiting for a batch on one member.
pub const RENEW_QUEUE: usize = 8192;
/// Batches proposing at once per member. More than one, so that a batch gathers
/// while others commit; a handful, so that batches stay large under load.
pub const RENEW_BATCHES_IN_FLIGHT: usize = 4;

/// A renewal's outcome: the TTL in seconds (0: no such lease) and the revision of
/// the entry that renewed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewed {
    pub ttl_s: i64,
    pub revision: i64,
}

/// Why a renewal was not made.
#[derive(Debug, Clone)]
pub enum RenewError {
    Consensus(ConsensusError),
    Apply(ApplyError),
}

type Waiter = (i64, oneshot::Sender<Result<Renewed, RenewError>>);

/// One member's keep-alive batcher.
pub struct Renewer {
    queue: mpsc::Sender<Waiter>,
}

impl Renewer {
    /// Starts the batching task; each batch's proposal may take up to `timeout`.
    pub fn start(group: Group, timeout: Duration) -> Renewer {
        let (queue, rx) = mpsc::channel(RENEW_QUEUE);
        tokio::spawn(run(group, rx, timeout));
        Renewer { queue }
    }

    /// Renews lease `id` to its full TTL, together with whatever other keep-alives
    /// this member has waiting.
    pub async fn renew(&self, id: i64) -> Result<Renewed, RenewError> {
        let (reply, answer) = oneshot::channel();
        let gone = || RenewError::Consensus(ConsensusError::Fatal("the lease renewer stopped".into()));
        self.queue.send((id, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run(group: Group, mut rx: mpsc::Receiver<Waiter>, timeout: Duration) {
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
        let group = group.clone();
        tokio::spawn(async move {
            let ids: Vec<i64> = batch.iter().map(|(id, _)| *id).collect();
            let outcome = group.propose(Command::LeaseRenewBatch(ids), timeout).await;
            answer(batch, outcome);
            drop(slot);
        });
    }
}

/// Hands each waiter its part of a batch's outcome.
fn answer(batch: Vec<Waiter>, outcome: Result<CommandResult, ConsensusError>) {
    let decoded = match outcome {
        Ok(CommandResult::Ok(bytes)) => match LeaseRenewals::decode(bytes.as_slice()) {
            Ok(r) if r.ttl_s.len() == batch.len() => Ok(r),
            Ok(r) => Err(RenewError::Apply(ApplyError::Malformed(format!(
                "{} renewals answered for {} leases",
                r.ttl_s.len(),
                batch.len()
            )))),
            Err(e) => Err(RenewError::Apply(ApplyError::Malformed(e.to_string()))),
        },
        Ok(CommandResult::Err(e)) => Err(RenewError::Apply(e)),
        Err(e) => Err(RenewError::Consensus(e)),
    };
    match decoded {
        Ok(r) => {
            let revision = r.header.map_or(0, |h| h.revision);
            for ((_, reply), ttl_s) in batch.into_iter().zip(r.ttl_s) {
                let _ = reply.send(Ok(Renewed { ttl_s, revision }));
            }
        }
        Err(e) => {
            for (_, reply) in batch {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

//! The channel from the poller thread to the delivery loop: what the poller hands over (records, errors,
//! revokes) in the order librdkafka produced it, and the revoke's answer. Shared by the poller, the rebalance
//! callback (`kafka::context`) and the loop (`kafka::delivery`); knows none of them.

use std::sync::Mutex;

use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Tp;

/// What the poller hands the loop, in the order librdkafka produced it.
pub(crate) enum Polled {
    /// What the consumer had ready at one go, up to `KAFKA_MAX_POLL_RECORDS`: one hand-off per burst instead
    /// of one per record.
    Records(Vec<OwnedMessage>),
    Error(KafkaError),
    /// Partitions leave this consumer. Every record of theirs polled before the revoke is ahead of it in the
    /// channel, every record polled after it (from a partition assigned back meanwhile) behind it.
    Revoked(Revocation),
}

/// The poller's side of the channel to the loop, shared with the rebalance callback. Both run on the poller
/// thread (the callback inside a `recv`), so the lock is never contended; it is there because librdkafka's
/// context must be `Sync`.
pub(crate) struct Handoff {
    /// Records polled and not sent yet.
    pending: Mutex<Vec<OwnedMessage>>,
    to_loop: mpsc::Sender<Polled>,
}

impl Handoff {
    /// A hand-off into a channel of `capacity` bursts; the loop reads the other end.
    pub(crate) fn channel(capacity: usize) -> (Handoff, mpsc::Receiver<Polled>) {
        let (to_loop, polled) = mpsc::channel(capacity);
        let handoff = Handoff {
            pending: Mutex::new(Vec::new()),
            to_loop,
        };
        (handoff, polled)
    }

    pub(crate) fn push(&self, m: OwnedMessage) -> usize {
        let mut p = crate::lock(&self.pending);
        p.push(m);
        p.len()
    }

    pub(crate) fn take_pending(&self) -> Vec<OwnedMessage> {
        std::mem::take(&mut *crate::lock(&self.pending))
    }

    /// Sends from the poller, giving up on `stop`; false once the loop is gone.
    pub(crate) async fn send(&self, polled: Polled, stop: &CancellationToken) -> bool {
        tokio::select! {
            biased;
            _ = stop.cancelled() => false,
            sent = self.to_loop.send(polled) => sent.is_ok(),
        }
    }

    /// Sends a revoke from the callback, behind the records polled before it; false when the loop is gone.
    /// Blocking is the point: this is the poller thread, not the runtime's, and the loop reads the channel
    /// whenever the in-flight limit does not hold it, and within a second when it does (`kafka::delivery`).
    pub(crate) fn send_revoke(&self, revocation: Revocation) -> bool {
        if self.to_loop.is_closed() {
            return false;
        }
        let pending = self.take_pending();
        if !pending.is_empty()
            && self
                .to_loop
                .blocking_send(Polled::Records(pending))
                .is_err()
        {
            return false;
        }
        self.to_loop
            .blocking_send(Polled::Revoked(revocation))
            .is_ok()
    }
}

/// A revoke waiting for the loop's answer: the finished offsets to commit before the partitions move.
pub(crate) struct Revocation {
    pub partitions: Vec<Tp>,
    /// Taken away without a revoke (session timed out): nothing is drained or committed.
    pub lost: bool,
    pub answer: std::sync::mpsc::SyncSender<Vec<(Tp, i64)>>,
}

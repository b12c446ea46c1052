//! The queue model on an in-memory table: sequences, dedup, limits, retention,
//! leases, redelivery and dead-lettering.

use std::collections::BTreeMap;

use super::*;

struct Fixture(BTreeMap<Vec<u8>, Vec<u8>>);

const MAX: u64 = 1 << 20;

impl Fixture {
    fn new(config: QueueConfig) -> Fixture {
        let mut f = Fixture(BTreeMap::new());
        assert!(matches!(f.apply(QueueCommand::CreateStream { config, now_ms: 0 }), QueueReply::Stream(_)));
        f
    }
    fn apply(&mut self, cmd: QueueCommand) -> QueueReply {
        Queues { table: &mut self.0 }.apply(cmd).expect("apply")
    }
    fn view(&self) -> QueueView<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        QueueView { table: &self.0 }
    }
    fn meta(&self) -> QueueMeta {
        self.view().meta("s").expect("meta").expect("stream")
    }
    fn publish_at(&mut self, payload: &str, msg_id: &str, ts_ms: u64) -> QueueReply {
        let msg = Msg { ts_ms, headers: vec![], payload: payload.as_bytes().to_vec() };
        self.apply(QueueCommand::Publish {
            name: "s".into(),
            msg,
            msg_id: msg_id.into(),
            expected_last_seq: None,
            max_msg_bytes: MAX,
        })
    }
    fn publish(&mut self, payload: &str) -> u64 {
        match self.publish_at(payload, "", 1) {
            QueueReply::PubAck { seq, duplicate: false } => seq,
            other => panic!("publish: {other:?}"),
        }
    }
    fn consumer(&mut self, name: &str, config: ConsumerConfig) {
        let config = ConsumerConfig { name: name.into(), ..config };
        let r = self.apply(QueueCommand::CreateConsumer { name: "s".into(), config, now_ms: 0 });
        assert!(matches!(r, QueueReply::Consumer(_)), "{r:?}");
    }
    fn fetch(&mut self, consumer: &str, batch: u64, now_ms: u64) -> Vec<Delivery> {
        match self.apply(QueueCommand::Fetch { name: "s".into(), consumer: consumer.into(), batch, now_ms }) {
            QueueReply::Deliveries(d) => d,
            other => panic!("fetch: {other:?}"),
        }
    }
    fn act(&mut self, consumer: &str, leases: &[(u64, u64)], action: LeaseAction, now_ms: u64) -> Vec<bool> {
        let cmd = QueueCommand::Leases {
            name: "s".into(),
            consumer: consumer.into(),
            leases: leases.to_vec(),
            action,
            now_ms,
        };
        match self.apply(cmd) {
            QueueReply::Done(d) => d,
            other => panic!("leases: {other:?}"),
        }
    }
}

fn stream(retention: Retention) -> QueueConfig {
    QueueConfig { name: "s".into(), retention, ..QueueConfig::default() }
}

fn seqs(d: &[Delivery]) -> Vec<(u64, u64)> {
    d.iter().map(|d| (d.seq, d.deliveries)).collect()
}

#[test]
fn sequences_are_gapless_and_duplicates_get_the_first_sequence() {
    let mut f = Fixture::new(stream(Retention::Limits));
    let mut expected = 0;
    for i in 0..100u64 {
        // Every tenth publish repeats the previous one's id.
        let id = if i % 10 == 9 { format!("id-{}", i - 1) } else { format!("id-{i}") };
        match f.publish_at("x", &id, 1_000 + i) {
            QueueReply::PubAck { seq, duplicate: false } => {
                expected += 1;
                assert_eq!(seq, expected);
            }
            QueueReply::PubAck { seq, duplicate: true } => assert_eq!(seq, expected),
            other => panic!("{other:?}"),
        }
    }
    let m = f.meta();
    assert_eq!((m.msgs, m.first_seq, m.last_seq), (90, 1, 90));
    // Past the window the id is new again, and the dedup rows expire.
    assert!(matches!(
        f.publish_at("x", "id-0", 1_100 + DEFAULT_DUPLICATE_WINDOW_MS),
        QueueReply::PubAck { seq: 91, duplicate: false }
    ));
    assert_eq!(f.0.keys().filter(|k| k[0] == b'd').count(), 1, "old dedup rows were not expired");
}

#[test]
fn max_msgs_keeps_the_newest_and_discard_new_refuses() {
    let mut f = Fixture::new(QueueConfig { max_msgs: 1_000, ..stream(Retention::Limits) });
    for _ in 0..10_000 {
        f.publish("m");
    }
    let m = f.meta();
    assert_eq!((m.msgs, m.first_seq, m.last_seq), (1_000, 9_001, 10_000));

    let mut f =
        Fixture::new(QueueConfig { max_msgs: 2, max_bytes: 0, discard: Discard::New, ..stream(Retention::Limits) });
    f.publish("a");
    f.publish("b");
    assert_eq!(f.publish_at("c", "", 1), QueueReply::Refused(QueueError::MaxMsgs));
    let mut f = Fixture::new(QueueConfig { max_bytes: 3, discard: Discard::New, ..stream(Retention::Limits) });
    f.publish("ab");
    assert_eq!(f.publish_at("cd", "", 1), QueueReply::Refused(QueueError::MaxBytes));
    assert_eq!(f.meta().last_seq, 1, "a refused publish took a sequence");
}

#[test]
fn expected_last_sequence_and_size_limit() {
    let mut f = Fixture::new(QueueConfig { max_msg_bytes: 4, ..stream(Retention::Limits) });
    f.publish("a");
    let publish = |f: &mut Fixture, expected_last_seq, payload: &str| {
        f.apply(QueueCommand::Publish {
            name: "s".into(),
            msg: Msg { ts_ms: 1, headers: vec![("k".into(), "v".into())], payload: payload.into() },
            msg_id: String::new(),
            expected_last_seq,
            max_msg_bytes: MAX,
        })
    };
    assert_eq!(publish(&mut f, Some(5), "b"), QueueReply::Refused(QueueError::WrongLastSeq(1)));
    assert_eq!(publish(&mut f, Some(1), "b"), QueueReply::PubAck { seq: 2, duplicate: false });
    // Headers count: 2 + 3 > 4.
    assert_eq!(publish(&mut f, None, "abc"), QueueReply::Refused(QueueError::MsgTooBig));
    assert_eq!(
        f.apply(QueueCommand::Publish {
            name: "nope".into(),
            msg: Msg { ts_ms: 1, headers: vec![], payload: vec![] },
            msg_id: String::new(),
            expected_last_seq: None,
            max_msg_bytes: MAX,
        }),
        QueueReply::Refused(QueueError::StreamNotFound)
    );
}

#[test]
fn leases_run_out_and_are_redelivered_once_and_stale_acks_do_nothing() {
    let mut f = Fixture::new(stream(Retention::Limits));
    f.consumer("c", ConsumerConfig { ack_wait_ms: 100, ..ConsumerConfig::default() });
    for _ in 0..3 {
        f.publish("m");
    }
    let d = f.fetch("c", 2, 1_000);
    assert_eq!(seqs(&d), vec![(1, 1), (2, 1)]);
    assert_eq!(d[0].deadline_ms, 1_100);
    assert_eq!(f.act("c", &[(1, 1)], LeaseAction::Ack, 1_050), vec![true]);
    // Seq 2's lease runs out; the next fetch redelivers it first, then seq 3.
    assert_eq!(seqs(&f.fetch("c", 5, 1_100)), vec![(2, 2), (3, 1)]);
    // The first delivery's ack comes late: refused, the second's counts.
    assert_eq!(f.act("c", &[(2, 1), (2, 2), (2, 2)], LeaseAction::Ack, 1_150), vec![false, true, false]);
    assert!(f.fetch("c", 5, 1_150).is_empty());
    let c = f.view().consumer("s", "c").expect("read").expect("consumer");
    assert_eq!((c.pending, c.acked, c.redelivered, c.delivered), (1, 2, 1, 3));
}

#[test]
fn nak_in_progress_and_term() {
    let mut f = Fixture::new(stream(Retention::WorkQueue));
    f.consumer("c", ConsumerConfig { ack_wait_ms: 100, ..ConsumerConfig::default() });
    f.publish("a");
    f.publish("b");
    f.publish("c");
    assert_eq!(f.fetch("c", 3, 0).len(), 3);
    assert_eq!(f.act("c", &[(1, 1)], LeaseAction::Nak { delay_ms: 500 }, 10), vec![true]);
    assert_eq!(f.act("c", &[(2, 1)], LeaseAction::InProgress, 90), vec![true]);
    assert_eq!(f.act("c", &[(3, 1)], LeaseAction::Term, 10), vec![true]);
    // Term settles the message: a work queue lets it go.
    assert!(f.view().message("s", 3).expect("read").is_none());
    // At 150: seq 2's deadline moved to 190, seq 1's to 510.
    assert!(f.fetch("c", 3, 150).is_empty());
    assert_eq!(seqs(&f.fetch("c", 3, 200)), vec![(2, 2)]);
    assert_eq!(f.act("c", &[(2, 2)], LeaseAction::Ack, 250), vec![true]);
    assert_eq!(seqs(&f.fetch("c", 3, 510)), vec![(1, 2)]);
    assert_eq!(f.act("c", &[(1, 2)], LeaseAction::Ack, 520), vec![true]);
    let m = f.meta();
    assert_eq!((m.msgs, m.first_seq, m.last_seq), (0, 4, 3));
}

#[test]
fn after_max_deliver_a_message_goes_to_the_outbox() {
    let mut f = Fixture::new(stream(Retention::WorkQueue));
    f.consumer("c", ConsumerConfig { ack_wait_ms: 10, max_deliver: 5, ..ConsumerConfig::default() });
    f.publish("poison");
    let mut deliveries = Vec::new();
    for round in 0..7u64 {
        deliveries.extend(seqs(&f.fetch("c", 1, round * 10)));
    }
    assert_eq!(deliveries, (1..=5).map(|n| (1, n)).collect::<Vec<_>>());
    let dead = f.view().dead("s", 10).expect("dead");
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].seq, dead[0].deliveries, dead[0].msg.payload.as_slice()), (1, 5, &b"poison"[..]));
    let m = f.meta();
    assert_eq!((m.msgs, m.dead_waiting), (0, 1));
    assert_eq!(
        f.apply(QueueCommand::ForgetDead { name: "s".into(), entries: vec![(1, "c".into()), (1, "c".into())] }),
        QueueReply::Count(1)
    );
    let m = f.meta();
    assert_eq!((m.dead_waiting, m.dead_lettered), (0, 1));
}

#[test]
fn max_ack_pending_bounds_the_leases() {
    let mut f = Fixture::new(stream(Retention::Limits));
    f.consumer("c", ConsumerConfig { max_ack_pending: 2, ..ConsumerConfig::default() });
    for _ in 0..5 {
        f.publish("m");
    }
    assert_eq!(f.fetch("c", 10, 0).len(), 2);
    assert!(f.fetch("c", 10, 0).is_empty());
    f.act("c", &[(1, 1)], LeaseAction::Ack, 0);
    assert_eq!(seqs(&f.fetch("c", 10, 0)), vec![(3, 1)]);
}

#[test]
fn interest_keeps_a_message_until_every_consumer_acknowledged_it() {
    let mut f = Fixture::new(stream(Retention::Interest));
    // No consumer: not kept, though it takes a sequence.
    assert_eq!(f.publish("lost"), 1);
    assert_eq!(f.meta().msgs, 0);
    f.consumer("a", ConsumerConfig::default());
    f.consumer("b", ConsumerConfig::default());
    assert_eq!(f.publish("m"), 2);
    assert_eq!(seqs(&f.fetch("a", 1, 0)), vec![(2, 1)]);
    f.act("a", &[(2, 1)], LeaseAction::Ack, 0);
    assert_eq!(f.meta().msgs, 1, "removed before b acknowledged");
    assert_eq!(seqs(&f.fetch("b", 1, 0)), vec![(2, 1)]);
    f.act("b", &[(2, 1)], LeaseAction::Ack, 0);
    assert_eq!(f.meta().msgs, 0);
    // A message b never read goes when b is deleted.
    f.publish("n");
    f.act("a", &[(3, 1)], LeaseAction::Ack, 0);
    assert_eq!(seqs(&f.fetch("a", 1, 0)), vec![(3, 1)]);
    f.act("a", &[(3, 1)], LeaseAction::Ack, 0);
    assert_eq!(f.meta().msgs, 1);
    f.apply(QueueCommand::DeleteConsumer { name: "s".into(), consumer: "b".into() });
    assert_eq!(f.meta().msgs, 0);
}

#[test]
fn work_queue_allows_one_consumer() {
    let mut f = Fixture::new(stream(Retention::WorkQueue));
    f.consumer("a", ConsumerConfig::default());
    let r = f.apply(QueueCommand::CreateConsumer {
        name: "s".into(),
        config: ConsumerConfig { name: "b".into(), ..ConsumerConfig::default() },
        now_ms: 0,
    });
    assert_eq!(r, QueueReply::Refused(QueueError::WorkQueueConsumers));
    // The same consumer again is no error; a different config is.
    f.consumer("a", ConsumerConfig::default());
    let r = f.apply(QueueCommand::CreateConsumer {
        name: "s".into(),
        config: ConsumerConfig { name: "a".into(), ack_wait_ms: 5, ..ConsumerConfig::default() },
        now_ms: 0,
    });
    assert_eq!(r, QueueReply::Refused(QueueError::ConsumerExists));
}

#[test]
fn max_age_expires_old_messages_and_deliver_policies_start_where_asked() {
    let mut f = Fixture::new(QueueConfig { max_age_ms: 1_000, ..stream(Retention::Limits) });
    for t in [100, 200, 300, 400] {
        f.publish_at("m", "", t);
    }
    assert!(!f.view().expirable("s", 1_099).expect("read"));
    assert!(f.view().expirable("s", 1_100).expect("read"));
    assert_eq!(f.apply(QueueCommand::Expire { name: "s".into(), now_ms: 1_250 }), QueueReply::Count(2));
    assert_eq!(f.meta().first_seq, 3);
    f.consumer("time", ConsumerConfig { deliver: DeliverPolicy::ByTime(400), ..ConsumerConfig::default() });
    f.consumer("seq", ConsumerConfig { deliver: DeliverPolicy::BySeq(4), ..ConsumerConfig::default() });
    f.consumer("new", ConsumerConfig { deliver: DeliverPolicy::New, ..ConsumerConfig::default() });
    f.consumer("all", ConsumerConfig::default());
    assert_eq!(seqs(&f.fetch("time", 10, 1_250)), vec![(4, 1)]);
    assert_eq!(seqs(&f.fetch("seq", 10, 1_250)), vec![(4, 1)]);
    assert!(f.fetch("new", 10, 1_250).is_empty());
    assert_eq!(seqs(&f.fetch("all", 10, 1_250)), vec![(3, 1), (4, 1)]);
}

#[test]
fn purge_and_delete() {
    let mut f = Fixture::new(stream(Retention::Limits));
    for _ in 0..10 {
        f.publish("m");
    }
    f.consumer("c", ConsumerConfig::default());
    assert_eq!(f.apply(QueueCommand::Purge { name: "s".into(), keep_from_seq: 8 }), QueueReply::Count(7));
    assert_eq!(f.meta().first_seq, 8);
    assert_eq!(seqs(&f.fetch("c", 10, 0)), vec![(8, 1), (9, 1), (10, 1)]);
    assert_eq!(f.apply(QueueCommand::Purge { name: "s".into(), keep_from_seq: 0 }), QueueReply::Count(3));
    let m = f.meta();
    assert_eq!((m.msgs, m.first_seq, m.last_seq), (0, 11, 10));
    assert_eq!(f.apply(QueueCommand::DeleteStream { name: "s".into() }), QueueReply::Count(1));
    assert!(f.0.is_empty(), "rows left after delete: {}", f.0.len());
}

#[test]
fn a_batch_of_publishes_applies_each_in_order() {
    let mut f = Fixture::new(QueueConfig { max_msg_bytes: 3, ..stream(Retention::Limits) });
    let item = |payload: &str, msg_id: &str, expected_last_seq| PublishItem {
        msg: Msg { ts_ms: 5, headers: vec![], payload: payload.into() },
        msg_id: msg_id.into(),
        expected_last_seq,
    };
    let items = vec![
        item("a", "x", None),
        item("b", "x", None),
        item("toolong", "", None),
        item("c", "", Some(1)),
        item("d", "", Some(7)),
    ];
    let r = f.apply(QueueCommand::PublishBatch { name: "s".into(), items, max_msg_bytes: MAX });
    assert_eq!(
        r,
        QueueReply::Batch(vec![
            QueueReply::PubAck { seq: 1, duplicate: false },
            QueueReply::PubAck { seq: 1, duplicate: true },
            QueueReply::Refused(QueueError::MsgTooBig),
            QueueReply::PubAck { seq: 2, duplicate: false },
            QueueReply::Refused(QueueError::WrongLastSeq(2)),
        ])
    );
}

/// A message's payload encodes as a plain `Vec<u8>` did: rows and log entries
/// written before it was a byte string read back unchanged, and back again.
#[test]
fn payload_byte_strings_keep_the_vec_encoding() {
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Plain {
        ts_ms: u64,
        headers: Vec<(String, String)>,
        payload: Vec<u8>,
    }
    let msg = Msg { ts_ms: 7, headers: vec![("k".into(), "v".into())], payload: (0..=255u8).collect() };
    let plain = Plain { ts_ms: 7, headers: vec![("k".into(), "v".into())], payload: (0..=255u8).collect() };
    assert_eq!(encode(&msg), encode(&plain));
    assert_eq!(decode::<Msg>(&encode(&plain)).expect("decode"), msg);
    assert_eq!(decode::<Plain>(&encode(&msg)).expect("decode"), plain);
}

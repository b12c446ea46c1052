//! The durable-queue service (`concord.queue.v1`) on a 3-member cluster of
//! real processes:
//! - 10,000 publishes, 1,000 of them repeating an earlier msg-id, from several
//!   publishers across a SIGKILL of the stream's leader: exactly 9,000 messages
//!   with sequences 1..=9,000, each payload once; a stream limited to 1,000
//!   messages then starts at 9,001.
//! - Three consumers sharing one durable consumer, one of them a `concord
//!   queue sub` process SIGKILLed mid-batch: nothing lost, its leased messages
//!   redelivered once their ack_wait ran out, none acknowledged twice; a message never
//!   acknowledged goes to the dead-letter stream after its fifth delivery.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord::proto::groups::groups_client::GroupsClient;
use concord::proto::groups::NodesRequest;
use concord::proto::queue as pb;
use concord::proto::queue::queue_client::QueueClient;
use concord_testkit::{ClusterOptions, ProcessCluster};
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_concord");

async fn client(endpoint: &str) -> QueueClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match QueueClient::connect(endpoint.to_string()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("connect {endpoint}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Retries a call while the cluster answers UNAVAILABLE (no leader yet, a
/// member down): each retry is safe here (publishes carry a msg-id).
async fn retry<T, F, Fut>(endpoints: &[String], what: &str, mut f: F) -> T
where
    F: FnMut(QueueClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut which = 0;
    loop {
        let endpoint = &endpoints[which % endpoints.len()];
        let answer = match tokio::time::timeout(Duration::from_secs(2), QueueClient::connect(endpoint.clone())).await {
            Ok(Ok(c)) => tokio::time::timeout(Duration::from_secs(10), f(c)).await.ok(),
            _ => None,
        };
        match answer {
            Some(Ok(r)) => return r.into_inner(),
            Some(Err(s)) if s.code() != tonic::Code::Unavailable && s.code() != tonic::Code::Unknown => {
                panic!("{what}: {s:?}")
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "{what}: no answer within 60 s");
        which += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn stream(name: &str, max_msgs: u64) -> pb::CreateStreamRequest {
    pb::CreateStreamRequest { config: Some(pb::StreamConfig { name: name.into(), max_msgs, ..Default::default() }) }
}

/// The member leading stream group `group`, as member 0 sees it.
async fn stream_leader(cluster: &ProcessCluster, group: u64) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for i in 0..cluster.members.len() {
            let Ok(mut c) = GroupsClient::connect(cluster.members[i].endpoint()).await else { continue };
            let Ok(nodes) = c.nodes(NodesRequest {}).await else { continue };
            if let Some(l) = nodes.into_inner().leaders.iter().find(|l| l.group == group && l.leader != 0) {
                if let Some(i) = cluster.member_index(l.leader).await {
                    return i;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader for stream group {group}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_across_a_leader_kill_are_exactly_once_and_gapless() {
    const PUBLISHES: u64 = 10_000;
    const PUBLISHERS: u64 = 8;
    let mut cluster = ProcessCluster::start(Path::new(BIN), 3, ClusterOptions::default());
    cluster.wait_leader(Duration::from_secs(20)).await;
    let endpoints = cluster.endpoints();
    let info = retry(&endpoints, "create", |mut c| async move { c.create_stream(stream("orders", 0)).await }).await;
    assert_eq!(info.replicas.len(), 3);
    // Publish i carries msg-id "m{i}", except every tenth, which repeats the id
    // (and payload) of the publish before it: 9,000 distinct messages.
    let id_of = |i: u64| if i % 10 == 9 { i - 1 } else { i };
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let endpoints = endpoints.clone();
        let done = done.clone();
        publishers.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in (p..PUBLISHES).step_by(PUBLISHERS as usize) {
                let id = id_of(i);
                let req = pb::PublishRequest {
                    stream: "orders".into(),
                    payload: format!("payload-{id}").into_bytes(),
                    msg_id: format!("m{id}"),
                    ..Default::default()
                };
                let ack = retry(&endpoints, "publish", |mut c| {
                    let req = req.clone();
                    async move { c.publish(req).await }
                })
                .await;
                acks.push((id, ack.seq));
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            acks
        }));
    }
    while done.load(std::sync::atomic::Ordering::Relaxed) < PUBLISHES / 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let victim = stream_leader(&cluster, info.group).await;
    cluster.kill(victim);
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart(victim);
    let mut seq_of: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for p in publishers {
        for (id, seq) in p.await.expect("publisher") {
            seq_of.entry(id).or_default().insert(seq);
        }
    }
    assert_eq!(seq_of.len(), 9_000);
    for (id, seqs) in &seq_of {
        assert_eq!(seqs.len(), 1, "msg-id m{id} acknowledged with sequences {seqs:?}");
    }
    let all: BTreeSet<u64> = seq_of.values().flatten().copied().collect();
    assert_eq!(all, (1..=9_000).collect(), "sequences are not 1..=9000");
    // Every member's replica agrees, and each message is the one its sequence
    // was acknowledged for.
    for endpoint in &endpoints {
        let mut c = client(endpoint).await;
        let s = retry(std::slice::from_ref(endpoint), "info", |mut c| async move {
            c.get_stream(pb::StreamInfoRequest { name: "orders".into() }).await
        })
        .await
        .state
        .expect("state");
        assert_eq!((s.messages, s.first_seq, s.last_seq), (9_000, 1, 9_000), "on {endpoint}");
        for (id, seqs) in seq_of.iter().step_by(97) {
            let seq = *seqs.iter().next().expect("a sequence");
            let m = c.get_message(pb::GetMessageRequest { stream: "orders".into(), seq }).await.expect("get");
            assert_eq!(m.into_inner().payload, format!("payload-{id}").into_bytes());
        }
    }
    // A stream limited to 1,000 messages keeps the newest. (Retried with msg-ids:
    // the restarted member's return may still cost the new group an election.)
    retry(&endpoints, "create", |mut c| async move { c.create_stream(stream("recent", 1_000)).await }).await;
    let mut c = client(&endpoints[1]).await;
    let mut retries = 0;
    for i in 0..10_000u64 {
        let req = pb::PublishRequest {
            stream: "recent".into(),
            payload: i.to_string().into_bytes(),
            msg_id: i.to_string(),
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match c.publish(req.clone()).await {
                Ok(_) => break,
                Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(s) => panic!("publish {i}: {s:?}"),
            }
        }
    }
    println!("publishes to 'recent' retried after UNAVAILABLE: {retries}");
    let s = c.get_stream(pb::StreamInfoRequest { name: "recent".into() }).await.expect("info").into_inner();
    let s = s.state.expect("state");
    assert_eq!((s.messages, s.first_seq, s.last_seq), (1_000, 9_001, 10_000));
    assert!(cluster.crashed().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_consumer_s_leases_are_redelivered_and_poison_goes_to_the_dead_letter_stream() {
    const MESSAGES: u64 = 600;
    const ACK_WAIT_MS: u64 = 2_000;
    let mut cluster = ProcessCluster::start(Path::new(BIN), 3, ClusterOptions::default());
    cluster.wait_leader(Duration::from_secs(20)).await;
    let endpoints = cluster.endpoints();
    let create = pb::CreateStreamRequest {
        config: Some(pb::StreamConfig {
            name: "jobs".into(),
            retention: pb::Retention::WorkQueue as i32,
            ..Default::default()
        }),
    };
    retry(&endpoints, "create", |mut c| {
        let create = create.clone();
        async move { c.create_stream(create).await }
    })
    .await;
    let consumer = pb::CreateConsumerRequest {
        stream: "jobs".into(),
        config: Some(pb::ConsumerConfig {
            name: "workers".into(),
            ack_wait_ms: ACK_WAIT_MS,
            max_deliver: 5,
            ..Default::default()
        }),
    };
    let mut c = client(&endpoints[0]).await;
    c.create_consumer(consumer).await.expect("consumer");
    for i in 0..MESSAGES {
        let payload = if i == 7 { b"poison".to_vec() } else { format!("job-{i}").into_bytes() };
        c.publish(pb::PublishRequest { stream: "jobs".into(), payload, ..Default::default() }).await.expect("publish");
    }
    // Acknowledged sequences, by who acknowledged them.
    let acked: Arc<Mutex<Vec<(usize, u64, u64)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The third consumer is a `concord queue sub` process: SIGKILLed once it
    // printed its first batch of leases, in the middle of fetching its second.
    let mut sub = std::process::Command::new(BIN)
        .args(["queue", "--endpoints", &endpoints[2], "sub", "jobs", "workers", "--batch", "10", "--count", "40"])
        .args(["--wait", "5s", "--no-ack"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("concord queue sub");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(sub.stdout.take().expect("stdout")));
    let mut killed_leases = Vec::new();
    while killed_leases.len() < 10 {
        let line = lines.next().expect("the sub process printed its leases").expect("read");
        if let Some(lease) = line.trim().strip_prefix("lease ") {
            let (seq, _) = lease.split_once(':').expect("SEQ:DELIVERIES");
            killed_leases.push(seq.parse::<u64>().expect("seq"));
        }
    }
    sub.kill().expect("SIGKILL the consumer");
    let _ = sub.wait();
    let mut fetchers = Vec::new();
    for (w, endpoint) in endpoints.iter().take(2).cloned().enumerate() {
        let (acked, stop) = (acked.clone(), stop.clone());
        fetchers.push(tokio::spawn(async move {
            let mut c = client(&endpoint).await;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let fetched = c
                    .fetch(pb::FetchRequest {
                        stream: "jobs".into(),
                        consumer: "workers".into(),
                        batch: 10,
                        max_wait_ms: 200,
                    })
                    .await
                    .expect("fetch")
                    .into_inner();
                let mut leases = Vec::new();
                for d in &fetched.deliveries {
                    let m = d.message.as_ref().expect("message");
                    if m.payload != b"poison" {
                        leases.push(pb::Lease { seq: m.seq, deliveries: d.deliveries });
                    }
                }
                if leases.is_empty() {
                    continue;
                }
                let done = c
                    .ack(pb::AckRequest {
                        stream: "jobs".into(),
                        consumer: "workers".into(),
                        leases: leases.clone(),
                        delay_ms: 0,
                    })
                    .await
                    .expect("ack")
                    .into_inner()
                    .done;
                let mut acked = acked.lock().expect("lock");
                for (l, ok) in leases.iter().zip(done) {
                    if ok {
                        acked.push((w, l.seq, l.deliveries));
                    }
                }
            }
        }));
    }
    // Until every message but the poison is acknowledged and the poison is dead-lettered.
    let deadline = Instant::now() + Duration::from_secs(120);
    let dead = loop {
        let n = acked.lock().expect("lock").len() as u64;
        let dlq = c.get_stream(pb::StreamInfoRequest { name: "jobs.dlq".into() }).await;
        if let (true, Ok(info)) = (n == MESSAGES - 1, dlq) {
            if info.get_ref().state.as_ref().is_some_and(|s| s.messages == 1) {
                break info.into_inner();
            }
        }
        assert!(Instant::now() < deadline, "acknowledged {n} of {} and no dead letter", MESSAGES - 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in fetchers {
        f.await.expect("fetcher");
    }
    let acked = acked.lock().expect("lock").clone();
    let seqs: Vec<u64> = acked.iter().map(|(_, s, _)| *s).collect();
    let distinct: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(seqs.len(), distinct.len(), "a message was acknowledged twice");
    assert_eq!(distinct, (1..=MESSAGES).filter(|s| *s != 8).collect(), "a message was lost");
    // (Seq 8 is the poison: never acknowledged.)
    for seq in killed_leases.iter().filter(|s| **s != 8) {
        let (_, _, deliveries) = acked.iter().find(|(_, s, _)| s == seq).expect("acknowledged");
        assert!(*deliveries >= 2, "seq {seq}, leased by the killed consumer, was acknowledged on its first delivery");
    }
    // The poison: five deliveries, then the dead-letter stream, gone from the work queue.
    let m = c.get_message(pb::GetMessageRequest { stream: "jobs.dlq".into(), seq: 1 }).await.expect("dlq message");
    let m = m.into_inner();
    assert_eq!(m.payload, b"poison");
    let header = |k: &str| m.headers.iter().find(|h| h.key == k).map(|h| h.value.clone());
    assert_eq!(header("Concord-Deliveries").as_deref(), Some("5"));
    assert_eq!(header("Concord-Dead-Seq").as_deref(), Some("8"));
    assert_eq!(dead.state.expect("state").messages, 1);
    let jobs = c.get_stream(pb::StreamInfoRequest { name: "jobs".into() }).await.expect("info").into_inner();
    let s = jobs.state.expect("state");
    assert_eq!((s.messages, s.dead_lettered, s.dead_waiting), (0, 1, 0));
    let info = c
        .get_consumer(pb::ConsumerInfoRequest { stream: "jobs".into(), name: "workers".into() })
        .await
        .expect("consumer")
        .into_inner();
    assert_eq!((info.ack_pending, info.num_pending, info.dead_lettered), (0, 0, 1));
    // Each member's /metrics shows the queues as its replica holds them.
    for m in &cluster.members {
        let (status, body) = concord_testkit::http_get(m.client_port, "/metrics").expect("metrics");
        assert_eq!(status, 200);
        assert!(body.contains("concord_queues 2\n"), "{body}");
        assert!(body.contains("concord_queue_messages{stream=\"jobs.dlq\"} 1\n"), "{body}");
        assert!(body.contains(&format!("concord_queue_last_seq{{stream=\"jobs\"}} {MESSAGES}\n")), "{body}");
        assert!(
            body.contains("concord_queue_consumer_ack_pending{stream=\"jobs\",consumer=\"workers\"} 0\n"),
            "{body}"
        );
    }
    assert!(cluster.crashed().is_empty());
}

/// With four members each stream has replicas on three: every member answers
/// for every stream, forwarding to a replica when it holds none.
#[tokio::test(flavor = "multi_thread")]
async fn every_member_answers_for_streams_it_holds_no_replica_of() {
    const STREAMS: usize = 6;
    let cluster = ProcessCluster::start(Path::new(BIN), 4, ClusterOptions::default());
    cluster.wait_leader(Duration::from_secs(20)).await;
    let endpoints = cluster.endpoints();
    for s in 0..STREAMS {
        let info =
            retry(&endpoints, "create", |mut c| async move { c.create_stream(stream(&format!("q{s}"), 0)).await })
                .await;
        assert_eq!(info.replicas.len(), 3, "q{s}");
    }
    let mut clients = Vec::new();
    for e in &endpoints {
        clients.push(client(e).await);
    }
    for (m, c) in clients.iter_mut().enumerate() {
        let listed = c.list_streams(pb::ListStreamsRequest {}).await.expect("list").into_inner().streams;
        assert_eq!(listed.len(), STREAMS, "member {m}");
        for s in 0..STREAMS {
            let name = format!("q{s}");
            let consumer = format!("c{m}");
            let config = pb::ConsumerConfig { name: consumer.clone(), ..Default::default() };
            c.create_consumer(pb::CreateConsumerRequest { stream: name.clone(), config: Some(config) })
                .await
                .expect("consumer");
            let ack = c
                .publish(pb::PublishRequest {
                    stream: name.clone(),
                    payload: format!("from {m}").into_bytes(),
                    ..Default::default()
                })
                .await
                .expect("publish")
                .into_inner();
            assert_eq!(ack.seq, m as u64 + 1, "{name} through member {m}");
            let fetched = c
                .fetch(pb::FetchRequest {
                    stream: name.clone(),
                    consumer: consumer.clone(),
                    batch: 10,
                    max_wait_ms: 1_000,
                })
                .await
                .expect("fetch")
                .into_inner()
                .deliveries;
            assert_eq!(fetched.len(), m + 1, "{name} through member {m}");
            let leases = fetched
                .iter()
                .map(|d| pb::Lease { seq: d.message.as_ref().map_or(0, |m| m.seq), deliveries: d.deliveries })
                .collect();
            let done = c
                .ack(pb::AckRequest { stream: name.clone(), consumer, leases, delay_ms: 0 })
                .await
                .expect("ack")
                .into_inner()
                .done;
            assert!(done.iter().all(|d| *d), "{name} through member {m}: {done:?}");
        }
    }
    let s = clients[1].get_stream(pb::StreamInfoRequest { name: "q0".into() }).await.expect("info").into_inner();
    let s = s.state.expect("state");
    assert!(s.first_ts_ms > 0 && s.first_ts_ms <= s.last_ts_ms, "{s:?}");
    // Errors travel back unchanged.
    let e = clients[3].get_stream(pb::StreamInfoRequest { name: "nope".into() }).await.expect_err("missing stream");
    assert_eq!((e.code(), e.message()), (tonic::Code::NotFound, "stream not found"));
    let e = clients[2]
        .publish(pb::PublishRequest { stream: "q0".into(), expected_last_seq: Some(1), ..Default::default() })
        .await
        .expect_err("wrong last sequence");
    assert_eq!((e.code(), e.message()), (tonic::Code::FailedPrecondition, "wrong last sequence: 4"));
}

/// With auth enabled a queue call needs an etcd user's token: etcd's error
/// without one, served with one.
#[tokio::test(flavor = "multi_thread")]
async fn with_auth_enabled_calls_need_a_user_token() {
    let cluster = ProcessCluster::start(Path::new(BIN), 1, ClusterOptions::default());
    cluster.wait_leader(Duration::from_secs(20)).await;
    let endpoint = cluster.endpoints()[0].clone();
    let c = cluster.client(0).await;
    c.auth_client().user_add("root", "pw", None).await.expect("user add");
    c.auth_client().user_grant_role("root", "root").await.expect("grant");
    c.auth_client().auth_enable().await.expect("auth enable");
    let mut anonymous = client(&endpoint).await;
    let e = anonymous.create_stream(stream("secret", 0)).await.expect_err("no token");
    assert_eq!((e.code(), e.message()), (tonic::Code::InvalidArgument, "etcdserver: user name is empty"));
    let options = concord_testkit::etcd_client::ConnectOptions::new().with_user("root", "pw");
    let root = concord_testkit::etcd_client::Client::connect([endpoint.as_str()], Some(options)).await.expect("root");
    let token = root.auth_client().authenticate("root".into(), "pw".into()).await.expect("authenticate");
    let channel =
        tonic::transport::Endpoint::from_shared(endpoint).expect("endpoint").connect().await.expect("connect");
    let token: tonic::metadata::MetadataValue<_> = token.token().parse().expect("token");
    let mut authed = QueueClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("token", token.clone());
        Ok(req)
    });
    let info = authed.create_stream(stream("secret", 0)).await.expect("create with a token").into_inner();
    assert_eq!(info.config.expect("config").name, "secret");
    let e = anonymous.get_stream(pb::StreamInfoRequest { name: "secret".into() }).await.expect_err("no token");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

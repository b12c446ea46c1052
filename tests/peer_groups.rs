//! Peer requests name their Raft group (the `concord-group` header): one peer
//! connection carries every group's traffic. A request for a group the member
//! does not host, or with a malformed group, is refused and changes nothing.

use std::path::PathBuf;
use std::time::Duration;

use concord::proto::peer::peer_client::PeerClient;
use concord::proto::peer::Payload;
use concord_testkit::{ClusterOptions, ProcessCluster};
use tonic::Code;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concord"))
}

fn vote(group: Option<&str>, data: Vec<u8>) -> tonic::Request<Payload> {
    let mut req = tonic::Request::new(Payload { data });
    if let Some(g) = group {
        req.metadata_mut().insert("concord-group", g.parse().expect("ascii header"));
    }
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_unknown_or_malformed_groups_are_refused() {
    let cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let mut c = cluster.client(leader).await;
    c.put("before", "1", None).await.unwrap();
    let (_, term_before, _) = cluster.status(leader).await.unwrap();

    let mut peer = PeerClient::connect(cluster.peer_url(leader)).await.expect("dial the peer port");
    let unknown = peer.vote(vote(Some("7"), vec![0xff; 16])).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    assert!(unknown.message().contains("raft group 7"), "{unknown:?}");
    let malformed = peer.vote(vote(Some("seven"), vec![])).await.unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument, "{malformed:?}");
    // The member's own group, named or not (members before groups were numbered
    // send no header): garbage is refused as a malformed payload.
    for group in [Some("1"), None] {
        let garbage = peer.vote(vote(group, vec![0xff; 16])).await.unwrap_err();
        assert_eq!(garbage.code(), Code::InvalidArgument, "{garbage:?}");
    }

    // Nothing changed: same leader and term, the data is there, writes go on.
    let (_, term_after, _) = cluster.status(leader).await.unwrap();
    assert_eq!(term_before, term_after);
    assert_eq!(c.get("before", None).await.unwrap().kvs().len(), 1);
    c.put("after", "2", None).await.unwrap();
}

/// A snapshot stream that is garbage, announces more than a snapshot can be, or
/// ends early is refused, and nothing is installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_snapshot_streams_are_refused() {
    use concord::consensus::snapshot::SnapshotFrame;
    let cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let mut c = cluster.client(leader).await;
    c.put("before", "1", None).await.unwrap();
    let follower = (leader + 1) % 3;
    let mut peer = PeerClient::connect(cluster.peer_url(follower)).await.expect("dial the peer port");
    let frame = |f: &SnapshotFrame| Payload {
        data: bincode::serde::encode_to_vec(f, bincode::config::standard()).expect("encode"),
    };
    let head = |len| SnapshotFrame::Head { vote: openraft::Vote::new(1, 1), meta: Default::default(), len };
    let send = |frames: Vec<Payload>| {
        let mut req = tonic::Request::new(futures::stream::iter(frames));
        req.metadata_mut().insert("concord-group", "1".parse().expect("ascii header"));
        req
    };
    let garbage = peer.snapshot_stream(send(vec![Payload { data: vec![0xff; 16] }])).await.unwrap_err();
    assert_eq!(garbage.code(), Code::InvalidArgument, "{garbage:?}");
    let huge = peer.snapshot_stream(send(vec![frame(&head(u64::MAX))])).await.unwrap_err();
    assert_eq!(huge.code(), Code::InvalidArgument, "{huge:?}");
    assert!(huge.message().contains("at most"), "{huge:?}");
    let short = send(vec![frame(&head(10)), frame(&SnapshotFrame::Chunk(vec![1; 5]))]);
    let short = peer.snapshot_stream(short).await.unwrap_err();
    assert!(short.message().contains("ended before"), "{short:?}");
    let bad_crc =
        send(vec![frame(&head(3)), frame(&SnapshotFrame::Chunk(vec![1; 3])), frame(&SnapshotFrame::End { crc32: 0 })]);
    let bad_crc = peer.snapshot_stream(bad_crc).await.unwrap_err();
    assert!(bad_crc.message().contains("checksum"), "{bad_crc:?}");

    // Nothing changed: the follower still serves the data, writes go on.
    let mut f = cluster.client(follower).await;
    assert_eq!(f.get("before", None).await.unwrap().kvs().len(), 1);
    c.put("after", "2", None).await.unwrap();
    assert_eq!(f.get("after", None).await.unwrap().kvs().len(), 1);
}

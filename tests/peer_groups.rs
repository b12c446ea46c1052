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

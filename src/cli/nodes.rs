//! `concord nodes`: the members as placement sees them — zone, weight, how many
//! groups each holds a replica of and how many it leads. Each member reports the
//! leaders of the groups it hosts; the command asks every member and merges, so
//! a group's leader is known while any of its replicas answers.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;

use super::group::{connect, runtime};
use crate::proto::groups::groups_client::GroupsClient;
use crate::proto::groups::{NodeInfo, NodesRequest};

#[derive(Parser, Debug)]
#[command(name = "concord nodes", about = "List the members with zone, weight, replica and leader counts")]
pub struct NodesArgs {
    /// Comma-separated client endpoints; the first that answers gives the member list.
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Per-request timeout, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// Output format: table or json.
    #[arg(short = 'w', long = "write-out", default_value = "table")]
    pub write_out: String,
}

/// One row of the listing.
#[derive(Debug, serde::Serialize)]
pub struct NodeRow {
    pub id: String,
    pub name: String,
    pub zone: String,
    pub weight: u32,
    pub learner: bool,
    pub replicas: u32,
    /// Groups this member leads, as their replicas report it.
    pub leaders: u32,
}

/// Runs `concord nodes ...`; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let args = match NodesArgs::try_parse_from(std::iter::once("concord nodes".to_string()).chain(args.iter().cloned()))
    {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    if args.write_out != "table" && args.write_out != "json" {
        eprintln!("Error: unknown --write-out {:?} (table or json)", args.write_out);
        return 2;
    }
    match runtime().block_on(rows(&args.endpoints, Duration::from_millis(args.timeout_ms))) {
        Ok(rows) if args.write_out == "json" => {
            println!("{}", serde_json::to_string(&rows).unwrap_or_default());
            0
        }
        Ok(rows) => {
            print!("{}", table(&rows));
            0
        }
        Err(e) => {
            eprintln!("Error: {e}");
            1
        }
    }
}

/// The member list from the first endpoint that answers, with leader counts
/// merged from every member's report.
pub async fn rows(endpoints: &[String], timeout: Duration) -> Result<Vec<NodeRow>, String> {
    let mut c = GroupsClient::new(connect(endpoints, timeout).await?);
    let first = c.nodes(NodesRequest {}).await.map_err(|s| s.message().to_string())?.into_inner();
    let mut leader_of: BTreeMap<u64, u64> = BTreeMap::new();
    let mut merge = |leaders: &[crate::proto::groups::GroupLeader]| {
        for l in leaders.iter().filter(|l| l.leader != 0) {
            leader_of.entry(l.group).or_insert(l.leader);
        }
    };
    merge(&first.leaders);
    for node in &first.nodes {
        let Some(url) = node.client_urls.first() else { continue };
        let Ok(channel) = connect(std::slice::from_ref(url), timeout).await else { continue };
        if let Ok(r) = GroupsClient::new(channel).nodes(NodesRequest {}).await {
            merge(&r.into_inner().leaders);
        }
    }
    Ok(first
        .nodes
        .into_iter()
        .map(|n: NodeInfo| NodeRow {
            id: format!("{:x}", n.id),
            leaders: leader_of.values().filter(|l| **l == n.id).count() as u32,
            name: n.name,
            zone: n.zone,
            weight: n.weight,
            learner: n.learner,
            replicas: n.replicas,
        })
        .collect())
}

/// etcdctl-style table.
pub fn table(rows: &[NodeRow]) -> String {
    let header = ["ID", "NAME", "ZONE", "WEIGHT", "LEARNER", "REPLICAS", "LEADERS"];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.id.clone(),
                r.name.clone(),
                r.zone.clone(),
                r.weight.to_string(),
                r.learner.to_string(),
                r.replicas.to_string(),
                r.leaders.to_string(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let rule: String = widths.iter().map(|w| format!("+{}", "-".repeat(w + 2))).collect::<String>() + "+\n";
    let line = |row: &[String]| -> String {
        row.iter().zip(&widths).map(|(c, w)| format!("| {c:^w$} ")).collect::<String>() + "|\n"
    };
    let mut out = rule.clone();
    out += &line(&header.map(String::from));
    out += &rule;
    for row in &cells {
        out += &line(row);
    }
    out += &rule;
    out
}

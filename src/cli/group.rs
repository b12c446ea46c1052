//! `concord group ...` and `concord register ...`: the group catalog and the
//! register service (`concord.groups.v1`) from the command line.

use std::time::Duration;

use clap::{Parser, Subcommand};
use tonic::transport::Channel;

use crate::proto::groups::groups_client::GroupsClient;
use crate::proto::groups::registers_client::RegistersClient;
use crate::proto::groups::{
    CasRequest, CreateRequest, GroupSpec, ListRequest, ReadRequest, RemoveRequest, WriteRequest,
};

#[derive(Parser, Debug)]
#[command(name = "concord group", about = "Create, remove and list the cluster's Raft groups besides the etcd store's")]
struct GroupArgs {
    /// Comma-separated client endpoints; the first that answers is used.
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',', global = true)]
    endpoints: Vec<String>,
    /// Per-request timeout, in milliseconds.
    #[arg(long, default_value_t = 5000, global = true)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: GroupCommand,
}

#[derive(Subcommand, Debug)]
enum GroupCommand {
    /// Adds group ID (2 and up) running SERVICE on the given members (hex ids),
    /// or on REPLICA_COUNT members chosen by placement (default 3).
    Create {
        id: u64,
        #[arg(long, default_value = "register")]
        service: String,
        #[arg(long, value_delimiter = ',', conflicts_with = "replica_count")]
        replicas: Vec<String>,
        #[arg(long)]
        replica_count: Option<u32>,
    },
    /// Removes group ID; its replicas stop and their data is deleted.
    Rm { id: u64 },
    /// Lists the groups.
    Ls,
}

#[derive(Parser, Debug)]
#[command(name = "concord register", about = "Write, compare-and-swap and read the registers of a register group")]
struct RegisterArgs {
    /// Comma-separated client endpoints; the first that answers is used.
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',', global = true)]
    endpoints: Vec<String>,
    /// Per-request timeout, in milliseconds.
    #[arg(long, default_value_t = 5000, global = true)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: RegisterCommand,
}

#[derive(Subcommand, Debug)]
enum RegisterCommand {
    /// Sets register KEY of group GROUP to VALUE.
    Write { group: u64, key: String, value: u64 },
    /// Sets KEY to VALUE if it holds EXPECT ("none": does not exist); prints
    /// whether it did.
    Cas { group: u64, key: String, expect: String, value: u64 },
    /// Prints KEY's value (linearizable), or "none".
    Read { group: u64, key: String },
}

pub(crate) async fn connect(endpoints: &[String], timeout: Duration) -> Result<Channel, String> {
    let mut last = String::from("no endpoints given");
    for e in endpoints {
        let url = if e.contains("://") { e.clone() } else { format!("http://{e}") };
        let endpoint = Channel::from_shared(url.clone()).map_err(|err| format!("{e}: {err}"))?;
        match endpoint.connect_timeout(timeout).timeout(timeout).connect().await {
            Ok(c) => return Ok(c),
            Err(err) => last = format!("{url}: {err}"),
        }
    }
    Err(last)
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a current-thread runtime")
}

fn member_ids(hex: &[String]) -> Result<Vec<u64>, String> {
    hex.iter().map(|h| u64::from_str_radix(h, 16).map_err(|_| format!("bad member id {h:?} (hex)"))).collect()
}

fn show(spec: &GroupSpec) -> String {
    let replicas: Vec<String> = spec.replicas.iter().map(|r| format!("{r:x}")).collect();
    format!("{}, {}, {}", spec.id, spec.service, replicas.join(" "))
}

/// Runs `concord group ...`; returns the process exit code.
pub fn group_main(args: &[String]) -> i32 {
    let args = match GroupArgs::try_parse_from(std::iter::once("concord group".to_string()).chain(args.iter().cloned()))
    {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let result = runtime().block_on(async {
        let mut c = GroupsClient::new(connect(&args.endpoints, timeout).await?);
        match args.command {
            GroupCommand::Create { id, service, replicas, replica_count } => {
                if replica_count == Some(0) {
                    return Err("--replica-count must be at least 1".to_string());
                }
                let spec = GroupSpec { id, service, replicas: member_ids(&replicas)? };
                let request = CreateRequest { group: Some(spec), replica_count: replica_count.unwrap_or(0) };
                let created = c.create(request).await.map_err(|s| s.message().to_string())?;
                println!("{}", show(&created.into_inner().group.unwrap_or_default()));
            }
            GroupCommand::Rm { id } => {
                c.remove(RemoveRequest { id }).await.map_err(|s| s.message().to_string())?;
                println!("Group {id} removed");
            }
            GroupCommand::Ls => {
                let list = c.list(ListRequest {}).await.map_err(|s| s.message().to_string())?;
                for g in list.into_inner().groups {
                    println!("{}", show(&g));
                }
            }
        }
        Ok::<(), String>(())
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("Error: {e}");
            1
        }
    }
}

/// Runs `concord register ...`; returns the process exit code.
pub fn register_main(args: &[String]) -> i32 {
    let args =
        match RegisterArgs::try_parse_from(std::iter::once("concord register".to_string()).chain(args.iter().cloned()))
        {
            Ok(a) => a,
            Err(e) => e.exit(),
        };
    let timeout = Duration::from_millis(args.timeout_ms);
    let result = runtime().block_on(async {
        let mut c = RegistersClient::new(connect(&args.endpoints, timeout).await?);
        let err = |s: tonic::Status| s.message().to_string();
        match args.command {
            RegisterCommand::Write { group, key, value } => {
                c.write(WriteRequest { group, key, value }).await.map_err(err)?;
                println!("OK");
            }
            RegisterCommand::Cas { group, key, expect, value } => {
                let expect = match expect.as_str() {
                    "none" => None,
                    v => Some(v.parse::<u64>().map_err(|_| format!("bad EXPECT {v:?} (a number or none)"))?),
                };
                let r = c.cas(CasRequest { group, key, expect, value }).await.map_err(err)?;
                println!("{}", if r.into_inner().swapped { "SWAPPED" } else { "NOT SWAPPED" });
            }
            RegisterCommand::Read { group, key } => {
                let r = c.read(ReadRequest { group, key }).await.map_err(err)?;
                match r.into_inner().value {
                    Some(v) => println!("{v}"),
                    None => println!("none"),
                }
            }
        }
        Ok::<(), String>(())
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("Error: {e}");
            1
        }
    }
}

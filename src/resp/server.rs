//! The RESP server: accepts connections, decodes pipelined commands, answers the
//! connection-level commands itself and hands every other command to a [`Handler`].
//!
//! Per connection (one spawned task each):
//! - Commands run one at a time, in the order received; their replies are sent in
//!   that order. Replies accumulate while more complete commands are buffered and are
//!   written when none is left or when [`ServerConfig::max_pending_reply_bytes`] are
//!   pending, so a pipeline gets few writes and a slow reader stalls its own reads
//!   (backpressure), not the server's memory.
//! - Input is bounded: each command by [`Limits`] (a violation is a protocol error:
//!   `-ERR Protocol error: …` is sent and the connection closed, as Redis does), and
//!   the whole query buffer by [`ServerConfig::max_query_buffer_bytes`] (exceeding it
//!   closes the connection without a reply, as Redis's `client-query-buffer-limit`).
//! - While a command runs, the connection keeps reading (up to that bound), so that a
//!   client closing its connection is noticed: the running command's future is then
//!   dropped and the connection ends, as Redis frees a client on EOF even while it is
//!   blocked (e.g. in `XREAD BLOCK`). Handlers must therefore be cancel-safe.
//! - TCP_NODELAY is on: replies are written whole, so Nagle only adds latency.
//!
//! Connections beyond [`ServerConfig::max_clients`] get
//! `-ERR max number of clients reached` and are closed. Dropping (or aborting) the
//! [`serve`] future closes the listener and every connection it started.
//!
//! Handled here, with Redis 7.0.15's replies (checked against redis-server 7.0.15;
//! names case-insensitive): `PING`, `ECHO`, `QUIT`, `HELLO`, `AUTH`, `RESET`,
//! `SELECT`, `CLIENT ID|SETNAME|GETNAME|SETINFO|INFO|HELP`, and a minimal `COMMAND`
//! that describes no commands (`COMMAND`, `COMMAND DOCS`, `COMMAND INFO` answer
//! empty or null; `COMMAND COUNT` answers 0), which redis-cli and client libraries
//! accept. As in Redis, arity and unknown-subcommand errors come before the
//! authentication check, and only `AUTH`, `HELLO`, `QUIT` and `RESET` run before a
//! required authentication; everything else then gets `NOAUTH Authentication required.`

use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::codec::{parse_integer, AuthStage, CommandParser, Limits, Protocol, Reply};

/// The Redis version `HELLO` reports; the replies here are Redis 7.0.15's.
pub const REDIS_VERSION: &str = "7.0.15";

/// Default [`ServerConfig::max_clients`], Redis's `maxclients` default.
pub const DEFAULT_MAX_CLIENTS: usize = 10_000;

/// Default [`ServerConfig::max_pending_reply_bytes`].
pub const DEFAULT_MAX_PENDING_REPLY_BYTES: usize = 1024 * 1024;

/// Default [`ServerConfig::max_query_buffer_bytes`]. Redis's `client-query-buffer-limit`
/// is 1 GiB; a gateway for stream entries needs far less, and the bound is per
/// connection, so it is multiplied by the number of clients in the worst case.
pub const DEFAULT_MAX_QUERY_BUFFER_BYTES: usize = 64 * 1024 * 1024;

/// Bytes asked of the socket per read: Redis's `PROTO_IOBUF_LEN`.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Pause after a failed `accept` (e.g. out of file descriptors) so that a persistent
/// failure does not spin the accept loop.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);

const MAX_CLIENTS_REACHED: &[u8] = b"-ERR max number of clients reached\r\n";

/// `HELLO`'s reply when authentication is required and the client has not
/// authenticated (Redis 7.0's text; 7.2 writes `HELLO <proto> AUTH`).
const HELLO_NOAUTH: &str = "NOAUTH HELLO must be called with the client already authenticated, otherwise the \
     HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol \
     version at the same time";

const INVALID_CLIENT_NAME: &str = "ERR Client names cannot contain spaces, newlines or special characters.";

/// The user every connection is when no authentication is required, as in Redis.
const DEFAULT_USER: &str = "default";

/// One client connection's state, passed to the [`Handler`] with each command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Unique per [`serve`] call, from 1 (`CLIENT ID`, `HELLO`'s `id`).
    pub id: u64,
    /// The reply protocol, switched by `HELLO`; replies are encoded with it.
    pub protocol: Protocol,
    /// Set by `CLIENT SETNAME` or `HELLO … SETNAME`; never empty.
    pub name: Option<Vec<u8>>,
    /// The user `AUTH` (or `HELLO … AUTH`) authenticated; `None` before, and after
    /// `RESET`.
    pub user: Option<String>,
    /// The client's address.
    pub peer: SocketAddr,
}

impl Session {
    /// A fresh session as a new connection has it.
    pub fn new(id: u64, peer: SocketAddr) -> Self {
        Session { id, protocol: Protocol::Resp2, name: None, user: None, peer }
    }
}

/// The commands behind the server: everything that is not a connection-level command.
///
/// Futures returned here may be dropped before completion when the client
/// disconnects, so they must leave shared state consistent at every `.await`.
pub trait Handler: Send + Sync + 'static {
    /// Runs one command. `args` is never empty; `args[0]` is the name as the client
    /// sent it (any case). Not called before a required authentication. For a
    /// command it does not know, [`Reply::unknown_command`] is Redis's answer.
    fn call<'a>(&'a self, session: &'a mut Session, args: Vec<Vec<u8>>) -> BoxFuture<'a, Reply>;

    /// Whether clients must authenticate before running commands. Checked per command.
    fn auth_required(&self) -> bool;

    /// Checks a password for `AUTH` and `HELLO … AUTH`; on success the session's user
    /// becomes `user`. The error is the reply sent, usually [`Reply::wrong_pass`].
    /// When [`Handler::auth_required`] is false, user `default` is accepted with any
    /// password without calling this (Redis's passwordless default user).
    fn authenticate<'a>(&'a self, user: &'a str, password: &'a [u8]) -> BoxFuture<'a, Result<(), Reply>>;
}

/// Bounds on the server's connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Most connections served at once; more are refused with
    /// `-ERR max number of clients reached`. Default [`DEFAULT_MAX_CLIENTS`].
    pub max_clients: usize,
    /// Per-command decoding limits. Default [`Limits::default`].
    pub limits: Limits,
    /// Unsent reply bytes a connection accumulates during a pipeline before it stops
    /// executing commands to write them. Default [`DEFAULT_MAX_PENDING_REPLY_BYTES`].
    pub max_pending_reply_bytes: usize,
    /// Most bytes of received, not yet executed input kept per connection. Reading
    /// pauses at this size while a command runs; an incomplete command this large
    /// closes the connection, so no command may be longer. Default
    /// [`DEFAULT_MAX_QUERY_BUFFER_BYTES`].
    pub max_query_buffer_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_clients: DEFAULT_MAX_CLIENTS,
            limits: Limits::default(),
            max_pending_reply_bytes: DEFAULT_MAX_PENDING_REPLY_BYTES,
            max_query_buffer_bytes: DEFAULT_MAX_QUERY_BUFFER_BYTES,
        }
    }
}

/// Serves RESP on `listener` until this future is dropped, which also ends every
/// connection it accepted. See the module docs for the per-connection behaviour.
pub async fn serve(listener: TcpListener, handler: Arc<dyn Handler>, config: ServerConfig) {
    let config = Arc::new(config);
    let slots = Arc::new(Semaphore::new(config.max_clients.min(Semaphore::MAX_PERMITS)));
    // Owning the connection tasks here is what ends them when `serve` is dropped.
    let mut connections = JoinSet::new();
    let mut last_id: u64 = 0;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match Arc::clone(&slots).try_acquire_owned() {
                    Ok(slot) => {
                        last_id += 1;
                        let session = Session::new(last_id, peer);
                        connections.spawn(connection(stream, session, Arc::clone(&handler), Arc::clone(&config), slot));
                    }
                    Err(_) => refuse(stream, peer),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "RESP accept failed");
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                }
            },
            Some(finished) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = finished {
                    if e.is_panic() {
                        tracing::error!(error = %e, "RESP connection task panicked");
                    }
                }
            }
        }
    }
}

/// Refuses a connection over `max_clients` the way Redis does: one best-effort,
/// non-blocking write of the error (a fresh socket's send buffer has room), then close.
fn refuse(stream: TcpStream, peer: SocketAddr) {
    tracing::debug!(%peer, "RESP connection refused: max number of clients reached");
    // The tokio socket only writes once its readiness is known; the std one, still
    // non-blocking, writes right away.
    if let Ok(stream) = stream.into_std() {
        let _ = io::Write::write(&mut &stream, MAX_CLIENTS_REACHED);
    }
}

/// Runs one connection to its end. `_slot` is its place under `max_clients`, freed
/// when this returns.
async fn connection(
    mut stream: TcpStream,
    session: Session,
    handler: Arc<dyn Handler>,
    config: Arc<ServerConfig>,
    _slot: OwnedSemaphorePermit,
) {
    let peer = session.peer;
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "RESP: cannot set TCP_NODELAY");
    }
    if let Err(e) = run_connection(&mut stream, session, handler.as_ref(), &config).await {
        tracing::debug!(%peer, error = %e, "RESP connection ended with an error");
    }
    // Best effort: the peer may already be gone.
    let _ = stream.shutdown().await;
}

/// What the connection does after a command's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    Continue,
    Close,
}

async fn run_connection(
    stream: &mut TcpStream,
    mut session: Session,
    handler: &dyn Handler,
    config: &ServerConfig,
) -> io::Result<()> {
    let mut parser = CommandParser::new(config.limits);
    let mut input = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut output: Vec<u8> = Vec::new();
    loop {
        // Run every complete command already received, in order.
        loop {
            let stage =
                if is_authenticated(handler, &session) { AuthStage::Authenticated } else { AuthStage::Unauthenticated };
            let args = match parser.parse(&mut input, stage) {
                Ok(Some(args)) => args,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(peer = %session.peer, error = %e, "RESP protocol error");
                    Reply::Error(format!("ERR {e}")).encode(session.protocol, &mut output);
                    return stream.write_all(&output).await;
                }
            };
            if args.is_empty() {
                continue;
            }
            let outcome = {
                let mut command = pin!(execute(&mut session, handler, args));
                loop {
                    tokio::select! {
                        // A finished command wins over an EOF that arrived meanwhile.
                        biased;
                        outcome = &mut command => break Some(outcome),
                        read = read_more(stream, &mut input), if input.len() < config.max_query_buffer_bytes => {
                            if read? == 0 {
                                break None;
                            }
                        }
                    }
                }
            };
            let Some((reply, after)) = outcome else {
                // The client closed while its command ran: nobody is left to answer.
                return Ok(());
            };
            // Encoded after the command, so HELLO's reply uses the protocol it chose.
            reply.encode(session.protocol, &mut output);
            if after == After::Close {
                return stream.write_all(&output).await;
            }
            if output.len() >= config.max_pending_reply_bytes {
                stream.write_all(&output).await?;
                output.clear();
            }
        }
        if !output.is_empty() {
            stream.write_all(&output).await?;
            output.clear();
        }
        if input.len() >= config.max_query_buffer_bytes {
            tracing::warn!(
                peer = %session.peer,
                buffered_bytes = input.len(),
                "closing RESP client that reached the max query buffer length"
            );
            return Ok(());
        }
        if read_more(stream, &mut input).await? == 0 {
            return Ok(());
        }
    }
}

/// One read into `input`, growing it by up to a chunk. Cancel-safe: an unfinished
/// read leaves `input` as it was.
async fn read_more(stream: &mut TcpStream, input: &mut BytesMut) -> io::Result<usize> {
    input.reserve(READ_CHUNK_BYTES);
    stream.read_buf(input).await
}

fn is_authenticated(handler: &dyn Handler, session: &Session) -> bool {
    session.user.is_some() || !handler.auth_required()
}

/// Runs one command: a connection-level one here, anything else in the handler.
async fn execute(session: &mut Session, handler: &dyn Handler, args: Vec<Vec<u8>>) -> (Reply, After) {
    let Some(name) = args.first() else {
        return (Reply::ok(), After::Continue);
    };
    let name = name.to_ascii_uppercase();
    let reply = match name.as_slice() {
        // Allowed before authentication, as Redis's `no_auth` commands.
        b"QUIT" => return (Reply::ok(), After::Close),
        b"AUTH" => auth_command(session, handler, &args).await,
        b"HELLO" => hello_command(session, handler, &args).await,
        b"RESET" => reset_command(session, &args),
        b"PING" | b"ECHO" | b"SELECT" | b"CLIENT" | b"COMMAND" => {
            if let Err(refusal) = check_arity(&name, &args) {
                refusal
            } else if !is_authenticated(handler, session) {
                Reply::noauth()
            } else {
                connection_command(session, &name, &args)
            }
        }
        _ if !is_authenticated(handler, session) => Reply::noauth(),
        _ => handler.call(session, args).await,
    };
    (reply, After::Continue)
}

/// Redis's arity convention: `n` means exactly n arguments (the name included),
/// `-n` at least n.
fn arity_allows(arity: i32, argc: usize) -> bool {
    let required = arity.unsigned_abs() as usize;
    if arity >= 0 {
        argc == required
    } else {
        argc >= required
    }
}

/// A subcommand this server implements: its upper-case name and Redis's arity.
struct Subcommand {
    name: &'static str,
    arity: i32,
}

const CLIENT_SUBCOMMANDS: &[Subcommand] = &[
    Subcommand { name: "ID", arity: 2 },
    Subcommand { name: "SETNAME", arity: 3 },
    Subcommand { name: "GETNAME", arity: 2 },
    Subcommand { name: "SETINFO", arity: 4 },
    Subcommand { name: "INFO", arity: 2 },
    Subcommand { name: "HELP", arity: 2 },
];

const COMMAND_SUBCOMMANDS: &[Subcommand] = &[
    Subcommand { name: "COUNT", arity: 2 },
    Subcommand { name: "DOCS", arity: -2 },
    Subcommand { name: "INFO", arity: -2 },
    Subcommand { name: "LIST", arity: -2 },
    Subcommand { name: "GETKEYS", arity: -3 },
    Subcommand { name: "GETKEYSANDFLAGS", arity: -3 },
    Subcommand { name: "HELP", arity: 2 },
];

/// The checks Redis makes before authentication for the commands below: arity,
/// then for containers the subcommand's existence and arity.
fn check_arity(name: &[u8], args: &[Vec<u8>]) -> Result<(), Reply> {
    let (arity, subcommands): (i32, &[Subcommand]) = match name {
        b"PING" => (-1, &[]),
        b"ECHO" | b"SELECT" => (2, &[]),
        b"CLIENT" => (-2, CLIENT_SUBCOMMANDS),
        b"COMMAND" => (-1, COMMAND_SUBCOMMANDS),
        _ => return Ok(()),
    };
    if !arity_allows(arity, args.len()) {
        return Err(Reply::wrong_args(name));
    }
    let Some(sub) = args.get(1).filter(|_| !subcommands.is_empty()) else {
        return Ok(());
    };
    let upper = sub.to_ascii_uppercase();
    match subcommands.iter().find(|s| s.name.as_bytes() == upper.as_slice()) {
        None => Err(unknown_subcommand(name, sub)),
        Some(s) if !arity_allows(s.arity, args.len()) => {
            let full = format!("{}|{}", String::from_utf8_lossy(name), s.name);
            Err(Reply::wrong_args(full))
        }
        Some(_) => Ok(()),
    }
}

/// `ERR unknown subcommand 'x'. Try CLIENT HELP.` (at most 128 bytes of `x`).
fn unknown_subcommand(container: &[u8], sub: &[u8]) -> Reply {
    let shown = &sub[..sub.len().min(128)];
    Reply::Error(format!(
        "ERR unknown subcommand '{}'. Try {} HELP.",
        String::from_utf8_lossy(shown),
        String::from_utf8_lossy(container)
    ))
}

/// Redis's `HELP` layout: a title line, the given lines, then `HELP` itself.
fn help_reply(container: &str, lines: &[&str]) -> Reply {
    let title = format!("{container} <subcommand> [<arg> [value] [opt] ...]. Subcommands are:");
    let mut all: Vec<Reply> = vec![Reply::Simple(title)];
    all.extend(lines.iter().map(|line| Reply::Simple((*line).to_owned())));
    all.push(Reply::Simple("HELP".to_owned()));
    all.push(Reply::Simple("    Prints this help.".to_owned()));
    Reply::Array(all)
}

/// The authenticated part of PING, ECHO, SELECT, CLIENT and COMMAND, whose arity
/// `check_arity` has already checked.
fn connection_command(session: &mut Session, name: &[u8], args: &[Vec<u8>]) -> Reply {
    match name {
        b"PING" => match args.get(1) {
            None => Reply::Simple("PONG".to_owned()),
            Some(message) if args.len() == 2 => Reply::bulk(message.clone()),
            Some(_) => Reply::wrong_args("ping"),
        },
        b"ECHO" => Reply::bulk(args[1].clone()),
        b"SELECT" => match parse_integer(&args[1]).and_then(|db| i32::try_from(db).ok()) {
            None => Reply::error("ERR value is not an integer or out of range"),
            Some(0) => Reply::ok(),
            // One keyspace, database 0, as a Redis started with `databases 1`.
            Some(_) => Reply::error("ERR DB index is out of range"),
        },
        b"CLIENT" => client_command(session, args),
        b"COMMAND" => command_command(args),
        _ => Reply::unknown_command(args),
    }
}

/// Redis's rule for client names and library attributes: printable ASCII without
/// spaces, since `CLIENT LIST` separates fields with spaces and clients with newlines.
fn valid_client_attribute(value: &[u8]) -> bool {
    value.iter().all(|&b| (b'!'..=b'~').contains(&b))
}

fn client_command(session: &mut Session, args: &[Vec<u8>]) -> Reply {
    let sub = args[1].to_ascii_uppercase();
    match sub.as_slice() {
        b"ID" => Reply::Integer(i64::try_from(session.id).unwrap_or(i64::MAX)),
        b"SETNAME" => {
            let name = &args[2];
            if !valid_client_attribute(name) {
                return Reply::error(INVALID_CLIENT_NAME);
            }
            session.name = if name.is_empty() { None } else { Some(name.clone()) };
            Reply::ok()
        }
        b"GETNAME" => session.name.clone().map_or(Reply::Nil, Reply::Bulk),
        // Redis 7.2's command, accepted because client libraries send it on connect.
        // The values are validated as Redis does but not kept: nothing here shows them.
        b"SETINFO" => {
            let attribute = String::from_utf8_lossy(&args[2]);
            if !attribute.eq_ignore_ascii_case("lib-name") && !attribute.eq_ignore_ascii_case("lib-ver") {
                return Reply::Error(format!("ERR Unrecognized option '{attribute}'"));
            }
            if !valid_client_attribute(&args[3]) {
                return Reply::Error(format!("ERR {attribute} cannot contain spaces, newlines or special characters."));
            }
            Reply::ok()
        }
        // A subset of Redis's fields, in Redis's order. Redis sends this as a RESP3
        // verbatim string to RESP3 clients; a bulk string carries the same text.
        b"INFO" => {
            let name = session.name.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            let user = session.user.as_deref().unwrap_or(DEFAULT_USER);
            Reply::bulk(format!(
                "id={} addr={} name={} db=0 user={} resp={}\n",
                session.id,
                session.peer,
                name,
                user,
                session.protocol.version()
            ))
        }
        b"HELP" => help_reply(
            "CLIENT",
            &[
                "GETNAME",
                "    Return the name of the current connection.",
                "ID",
                "    Return the ID of the current connection.",
                "INFO",
                "    Return information about the current client connection.",
                "SETINFO <option> <value>",
                "    Accept client library attributes LIB-NAME and LIB-VER (not stored).",
                "SETNAME <name>",
                "    Assign the name <name> to the current connection.",
            ],
        ),
        _ => unknown_subcommand(b"CLIENT", &args[1]),
    }
}

/// A minimal `COMMAND`: this server describes no commands, which is true of its
/// command table (there is none) and accepted by redis-cli and client libraries.
fn command_command(args: &[Vec<u8>]) -> Reply {
    let Some(sub) = args.get(1) else {
        return Reply::Array(Vec::new());
    };
    match sub.to_ascii_uppercase().as_slice() {
        b"COUNT" => Reply::Integer(0),
        // A map of name to docs: `%0` in RESP3, `*0` in RESP2, as Redis sends it.
        b"DOCS" => Reply::Map(Vec::new()),
        // One null per name asked about, Redis's answer for a command it lacks.
        b"INFO" => Reply::Array(args.iter().skip(2).map(|_| Reply::Nil).collect()),
        b"LIST" => {
            let filter = args.get(2).map(|word| word.eq_ignore_ascii_case(b"FILTERBY"));
            let kind = args.get(3).map(|word| word.to_ascii_uppercase());
            match (filter, kind.as_deref(), args.len()) {
                (None, _, _) => Reply::Array(Vec::new()),
                (Some(true), Some(b"MODULE" | b"ACLCAT" | b"PATTERN"), 5) => Reply::Array(Vec::new()),
                _ => Reply::syntax(),
            }
        }
        b"GETKEYS" | b"GETKEYSANDFLAGS" => Reply::error("ERR Invalid command specified"),
        b"HELP" => help_reply(
            "COMMAND",
            &[
                "(no subcommand)",
                "    Return details about all commands (none are described here).",
                "COUNT",
                "    Return the number of commands described (0).",
                "DOCS [<command-name> ...]",
                "    Return documentation for commands (none).",
                "INFO [<command-name> ...]",
                "    Return details about commands (null for each).",
                "LIST [FILTERBY (MODULE <module-name>|ACLCAT <category>|PATTERN <pattern>)]",
                "    Return the names of commands (none).",
            ],
        ),
        _ => unknown_subcommand(b"COMMAND", sub),
    }
}

/// Authenticates `user` for AUTH and HELLO. Redis's passwordless `default` user is
/// accepted when no authentication is required; a user name that is not UTF-8
/// matches no user.
async fn authenticate(session: &mut Session, handler: &dyn Handler, user: &[u8], password: &[u8]) -> Result<(), Reply> {
    let Ok(user) = std::str::from_utf8(user) else {
        return Err(Reply::wrong_pass());
    };
    let passwordless_default = user == DEFAULT_USER && !handler.auth_required();
    if !passwordless_default {
        handler.authenticate(user, password).await?;
    }
    session.user = Some(user.to_owned());
    Ok(())
}

/// `AUTH [user] password` (Redis 7.0's `authCommand`).
async fn auth_command(session: &mut Session, handler: &dyn Handler, args: &[Vec<u8>]) -> Reply {
    let (user, password) = match args {
        [_] => return Reply::wrong_args("auth"),
        [_, password] => {
            if !handler.auth_required() {
                return Reply::error(
                    "ERR AUTH <password> called without any password configured for the default user. \
                     Are you sure your configuration is correct?",
                );
            }
            (DEFAULT_USER.as_bytes(), password)
        }
        [_, user, password] => (user.as_slice(), password),
        _ => return Reply::syntax(),
    };
    match authenticate(session, handler, user, password).await {
        Ok(()) => Reply::ok(),
        Err(refusal) => refusal,
    }
}

/// `HELLO [protover [AUTH user pass] [SETNAME name]]` as Redis 7.0.15 runs it: the
/// version is checked first, then the options are applied one by one as they are
/// read, so an AUTH or SETNAME takes effect even if a later option is refused or the
/// client turns out not to be authenticated (Redis 7.2 defers SETNAME; 7.0 does not).
/// Only the protocol switch waits until everything has passed.
async fn hello_command(session: &mut Session, handler: &dyn Handler, args: &[Vec<u8>]) -> Reply {
    let mut protocol = None;
    if let Some(version) = args.get(1) {
        protocol = match parse_integer(version) {
            None => return Reply::error("ERR Protocol version is not an integer or out of range"),
            Some(2) => Some(Protocol::Resp2),
            Some(3) => Some(Protocol::Resp3),
            Some(_) => return Reply::error("NOPROTO unsupported protocol version"),
        };
    }
    let mut i = 2;
    while let Some(option) = args.get(i) {
        let more = args.len() - i - 1;
        if option.eq_ignore_ascii_case(b"AUTH") && more >= 2 {
            if let Err(refusal) = authenticate(session, handler, &args[i + 1], &args[i + 2]).await {
                return refusal;
            }
            i += 3;
        } else if option.eq_ignore_ascii_case(b"SETNAME") && more >= 1 {
            let candidate = &args[i + 1];
            if !valid_client_attribute(candidate) {
                return Reply::error(INVALID_CLIENT_NAME);
            }
            session.name = if candidate.is_empty() { None } else { Some(candidate.clone()) };
            i += 2;
        } else {
            return Reply::Error(format!("ERR Syntax error in HELLO option '{}'", String::from_utf8_lossy(option)));
        }
    }
    if !is_authenticated(handler, session) {
        return Reply::error(HELLO_NOAUTH);
    }
    if let Some(protocol) = protocol {
        session.protocol = protocol;
    }
    let field = |key: &str, value: Reply| (Reply::bulk(key), value);
    Reply::Map(vec![
        field("server", Reply::bulk("redis")),
        field("version", Reply::bulk(REDIS_VERSION)),
        field("proto", Reply::Integer(session.protocol.version())),
        field("id", Reply::Integer(i64::try_from(session.id).unwrap_or(i64::MAX))),
        field("mode", Reply::bulk("standalone")),
        field("role", Reply::bulk("master")),
        field("modules", Reply::Array(Vec::new())),
    ])
}

/// `RESET`: back to a new connection's state (RESP2, no name, not authenticated)
/// but with the same id, as Redis does.
fn reset_command(session: &mut Session, args: &[Vec<u8>]) -> Reply {
    if args.len() != 1 {
        return Reply::wrong_args("reset");
    }
    session.protocol = Protocol::Resp2;
    session.name = None;
    session.user = None;
    Reply::Simple("RESET".to_owned())
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::task::JoinHandle;
    use tokio::time::timeout;

    use super::*;

    /// Every test ends within this, pass or fail.
    const TEST_TIMEOUT: Duration = Duration::from_secs(20);

    async fn bounded<F: Future>(test: F) -> F::Output {
        timeout(TEST_TIMEOUT, test).await.expect("test timed out")
    }

    /// A toy handler: `ARGC ...` answers its argument count, `BIG n` a bulk of n
    /// bytes, `BLOCK` never answers (and records being dropped), the rest is unknown.
    /// It requires the password "pw" for user `default` when `password` is set.
    #[derive(Default)]
    struct Toy {
        password: bool,
        block_dropped: Arc<AtomicBool>,
    }

    struct SetOnDrop(Arc<AtomicBool>);

    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl Handler for Toy {
        fn call<'a>(&'a self, _session: &'a mut Session, args: Vec<Vec<u8>>) -> BoxFuture<'a, Reply> {
            Box::pin(async move {
                match args[0].to_ascii_uppercase().as_slice() {
                    b"ARGC" => Reply::Integer(args.len() as i64),
                    b"BIG" => {
                        let n: usize = String::from_utf8_lossy(&args[1]).parse().unwrap();
                        Reply::bulk(vec![b'x'; n])
                    }
                    b"BLOCK" => {
                        let _guard = SetOnDrop(Arc::clone(&self.block_dropped));
                        futures::future::pending::<Reply>().await
                    }
                    _ => Reply::unknown_command(&args),
                }
            })
        }

        fn auth_required(&self) -> bool {
            self.password
        }

        fn authenticate<'a>(&'a self, user: &'a str, password: &'a [u8]) -> BoxFuture<'a, Result<(), Reply>> {
            Box::pin(async move {
                if self.password && user == "default" && password == b"pw" {
                    Ok(())
                } else {
                    Err(Reply::wrong_pass())
                }
            })
        }
    }

    /// A running server, aborted when dropped.
    struct Running {
        addr: SocketAddr,
        task: JoinHandle<()>,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn start(handler: Toy, config: ServerConfig) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(serve(listener, Arc::new(handler), config));
        Running { addr, task }
    }

    fn command(args: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        Reply::Array(args.iter().map(|a| Reply::bulk(*a)).collect()).encode(Protocol::Resp2, &mut out);
        out
    }

    /// Sends `request` and expects exactly `reply` back.
    async fn exchange(stream: &mut TcpStream, request: &[u8], reply: &[u8]) {
        stream.write_all(request).await.unwrap();
        expect(stream, reply).await;
    }

    async fn expect(stream: &mut TcpStream, reply: &[u8]) {
        let mut got = vec![0u8; reply.len()];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(reply));
    }

    async fn expect_closed(stream: &mut TcpStream) {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte).await {
            Ok(0) | Err(_) => {}
            Ok(_) => panic!("expected the connection to be closed, got {:?}", byte[0] as char),
        }
    }

    fn hello_map(protocol: Protocol, id: u64) -> Vec<u8> {
        let head = match protocol {
            Protocol::Resp2 => "*14".to_owned(),
            Protocol::Resp3 => "%7".to_owned(),
        };
        format!(
            "{head}\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n7.0.15\r\n$5\r\nproto\r\n:{}\r\n\
             $2\r\nid\r\n:{id}\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n\
             $7\r\nmodules\r\n*0\r\n",
            protocol.version()
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn answers_pipelined_commands_in_order() {
        bounded(async {
            let server = start(Toy::default(), ServerConfig::default()).await;
            let mut c = TcpStream::connect(server.addr).await.unwrap();
            let mut pipeline = b"PING\r\nping\r\n".to_vec();
            pipeline.extend(command(&["PING", "hi"]));
            pipeline.extend(b"*0\r\n\r\n");
            pipeline.extend(command(&["ARGC", "a", "b"]));
            pipeline.extend(command(&["ECHO", "x y"]));
            pipeline.extend(command(&["PING", "a", "b"]));
            pipeline.extend(command(&["nosuch", "arg"]));
            pipeline.extend(b"echo \"quoted\\tword\"\r\n");
            exchange(
                &mut c,
                &pipeline,
                b"+PONG\r\n+PONG\r\n$2\r\nhi\r\n:3\r\n$3\r\nx y\r\n\
                  -ERR wrong number of arguments for 'ping' command\r\n\
                  -ERR unknown command 'nosuch', with args beginning with: 'arg' \r\n\
                  $11\r\nquoted\tword\r\n",
            )
            .await;
            // QUIT answers and closes, leaving the rest of the pipeline unrun.
            let mut quit = command(&["QUIT"]);
            quit.extend(command(&["PING"]));
            exchange(&mut c, &quit, b"+OK\r\n").await;
            expect_closed(&mut c).await;
        })
        .await;
    }

    #[tokio::test]
    async fn flushes_large_pipelines_in_bounded_pieces() {
        bounded(async {
            let config = ServerConfig { max_pending_reply_bytes: 1000, ..ServerConfig::default() };
            let server = start(Toy::default(), config).await;
            let mut c = TcpStream::connect(server.addr).await.unwrap();
            let mut pipeline = Vec::new();
            let mut replies = Vec::new();
            for _ in 0..200 {
                pipeline.extend(command(&["BIG", "700"]));
                replies.extend(b"$700\r\n");
                replies.extend([b'x'; 700]);
                replies.extend(b"\r\n");
            }
            // Written concurrently: the server's replies would otherwise fill the
            // socket buffers while the test is still writing.
            let (mut rd, mut wr) = c.split();
            let write = async { wr.write_all(&pipeline).await.unwrap() };
            let read = async {
                let mut got = vec![0u8; replies.len()];
                rd.read_exact(&mut got).await.unwrap();
                got
            };
            let ((), got) = tokio::join!(write, read);
            assert!(got == replies, "replies differ");
            exchange(&mut c, b"PING\r\n", b"+PONG\r\n").await;
        })
        .await;
    }

    #[tokio::test]
    async fn hello_3_switches_to_resp3() {
        bounded(async {
            let server = start(Toy::default(), ServerConfig::default()).await;
            let mut c = TcpStream::connect(server.addr).await.unwrap();
            exchange(&mut c, &command(&["CLIENT", "ID"]), b":1\r\n").await;
            exchange(&mut c, &command(&["HELLO"]), &hello_map(Protocol::Resp2, 1)).await;
            exchange(&mut c, &command(&["CLIENT", "GETNAME"]), b"$-1\r\n").await;
            exchange(&mut c, &command(&["hello", "3"]), &hello_map(Protocol::Resp3, 1)).await;
            exchange(&mut c, &command(&["CLIENT", "GETNAME"]), b"_\r\n").await;
            exchange(&mut c, &command(&["COMMAND", "DOCS"]), b"%0\r\n").await;
            exchange(&mut c, &command(&["COMMAND", "INFO", "get"]), b"*1\r\n_\r\n").await;
            exchange(&mut c, &command(&["HELLO", "4"]), b"-NOPROTO unsupported protocol version\r\n").await;
            exchange(&mut c, &command(&["HELLO", "x"]), b"-ERR Protocol version is not an integer or out of range\r\n")
                .await;
            exchange(&mut c, &command(&["HELLO", "3", "FOO"]), b"-ERR Syntax error in HELLO option 'FOO'\r\n").await;
            // Redis 7.0.15 applies SETNAME as it reads it, even when a later option fails.
            let mut partly = command(&["HELLO", "3", "SETNAME", "early", "FOO"]);
            partly.extend(command(&["CLIENT", "GETNAME"]));
            exchange(&mut c, &partly, b"-ERR Syntax error in HELLO option 'FOO'\r\n$5\r\nearly\r\n").await;
            let mut named = command(&["HELLO", "2", "SETNAME", "worker"]);
            named.extend(command(&["CLIENT", "GETNAME"]));
            let mut want = hello_map(Protocol::Resp2, 1);
            want.extend(b"$6\r\nworker\r\n");
            exchange(&mut c, &named, &want).await;
            exchange(&mut c, &command(&["CLIENT", "SETNAME", "a b"]), format!("-{INVALID_CLIENT_NAME}\r\n").as_bytes())
                .await;
            exchange(&mut c, &command(&["CLIENT", "SETINFO", "lib-name", "redis-py"]), b"+OK\r\n").await;
            exchange(&mut c, &command(&["CLIENT", "SETINFO", "FOO", "1"]), b"-ERR Unrecognized option 'FOO'\r\n").await;
            exchange(&mut c, &command(&["SELECT", "0"]), b"+OK\r\n").await;
            exchange(&mut c, &command(&["SELECT", "1"]), b"-ERR DB index is out of range\r\n").await;
            exchange(&mut c, &command(&["CLIENT", "FOO"]), b"-ERR unknown subcommand 'FOO'. Try CLIENT HELP.\r\n")
                .await;
            exchange(
                &mut c,
                &command(&["CLIENT", "ID", "x"]),
                b"-ERR wrong number of arguments for 'client|id' command\r\n",
            )
            .await;
            exchange(&mut c, &command(&["COMMAND"]), b"*0\r\n").await;
            exchange(
                &mut c,
                &command(&["AUTH", "pw"]),
                b"-ERR AUTH <password> called without any password configured for the default user. \
                  Are you sure your configuration is correct?\r\n",
            )
            .await;
            // RESET returns to RESP2 and forgets the name, keeping the id.
            let mut reset = command(&["HELLO", "3"]);
            reset.extend(command(&["RESET"]));
            reset.extend(command(&["CLIENT", "GETNAME"]));
            reset.extend(command(&["CLIENT", "ID"]));
            let mut want = hello_map(Protocol::Resp3, 1);
            want.extend(b"+RESET\r\n$-1\r\n:1\r\n");
            exchange(&mut c, &reset, &want).await;
        })
        .await;
    }

    #[tokio::test]
    async fn protocol_error_is_reported_then_the_connection_closed() {
        bounded(async {
            let server = start(Toy::default(), ServerConfig::default()).await;
            let mut c = TcpStream::connect(server.addr).await.unwrap();
            // Commands before the error are answered first.
            exchange(&mut c, b"PING\r\n*1\r\n$x\r\n", b"+PONG\r\n-ERR Protocol error: invalid bulk length\r\n").await;
            expect_closed(&mut c).await;

            let mut c = TcpStream::connect(server.addr).await.unwrap();
            exchange(
                &mut c,
                b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\nfooz\r\n",
                b"-ERR Protocol error: expected '$', got 'f'\r\n",
            )
            .await;
            expect_closed(&mut c).await;

            let mut c = TcpStream::connect(server.addr).await.unwrap();
            exchange(&mut c, b"SET a \"b\r\n", b"-ERR Protocol error: unbalanced quotes in request\r\n").await;
            expect_closed(&mut c).await;
        })
        .await;
    }

    #[tokio::test]
    async fn query_buffer_bound_closes_the_connection() {
        bounded(async {
            let config = ServerConfig { max_query_buffer_bytes: 4096, ..ServerConfig::default() };
            let server = start(Toy::default(), config).await;
            let mut c = TcpStream::connect(server.addr).await.unwrap();
            // A command that would need more than 4 KiB of buffer: each element is
            // within the limits, the whole is not.
            let mut big = b"*100\r\n".to_vec();
            for _ in 0..99 {
                big.extend(b"$100\r\n");
                big.extend([b'v'; 100]);
                big.extend(b"\r\n");
            }
            // The server may close while this is still being written.
            let _ = c.write_all(&big).await;
            expect_closed(&mut c).await;
        })
        .await;
    }

    #[tokio::test]
    async fn max_clients_refuses_extra_connections() {
        bounded(async {
            let config = ServerConfig { max_clients: 1, ..ServerConfig::default() };
            let server = start(Toy::default(), config).await;
            let mut first = TcpStream::connect(server.addr).await.unwrap();
            exchange(&mut first, b"PING\r\n", b"+PONG\r\n").await;

            let mut second = TcpStream::connect(server.addr).await.unwrap();
            expect(&mut second, b"-ERR max number of clients reached\r\n").await;
            expect_closed(&mut second).await;

            // Once the first leaves, its slot is free again (after its task ends).
            drop(first);
            loop {
                let mut next = TcpStream::connect(server.addr).await.unwrap();
                next.write_all(b"PING\r\n").await.unwrap();
                let mut got = [0u8; 7];
                if next.read_exact(&mut got).await.is_ok() && &got == b"+PONG\r\n" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    #[tokio::test]
    async fn noauth_until_authenticated() {
        bounded(async {
            let server = start(Toy { password: true, ..Toy::default() }, ServerConfig::default()).await;
            let mut c = TcpStream::connect(server.addr).await.unwrap();
            let noauth = b"-NOAUTH Authentication required.\r\n";
            exchange(&mut c, &command(&["PING"]), noauth).await;
            exchange(&mut c, &command(&["ARGC", "a"]), noauth).await;
            exchange(&mut c, &command(&["client", "id"]), noauth).await;
            exchange(&mut c, &command(&["COMMAND", "DOCS"]), noauth).await;
            // Arity errors come first, as in Redis.
            exchange(&mut c, &command(&["ECHO"]), b"-ERR wrong number of arguments for 'echo' command\r\n").await;
            exchange(&mut c, &command(&["HELLO", "3"]), format!("-{HELLO_NOAUTH}\r\n").as_bytes()).await;
            exchange(&mut c, &command(&["HELLO", "4"]), b"-NOPROTO unsupported protocol version\r\n").await;
            let wrongpass = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
            exchange(&mut c, &command(&["AUTH", "nope"]), wrongpass).await;
            exchange(&mut c, &command(&["AUTH", "bob", "pw"]), wrongpass).await;
            exchange(&mut c, &command(&["HELLO", "3", "AUTH", "default", "nope"]), wrongpass).await;
            exchange(&mut c, &command(&["AUTH", "a", "b", "c"]), b"-ERR syntax error\r\n").await;
            exchange(&mut c, &command(&["AUTH", "pw"]), b"+OK\r\n").await;
            exchange(&mut c, &command(&["ARGC", "a"]), b":2\r\n").await;
            let info = format!("id=1 addr={} name= db=0 user=default resp=2\n", c.local_addr().unwrap());
            exchange(&mut c, &command(&["CLIENT", "INFO"]), format!("${}\r\n{info}\r\n", info.len()).as_bytes()).await;
            // RESET logs out.
            exchange(&mut c, &command(&["RESET"]), b"+RESET\r\n").await;
            exchange(&mut c, &command(&["PING"]), noauth).await;
            // HELLO can authenticate, name and switch protocol at once.
            let mut hello = command(&["HELLO", "3", "AUTH", "default", "pw", "SETNAME", "n"]);
            hello.extend(command(&["CLIENT", "GETNAME"]));
            let mut want = hello_map(Protocol::Resp3, 1);
            want.extend(b"$1\r\nn\r\n");
            exchange(&mut c, &hello, &want).await;

            // Before authentication Redis's tighter request limits apply.
            let mut c = TcpStream::connect(server.addr).await.unwrap();
            exchange(&mut c, b"*11\r\n", b"-ERR Protocol error: unauthenticated multibulk length\r\n").await;
            expect_closed(&mut c).await;
            let mut c = TcpStream::connect(server.addr).await.unwrap();
            exchange(&mut c, &command(&["QUIT"]), b"+OK\r\n").await;
            expect_closed(&mut c).await;
        })
        .await;
    }

    #[tokio::test]
    async fn client_disconnect_drops_a_running_command() {
        bounded(async {
            let toy = Toy::default();
            let dropped = Arc::clone(&toy.block_dropped);
            let server = start(toy, ServerConfig::default()).await;
            let mut c = TcpStream::connect(server.addr).await.unwrap();
            exchange(&mut c, b"PING\r\n", b"+PONG\r\n").await;
            c.write_all(&command(&["BLOCK"])).await.unwrap();
            // Give the server time to start the command, then leave.
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(c);
            while !dropped.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    #[tokio::test]
    async fn dropping_serve_closes_its_connections() {
        bounded(async {
            let server = start(Toy::default(), ServerConfig::default()).await;
            let mut c = TcpStream::connect(server.addr).await.unwrap();
            exchange(&mut c, b"PING\r\n", b"+PONG\r\n").await;
            drop(server);
            expect_closed(&mut c).await;
        })
        .await;
    }
}

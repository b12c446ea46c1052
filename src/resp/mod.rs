//! A Redis protocol (RESP) layer, server side, for concord's Redis Streams gateway.
//!
//! What this layer guarantees to the gateway built on it:
//! - **Replies in both protocols.** A [`Reply`] is encoded for the connection's
//!   [`Protocol`]: RESP2 until the client sends `HELLO 3`, RESP3 after. Nulls, null
//!   arrays and maps take each protocol's form (`$-1` / `*-1` / flat array in RESP2,
//!   `_` / `%` in RESP3). Error and status texts can never break the framing: a `\r`
//!   or `\n` in them is sent as a space, as Redis does.
//! - **Redis 7's request handling.** Multibulk and inline commands (with Redis's
//!   quoting rules) are decoded as redis-server 7.0 decodes them, and a malformed
//!   request gets Redis 7's exact message (`-ERR Protocol error: …`) before the
//!   connection is closed. Connection-level commands (`PING`, `ECHO`, `QUIT`,
//!   `HELLO`, `AUTH`, `RESET`, `SELECT`, `CLIENT …`, a minimal `COMMAND`) are
//!   answered here with Redis 7.0.15's replies and errors, and `NOAUTH` keeps every
//!   other command from running before a required authentication.
//! - **Bounded resources.** Each command is bounded by [`Limits`] (argument count,
//!   argument size, inline line size; tighter, as in Redis, before authentication),
//!   each connection's unread input and unsent replies by [`ServerConfig`], and the
//!   number of connections by [`ServerConfig::max_clients`]. No client-supplied
//!   length is trusted for allocation before its bytes have arrived.
//! - **Pipelining.** Commands run strictly in order, one at a time per connection;
//!   replies come back in the same order, batched into few writes.
//!
//! [`codec`] is the wire format alone (no I/O); [`server`] runs connections over TCP
//! and calls a [`Handler`] for every command it does not answer itself.

pub mod codec;
pub mod server;

pub use codec::{parse_command, AuthStage, CommandParser, Limits, Protocol, ProtocolError, Reply};
pub use server::{serve, Handler, ServerConfig, Session};

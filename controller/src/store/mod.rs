//! The durable store behind a trait: SQLite (WAL, synchronous=FULL) by default, PostgreSQL
//! for several controllers (one leader, hot standbys). The fleet's changes are written in one
//! transaction per batch, before anything is published.
//!
//! Leadership lives in the store too: a store several controllers share ([`PgStore`]) keeps a
//! lease row with a monotonic epoch, and every write checks that epoch (a fencing token), so a
//! controller that lost the lease cannot write, and so cannot publish, anything.

mod postgres;
pub mod rows;
mod sqlite;
mod worker;

use std::path::PathBuf;

use crate::fleet::Changes;
pub use crate::fleet::Snapshot;
pub use postgres::{LEASE_TTL, PgConfig, PgStore, RENEW_EVERY, migrate};
pub use sqlite::{CHECKPOINT_EVERY, DB_FILE, SqliteStore};
pub use worker::{Gone, StoreWorker, Worker};

/// The schema version this build writes (2: the fleet's identity and tombstones; 3: node
/// labels set on the controller; 4: how a power change is carried out; 5: adopted instances,
/// removed nodes and capacity ceilings; 6: the agent install bound to each node).
pub const SCHEMA_VERSION: i64 = 6;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed.
    #[error("postgres: {0}")]
    Postgres(String),
    /// The store's thread is gone.
    #[error("store thread: {0}")]
    Thread(String),
    /// The data directory or database file cannot be created or secured.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A stored row does not decode.
    #[error("corrupt row in {table}: {what}")]
    Corrupt {
        /// Table.
        table: &'static str,
        /// What is wrong.
        what: String,
    },
    /// The database was written by a newer Outpost.
    #[error("store schema {0} is newer than this build ({SCHEMA_VERSION})")]
    Schema(i64),
    /// Another controller holds the lease now: this one may not write.
    #[error("fenced: this controller's lease (epoch {ours}) was taken over (epoch {current})")]
    Fenced {
        /// The epoch this controller led in.
        ours: u64,
        /// The store's epoch now.
        current: u64,
    },
    /// The store did not answer in time.
    #[error("the store did not answer within {0:?}")]
    Timeout(std::time::Duration),
}

impl From<::postgres::Error> for StoreError {
    fn from(e: ::postgres::Error) -> Self {
        Self::Postgres(pg_message(&e))
    }
}

/// A PostgreSQL error in words: the server's message with its code (not only "db error"), or
/// the client's with its causes ("error performing TLS handshake: invalid peer certificate…").
pub fn pg_message(e: &::postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut msg = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                msg.push_str(": ");
                msg.push_str(&c.to_string());
                cause = c.source();
            }
            msg
        }
    }
}

impl From<Gone> for StoreError {
    fn from(e: Gone) -> Self {
        Self::Thread(e.to_string())
    }
}

/// Who asks to lead: a name unique among the controllers sharing a store, and the API address
/// the others point clients at while it leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// This controller's name (`--name`, default the host name).
    pub name: String,
    /// Its API's URL as clients reach it.
    pub api: String,
    /// Whether it has its MQTT broker: a leader that has lost it (past
    /// [`BROKER_GRACE`](crate::service::BROKER_GRACE)) gives the lease to a standby that has it.
    pub broker: bool,
}

/// Whether this controller leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lead {
    /// It leads; every write carries `epoch`.
    Leader {
        /// The lease's epoch: grows with every change of leader.
        epoch: u64,
    },
    /// Another controller leads (or nobody, while a dead leader's lease runs out).
    Standby {
        /// The leader's name and API URL, if a live lease names one.
        leader: Option<(String, String)>,
    },
}

/// A durable store of the fleet.
pub trait Store: Send {
    /// Everything stored.
    fn load(&mut self) -> Result<Snapshot, StoreError>;
    /// Stores a batch of changes atomically (refused with [`StoreError::Fenced`] once another
    /// controller leads).
    fn apply(&mut self, changes: &Changes) -> Result<(), StoreError>;
    /// Checks that the store can be written (after a failure, before taking changes again).
    fn check_writable(&mut self) -> Result<(), StoreError>;
    /// Takes or renews the lease. A store only one controller uses always leads, in epoch 0.
    fn lead(&mut self, _me: &Candidate) -> Result<Lead, StoreError> {
        Ok(Lead::Leader { epoch: 0 })
    }
    /// Gives the lease up (a clean shutdown), so that a standby takes over at once.
    fn resign(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Where the fleet is stored.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    /// `DATA_DIR/outpost.db`.
    Sqlite,
    /// A PostgreSQL database shared by every controller of the fleet.
    Postgres(PgConfig),
}

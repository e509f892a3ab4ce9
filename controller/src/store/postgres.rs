//! The PostgreSQL store: one database shared by every controller of a fleet, one of them the
//! leader. The schema is created and migrated by the controller (numbered migrations, applied
//! under a transaction-scoped advisory lock so that two controllers starting together do not
//! race). Leadership is a lease row with a monotonic epoch, kept by PostgreSQL's clock:
//!
//! - a controller takes the lease when it has expired, when its holder's session is gone from
//!   `pg_stat_activity` (a killed leader), or when it names this controller (a restart), and
//!   the epoch grows by one;
//! - the leader renews it every [`RENEW_EVERY`]; it expires [`LEASE_TTL`] after the last renewal;
//!   each renewal says whether the leader still has its MQTT broker, and a standby that has
//!   it takes the lease from a leader that has not (a leader cut from its nodes stands down);
//! - every write goes through `outpost_fence(epoch)` (migration 3), which reads the lease row
//!   `FOR SHARE` and fails the write unless the epoch is still this controller's
//!   ([`StoreError::Fenced`]), so a stale leader cannot write, and the takeover waits for a
//!   write already under way.
//!
//! The lease is a row, not a session advisory lock, so it works through connection poolers.

use std::str::FromStr as _;
use std::time::Duration;

use bytes::BytesMut;
use outpost_protocol::FleetId;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use std::collections::HashMap;

use postgres::{Client, Row, Statement};

use super::rows::{
    Cols, EVENT_COLS, IMAGE_COLS, INSTANCE_COLS, NODE_COLS, Reader, Val, corrupt, event_row,
    image_row, instance_row, node_row, snapshot,
};
use super::{Candidate, Lead, Snapshot, Store, StoreError};
use crate::fleet::Changes;
use crate::fleet::events::MAX_EVENTS;

/// How long a lease lasts after its last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(4);
/// How often the leader renews it.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

/// The schema, as numbered migrations: a database at version N gets N+1.. applied in order.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
     CREATE TABLE nodes (
        id TEXT PRIMARY KEY, inventory BYTEA, session BIGINT NOT NULL, cordoned BOOLEAN NOT NULL,
        draining BOOLEAN NOT NULL, generation BIGINT NOT NULL,
        reported_generation BIGINT NOT NULL, last_seen_ms BIGINT NOT NULL,
        failures TEXT NOT NULL, labels TEXT NOT NULL);
     CREATE TABLE instances (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, spec BYTEA NOT NULL,
        selector TEXT NOT NULL, grp TEXT, power BOOLEAN NOT NULL, reboot_count BIGINT NOT NULL,
        phase TEXT NOT NULL, node TEXT, failures TEXT NOT NULL, reason TEXT NOT NULL,
        created_ms BIGINT NOT NULL, power_force BOOLEAN NOT NULL, power_grace BIGINT NOT NULL,
        placement TEXT NOT NULL);
     CREATE TABLE groups (name TEXT PRIMARY KEY, policy TEXT NOT NULL);
     CREATE TABLE tombstones (id TEXT PRIMARY KEY);
     CREATE TABLE images (
        name TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL, size BIGINT NOT NULL,
        arch TEXT, format TEXT NOT NULL, url TEXT, created_ms BIGINT NOT NULL,
        PRIMARY KEY (name, version));
     CREATE TABLE secrets (name TEXT PRIMARY KEY, value BYTEA NOT NULL);
     CREATE TABLE events (
        seq BIGINT PRIMARY KEY, at_ms BIGINT NOT NULL, instance TEXT, name TEXT, node TEXT,
        kind TEXT NOT NULL, detail TEXT NOT NULL, actor TEXT NOT NULL);
     CREATE TABLE lease (
        id INTEGER PRIMARY KEY CHECK (id = 1), epoch BIGINT NOT NULL, holder TEXT NOT NULL,
        api TEXT NOT NULL, backend INTEGER NOT NULL, expires TIMESTAMPTZ NOT NULL);
     INSERT INTO lease VALUES (1, 0, '', '', 0, 'epoch');",
    ),
    (
        2,
        "CREATE TABLE tokens (
            name TEXT PRIMARY KEY, role TEXT NOT NULL, hash BYTEA NOT NULL UNIQUE,
            created_ms BIGINT NOT NULL, expires_ms BIGINT, revoked_ms BIGINT);",
    ),
    (
        3,
        // The fence as a function, so that a whole batch can be one statement: it takes the
        // lease row FOR SHARE (a takeover waits for the statement) and fails the statement,
        // and so everything it writes, unless the epoch is still the writer's.
        "CREATE FUNCTION outpost_fence(ours BIGINT) RETURNS BIGINT LANGUAGE plpgsql AS $$
         DECLARE current BIGINT;
         BEGIN
           SELECT epoch INTO current FROM lease WHERE id = 1 FOR SHARE;
           IF current IS DISTINCT FROM ours THEN
             RAISE EXCEPTION 'fenced: epoch % leads, not %', current, ours USING ERRCODE = 'OPFEN';
           END IF;
           RETURN current;
         END $$;",
    ),
    (
        4,
        "ALTER TABLE instances ADD COLUMN adopted BOOLEAN NOT NULL DEFAULT FALSE;
         ALTER TABLE nodes ADD COLUMN ceiling TEXT NOT NULL DEFAULT '';
         CREATE TABLE removed_nodes (id TEXT PRIMARY KEY);",
    ),
    (
        5,
        "ALTER TABLE nodes ADD COLUMN boot TEXT NOT NULL DEFAULT '';",
    ),
    (
        6,
        // The leader says at each renewal whether it still has its broker: a standby that has
        // it takes the lease from one that does not.
        "ALTER TABLE lease ADD COLUMN blind BOOLEAN NOT NULL DEFAULT FALSE;",
    ),
];

/// The SQLSTATE `outpost_fence` fails with.
const FENCED: &str = "OPFEN";

/// Where the database is and how to log in.
#[derive(Clone)]
pub struct PgConfig {
    /// `postgres://USER@HOST:PORT/DB?sslmode=…` (no password in it).
    pub url: String,
    /// The password (from a file or the environment, never the command line).
    pub password: Option<String>,
    /// CA certificates (PEM) the server's certificate must chain to; none: the system's.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "…"))
            .finish_non_exhaustive()
    }
}

impl PgConfig {
    /// Checks the URL: it parses, and carries no password (that belongs in a file).
    pub fn check(&self) -> Result<(), String> {
        let c = postgres::Config::from_str(&self.url)
            .map_err(|e| format!("--store {}: {e}", self.url))?;
        if c.get_password().is_some() {
            return Err(
                "--store: the URL holds a password; put it in --store-password-file (or OUTPOST_STORE_PASSWORD) so that it is not on a command line".into(),
            );
        }
        Ok(())
    }

    /// A connection (as controller `name`, in `application_name`); see [`migrate`] for the
    /// schema.
    pub fn connect(&self, name: &str) -> Result<Client, StoreError> {
        let mut c = postgres::Config::from_str(&self.url)
            .map_err(|e| StoreError::Postgres(format!("{}: {e}", self.url)))?;
        if let Some(p) = &self.password {
            c.password(p);
        }
        // A dead link is noticed in seconds, not the kernel's two hours; a transaction left
        // open by a vanished controller gives its locks back within the lease; a takeover
        // never waits long on a lock.
        c.application_name(&format!("outpost-controller/{name}"))
            .connect_timeout(Duration::from_secs(5))
            .tcp_user_timeout(Duration::from_secs(5))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3)
            .options(
                "-c idle_in_transaction_session_timeout=5000 -c lock_timeout=2000 -c statement_timeout=60000",
            );
        let client = match c.get_ssl_mode() {
            postgres::config::SslMode::Disable => c.connect(postgres::NoTls),
            _ => c.connect(tls_connector(self.ca_pem.as_deref())?),
        };
        // Which database could not be reached, with why.
        client.map_err(|e| StoreError::Postgres(format!("{}: {}", self.url, super::pg_message(&e))))
    }
}

/// The PostgreSQL store.
pub struct PgStore {
    cfg: PgConfig,
    /// This controller's name in `application_name` and the lease.
    name: String,
    /// None after a connection failure: made again at the next call.
    client: Option<Client>,
    /// Its prepared statements.
    stmts: Statements,
    new_fleet: FleetId,
    /// The epoch this controller leads in, while it does.
    epoch: Option<u64>,
}

impl ToSql for Val {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Val::Int(v) => v.to_sql(ty, out),
            Val::Flag(v) => v.to_sql(ty, out),
            Val::Text(v) => v.to_sql(ty, out),
            Val::OptText(v) => v.to_sql(ty, out),
            Val::Bytes(v) => v.to_sql(ty, out),
            Val::OptBytes(v) => v.to_sql(ty, out),
        }
    }
    fn accepts(ty: &Type) -> bool {
        [Type::INT8, Type::BOOL, Type::TEXT, Type::BYTEA].contains(ty)
    }
    to_sql_checked!();
}

pub(super) struct PgRow<'a>(&'a Row);

impl Cols for PgRow<'_> {
    type Error = postgres::Error;
    fn int(&self, i: usize) -> Result<i64, postgres::Error> {
        self.0.try_get(i)
    }
    fn flag(&self, i: usize) -> Result<bool, postgres::Error> {
        self.0.try_get(i)
    }
    fn text(&self, i: usize) -> Result<String, postgres::Error> {
        self.0.try_get(i)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, postgres::Error> {
        self.0.try_get(i)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>, postgres::Error> {
        self.0.try_get(i)
    }
    fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, postgres::Error> {
        self.0.try_get(i)
    }
}

/// One column of a batch of rows, as a PostgreSQL array (`unnest` turns the arrays back into
/// rows): one statement per table whatever the batch's size, prepared once per connection.
#[derive(Debug)]
enum Column {
    Int(Vec<i64>),
    Flag(Vec<bool>),
    Text(Vec<Option<String>>),
    Bytes(Vec<Option<Vec<u8>>>),
}

impl Column {
    fn sql_type(&self) -> &'static str {
        match self {
            Self::Int(_) => "int8[]",
            Self::Flag(_) => "bool[]",
            Self::Text(_) => "text[]",
            Self::Bytes(_) => "bytea[]",
        }
    }

    fn push(&mut self, v: &Val) {
        match (self, v) {
            (Self::Int(c), Val::Int(x)) => c.push(*x),
            (Self::Flag(c), Val::Flag(x)) => c.push(*x),
            (Self::Text(c), Val::Text(x)) => c.push(Some(x.clone())),
            (Self::Text(c), Val::OptText(x)) => c.push(x.clone()),
            (Self::Bytes(c), Val::Bytes(x)) => c.push(Some(x.clone())),
            (Self::Bytes(c), Val::OptBytes(x)) => c.push(x.clone()),
            // A column's values are all of one kind (rows.rs makes them).
            _ => {}
        }
    }

    fn of(v: &Val) -> Self {
        match v {
            Val::Int(_) => Self::Int(Vec::new()),
            Val::Flag(_) => Self::Flag(Vec::new()),
            Val::Text(_) | Val::OptText(_) => Self::Text(Vec::new()),
            Val::Bytes(_) | Val::OptBytes(_) => Self::Bytes(Vec::new()),
        }
    }
}

impl ToSql for Column {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Self::Int(v) => v.to_sql(ty, out),
            Self::Flag(v) => v.to_sql(ty, out),
            Self::Text(v) => v.to_sql(ty, out),
            Self::Bytes(v) => v.to_sql(ty, out),
        }
    }
    fn accepts(ty: &Type) -> bool {
        [
            Type::INT8_ARRAY,
            Type::BOOL_ARRAY,
            Type::TEXT_ARRAY,
            Type::BYTEA_ARRAY,
        ]
        .contains(ty)
    }
    to_sql_checked!();
}

/// Prepared statements of one connection, by their text.
type Statements = HashMap<String, Statement>;

/// Runs `sql` prepared (once per connection).
fn exec(
    c: &mut Client,
    stmts: &mut Statements,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StoreError> {
    let st = match stmts.get(sql) {
        Some(st) => st.clone(),
        None => {
            let st = c.prepare(sql)?;
            stmts.insert(sql.to_owned(), st.clone());
            st
        }
    };
    Ok(c.execute(&st, params)?)
}

/// Upserts `rows` (each of `cols`, in order) into `table`, in one statement.
fn upsert_rows(
    c: &mut Client,
    stmts: &mut Statements,
    (table, cols, key, rows): &Upsert,
) -> Result<(), StoreError> {
    if let Some((sql, columns)) = upsert_sql(table, cols, key, rows, 1) {
        let params: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        exec(c, stmts, &sql, &params)?;
    }
    Ok(())
}

/// One table's upsert: its name, its columns, its key and the rows.
type Upsert = (&'static str, &'static str, &'static str, Vec<Vec<Val>>);

/// Every upsert a batch makes, table by table (both write paths use them).
fn upserts(ch: &Changes) -> Result<[Upsert; 6], StoreError> {
    Ok([
        (
            "nodes",
            NODE_COLS,
            "id",
            ch.nodes.iter().map(node_row).collect::<Result<_, _>>()?,
        ),
        (
            "instances",
            INSTANCE_COLS,
            "id",
            ch.instances
                .iter()
                .map(instance_row)
                .collect::<Result<_, _>>()?,
        ),
        (
            "groups",
            "name, policy",
            "name",
            ch.groups
                .iter()
                .map(|(n, p)| vec![Val::Text(n.clone()), Val::Text(p.as_str().to_owned())])
                .collect(),
        ),
        (
            "tombstones",
            "id",
            "id",
            ch.tombstones
                .iter()
                .map(|id| vec![Val::Text(id.to_string())])
                .collect(),
        ),
        (
            "images",
            IMAGE_COLS,
            "name, version",
            ch.images.iter().map(image_row).collect(),
        ),
        (
            "events",
            EVENT_COLS,
            "seq",
            ch.events.iter().map(event_row).collect(),
        ),
    ])
}

/// Events are trimmed to the newest [`MAX_EVENTS`] when a batch crosses a multiple of this
/// (not in every transaction: one statement fewer per batch).
const TRIM_EVENTS_EVERY: u64 = 256;

/// The sequence number at and below which events go, if this batch trims them.
fn events_trim(ch: &Changes) -> Option<i64> {
    match (ch.events.first(), ch.events.last()) {
        (Some(first), Some(last))
            if first.seq / TRIM_EVENTS_EVERY != last.seq / TRIM_EVENTS_EVERY =>
        {
            Some(last.seq as i64 - MAX_EVENTS as i64)
        }
        _ => None,
    }
}

/// The `INSERT … SELECT * FROM unnest(…) ON CONFLICT … DO UPDATE` of `rows`, its array
/// parameters numbered from `$first`.
fn upsert_sql(
    table: &str,
    cols: &str,
    key: &str,
    rows: &[Vec<Val>],
    first: usize,
) -> Option<(String, Vec<Column>)> {
    let head = rows.first()?;
    let mut columns: Vec<Column> = head.iter().map(Column::of).collect();
    for row in rows {
        for (col, v) in columns.iter_mut().zip(row) {
            col.push(v);
        }
    }
    let set: Vec<String> = cols
        .split(',')
        .map(str::trim)
        .filter(|c| !key.split(',').any(|k| k.trim() == *c))
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    let arrays: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(k, col)| format!("${}::{}", first + k, col.sql_type()))
        .collect();
    let on_conflict = if set.is_empty() {
        "DO NOTHING".to_owned()
    } else {
        format!("DO UPDATE SET {}", set.join(", "))
    };
    let sql = format!(
        "INSERT INTO {table} ({cols}) SELECT * FROM unnest({}) ON CONFLICT ({key}) {on_conflict}",
        arrays.join(", "),
    );
    Some((sql, columns))
}

/// A batch without removals as one statement (its own transaction: one round trip): the
/// fence, then each table's upsert as a data-modifying CTE. Fails whole if fenced.
fn apply_in_one_statement(
    c: &mut Client,
    stmts: &mut Statements,
    epoch: Option<i64>,
    ch: &Changes,
) -> Result<(), StoreError> {
    let mut ctes = vec!["f AS (SELECT outpost_fence($1) AS epoch)".to_owned()];
    let mut columns: Vec<Column> = Vec::new();
    for (table, cols, key, rows) in upserts(ch)? {
        if let Some((sql, cols)) = upsert_sql(table, cols, key, &rows, columns.len() + 2) {
            ctes.push(format!("w_{table} AS ({sql})"));
            columns.extend(cols);
        }
    }
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&epoch];
    params.extend(columns.iter().map(|c| c as &(dyn ToSql + Sync)));
    let trim = events_trim(ch);
    if let Some(bound) = &trim {
        ctes.push(format!(
            "w_trim AS (DELETE FROM events WHERE seq <= ${})",
            params.len() + 1
        ));
        params.push(bound);
    }
    let sql = format!("WITH {} SELECT epoch FROM f", ctes.join(", "));
    exec(c, stmts, &sql, &params)?;
    Ok(())
}

/// A batch with removals: a transaction of several statements, the fence first, removals
/// before the upserts (a new instance may take a removed one's name in the same batch).
fn apply_in_a_transaction(
    c: &mut Client,
    stmts: &mut Statements,
    epoch: Option<i64>,
    ch: &Changes,
) -> Result<(), StoreError> {
    c.batch_execute("BEGIN")?;
    exec(c, stmts, "SELECT outpost_fence($1)", &[&epoch])?;
    if !ch.removed.is_empty() {
        let ids: Vec<String> = ch.removed.iter().map(ToString::to_string).collect();
        exec(
            c,
            stmts,
            "DELETE FROM instances WHERE id = ANY($1)",
            &[&ids],
        )?;
    }
    if !ch.removed_nodes.is_empty() {
        let ids: Vec<&str> = ch.removed_nodes.iter().map(|n| n.as_str()).collect();
        exec(c, stmts, "DELETE FROM nodes WHERE id = ANY($1)", &[&ids])?;
        exec(
            c,
            stmts,
            "INSERT INTO removed_nodes (id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
            &[&ids],
        )?;
    }
    if !ch.readmitted.is_empty() {
        let ids: Vec<&str> = ch.readmitted.iter().map(|n| n.as_str()).collect();
        exec(
            c,
            stmts,
            "DELETE FROM removed_nodes WHERE id = ANY($1)",
            &[&ids],
        )?;
    }
    for (name, version) in &ch.removed_images {
        exec(
            c,
            stmts,
            "DELETE FROM images WHERE name = $1 AND version = $2",
            &[name, version],
        )?;
    }
    for u in &upserts(ch)? {
        upsert_rows(c, stmts, u)?;
    }
    if let Some(bound) = events_trim(ch) {
        // Bounded: the oldest go.
        exec(c, stmts, "DELETE FROM events WHERE seq <= $1", &[&bound])?;
    }
    c.batch_execute("COMMIT")?;
    Ok(())
}

/// Ends the transaction a failed write may have left open.
fn end_failed<T>(c: &mut Client, r: &Result<T, StoreError>) {
    if r.is_err() && !c.is_closed() {
        let _ = c.batch_execute("ROLLBACK");
    }
}

/// `r`, with a write that `outpost_fence` refused as [`StoreError::Fenced`] (naming the
/// epoch that leads now).
fn fenced<T>(c: &mut Client, ours: Option<u64>, r: Result<T, StoreError>) -> Result<T, StoreError> {
    match r {
        Err(StoreError::Postgres(m)) if m.contains(FENCED) => {
            let current: i64 = c
                .query_one("SELECT epoch FROM lease WHERE id = 1", &[])?
                .try_get(0)?;
            Err(StoreError::Fenced {
                ours: ours.unwrap_or(0),
                current: current as u64,
            })
        }
        r => r,
    }
}

impl Reader for Client {
    type Row<'r> = PgRow<'r>;
    fn each<T>(
        &mut self,
        sql: &str,
        bound: Option<i64>,
        f: impl Fn(&Self::Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let rows = match &bound {
            Some(b) => self.query(sql, &[b])?,
            None => self.query(sql, &[])?,
        };
        rows.iter().map(|r| f(&PgRow(r))).collect()
    }
}

impl PgStore {
    /// Connects, creates or migrates the schema, and gives a new database `new_fleet` as its
    /// identity. `name` is this controller's (in the lease and `application_name`).
    pub fn open(cfg: PgConfig, name: &str, new_fleet: FleetId) -> Result<Self, StoreError> {
        cfg.check().map_err(StoreError::Postgres)?;
        let mut s = Self {
            cfg,
            name: name.to_owned(),
            client: None,
            stmts: Statements::new(),
            new_fleet,
            epoch: None,
        };
        s.client()?;
        Ok(s)
    }

    /// The connection, made (and the schema brought up to date) if there is none.
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            self.stmts.clear();
            let mut c = self.connect()?;
            migrate(&mut c, self.new_fleet)?;
            self.client = Some(c);
        }
        self.client
            .as_mut()
            .ok_or_else(|| StoreError::Postgres("no connection".into()))
    }

    fn connect(&self) -> Result<Client, StoreError> {
        self.cfg.connect(&self.name)
    }

    /// Runs `f` on the connection; a failed connection is dropped, to be made again next time.
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Client, &mut Statements, Option<u64>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let epoch = self.epoch;
        self.client()?;
        let Some(client) = self.client.as_mut() else {
            return Err(StoreError::Postgres("no connection".into()));
        };
        let r = f(client, &mut self.stmts, epoch);
        if let Err(StoreError::Postgres(_)) = &r
            && self.client.as_ref().is_some_and(Client::is_closed)
        {
            self.client = None;
        }
        r
    }

    /// This store's fleet identity.
    pub fn fleet(&mut self) -> Result<FleetId, StoreError> {
        self.with(|c, _, _| {
            let v: i64 = c
                .query_one("SELECT value FROM meta WHERE key = 'fleet'", &[])?
                .try_get(0)?;
            Ok(FleetId(v as u64))
        })
    }
}

fn tls_connector(
    ca_pem: Option<&[u8]>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                let cert = cert.map_err(|e| StoreError::Postgres(format!("CA file: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| StoreError::Postgres(format!("CA file: {e}")))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Applies the migrations the database lacks, in one transaction under an advisory lock, and
/// gives a new database `new_fleet` as its identity.
pub fn migrate(c: &mut Client, new_fleet: FleetId) -> Result<(), StoreError> {
    let mut tx = c.transaction()?;
    // A transaction-scoped lock: controllers starting together migrate one after the other.
    tx.execute("SELECT pg_advisory_xact_lock(7078656)", &[])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )?;
    let have: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )?
        .try_get(0)?;
    let newest = MIGRATIONS.last().map_or(0, |m| m.0);
    if have > newest {
        return Err(StoreError::Schema(have));
    }
    for (v, sql) in MIGRATIONS.iter().filter(|m| m.0 > have) {
        tx.batch_execute(sql)?;
        tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[v])?;
        tracing::info!(version = v, "store schema migrated");
    }
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('fleet', $1) ON CONFLICT DO NOTHING",
        &[&(new_fleet.0 as i64)],
    )?;
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| corrupt("secrets", format!("no randomness: {e}")))?;
    tx.execute(
        "INSERT INTO secrets (name, value) VALUES ('blob_key', $1) ON CONFLICT DO NOTHING",
        &[&key.to_vec()],
    )?;
    tx.commit()?;
    Ok(())
}

impl Store for PgStore {
    fn check_writable(&mut self) -> Result<(), StoreError> {
        self.with(|c, stmts, epoch| {
            let ours = epoch.map(|e| e as i64);
            let r = (|| {
                c.batch_execute("BEGIN")?;
                exec(c, stmts, "SELECT outpost_fence($1)", &[&ours])?;
                c.execute(
                    "INSERT INTO meta (key, value) VALUES ('probe', $1)
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    &[&fastrand::i64(..)],
                )?;
                c.batch_execute("COMMIT")?;
                Ok(())
            })();
            end_failed(c, &r);
            fenced(c, epoch, r)
        })
    }

    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let fleet = self.fleet()?;
        self.with(|c, _, _| {
            // One consistent view of every table.
            c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
            let r = load_all(c, fleet);
            c.batch_execute(if r.is_ok() { "COMMIT" } else { "ROLLBACK" })?;
            r
        })
    }

    fn apply(&mut self, ch: &Changes) -> Result<(), StoreError> {
        self.with(|c, stmts, epoch| {
            let ours = epoch.map(|e| e as i64);
            let r = if ch.removed.is_empty()
                && ch.removed_nodes.is_empty()
                && ch.readmitted.is_empty()
                && ch.removed_images.is_empty()
            {
                // The common batch (creates, reports, events): one statement, one round trip.
                apply_in_one_statement(c, stmts, ours, ch)
            } else {
                apply_in_a_transaction(c, stmts, ours, ch)
            };
            end_failed(c, &r);
            fenced(c, epoch, r)
        })
    }

    fn lead(&mut self, me: &Candidate) -> Result<Lead, StoreError> {
        let ttl = format!("{} seconds", LEASE_TTL.as_secs());
        let held = self.epoch;
        let r = self.with(|c, _, _| {
            if let Some(e) = held {
                let renewed = c.query_opt(
                    "UPDATE lease SET expires = now() + $1::text::interval, blind = NOT $4
                      WHERE id = 1 AND epoch = $2 AND holder = $3 RETURNING epoch",
                    &[&ttl, &(e as i64), &me.name, &me.broker],
                )?;
                if renewed.is_some() {
                    return Ok(Lead::Leader { epoch: e });
                }
                tracing::warn!(
                    epoch = e,
                    "the lease was taken over: this controller no longer leads"
                );
            }
            // Take it if it has run out, if its holder's session is gone (a killed leader),
            // if it names this controller (a restart), or if its holder has lost the broker
            // and this controller has it (a leader cut from its nodes).
            let taken = c.query_opt(
                "UPDATE lease SET epoch = epoch + 1, holder = $2, api = $3,
                        backend = pg_backend_pid(), expires = now() + $1::text::interval,
                        blind = NOT $4
                  WHERE id = 1 AND (expires < now() OR holder = '' OR holder = $2
                        OR ($4 AND blind)
                        OR NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = lease.backend))
                  RETURNING epoch",
                &[&ttl, &me.name, &me.api, &me.broker],
            )?;
            if let Some(row) = taken {
                let e: i64 = row.try_get(0)?;
                return Ok(Lead::Leader { epoch: e as u64 });
            }
            let row = c.query_one(
                "SELECT holder, api, expires > now() FROM lease WHERE id = 1",
                &[],
            )?;
            let live: bool = row.try_get(2)?;
            Ok(Lead::Standby {
                leader: live
                    .then(|| Ok::<_, postgres::Error>((row.try_get(0)?, row.try_get(1)?)))
                    .transpose()?,
            })
        });
        self.epoch = match &r {
            Ok(Lead::Leader { epoch }) => Some(*epoch),
            _ => None,
        };
        r
    }

    fn resign(&mut self) -> Result<(), StoreError> {
        let Some(e) = self.epoch.take() else {
            return Ok(());
        };
        self.with(|c, _, _| {
            c.execute(
                "UPDATE lease SET expires = now() - interval '1 second', holder = ''
                  WHERE id = 1 AND epoch = $1",
                &[&(e as i64)],
            )?;
            Ok(())
        })
    }
}

fn load_all(c: &mut Client, fleet: FleetId) -> Result<Snapshot, StoreError> {
    let key: Vec<u8> = c
        .query_one("SELECT value FROM secrets WHERE name = 'blob_key'", &[])?
        .try_get(0)?;
    snapshot(c, fleet, key)
}

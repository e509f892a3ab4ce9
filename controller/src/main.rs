//! `outpost-controller`: runs the controller service.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use outpost_controller::fleet::FleetConfig;
use outpost_controller::scheduler::SchedulerConfig;
use outpost_controller::service::{BrokerChoice, BrokerTls, ServeConfig, serve};
use outpost_controller::store::{PgConfig, StoreChoice};

/// Outpost's controller: tracks the fleet, schedules instances onto nodes, and dispatches each
/// node's desired state over MQTT. With no options it embeds its MQTT broker and its store.
#[derive(Debug, Parser)]
#[command(name = "outpost-controller", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, global = true, env = "OUTPOST_LOG", default_value = "info")]
    log_level: tracing::Level,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller.
    Serve(Box<ServeArgs>),
    /// Named API tokens with roles (read, operator, admin), kept in DATA_DIR/tokens.db; changes
    /// take effect on a running controller within a second.
    #[command(subcommand)]
    Tokens(TokenCmd),
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Make a token and print its secret (once: only its hash is kept).
    Create {
        /// Its name (who it is in the history and the log): a-z, 0-9, '-' and '_'.
        name: String,
        /// read (sees everything, changes nothing), operator (instances; cordon, drain and
        /// label nodes) or admin (also removes and adopts nodes, manages images).
        #[arg(long)]
        role: String,
        /// It stops working after this long: 30d, 12h, 90m, 45s (default: never).
        #[arg(long)]
        expires: Option<String>,
        #[command(flatten)]
        dir: DataDir,
    },
    /// List the tokens (never their secrets).
    List {
        #[command(flatten)]
        dir: DataDir,
    },
    /// Revoke a token (kept in the list, so that the history still names it).
    Revoke {
        /// Its name.
        name: String,
        #[command(flatten)]
        dir: DataDir,
    },
}

#[derive(Debug, clap::Args)]
struct DataDir {
    /// The controller's data directory.
    #[arg(
        long,
        env = "OUTPOST_DATA_DIR",
        default_value = "/var/lib/outpost-controller"
    )]
    data_dir: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
}

impl DataDir {
    /// The token table: DATA_DIR/tokens.db, or the shared PostgreSQL store's.
    fn tokens(&self) -> anyhow::Result<outpost_controller::tokens::TokenDb> {
        Ok(outpost_controller::tokens::TokenDb::open_for(
            &store_choice(&self.store)?,
            &self.data_dir,
        )?)
    }
}

#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// Store the fleet in PostgreSQL (postgres://USER@HOST:PORT/DB, `?sslmode=require` for
    /// TLS) instead of DATA_DIR/outpost.db: several controllers may then share it, one leading
    /// and the others standing by. The password comes from --store-password-file or
    /// OUTPOST_STORE_PASSWORD / PGPASSWORD, never from the URL.
    #[arg(long, env = "OUTPOST_STORE")]
    store: Option<String>,
    /// File holding the PostgreSQL password.
    #[arg(long, env = "OUTPOST_STORE_PASSWORD_FILE")]
    store_password_file: Option<PathBuf>,
    /// CA certificate (PEM) the PostgreSQL server's certificate must chain to (default: the
    /// system's roots).
    #[arg(long, env = "OUTPOST_STORE_CA_FILE")]
    store_ca_file: Option<PathBuf>,
}

fn tokens(cmd: TokenCmd) -> anyhow::Result<()> {
    use outpost_controller::tokens::{Role, parse_duration};
    let when = |ms: Option<u64>| ms.map_or("-".to_owned(), |ms| format!("{ms}"));
    match cmd {
        TokenCmd::Create {
            name,
            role,
            expires,
            dir,
        } => {
            let role = Role::parse(&role)
                .with_context(|| format!("--role {role}: read, operator or admin"))?;
            let valid_for = expires
                .as_deref()
                .map(|e| {
                    parse_duration(e).with_context(|| {
                        format!("--expires {e}: a number and a unit, as 30d, 12h, 90m or 45s")
                    })
                })
                .transpose()?;
            let db = dir.tokens()?;
            let (secret, r) = db.create(&name, role, valid_for)?;
            eprintln!(
                "token {} ({}{}): its secret follows, shown only now",
                r.name,
                r.role,
                r.expires_ms
                    .map(|e| format!(", expires at {e} ms since the epoch"))
                    .unwrap_or_default()
            );
            println!("{secret}");
        }
        TokenCmd::List { dir } => {
            let db = dir.tokens()?;
            println!("NAME  ROLE  CREATED_MS  EXPIRES_MS  REVOKED_MS");
            for t in db.list()? {
                println!(
                    "{}  {}  {}  {}  {}",
                    t.name,
                    t.role,
                    t.created_ms,
                    when(t.expires_ms),
                    when(t.revoked_ms)
                );
            }
        }
        TokenCmd::Revoke { name, dir } => {
            dir.tokens()?.revoke(&name)?;
            eprintln!("token {name} revoked: refused from now on (within a second)");
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Directory of the durable store (SQLite, outpost.db).
    #[arg(
        long,
        env = "OUTPOST_DATA_DIR",
        default_value = "/var/lib/outpost-controller"
    )]
    data_dir: PathBuf,
    /// Address of the embedded MQTT broker (loopback unless --mqtt-passwd is given).
    #[arg(long, env = "OUTPOST_MQTT_LISTEN", default_value = "127.0.0.1:1883")]
    mqtt_listen: SocketAddr,
    /// Password file (mosquitto format, from outpost-provision): the embedded broker then
    /// authenticates every device and confines it to its own topics, and may listen beyond
    /// loopback.
    #[arg(long)]
    mqtt_passwd: Option<PathBuf>,
    /// The provisioning registry (outpost-provision --registry): the capacity each device was
    /// enrolled with (`outpost-provision device --max-vcpus --max-memory --max-disk`) is its
    /// first ceiling, instead of trusting its first report.
    #[arg(long)]
    registry: Option<PathBuf>,
    /// Use this external broker (mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS) instead of the
    /// embedded one.
    #[arg(long)]
    broker: Option<String>,
    /// CA certificate (PEM) that an mqtts:// broker must chain to.
    #[arg(long)]
    broker_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS with the broker.
    #[arg(long, requires = "broker_key")]
    broker_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS with the broker.
    #[arg(long, requires = "broker_cert")]
    broker_key: Option<PathBuf>,
    /// Username for the external broker.
    #[arg(long)]
    broker_username: Option<String>,
    /// Password for the external broker (prefer --broker-password-file or the environment:
    /// an argument shows in `ps` to every user).
    #[arg(long, env = "OUTPOST_BROKER_PASSWORD", hide_env_values = true)]
    broker_password: Option<String>,
    /// File holding the password for the external broker.
    #[arg(
        long,
        env = "OUTPOST_BROKER_PASSWORD_FILE",
        conflicts_with = "broker_password"
    )]
    broker_password_file: Option<PathBuf>,
    /// Address of the HTTP API.
    #[arg(long, env = "OUTPOST_API_LISTEN", default_value = "127.0.0.1:8080")]
    api_listen: SocketAddr,
    /// Serve the API over TLS with this certificate chain (PEM; read again when it changes or
    /// on SIGHUP, so it can be rotated without a restart).
    #[arg(long, env = "OUTPOST_API_TLS_CERT", requires = "api_tls_key")]
    api_tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "OUTPOST_API_TLS_KEY", requires = "api_tls_cert")]
    api_tls_key: Option<PathBuf>,
    /// Require client certificates that chain to this CA (PEM): mutual TLS.
    #[arg(long, env = "OUTPOST_API_CLIENT_CA", requires = "api_tls_cert")]
    api_client_ca: Option<PathBuf>,
    /// Allow the API off loopback without TLS (its tokens then cross the network in clear).
    #[arg(long)]
    insecure_http: bool,
    /// Also serve `/metrics` on this address (a listener for a Prometheus scraper; the API's
    /// token rules apply: beyond loopback it needs --api-token).
    #[arg(long, env = "OUTPOST_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// The URL nodes fetch images from: this controller's API as the nodes reach it
    /// (default: http://API-LISTEN, unless that is 0.0.0.0 or [::]).
    #[arg(long, env = "OUTPOST_IMAGE_URL")]
    image_url: Option<String>,
    /// Bearer token the API requires (mandatory when it listens beyond loopback). Prefer
    /// --api-token-file or the environment: an argument shows in `ps` to every user.
    #[arg(long, env = "OUTPOST_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// File holding the API's bearer token.
    #[arg(long, env = "OUTPOST_API_TOKEN_FILE", conflicts_with = "api_token")]
    api_token_file: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
    /// This controller's name among those sharing a store (default: the host name). Each
    /// controller needs its own.
    #[arg(long, env = "OUTPOST_CONTROLLER_NAME")]
    name: Option<String>,
    /// The API URL that standbys name to clients while this controller leads (default:
    /// http(s)://API-LISTEN).
    #[arg(long, env = "OUTPOST_ADVERTISE_API")]
    advertise_api: Option<String>,
    /// Seconds without a report after which a node is down.
    #[arg(long, default_value_t = FleetConfig::default().liveness_timeout_ms / 1000)]
    liveness_timeout: u64,
    /// Seconds a node may be down before its instances are rebuilt on other nodes (a node that
    /// returns later deletes its stale copies).
    #[arg(long, default_value_t = FleetConfig::default().lost_after_ms / 1000)]
    lost_after: u64,
    /// Build attempts per instance (the first one plus retries on other nodes).
    #[arg(long, default_value_t = FleetConfig::default().max_attempts)]
    max_attempts: u32,
    /// vCPU allocation ratio.
    #[arg(long, default_value_t = SchedulerConfig::default().cpu_ratio)]
    cpu_ratio: f64,
    /// Memory allocation ratio.
    #[arg(long, default_value_t = SchedulerConfig::default().memory_ratio)]
    memory_ratio: f64,
    /// Weigher multiplier for free memory: positive spreads, negative packs.
    #[arg(long, default_value_t = SchedulerConfig::default().weights.memory, allow_negative_numbers = true)]
    memory_weight: f64,
    /// Weigher multiplier for free vCPUs: positive spreads, negative packs.
    #[arg(long, default_value_t = SchedulerConfig::default().weights.cpu, allow_negative_numbers = true)]
    cpu_weight: f64,
}

/// A secret from a file (trimmed), or the value given; refused when blank.
fn secret(
    what: &str,
    value: Option<String>,
    file: Option<&PathBuf>,
) -> anyhow::Result<Option<String>> {
    let v = match file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading {what} from {}", f.display()))?
                .trim()
                .to_owned(),
        ),
        None => value,
    };
    if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
        anyhow::bail!("{what} is blank: give a non-empty secret");
    }
    Ok(v)
}

/// SQLite in the data directory, or the PostgreSQL database `--store` names.
fn store_choice(a: &StoreArgs) -> anyhow::Result<StoreChoice> {
    let Some(url) = &a.store else {
        return Ok(StoreChoice::Sqlite);
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        anyhow::bail!("--store {url}: expected postgres://USER@HOST:PORT/DATABASE");
    }
    let env = std::env::var("OUTPOST_STORE_PASSWORD")
        .or_else(|_| std::env::var("PGPASSWORD"))
        .ok();
    let password = secret("the store password", env, a.store_password_file.as_ref())?;
    let ca_pem = a
        .store_ca_file
        .as_ref()
        .map(|f| {
            std::fs::read(f).with_context(|| format!("reading --store-ca-file {}", f.display()))
        })
        .transpose()?;
    let pg = PgConfig {
        url: url.clone(),
        password,
        ca_pem,
    };
    pg.check().map_err(|e| anyhow::anyhow!(e))?;
    Ok(StoreChoice::Postgres(pg))
}

/// Raises the soft open-file limit to the hard one: every device holds a connection (two
/// through the gate), and a low soft limit would lock devices and the API out.
fn raise_open_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "open-file limit raised"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// Whether `flag` was given on the command line (not through the environment).
fn on_command_line(flag: &str) -> bool {
    std::env::args().any(|a| a == flag || a.starts_with(&format!("{flag}=")))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // MQTT over TLS uses ring: the process's one rustls provider, chosen here.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The embedded broker logs every connection at info: keep it to warnings.
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::filter::Targets::new()
        .with_default(cli.log_level)
        .with_target("rumqttd", tracing::Level::WARN);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .with(filter)
        .init();
    let a = match cli.command {
        Command::Serve(a) => *a,
        Command::Tokens(t) => return tokens(t),
    };
    raise_open_files();
    for flag in ["--api-token", "--broker-password"] {
        if on_command_line(flag) {
            tracing::warn!(
                "{flag} on the command line is visible to every user in `ps`: use {flag}-file or the environment"
            );
        }
    }
    let api_token = secret(
        "the API token",
        a.api_token.clone(),
        a.api_token_file.as_ref(),
    )?;
    let broker_password = secret(
        "the broker password",
        a.broker_password.clone(),
        a.broker_password_file.as_ref(),
    )?;
    if a.broker_username.is_some() != broker_password.is_some() {
        anyhow::bail!("give --broker-username and a broker password together");
    }
    let broker = match &a.broker {
        None => BrokerChoice::Embedded(a.mqtt_listen),
        Some(url) => {
            let b = outpost_firmware_config::parse_broker(url).with_context(|| {
                format!("--broker {url}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
            })?;
            let read =
                |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            let tls = match (&a.broker_ca_file, b.tls) {
                (Some(ca), true) => {
                    let client = match (&a.broker_cert, &a.broker_key) {
                        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                        _ => None,
                    };
                    Some(BrokerTls {
                        ca_pem: read(ca)?,
                        client,
                    })
                }
                (None, true) => anyhow::bail!("--broker {url} uses TLS: give --broker-ca-file"),
                (Some(_), false) => anyhow::bail!("--broker-ca-file needs an mqtts:// broker"),
                (None, false) => None,
            };
            BrokerChoice::External {
                host: b.host.to_owned(),
                port: b.port,
                credentials: a.broker_username.clone().zip(broker_password),
                tls,
            }
        }
    };
    let mut scheduler = SchedulerConfig {
        cpu_ratio: a.cpu_ratio,
        memory_ratio: a.memory_ratio,
        ..SchedulerConfig::default()
    };
    scheduler.weights.memory = a.memory_weight;
    scheduler.weights.cpu = a.cpu_weight;
    let image_url = match &a.image_url {
        Some(u) => Some(
            outpost_protocol::BaseUrl::new(u).map_err(|e| anyhow::anyhow!("--image-url: {e}"))?,
        ),
        None if a.api_listen.ip().is_unspecified() => {
            tracing::warn!(
                "the API listens on {}: nodes cannot fetch images until --image-url says how they reach it",
                a.api_listen
            );
            None
        }
        None => outpost_protocol::BaseUrl::new(&format!(
            "{}://{}",
            if a.api_tls_cert.is_some() {
                "https"
            } else {
                "http"
            },
            a.api_listen
        ))
        .ok(),
    };
    let store = store_choice(&a.store)?;
    let cfg = ServeConfig {
        data_dir: a.data_dir,
        broker,
        api_listen: a.api_listen,
        api_token,
        mqtt_passwd: a.mqtt_passwd,
        registry: a.registry,
        fleet: FleetConfig {
            liveness_timeout_ms: a.liveness_timeout * 1000,
            max_attempts: a.max_attempts,
            lost_after_ms: a.lost_after * 1000,
            image_url,
            ..FleetConfig::default()
        },
        scheduler,
        metrics_listen: a.metrics_listen,
        api_tls: a.api_tls_cert.map(|cert| outpost_controller::tls::ApiTls {
            cert,
            key: a.api_tls_key.clone().unwrap_or_default(),
            client_ca: a.api_client_ca.clone(),
        }),
        insecure_http: a.insecure_http,
        store,
        name: match &a.name {
            Some(n) if !n.trim().is_empty() => n.trim().to_owned(),
            Some(_) => anyhow::bail!("--name is blank"),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "controller".to_owned()),
        },
        advertise_api: a.advertise_api.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let shutdown = async {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        serve(cfg, shutdown).await
    })?;
    Ok(())
}

//! The `hsm-kms` binary: a thin CLI over the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use hsm_kms::config::Settings;
use hsm_kms::kms::{Kms, Parts};
use hsm_kms::{dev, server};

/// mimalloc, overriding `malloc` for the whole process, the PKCS#11 library included.
/// Measured: after SoftHSM2 had created 6,000 keys in-process, glibc's allocator spent a
/// quarter of each C_Encrypt walking fragmented free lists (`_int_malloc`), and raw
/// throughput fell from 44k to 37k ops/s; with mimalloc it stayed at 48k.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "hsm-kms",
    version,
    about = "A KMS whose keys live in your PKCS#11 HSM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the KMS API with a configuration file.
    Serve {
        /// The TOML configuration file (see deploy/hsm-kms.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a self-contained development instance on a SoftHSM2 token.
    Dev {
        /// Where the token, config, metadata and secrets live
        /// [default: $XDG_DATA_HOME/hsm-kms/dev, else ~/.local/share/hsm-kms/dev].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The gRPC address [default: 127.0.0.1:50051, or a free port when that one is
        /// busy]; port 0 picks a free port.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// The AWS KMS protocol address [default: 127.0.0.1:50053, or a free port].
        #[arg(long)]
        aws_listen: Option<SocketAddr>,
        /// The admin (metrics) address [default: 127.0.0.1:50052, or a free port].
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// The XKS proxy API address [default: 127.0.0.1:50054, or a free port].
        #[arg(long)]
        xks_listen: Option<SocketAddr>,
    },
    /// Work with an audit trail file.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Measure the raw PKCS#11 ceiling and the service's throughput in one run.
    Bench {
        #[command(flatten)]
        opts: bench::Options,
        /// Write the JSON report here (it is also printed after the table).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write an SVG chart of throughput and p99 against concurrency here.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Do not measure: render the table (and --svg) from a saved JSON report.
        #[arg(long)]
        from_json: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain of an audit file: exits 1 naming the first removed, altered,
    /// inserted or reordered line. A torn last line (a crash during a write) is reported,
    /// not counted as tampering. Give rotated files first, in order, to check the chain
    /// across them.
    ///
    /// With --config, it also compares the chain with the heads the service recorded in its
    /// metadata database, which shows lines cut off the end of the file.
    Verify {
        /// The audit file, after the files it continues [default with --config: audit.file].
        #[arg(required_unless_present = "config")]
        files: Vec<PathBuf>,
        /// The service's configuration: its metadata database holds the recorded heads,
        /// and audit.replica names the replica whose chain this is.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    // First, while this is the only thread: no secret stays in the environment.
    hsm_kms::kms::sealing::take_env_key();
    hsm_kms::logging::init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let settings = Settings::load(&config)?;
            hsm_kms::limits::raise_open_files();
            // Before any thread starts: the PKCS#11 module reads it at C_Initialize.
            if let Some(conf) = &settings.hsm.softhsm2_conf {
                std::env::set_var("SOFTHSM2_CONF", conf);
            }
            runtime_with(settings.server.worker_threads)?.block_on(async {
                let modules = std::sync::Arc::new(hsm_kms::hsm::Modules::default());
                let kms = Kms::new(Parts::from_settings(&settings, modules).await?);
                let running = server::start(
                    &settings,
                    kms,
                    Some(config.clone()),
                    server::shutdown_signal(),
                )
                .await?;
                if let Some(admin) = running.admin_addr {
                    println!("hsm-kms admin listening on {admin}");
                }
                if let Some(aws) = running.aws_addr {
                    println!("hsm-kms AWS protocol listening on {aws}");
                }
                if let Some(xks) = running.xks_addr {
                    println!("hsm-kms XKS proxy API listening on {xks}");
                }
                println!("hsm-kms listening on {}", running.addr);
                running.task.await?
            })
        }
        Command::Bench {
            opts,
            json,
            svg,
            from_json,
        } => {
            let report = match from_json {
                Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)?,
                None => runtime()?.block_on(bench::run(opts))?,
            };
            let doc = serde_json::to_string_pretty(&report)?;
            println!("{}", bench::table(&report));
            println!("{doc}");
            if let Some(p) = json {
                std::fs::write(p, &doc)?;
            }
            if let Some(p) = svg {
                std::fs::write(p, bench::svg(&report))?;
            }
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Verify { files, config },
        } => verify_audit(files, config),
        Command::Dev {
            data_dir,
            listen,
            aws_listen,
            admin_listen,
            xks_listen,
        } => {
            let data_dir = data_dir.unwrap_or_else(dev::default_data_dir);
            let ports = dev::Listeners {
                grpc: listen,
                aws: aws_listen,
                admin: admin_listen,
                xks: xks_listen,
            };
            let settings = dev::prepare(&data_dir, ports)?;
            runtime()?.block_on(dev::run(data_dir, settings))
        }
    }
}

/// `hsm-kms audit verify`: exits 1 when the chain is broken or cut short.
fn verify_audit(mut files: Vec<PathBuf>, config: Option<PathBuf>) -> anyhow::Result<()> {
    let (replica, recorded) = match config {
        Some(config) => {
            let settings = Settings::load(&config)?;
            if settings.database.is_none() && !settings.storage.sqlite_path.exists() {
                anyhow::bail!(
                    "no metadata database at {} (storage.sqlite_path)",
                    settings.storage.sqlite_path.display()
                );
            }
            let heads = runtime()?.block_on(async {
                let meta = hsm_kms::metadata::open(&settings).await?;
                meta.audit_heads()
                    .await
                    .map_err(|e| anyhow::anyhow!("reading the recorded audit heads: {e}"))
            })?;
            if files.is_empty() {
                files.push(settings.audit.file.clone());
            }
            (Some(settings.audit.replica), Some(heads))
        }
        None => (None, None),
    };
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let names = names.join(" + ");
    let heads = recorded.as_deref().unwrap_or_default();
    match hsm_kms::audit::verify(&files, replica.as_deref(), heads) {
        Ok(v) => {
            println!("{names}: chain intact, {} lines, head {}", v.lines, v.head);
            match (&recorded, &v.recorded) {
                (None, _) => println!(
                    "{names}: lines cut off the end leave a chain intact; --config compares it \
                     with the heads recorded in the metadata database"
                ),
                (Some(_), Some(r)) => println!(
                    "{names}: holds line {} of replica {}, the head recorded at {}",
                    r.seq,
                    r.replica,
                    hsm_kms::audit::rfc3339(r.recorded_ms)
                ),
                (Some(_), None) => println!(
                    "{names}: no head recorded for replica {} yet",
                    v.replica.as_deref().or(replica.as_deref()).unwrap_or("?")
                ),
            }
            if v.torn_tail > 0 {
                println!(
                    "{names}: then a torn last line of {} bytes, not part of the chain: \
                     a crash during a write (hsm-kms cuts it off at start)",
                    v.torn_tail
                );
            }
            Ok(())
        }
        Err(e) => {
            println!("{names}: chain broken: {e:#}");
            std::process::exit(1);
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

fn runtime_with(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    builder
        .on_thread_park(collect_freed_memory)
        .enable_all()
        .build()
}

extern "C" {
    /// mimalloc's `mi_collect` (in the library the allocator above links): processes the
    /// calling thread's frees made by other threads and returns its unused pages.
    fn mi_collect(force: bool);
}

/// When a runtime thread goes idle, at most once a second: mimalloc keeps a block freed by
/// another thread on its owner's list until the owner collects, and an idle owner never
/// does. After a burst (a flood of large requests, hostile or not, whose buffers were
/// allocated on one thread and freed on another) the process would keep its peak size
/// while idle. Measured with tests/hardening.rs's hostile streams: without this, 3 of 8
/// runs kept ~75 MB for the 30 s after the client left.
fn collect_freed_memory() {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    LAST.with(|last| {
        let now = Instant::now();
        if last
            .get()
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            last.set(Some(now));
            // SAFETY: mi_collect takes no pointers; it only works on the calling thread's
            // own heap.
            unsafe { mi_collect(false) };
        }
    });
}

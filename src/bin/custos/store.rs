//! `custos store`: operations on a store's database itself, run on the
//! host with no custosd in the way; today the move from a single-node
//! SQLite file to PostgreSQL.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use custos::store::Store;
use custos::store::migrate::{MigrateReport, migrate};
use custos::store::postgres::PgSettings;

/// `custos store …`.
#[derive(Debug, Subcommand)]
pub(crate) enum StoreCommand {
    /// Copy a SQLite store, its audit log included, into an empty
    /// PostgreSQL database, and check the copy before committing it. The
    /// SQLite file is only read; no custosd can write it meanwhile.
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// The SQLite database file (`[store] path`).
    #[arg(long, value_name = "PATH")]
    from: PathBuf,
    /// The PostgreSQL database, `postgres://user@host:port/database`.
    #[arg(long, value_name = "URL")]
    to: String,
    /// A file (mode 0600) holding the PostgreSQL password.
    #[arg(long, value_name = "FILE")]
    to_password_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signs the PostgreSQL server's
    /// certificate: connect over TLS and verify it. Needed for any database
    /// not on this host.
    #[arg(long, value_name = "FILE")]
    to_ca_file: Option<PathBuf>,
}

pub(crate) async fn store(command: StoreCommand, json: bool) -> Result<(), String> {
    let StoreCommand::Migrate(args) = command;
    // The store is blocking; keep it off the async workers.
    let report = tokio::task::spawn_blocking(move || run_migrate(&args))
        .await
        .map_err(|e| format!("migrate: {e}"))??;
    print_report(&report, json)
}

fn run_migrate(args: &MigrateArgs) -> Result<MigrateReport, String> {
    if !args.from.is_file() {
        return Err(format!("{}: no such SQLite store", args.from.display()));
    }
    let from = Store::open(&args.from).map_err(|e| format!("{}: {e}", args.from.display()))?;
    let settings = PgSettings {
        url: args.to.clone(),
        password_file: args.to_password_file.clone(),
        ca_file: args.to_ca_file.clone(),
        read_pool: 1,
    };
    let to = Store::open_postgres(&settings).map_err(|e| format!("{}: {e}", settings.redacted_url()))?;
    migrate(&from, &to).map_err(|e| format!("migrate: {e}"))
}

fn print_report(report: &MigrateReport, json: bool) -> Result<(), String> {
    let root = hex::encode(report.root);
    let mut out = std::io::stdout().lock();
    let written = if json {
        let tables: serde_json::Map<String, serde_json::Value> = report
            .tables
            .iter()
            .map(|(name, rows)| ((*name).to_string(), (*rows).into()))
            .collect();
        writeln!(
            out,
            "{}",
            serde_json::json!({
                "tables": tables,
                "log_size": report.log_size,
                "root": root,
                "checkpoint_size": report.checkpoint_size,
            })
        )
    } else {
        let mut text = String::from("copied and checked:\n");
        for (name, rows) in &report.tables {
            text.push_str(&format!("  {name:<18} {rows} rows\n"));
        }
        text.push_str(&format!(
            "log size:            {}\nroot:                {root}\n",
            report.log_size
        ));
        match report.checkpoint_size {
            Some(size) => text.push_str(&format!(
                "latest checkpoint:   size {size}, matches the copied tree\n"
            )),
            None => text.push_str("latest checkpoint:   none yet\n"),
        }
        text.push_str(
            "next: point [store] url at the database, start custosd, and run `custos audit verify`\n",
        );
        write!(out, "{text}")
    };
    written.map_err(|e| format!("stdout: {e}"))
}

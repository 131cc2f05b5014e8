//! `powernode-devplatform`: the development platform. A real HTTPS + mTLS server for the
//! node_api contract (its own CA, single-use bootstrap tokens, instance JWTs, an embedded store
//! that survives restarts) plus the admin CLI that works on the same state directory. This file
//! only parses arguments, sets up logging and dispatches.

mod admin;
mod api;
mod ca;
mod events;
mod fsutil;
mod fulcio;
mod jwt;
mod modules;
mod server;
mod store;
mod tasks;

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "powernode-devplatform", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve node_api over HTTPS with mTLS until SIGTERM/SIGINT.
    Serve {
        /// State directory (created if missing): CA, JWT secret, store.
        #[arg(long = "state")]
        state: PathBuf,
        /// Address to listen on; port 0 picks a free port (the real one is printed).
        #[arg(long)]
        listen: String,
        /// Extra DNS name or IP address for the server certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// `next_poll_seconds` returned by heartbeats.
        #[arg(long, default_value_t = 30)]
        next_poll_seconds: u64,
        /// Lifetime of node client certificates (seconds, or with an s/m/h/d suffix).
        #[arg(long, visible_alias = "cert-ttl", default_value = "90d", value_parser = parse_duration)]
        cert_ttl_secs: u64,
        /// Lifetime of instance JWTs (seconds, or with an s/m/h/d suffix).
        #[arg(long, visible_alias = "jwt-ttl", default_value = "24h", value_parser = parse_duration)]
        jwt_ttl_secs: u64,
        /// Validate event severities as the upstream server does (low, medium, high,
        /// critical) instead of node-api.md Part A's words.
        #[arg(long)]
        upstream_severities: bool,
    },
    /// Bootstrap tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Fleet events received (de-duplicated on correlation_id), per instance.
    Events {
        #[arg(long = "state")]
        state: PathBuf,
        /// Only this instance.
        #[arg(long)]
        instance: Option<String>,
        /// Print JSON (an array of {instance_id, accepted, duplicates, events}).
        #[arg(long)]
        json: bool,
    },
    /// Modules: publish a signed EROFS artifact, assign it, list.
    Module {
        #[command(subcommand)]
        command: ModuleCommand,
    },
    /// Tasks: enqueue work for an instance, list, cancel.
    Task {
        #[command(subcommand)]
        command: TaskCommand,
    },
    /// List enrolled instances.
    Instances {
        #[arg(long = "state")]
        state: PathBuf,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Mint a single-use bootstrap token and print it.
    Create {
        #[arg(long = "state")]
        state: PathBuf,
        /// Instance the token enrolls; a fresh UUID v4 when omitted.
        #[arg(long)]
        instance_uuid: Option<String>,
        /// Token lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        /// Print `{"token","instance_uuid","expires_at"}`.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// Queue a task and print it as JSON.
    Enqueue {
        #[arg(long = "state")]
        state: PathBuf,
        #[arg(long)]
        instance: String,
        /// e.g. `restart`, `custom`, `sync_modules`.
        #[arg(long)]
        command: String,
        /// A JSON object, e.g. `{"unit":"nginx.service"}`.
        #[arg(long, default_value = "{}")]
        options: String,
    },
    /// Print every task (JSON array, oldest first).
    List {
        #[arg(long = "state")]
        state: PathBuf,
        #[arg(long)]
        instance: Option<String>,
    },
    /// Cancel a task that has not ended.
    Cancel {
        #[arg(long = "state")]
        state: PathBuf,
        id: String,
    },
    /// Move a pending task to `running` as the upstream server's own executor does.
    Dispatch {
        #[arg(long = "state")]
        state: PathBuf,
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum ModuleCommand {
    /// Build an EROFS image of ROOTFS_DIR, sign it, push it to the registry and record it.
    Publish {
        #[arg(long = "state")]
        state: PathBuf,
        /// OCI registry `HOST:PORT` (plain HTTP only on loopback).
        #[arg(long)]
        registry: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        #[arg(long, default_value = "amd64")]
        arch: String,
        /// Leave image.erofs, bundle.sigstore.json, trusted_root.json and signing.pub here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Record this PEM public key as the module's trust policy (default: the signing key).
        #[arg(long, conflicts_with = "no_policy")]
        policy_key: Option<PathBuf>,
        /// Record no trust policy (the agent must then refuse the module).
        #[arg(long)]
        no_policy: bool,
        /// Sign keyless as this identity (a URI, or an email address): an ephemeral key with a
        /// 10-minute certificate from the platform's Fulcio-style CA. The trust policy becomes
        /// this identity and `--issuer`.
        #[arg(long, requires = "issuer", conflicts_with = "policy_key")]
        identity: Option<String>,
        /// The OIDC issuer URL recorded in the keyless certificate.
        #[arg(long, requires = "identity")]
        issuer: Option<String>,
        /// Record this identity regexp in the trust policy instead of `^<identity>$`.
        #[arg(long, requires = "identity")]
        policy_identity: Option<String>,
        rootfs: PathBuf,
    },
    /// Assign a module (name or id) to an instance.
    Assign {
        #[arg(long = "state")]
        state: PathBuf,
        #[arg(long)]
        instance: String,
        #[arg(long)]
        module: String,
        /// Keep the node's /var across reboots while this module is composed (`/persist/var`
        /// bound onto the root); assigning again without it clears the flag.
        #[arg(long)]
        persistent: bool,
    },
    /// List published modules (JSON).
    List {
        #[arg(long = "state")]
        state: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("powernode-devplatform: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("a rustls crypto provider was already installed");
    }
    match cli.command {
        Command::Serve {
            state,
            listen,
            sans,
            next_poll_seconds,
            cert_ttl_secs,
            jwt_ttl_secs,
            upstream_severities,
        } => {
            let opts = server::ServeOptions {
                state_dir: state,
                listen,
                sans,
                config: api::ApiConfig {
                    next_poll_seconds,
                    cert_ttl_secs,
                    jwt_ttl_secs,
                    upstream_severities,
                },
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building tokio runtime")?
                .block_on(server::serve(opts))
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    state,
                    instance_uuid,
                    ttl_secs,
                    json,
                },
        } => {
            let t = admin::create_token(&state, instance_uuid.as_deref(), ttl_secs)?;
            if json {
                println!("{}", serde_json::to_string(&t)?);
            } else {
                println!("{}", t.token);
            }
            Ok(())
        }
        Command::Events {
            state,
            instance,
            json,
        } => {
            let list = events::list(&state, instance.as_deref())?;
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else {
                for i in &list {
                    println!(
                        "{}  accepted {}  duplicates {}",
                        i.instance_id, i.accepted, i.duplicates
                    );
                }
            }
            Ok(())
        }
        Command::Module { command } => module_command(command),
        Command::Task { command } => task_command(command),
        Command::Instances { state, json } => {
            let instances = admin::list_instances(&state)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&instances)?);
            } else {
                print!("{}", admin::render_table(&instances));
            }
            Ok(())
        }
    }
}

fn task_command(command: TaskCommand) -> Result<()> {
    match command {
        TaskCommand::Enqueue {
            state,
            instance,
            command,
            options,
        } => {
            let options: serde_json::Value = serde_json::from_str(&options)
                .with_context(|| format!("--options {options:?} is not JSON"))?;
            let t = tasks::enqueue(&state, &instance, &command, options)?;
            println!("{}", serde_json::to_string(&t)?);
        }
        TaskCommand::List { state, instance } => {
            let list = tasks::list_all(&state, instance.as_deref())?;
            println!("{}", serde_json::to_string(&list)?);
        }
        TaskCommand::Cancel { state, id } => {
            println!("{}", serde_json::to_string(&tasks::cancel(&state, &id)?)?);
        }
        TaskCommand::Dispatch { state, id } => {
            println!("{}", serde_json::to_string(&tasks::dispatch(&state, &id)?)?);
        }
    }
    Ok(())
}

fn module_command(command: ModuleCommand) -> Result<()> {
    match command {
        ModuleCommand::Publish {
            state,
            registry,
            name,
            version,
            arch,
            out,
            policy_key,
            no_policy,
            identity,
            issuer,
            policy_identity,
            rootfs,
        } => {
            let identity = identity
                .zip(issuer)
                .map(|(subject, issuer)| fulcio::Identity { subject, issuer });
            let args = modules::PublishArgs {
                state,
                registry,
                name,
                version,
                arch,
                rootfs,
                out,
                policy_key,
                no_policy,
                identity,
                policy_identity,
            };
            let m = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building tokio runtime")?
                .block_on(modules::publish(args))?;
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
        ModuleCommand::Assign {
            state,
            instance,
            module,
            persistent,
        } => {
            let id = modules::assign(&state, &instance, &module, persistent)?;
            println!(
                "{}",
                serde_json::json!({"instance": instance, "module_id": id, "persistent": persistent})
            );
            Ok(())
        }
        ModuleCommand::List { state } => {
            println!("{}", serde_json::to_string(&modules::list_all(&state)?)?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_defaults() {
        let cli = Cli::try_parse_from([
            "powernode-devplatform",
            "serve",
            "--state",
            "/tmp/x",
            "--listen",
            "127.0.0.1:0",
        ])
        .expect("parse");
        let Command::Serve {
            next_poll_seconds,
            cert_ttl_secs,
            jwt_ttl_secs,
            sans,
            ..
        } = cli.command
        else {
            panic!("expected serve");
        };
        assert_eq!(
            (next_poll_seconds, cert_ttl_secs, jwt_ttl_secs),
            (30, 7_776_000, 86_400)
        );
        assert!(sans.is_empty());
    }
}

/// `120`, `120s`, `2m`, `1h`, `90d` → seconds.
fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("invalid duration {s:?} (use e.g. 120, 120s, 2m, 1h, 90d)"))
}

#[cfg(test)]
mod duration_tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("120"), Ok(120));
        assert_eq!(parse_duration("120s"), Ok(120));
        assert_eq!(parse_duration("2m"), Ok(120));
        assert_eq!(parse_duration("90d"), Ok(7_776_000));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5w").is_err());
    }
}

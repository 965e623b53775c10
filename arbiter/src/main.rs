//! The `arbiter` command: run the built-in server, or claim/read a register.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use arbiter::client::{Client, ClientConfig};
use arbiter::server::{Server, ServerConfig};
use arbiter::{Arbiter, Decision};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// vmft arbiter: the test-and-set service that prevents split brain.
#[derive(Parser)]
#[command(name = "arbiter", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct TokenArgs {
    /// File holding the shared secret (default: $ARBITER_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl TokenArgs {
    fn token(&self) -> Result<Vec<u8>> {
        let t = match &self.token_file {
            Some(p) => {
                std::fs::read(p).with_context(|| format!("reading token file {}", p.display()))?
            }
            None => std::env::var("ARBITER_TOKEN")
                .context("no token: give --token-file or set ARBITER_TOKEN")?
                .into_bytes(),
        };
        let t = t.trim_ascii().to_vec();
        if t.is_empty() {
            bail!("the token is empty");
        }
        Ok(t)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the built-in server.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7420")]
        listen: String,
        /// Directory for the durable decision log.
        #[arg(long)]
        data: PathBuf,
        /// Most client connections at once; more are refused ("busy").
        #[arg(long, default_value_t = arbiter::server::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        #[command(flatten)]
        token: TokenArgs,
    },
    /// Claim a register as NAME:PID:NONCE (this process's id and a random
    /// nonce, so two processes started with the same name never both win);
    /// prints "claimant <identity>", then "won" or "lost <owner>".
    Claim {
        /// Server address.
        #[arg(long, default_value = "127.0.0.1:7420")]
        server: String,
        /// VM id.
        #[arg(long)]
        vm: String,
        /// Generation.
        #[arg(long, default_value_t = 0)]
        generation: u64,
        /// Claimant name (the identity claimed under adds ":PID:NONCE").
        #[arg(long)]
        claimant: String,
        #[command(flatten)]
        token: TokenArgs,
    },
    /// Print the owner of a register ("none" if undecided).
    Owner {
        /// Server address.
        #[arg(long, default_value = "127.0.0.1:7420")]
        server: String,
        /// VM id.
        #[arg(long)]
        vm: String,
        /// Generation.
        #[arg(long, default_value_t = 0)]
        generation: u64,
        #[command(flatten)]
        token: TokenArgs,
    },
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve {
            listen,
            data,
            max_connections,
            token,
        } => {
            let mut cfg = ServerConfig::new(token.token()?);
            cfg.max_connections = max_connections;
            let server = Server::bind(&listen, &data, cfg).await?;
            // Tests and scripts read the bound port from this line.
            println!("listening {}", server.local_addr());
            server.run().await?;
            Ok(())
        }
        Command::Claim {
            server,
            vm,
            generation,
            claimant,
            token,
        } => {
            let mut c = Client::new(ClientConfig::new(server, token.token()?));
            // Printed first: if the answer is lost, the identity tells
            // whether this process is the owner.
            println!("claimant {}", c.identity(&claimant));
            std::io::stdout().flush()?;
            match c.test_and_set(&vm, generation, &claimant).await? {
                Decision::Won => println!("won"),
                Decision::Lost { owner } => println!("lost {owner}"),
            }
            Ok(())
        }
        Command::Owner {
            server,
            vm,
            generation,
            token,
        } => {
            let mut c = Client::new(ClientConfig::new(server, token.token()?));
            match c.owner(&vm, generation).await? {
                Some(o) => println!("{o}"),
                None => println!("none"),
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("ARBITER_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("arbiter: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

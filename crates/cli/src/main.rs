//! The `suanwang` command line.
//!
//! `main` calls `try_main` and maps errors to exit codes: 0 success, 1 a
//! failed command (bad input file, unknown policy...), 2 bad usage (clap).

mod bench;
mod bench_ledger;
mod bench_platform;
mod bench_sandbox;
mod bench_slurm;
mod ledger_cmd;
mod platform;
mod simulate;
mod table;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "suanwang", version, about = "suanwang (算网): a compute-network scheduler")]
struct Cli {
    #[command(flatten)]
    connection: platform::Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay a real trace through the scheduler on a virtual clock and compare policies.
    Simulate(simulate::SimulateArgs),
    /// Measure the scheduler: wall time per trace and policy, and scale runs.
    Bench(bench::BenchArgs),
    /// Validate a topology file and print a summary of it.
    Topology(simulate::TopologyArgs),
    /// The voucher ledger: programmes, grants, cards, job billing, audit, verify.
    Ledger(ledger_cmd::LedgerArgs),
    /// Run the server and one local agent per site: a whole installation on this machine.
    Up(platform::UpArgs),
    /// Run the control-plane server.
    Serve(platform::ServeArgs),
    /// Run a site agent.
    Agent(platform::AgentArgs),
    /// Bootstrap tokens and organisations on the database file.
    Admin(platform::AdminArgs),
    #[command(flatten)]
    Client(platform::ClientCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match try_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`suanwang jobs | head`) is not an error.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            match error.downcast_ref::<platform::AgentSetupError>() {
                Some(_) => ExitCode::from(platform::AgentSetupError::EXIT),
                None => ExitCode::from(1),
            }
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || e.to_string().contains("Broken pipe")
    })
}

fn try_main(cli: Cli) -> anyhow::Result<()> {
    if matches!(cli.command, Command::Ledger(_) | Command::Serve(_) | Command::Admin(_)) {
        // The database holds current jobs' secrets and token hashes: what
        // these commands create is for no other user (a Slurm job shares
        // the machine's file system). Not for `up` and `agent`, whose
        // folders jobs must be able to enter; they set their files' modes
        // one by one, and the server makes the database private at start.
        // SAFETY: umask has no preconditions.
        unsafe {
            libc::umask(0o077);
        }
    }
    match cli.command {
        Command::Simulate(args) => simulate::simulate(args),
        Command::Bench(args) => bench::bench(args),
        Command::Topology(args) => simulate::topology(args),
        Command::Ledger(args) => ledger_cmd::run(args, cli.connection.json),
        Command::Up(args) => platform::up(args),
        Command::Serve(args) => platform::serve(args),
        Command::Agent(args) => platform::agent(args, &cli.connection),
        Command::Admin(args) => platform::admin(args),
        Command::Client(command) => platform::client(&cli.connection, command),
    }
}

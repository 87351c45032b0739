use clap::Parser as _;

fn main() {
    let cli = kml_agent::cli::Cli::parse();
    if !cli.command.long_running() {
        // `kml-agent eval ... | head`: end quietly when the reader does, as any
        // Unix tool (Rust ignores SIGPIPE, and printing would panic). Commands
        // that print while programs are attached keep it ignored and stop
        // through their cleanup instead.
        // SAFETY: at start, before any thread; restores the default action.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    kml_agent::cli::init_logging(cli.verbose);
    if let Err(err) = cli.command.execute() {
        // One clear line (with its causes), never a backtrace.
        eprintln!("kml-agent: {err:#}");
        std::process::exit(1);
    }
}

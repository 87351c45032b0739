use clap::Parser as _;

fn main() {
    let cli = kml_agent::cli::Cli::parse();
    kml_agent::cli::init_logging(cli.verbose);
    if let Err(err) = cli.command.execute() {
        // One clear line (with its causes), never a backtrace.
        eprintln!("kml-agent: {err:#}");
        std::process::exit(1);
    }
}

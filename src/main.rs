use clap::Parser;

fn main() {
    let cli = sdlora::cli::Cli::parse();
    if let Err(e) = sdlora::cli::run(cli) {
        // one line, no backtrace: what went wrong, which file, what to do
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

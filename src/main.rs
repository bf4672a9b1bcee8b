use clap::Parser;

fn main() {
    ieu_bench::logging::init();
    let cli = ieu_bench::cli::Cli::parse();
    if let Err(e) = ieu_bench::cli::main(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

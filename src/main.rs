use clap::Parser;

/// Training allocates and frees many tensor-sized buffers per step; glibc's allocator
/// returns them to the kernel and faults them back in (a fifth of a cpu-scale step), while
/// mimalloc keeps them for reuse (README, "Performance").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // Output piped into `head` and closed early ends the process quietly, as for other
    // Unix tools, instead of a panic on the broken pipe.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    ieu_bench::logging::init();
    ieu_bench::dag::exec::install_panic_hook();
    let cli = ieu_bench::cli::Cli::parse();
    if let Err(e) = ieu_bench::cli::main(cli) {
        eprintln!("error: {e:#}");
        let code = e
            .downcast_ref::<ieu_bench::cli::Exit>()
            .map(|x| x.code)
            .unwrap_or(1);
        std::process::exit(code);
    }
}

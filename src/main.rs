use clap::Parser;

/// Training allocates and frees many tensor-sized buffers per step; glibc's allocator
/// returns them to the kernel and faults them back in (a fifth of a cpu-scale step), while
/// mimalloc keeps them for reuse (README, "Performance").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    #[cfg(test)]
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
}

/// `mi_option_arena_purge_mult` in mimalloc 3's `enum mi_option_e` (`include/mimalloc.h` of
/// libmimalloc-sys 0.1.49, pinned in `Cargo.lock`); its default is 1.
const MI_OPTION_ARENA_PURGE_MULT: std::ffi::c_int = 24;

/// mimalloc returns freed arena memory to the kernel after `purge_delay` × this (1 s × 100),
/// instead of after 1 s: at 1 s a training step's buffers were still decommitted and faulted
/// back in (20 000 page faults in `bench --scale cpu`'s 80 timed steps, 850 with this;
/// the kernel zeroing those pages took 5% of a training step). Memory freed and not reused
/// goes back to the kernel after 100 s.
fn keep_freed_memory_longer() {
    unsafe { mi_option_set(MI_OPTION_ARENA_PURGE_MULT, 100) };
}

fn main() {
    // Output piped into `head` and closed early ends the process quietly, as for other
    // Unix tools, instead of a panic on the broken pipe.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    keep_freed_memory_longer();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number names the option meant: `arena_purge_mult` defaults to 1 and its
    /// neighbours `arena_reserve` and `purge_delay` to 1 GiB (in KiB) and 1000 ms.
    #[test]
    fn the_mimalloc_option_is_arena_purge_mult() {
        unsafe {
            assert_eq!(mi_option_get(MI_OPTION_ARENA_PURGE_MULT - 1), 1024 * 1024);
            assert_eq!(mi_option_get(15), 1000);
            assert_eq!(mi_option_get(MI_OPTION_ARENA_PURGE_MULT), 1);
            keep_freed_memory_longer();
            assert_eq!(mi_option_get(MI_OPTION_ARENA_PURGE_MULT), 100);
        }
    }
}

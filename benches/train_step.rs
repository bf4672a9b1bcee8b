//! Training-step and inference throughput (images/s) of the smoke- and cpu-scale ViTs, on
//! one thread and on every core: the baseline for speed work. Run with `cargo bench`.

fn main() {
    for name in ["smoke", "cpu"] {
        let scale = ieu_bench::spec::load_scale(
            ieu_bench::spec::DEFAULT_SCALES,
            "experiments/scales.yaml",
            name,
        )
        .expect("embedded scales parse");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for threads in [1, cores] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a thread pool");
            pool.install(|| {
                for r in [
                    ieu_bench::train::bench::train_throughput(&scale, 10),
                    ieu_bench::train::bench::inference_throughput(&scale, 10),
                ] {
                    match r {
                        Ok(r) => println!("{name:>6}: {r}"),
                        Err(e) => eprintln!("{name}: {e:#}"),
                    }
                }
            });
        }
    }
}

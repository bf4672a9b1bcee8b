//! Training-step throughput (images/s) of the smoke- and cpu-scale ViTs: the baseline for
//! speed work. Run with `cargo bench`.

fn main() {
    for name in ["smoke", "cpu"] {
        let scale = ieu_bench::spec::load_scale(
            ieu_bench::spec::DEFAULT_SCALES,
            "experiments/scales.yaml",
            name,
        )
        .expect("embedded scales parse");
        match ieu_bench::train::bench::train_throughput(&scale, 10) {
            Ok(r) => println!("{name:>6}: {r}"),
            Err(e) => eprintln!("{name}: {e:#}"),
        }
    }
}

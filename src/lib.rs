//! ieu-bench: a reproducible benchmark of IEU (Interleaved Ensemble Unlearning), a defence
//! for finetuning clean pretrained vision transformers on backdoor-poisoned data.
//!
//! A YAML spec ([`spec`]) is resolved into a DAG of content-addressed steps ([`dag`]):
//! dataset → poisoned dataset → pretrained checkpoint → f_p → defended f_r → metrics.
//! Outputs live in a content-addressed store ([`store`]); reports are rendered from it
//! ([`report`]).

pub mod attacks;
pub mod cli;
pub mod dag;
pub mod data;
pub mod defences;
pub mod logging;
pub mod metrics;
pub mod models;
pub mod progress;
pub mod report;
pub mod spec;
pub mod store;
pub mod train;

/// The compute device steps run on: the flex CPU backend by default; CUDA, wgpu or
/// LibTorch when the crate is built with the `cuda`, `wgpu` or `tch` feature (LibTorch runs
/// on CUDA device 0 when LibTorch sees a GPU, on its CPU backend otherwise).
pub fn default_device() -> burn::prelude::Device {
    #[cfg(feature = "cuda")]
    {
        return burn::prelude::Device::cuda(0);
    }
    #[allow(unreachable_code)]
    {
        #[cfg(feature = "wgpu")]
        {
            return burn::prelude::Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
        }
        // burn-tch is deprecated upstream, and the one CUDA route that builds offline.
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        {
            return if libtorch_has_cuda() {
                burn::prelude::Device::libtorch_cuda(0)
            } else {
                burn::prelude::Device::libtorch()
            };
        }
        burn::prelude::Device::flex()
    }
}

/// A short name of the backend, recorded in every manifest.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "wgpu") {
        "wgpu"
    } else if cfg!(feature = "tch") {
        if libtorch_has_cuda() {
            "tch-cuda"
        } else {
            "tch-cpu"
        }
    } else {
        "flex-cpu"
    }
}

/// Whether LibTorch sees a CUDA device (false without the `tch` feature).
fn libtorch_has_cuda() -> bool {
    #[cfg(feature = "tch")]
    {
        return tch::Cuda::is_available();
    }
    #[allow(unreachable_code)]
    false
}

/// Steps run at once by default: one per CPU core on a CPU backend, one on a GPU.
pub fn default_jobs() -> usize {
    if cfg!(any(feature = "cuda", feature = "wgpu")) || backend_name() == "tch-cuda" {
        1
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

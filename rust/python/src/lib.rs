//! `ktrs._native`: the thin PyO3 layer over the `ktrs` crate. Arguments are validated
//! and extracted while the GIL is held; kernels run with it released.

mod dlpack;
mod error;
mod experts;
mod fp8;
mod info;
mod load;
mod optim;
mod stage;
mod staging;
mod train_stage;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    error::install_panic_hook();
    error::register(m)?;
    m.add("MAX_THREADS", ktrs::pool::MAX_THREADS)?;
    m.add_class::<experts::Experts>()?;
    m.add_class::<experts::ForwardHandle>()?;
    m.add_class::<stage::HostStage>()?;
    m.add_class::<stage::PyStreamChannel>()?;
    m.add_class::<train_stage::TrainStage>()?;
    m.add_function(wrap_pyfunction!(error::_panic_for_test, m)?)?;
    m.add_function(wrap_pyfunction!(experts::py_resolve_threads, m)?)?;
    m.add_function(wrap_pyfunction!(fp8::dequantize_fp8, m)?)?;
    m.add_function(wrap_pyfunction!(info::cpu_info, m)?)?;
    m.add_function(wrap_pyfunction!(load::load_experts, m)?)?;
    m.add_function(wrap_pyfunction!(info::tuning, m)?)?;
    m.add_function(wrap_pyfunction!(info::set_tuning, m)?)?;
    optim::register(m)?;
    Ok(())
}

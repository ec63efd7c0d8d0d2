//! `cpu_info()`: what the CPU and OS offer and what ktrs would choose.

use ktrs::cpu::{amx_permission, physical_cores, AmxPermission, CpuFeatures, Isa};
use pyo3::prelude::*;
use pyo3::types::PyDict;

#[pyfunction]
pub fn cpu_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let f = CpuFeatures::get();
    let d = PyDict::new(py);
    d.set_item("features", f.names())?;
    d.set_item(
        "available_isas",
        Isa::available()
            .iter()
            .map(|i| i.name())
            .collect::<Vec<_>>(),
    )?;
    d.set_item("best_isa", Isa::best().name())?;
    // Every tier, fastest first: available or why not, and what it means for speed.
    let tiers = PyDict::new(py);
    for isa in Isa::ALL.iter().rev() {
        let t = PyDict::new(py);
        t.set_item(
            "status",
            match isa.check_available() {
                Ok(()) => "available".to_string(),
                Err(e) => format!("unavailable: {e}"),
            },
        )?;
        t.set_item("speed", isa.describe())?;
        tiers.set_item(isa.name(), t)?;
    }
    d.set_item("isa_tiers", tiers)?;
    d.set_item(
        "selected_isa",
        match Isa::from_env_or_best() {
            Ok(i) => i.name().to_string(),
            Err(e) => format!("error: {e}"),
        },
    )?;
    d.set_item("physical_cores", physical_cores())?;
    d.set_item("default_threads", ktrs::pool::default_threads())?;
    d.set_item(
        "amx_permission",
        match amx_permission() {
            AmxPermission::Granted => "granted".to_string(),
            AmxPermission::Refused(why) => format!("refused: {why}"),
            AmxPermission::NoHardware => "no AMX hardware".to_string(),
        },
    )?;
    d.set_item("amx_kernels_built", ktrs::kernels::amx_kernels_built())?;
    d.set_item("tuning", tuning(py)?)?;
    Ok(d)
}

/// `tuning()`: every speed knob (by its environment variable) and its current value.
#[pyfunction]
pub fn tuning(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (name, v) in ktrs::tuning::all() {
        d.set_item(name, v)?;
    }
    Ok(d)
}

/// `set_tuning(name, value)`: overrides a speed knob for this process (`None` restores
/// the environment's value or the default). Knobs change speed (at most rounding).
#[pyfunction]
#[pyo3(signature = (name, value))]
pub fn set_tuning(name: &str, value: Option<usize>) -> PyResult<()> {
    let knob = ktrs::tuning::Knob::from_name(name).ok_or_else(|| {
        let known: Vec<_> = ktrs::tuning::all().into_iter().map(|(n, _)| n).collect();
        pyo3::exceptions::PyValueError::new_err(format!(
            "name: expected one of {known:?}, got {name:?}"
        ))
    })?;
    ktrs::tuning::set(knob, value);
    Ok(())
}

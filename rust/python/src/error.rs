//! The one conversion from core errors to Python exceptions.
//!
//! `KtrsError` is the base class; argument errors are also `ValueError`s and non-finite
//! errors also `FloatingPointError`s, so callers can catch the standard classes.

use ktrs::KtrsError as CoreError;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    _native,
    KtrsError,
    PyException,
    "Base class of ktrs errors."
);
create_exception!(
    _native,
    IsaUnavailableError,
    KtrsError,
    "The requested instruction set cannot run here."
);

pub fn to_py(py: Python<'_>, e: CoreError) -> PyErr {
    let msg = e.to_string();
    let class = match e {
        CoreError::InvalidArgument { .. } => py.get_type::<pyo3::exceptions::PyValueError>(),
        CoreError::IsaUnavailable { .. } => py.get_type::<IsaUnavailableError>(),
        CoreError::NonFinite { .. } => py.get_type::<pyo3::exceptions::PyFloatingPointError>(),
        _ => py.get_type::<KtrsError>(),
    };
    PyErr::from_type(class, msg)
}

/// `Result<T, CoreError>` → `PyResult<T>`.
pub trait IntoPy<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, CoreError> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}

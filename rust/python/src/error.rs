//! The exception hierarchy and the one conversion from core errors to it.
//!
//! Every exception ktrs raises derives from `KtrsError`. Where a standard class fits, the
//! ktrs class derives from it too, so callers may catch either: `KtrsValueError` is a
//! `ValueError`, `NonFiniteError` a `FloatingPointError`, `KtrsMemoryError` a
//! `MemoryError`, and so on. Classes with two bases cannot come from
//! `create_exception!`; they are made with `type(name, bases, {})` when the module loads.
//!
//! [`guard`] wraps every entry point: a Rust panic (a ktrs bug) becomes `KtrsInternalError`
//! instead of pyo3's `PanicException`, which is not an `Exception` and would escape
//! `except Exception`; a failed allocation deep inside a call becomes `KtrsMemoryError`.

use ktrs::buffer::AllocFailure;
use ktrs::KtrsError as CoreError;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

create_exception!(
    _native,
    KtrsError,
    PyException,
    "Base class of every exception ktrs raises."
);
create_exception!(
    _native,
    IsaUnavailableError,
    KtrsError,
    "The requested instruction set cannot run on this CPU or OS."
);

/// The classes with a standard second base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An argument has a wrong value, shape, device or size.
    Value,
    /// An argument has a wrong type.
    Type,
    /// NaN or Inf where finite values are required.
    NonFinite,
    /// An allocation failed or a size does not fit the address space.
    Memory,
    /// A forward handle made under another LoRA setup or by another layer.
    StaleHandle,
    /// The operating system refused something (a worker thread).
    System,
    /// A bug in ktrs (a Rust panic caught at the boundary).
    Internal,
    /// A file or directory ktrs was asked to read is missing (raised from Python).
    FileNotFound,
    /// An attribute a ktrs object does not have (raised from Python, where the attribute
    /// protocol needs an `AttributeError`, e.g. PEFT probing a layer's `weight`).
    Attribute,
}

/// (name, standard base, docstring) in `Kind` order.
const CLASSES: [(&str, &str, &str); 9] = [
    (
        "KtrsValueError",
        "ValueError",
        "An argument has a wrong value, shape, device or size.",
    ),
    (
        "KtrsTypeError",
        "TypeError",
        "An argument has a wrong type.",
    ),
    (
        "NonFiniteError",
        "FloatingPointError",
        "NaN or Inf where finite values are required.",
    ),
    (
        "KtrsMemoryError",
        "MemoryError",
        "Memory for a ktrs buffer could not be allocated.",
    ),
    (
        "StaleHandleError",
        "RuntimeError",
        "A forward handle was used after the layer's LoRA changed, or with another layer.",
    ),
    (
        "KtrsSystemError",
        "OSError",
        "The operating system refused a request (e.g. a thread).",
    ),
    (
        "KtrsInternalError",
        "RuntimeError",
        "A bug in ktrs: an internal check failed. Please report it with the message.",
    ),
    (
        "KtrsFileNotFoundError",
        "FileNotFoundError",
        "A file or directory ktrs needs is missing.",
    ),
    (
        "KtrsAttributeError",
        "AttributeError",
        "An attribute a ktrs object does not have (its weights live in Rust memory).",
    ),
];

const KINDS: [Kind; 9] = [
    Kind::Value,
    Kind::Type,
    Kind::NonFinite,
    Kind::Memory,
    Kind::StaleHandle,
    Kind::System,
    Kind::Internal,
    Kind::FileNotFound,
    Kind::Attribute,
];

static TYPES: PyOnceLock<Vec<Py<PyType>>> = PyOnceLock::new();

fn types(py: Python<'_>) -> &Vec<Py<PyType>> {
    TYPES.get_or_init(py, || {
        make_types(py).expect("creating the ktrs exception classes cannot fail")
    })
}

fn make_types(py: Python<'_>) -> PyResult<Vec<Py<PyType>>> {
    let builtins = py.import("builtins")?;
    let type_ = builtins.getattr("type")?;
    let base = py.get_type::<KtrsError>();
    CLASSES
        .iter()
        .map(|(name, std_base, doc)| {
            let dict = PyDict::new(py);
            dict.set_item("__doc__", *doc)?;
            dict.set_item("__module__", "ktrs")?;
            let bases = PyTuple::new(py, [base.clone().into_any(), builtins.getattr(*std_base)?])?;
            Ok(type_
                .call1((*name, bases, dict))?
                .cast_into::<PyType>()?
                .unbind())
        })
        .collect()
}

/// Adds every exception class to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    // Users meet these as `ktrs.KtrsError` etc.; that is also where pickle finds them.
    for t in [
        py.get_type::<KtrsError>(),
        py.get_type::<IsaUnavailableError>(),
    ] {
        t.setattr("__module__", "ktrs")?;
    }
    m.add("KtrsError", py.get_type::<KtrsError>())?;
    m.add("IsaUnavailableError", py.get_type::<IsaUnavailableError>())?;
    for ((name, _, _), t) in CLASSES.iter().zip(types(py)) {
        m.add(*name, t.bind(py))?;
    }
    Ok(())
}

/// An exception of class `kind` with message `msg`.
pub fn err(kind: Kind, msg: impl Into<String>) -> PyErr {
    let msg = msg.into();
    Python::attach(|py| {
        let i = KINDS
            .iter()
            .position(|k| *k == kind)
            .expect("every kind has a class");
        PyErr::from_type(types(py)[i].bind(py).clone(), msg)
    })
}

pub fn value_err(msg: impl Into<String>) -> PyErr {
    err(Kind::Value, msg)
}

pub fn type_err(msg: impl Into<String>) -> PyErr {
    err(Kind::Type, msg)
}

/// The `TypeError` for argument `arg`, which must be `want` ("an integer", ...) but is
/// `obj`: the message names the type found.
pub fn wrong_type(arg: &str, want: &str, obj: &Bound<'_, PyAny>) -> PyErr {
    let got = obj.get_type().name().map(|n| n.to_string());
    type_err(format!(
        "`{arg}` must be {want}, got {}",
        got.unwrap_or_default()
    ))
}

pub fn to_py(e: CoreError) -> PyErr {
    let msg = e.to_string();
    match e {
        CoreError::InvalidArgument { .. } | CoreError::Checkpoint { .. } => err(Kind::Value, msg),
        CoreError::IsaUnavailable { .. } => IsaUnavailableError::new_err(msg),
        CoreError::NonFinite { .. } => err(Kind::NonFinite, msg),
        CoreError::OutOfMemory { .. } => err(Kind::Memory, msg),
        CoreError::StaleCache(_) => err(Kind::StaleHandle, msg),
        CoreError::System(_) => err(Kind::System, msg),
    }
}

/// `Result<T, CoreError>` → `PyResult<T>`.
pub trait IntoPy<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, CoreError> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

/// Runs an entry point's body; a panic inside becomes a ktrs exception (see module doc).
pub fn guard<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(panic_to_py(payload)),
    }
}

fn panic_to_py(payload: Box<dyn std::any::Any + Send>) -> PyErr {
    if let Some(a) = payload.downcast_ref::<AllocFailure>() {
        return to_py(CoreError::OutOfMemory {
            what: "this call's working memory".into(),
            bytes: a.bytes as u128,
        });
    }
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    err(
        Kind::Internal,
        format!("internal error in ktrs (a bug; please report it): {msg}"),
    )
}

/// Keeps the default panic message for real bugs, but says nothing for a failed
/// allocation: it is reported as `KtrsMemoryError` and is not a bug.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<AllocFailure>().is_none() {
                default(info);
            }
        }));
    });
}

/// Panics inside [`guard`] (`kind="bug"`: a plain panic; `"alloc"`: a failed allocation in
/// a worker thread), so tests can check that no panic escapes as `PanicException`.
#[pyfunction]
pub fn _panic_for_test(py: Python<'_>, kind: &str) -> PyResult<()> {
    guard(|| {
        let pool = ktrs::ThreadPool::new(2, false).py_err()?;
        let alloc = kind == "alloc";
        py.detach(|| {
            pool.run(8, |t, _| {
                if t == 5 {
                    if alloc {
                        ktrs::buffer::alloc_failed(1 << 40);
                    }
                    panic!("deliberate test panic");
                }
            })
        });
        Ok(())
    })
}

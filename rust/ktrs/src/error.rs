//! One error type for the whole crate. Messages name the argument (or layer, expert and
//! tensor) and what was expected, because they end up in front of a Python user.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum KtrsError {
    /// An argument has the wrong shape, size or value.
    InvalidArgument {
        arg: String,
        expected: String,
        got: String,
    },
    /// The requested instruction set is not available on this CPU or OS.
    IsaUnavailable { isa: String, reason: String },
    /// A NaN or infinity was found where the caller asked for finite values.
    NonFinite { what: String },
    /// A forward cache was used with a layer other than the one that made it, or twice.
    StaleCache(String),
    /// Anything the operating system refused (thread creation, permissions).
    System(String),
    /// An allocation of `bytes` bytes failed (or the size does not fit the address space).
    OutOfMemory { what: String, bytes: u128 },
    /// A tensor of a checkpoint file is not what its header or the model says.
    Checkpoint { key: String, problem: String },
}

pub type Result<T> = std::result::Result<T, KtrsError>;

impl KtrsError {
    pub fn invalid(
        arg: impl Into<String>,
        expected: impl Into<String>,
        got: impl fmt::Display,
    ) -> Self {
        KtrsError::InvalidArgument {
            arg: arg.into(),
            expected: expected.into(),
            got: got.to_string(),
        }
    }

    pub fn checkpoint(key: impl Into<String>, problem: impl Into<String>) -> Self {
        KtrsError::Checkpoint {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for KtrsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KtrsError::InvalidArgument { arg, expected, got } => {
                write!(
                    f,
                    "invalid argument `{arg}`: expected {expected}, got {got}"
                )
            }
            KtrsError::IsaUnavailable { isa, reason } => {
                write!(f, "ISA `{isa}` is not available: {reason}")
            }
            KtrsError::NonFinite { what } => write!(f, "non-finite value (NaN or Inf) in {what}"),
            KtrsError::StaleCache(msg) => write!(f, "invalid forward cache: {msg}"),
            KtrsError::System(msg) => write!(f, "system error: {msg}"),
            KtrsError::OutOfMemory { what, bytes } => write!(
                f,
                "cannot allocate {bytes} bytes ({:.1} GiB) for {what}",
                *bytes as f64 / (1u64 << 30) as f64
            ),
            KtrsError::Checkpoint { key, problem } => write!(f, "{key}: {problem}"),
        }
    }
}

impl std::error::Error for KtrsError {}

/// Checks `got == expected` for a size, naming the argument.
pub fn check_len(arg: &str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(KtrsError::invalid(
            arg,
            format!("{expected} elements"),
            format!("{got}"),
        ));
    }
    Ok(())
}

/// The product of `factors` (a size in elements or bytes), or an error naming `what` when
/// it does not fit a `usize`. Sizes derived from user input go through here: a wrapped
/// product would size a buffer smaller than the kernels index.
pub fn checked_size(what: &str, factors: &[usize]) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| KtrsError::OutOfMemory {
            what: what.to_string(),
            bytes: factors
                .iter()
                .map(|&f| f as u128)
                .fold(1u128, |a, f| a.saturating_mul(f)),
        })
}

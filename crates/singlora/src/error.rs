//! Errors a user can act on: each names the file, the tensor or the field at fault.

use std::path::{Path, PathBuf};

/// The library's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file whose content is malformed (bad JSON, a truncated or forged safetensors file).
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },

    /// A configuration field that is missing, mistyped or out of range.
    #[error("{path}: field `{field}`: {msg}")]
    BadField {
        path: PathBuf,
        field: String,
        msg: String,
    },

    /// An option of PEFT's that this library does not implement; refused rather than ignored.
    #[error("{path}: field `{field}` = {value} is not supported by singlora ({hint})")]
    Unsupported {
        path: PathBuf,
        field: String,
        value: String,
        hint: String,
    },

    /// A tensor whose shape or dtype does not fit where it is used.
    #[error("tensor `{tensor}`: {msg}")]
    BadTensor { tensor: String, msg: String },

    /// A tensor holding NaN or infinity where a finite value is required.
    #[error("tensor `{tensor}` holds non-finite values ({what}); refusing to use it")]
    NonFinite { tensor: String, what: String },

    /// A target pattern that selected no module of the model.
    #[error("target {pattern} matches no module of the model (modules look like `{example}`)")]
    NoTargetMatch { pattern: String, example: String },

    /// An output path that exists already.
    #[error("{path} already exists; pass --overwrite to replace it")]
    OutputExists { path: PathBuf },

    /// Anything else the user passed that cannot work, explained in words.
    #[error("{0}")]
    Msg(String),

    /// An error from candle's tensor operations.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn bad_file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn bad_field(
        path: impl AsRef<Path>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::BadField {
            path: path.as_ref().to_path_buf(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    pub fn bad_tensor(tensor: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::BadTensor {
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }

    pub fn msg(msg: impl Into<String>) -> Self {
        Error::Msg(msg.into())
    }
}

/// `std::fs` calls with the path attached to the error.
pub trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

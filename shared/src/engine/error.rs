//! The engine's own errors: bad crop lists and boxes, images over a limit, sources that do not
//! decode, crops that do not encode. Every one is about the input, except [`EngineError::Internal`]
//! (a codec handle that could not be created), so the engine needs to know nothing about where
//! the bytes came from; the worker's task error wraps these beside storage and queue errors.

use thiserror::Error;

/// Everything that can go wrong while checking boxes, decoding, cropping and encoding.
#[derive(Debug, Clone, Error)]
pub enum EngineError {
    #[error("invalid crop list: {0}")]
    InvalidCrops(String),
    #[error("crop #{index} {boxed} {reason}")]
    BadBox { index: usize, boxed: String, reason: String },
    #[error("too many crops: {count} > limit {limit}")]
    TooManyCrops { count: usize, limit: usize },
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels")]
    TooManyPixels { width: u64, height: u64, pixels: u64, limit: u64 },
    #[error("cannot decode image: {0}")]
    Decode(String),
    #[error("cannot encode crop #{index}: {reason}")]
    Encode { index: usize, reason: String },
    /// Not the input's fault (a codec handle could not be created): worth retrying.
    #[error("internal: {0}")]
    Internal(String),
}

impl EngineError {
    /// A short machine-readable kind, used as a metric label and in dead-letter reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::InvalidCrops(_) => "invalid_crops",
            EngineError::BadBox { .. } => "bad_box",
            EngineError::TooManyCrops { .. } => "too_many_crops",
            EngineError::TooManyPixels { .. } => "too_many_pixels",
            EngineError::Decode(_) => "decode",
            EngineError::Encode { .. } => "encode",
            EngineError::Internal(_) => "internal",
        }
    }

    /// True for errors about the input, which no retry can fix (all but [`EngineError::Internal`]).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, EngineError::Internal(_))
    }
}

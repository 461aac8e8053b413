//! cropfleet: the domain library of a distributed image-cropping fleet.
//!
//! A task names a source image, a list of crop boxes and an output prefix. Workers take
//! tasks from a queue ([`queue`]), read sources from storage ([`storage`]), cut and encode the
//! crops on a CPU pool ([`engine`]), store every crop under a deterministic name, then publish
//! a result event ([`task::ResultEvent`]) and ack. The [`stats`] module turns result events
//! into the throughput table that the aggregator prints.
//!
//! I/O stays at the edges: [`engine`], [`crops`], [`task`] and [`stats`] are plain synchronous
//! code over bytes and pixels; [`queue`] and [`storage`] are small traits with one module per
//! backend; [`worker`] wires them together.

pub mod crops;
pub mod engine;
pub mod error;
pub mod exif;
pub mod failure;
pub mod floor;
pub mod gcp;
pub mod logging;
pub mod lossless;
pub mod precheck;
pub mod produce;
pub mod provenance;
pub mod queue;
pub mod sample;
pub mod secret;
pub mod stats;
pub mod storage;
pub mod task;
pub mod telemetry;
pub mod util;
pub mod worker;

pub use crops::CropBox;
pub use engine::EngineError;
pub use error::{Failure, TaskError};
pub use task::{ResultEvent, Task};

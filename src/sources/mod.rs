//! Sources: what produces the raw bytes of a backup's objects. Each source runs on a
//! blocking thread and writes into the pipeline's `Write`.

pub mod files;
pub mod postgres;
pub mod process;

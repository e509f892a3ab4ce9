//! Images delivered by the controller: the cache on disk and the downloader that fills it.

pub mod cache;
pub mod fetch;

pub use cache::Cache;

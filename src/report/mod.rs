//! The training report: a loss plot (`plot`) and a self-contained HTML page (`html`) with sample
//! grids and the demo's scores — one file to open or send, nothing fetched from the network.
pub mod html;
pub mod plot;

pub use html::{grid, grid_rows, Forgetting, Miss, Report, Scores};

//! The demo: the whole product on the tiny world (`eval::world`) with an embedded base model
//! (`base`): render a concept the base never saw, train a LoRA with the normal training code,
//! measure what was learned and forgotten (`eval`), write report.html (`run`). `pretrain` made
//! the embedded base (`sdlora demo-pretrain`).
pub mod base;
pub mod pretrain;
pub mod run;

//! Stable Diffusion with adapters: the U-Net written for training (adapters on its attention
//! projections, backward through it), the frozen parts run forward only (CLIP text encoders,
//! the VAE), the noise schedule and samplers, DreamBooth training, and adapter files that
//! diffusers and ComfyUI load.
//!
//! A model is a diffusers folder: `model_index.json`, `unet/`, `vae/`, `text_encoder/`
//! (`text_encoder_2/` for SDXL), `tokenizer/` (`tokenizer_2/`), `scheduler/`;
//! [`single_file`] makes one from a single-file (A1111 / ComfyUI) checkpoint.

pub mod config;
pub mod files;
pub mod images;
pub mod pipeline;
pub mod schedule;
pub mod single_file;
pub mod text;
pub mod train;
pub mod unet;
pub mod vae;

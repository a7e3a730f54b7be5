//! A Stable Diffusion pipeline as a diffusers folder lays it out, and text-to-image sampling.
//!
//! Conditioning: SD 1.x/2.x use the text encoder's last hidden state (after its final layer
//! norm) as the U-Net's context; SDXL concatenates the penultimate hidden states of its two
//! encoders (768 + 1280 = 2048 wide) and adds the second encoder's projected pooled output and
//! the size/crop ids (h, w, top, left, h, w) as the U-Net's added conditioning.
//!
//! Sampling: latents x_T ~ N(0, σ_init²) of (4, s/8, s/8), drawn on the CPU from the image's
//! seed (so a seed gives the same image on every device); each step runs the U-Net on the
//! unconditional and the conditional context and guides ε = ε_u + g·(ε_c − ε_u); the VAE
//! decodes the final latents.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::schedule::{guide, sampler, NoiseSchedule, SamplerKind};
use super::text::{ClipTokenizer, TextEncoder};
use super::unet::{AddedCond, UNet};
use super::vae::Vae;
use crate::checkpoint::read_json;
use crate::error::{Error, Result};
use crate::rng::{normal, rng_for};

/// The components of a diffusers folder, loaded.
pub struct Pipeline {
    pub dir: PathBuf,
    pub unet: UNet,
    /// None for a pixel-space model (`"vae": [null, null]` in model_index.json, or no vae/
    /// folder): the U-Net then works on the images themselves.
    pub vae: Option<Vae>,
    /// One CLIP encoder (SD 1.x/2.x) or two (SDXL), each with its tokenizer.
    pub encoders: Vec<(ClipTokenizer, TextEncoder)>,
    pub schedule: NoiseSchedule,
    pub dtype: DType,
    pub device: Device,
    /// The U-Net's `sample_size` (latent side it was trained at).
    pub sample_size: usize,
    /// SDXL's `force_zeros_for_empty_prompt`: an empty negative prompt conditions on zeros.
    pub zeros_for_empty_prompt: bool,
}

/// What the U-Net is conditioned on, for a batch of prompts.
pub struct Conditioning {
    /// (b, seq, cross_attention_dim).
    pub context: Tensor,
    /// SDXL's pooled text embedding and size ids.
    pub added: Option<AddedCond>,
}

impl Conditioning {
    /// The rows of `self` then the rows of `other` (one U-Net call for both halves of
    /// classifier-free guidance).
    pub fn cat(&self, other: &Conditioning) -> Result<Conditioning> {
        let added = match (&self.added, &other.added) {
            (Some(a), Some(b)) => Some(AddedCond {
                text_embeds: Tensor::cat(&[&a.text_embeds, &b.text_embeds], 0)?,
                time_ids: Tensor::cat(&[&a.time_ids, &b.time_ids], 0)?,
            }),
            _ => None,
        };
        Ok(Conditioning {
            context: Tensor::cat(&[&self.context, &other.context], 0)?,
            added,
        })
    }

    /// Rows `idx` of `self`.
    pub fn select(&self, idx: &[usize]) -> Result<Conditioning> {
        let dev = self.context.device();
        let ix = Tensor::new(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), dev)?;
        Ok(Conditioning {
            context: self.context.index_select(&ix, 0)?,
            added: match &self.added {
                Some(a) => Some(AddedCond {
                    text_embeds: a.text_embeds.index_select(&ix, 0)?,
                    time_ids: a.time_ids.index_select(&ix, 0)?,
                }),
                None => None,
            },
        })
    }
}

/// One text-to-image request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompts: Vec<String>,
    /// The unconditional prompt of classifier-free guidance ("" by default).
    pub negative: String,
    /// One seed per prompt.
    pub seeds: Vec<u64>,
    pub steps: usize,
    /// Guidance scale g; 1 or less runs the conditional pass alone.
    pub guidance: f64,
    pub sampler: SamplerKind,
    /// Image side in pixels (a multiple of 8 × 2^(down blocks − 1)).
    pub size: usize,
}

/// Whether a model_index.json names a second text encoder (SDXL's).
pub(crate) fn has_text_encoder_2(index: &Value) -> bool {
    index
        .get("text_encoder_2")
        .and_then(Value::as_array)
        .is_some_and(|v| v.iter().all(|x| !x.is_null()))
}

impl Pipeline {
    /// Loads the folder `dir` (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/; text_encoder_2/ and tokenizer_2/ for SDXL). Frozen weights go to `device`
    /// in `dtype`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let index_path = dir.join("model_index.json");
        if !index_path.is_file() {
            return Err(Error::msg(format!(
                "{}: not a diffusers folder (no model_index.json; expected unet/, vae/, text_encoder/, tokenizer/, scheduler/)",
                dir.display()
            )));
        }
        let index = read_json(&index_path)?;
        let mut encoders = vec![(
            ClipTokenizer::load(&dir.join("tokenizer"))?,
            TextEncoder::load(&dir.join("text_encoder"), dtype, device)?,
        )];
        let has_second = has_text_encoder_2(&index);
        if has_second {
            encoders.push((
                ClipTokenizer::load(&dir.join("tokenizer_2"))?,
                TextEncoder::load(&dir.join("text_encoder_2"), dtype, device)?,
            ));
        }
        let unet = UNet::load(&dir.join("unet"), dtype, device)?;
        let unet_config = dir.join("unet").join("config.json");
        let sample_size = read_json(&unet_config)?
            .get("sample_size")
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                Error::bad_field(&unet_config, "sample_size", "is missing or not a number")
            })? as usize;
        let xl = unet.cfg.text_time.is_some();
        if xl != has_second {
            return Err(Error::bad_file(
                &index_path,
                if xl {
                    "describes a U-Net with SDXL's added conditioning but no text_encoder_2"
                } else {
                    "names a text_encoder_2 but the U-Net takes no added conditioning"
                },
            ));
        }
        let pixel_space = index
            .get("vae")
            .is_some_and(|v| v.as_array().is_some_and(|a| a.iter().all(Value::is_null)))
            || (index.get("vae").is_none() && !dir.join("vae").exists());
        let vae = if pixel_space {
            None
        } else {
            Some(Vae::load(&dir.join("vae"), dtype, device)?)
        };
        let schedule = NoiseSchedule::from_dir(&dir.join("scheduler"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            unet,
            vae,
            encoders,
            schedule,
            dtype,
            device: device.clone(),
            sample_size,
            zeros_for_empty_prompt: has_second
                && index
                    .get("force_zeros_for_empty_prompt")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
        })
    }

    /// Puts the adapter of `dir` (a train-diffusion run, a checkpoint of one, or any adapter
    /// directory of U-Net layers) on the U-Net.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let af = crate::adapter::file::AdapterFile::read(dir, &self.device)?;
        if let Some(m) = af
            .layers
            .keys()
            .find(|m| !m.starts_with(super::files::UNET_PREFIX))
        {
            return Err(Error::msg(format!(
                "{}: layer `{m}` is not a U-Net layer; this adapter was not trained on a Stable Diffusion U-Net",
                dir.display()
            )));
        }
        crate::adapter::inject::load(self.unet.linears_mut(), &af, &af.clock())
    }

    /// Pixels per latent cell on each side (1 in pixel space).
    pub fn downscale(&self) -> usize {
        self.vae.as_ref().map_or(1, Vae::downscale)
    }

    /// The latent posterior N(μ, σ²) of (b, 3, s, s) images in [−1, 1]: the VAE's, or in
    /// pixel space the images themselves (grey, the channel mean, for a one-channel U-Net)
    /// with σ = 0.
    pub fn latent_moments(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        match &self.vae {
            Some(v) => v.encode_moments(images),
            None => {
                let x = match self.unet.cfg.in_channels {
                    3 => images.clone(),
                    1 => images.mean_keepdim(1)?,
                    c => {
                        return Err(Error::msg(format!(
                            "a pixel-space U-Net needs 1 or 3 input channels, this one has {c}"
                        )))
                    }
                };
                let x = x.to_dtype(self.dtype)?;
                Ok((x.clone(), x.zeros_like()?))
            }
        }
    }

    /// Images (b, 3, s, s) from latents: the VAE's decoder, or in pixel space the latents
    /// (grey repeated over three channels for a one-channel U-Net).
    pub fn to_images(&self, latents: &Tensor) -> Result<Tensor> {
        match &self.vae {
            Some(v) => v.decode(latents),
            None if latents.dim(1)? == 1 => Ok(latents.repeat((1, 3, 1, 1))?),
            None => Ok(latents.clone()),
        }
    }

    pub fn is_xl(&self) -> bool {
        self.encoders.len() == 2
    }

    /// The image side the U-Net was trained at: its sample size times the VAE's downscale.
    pub fn default_size(&self) -> usize {
        self.sample_size * self.downscale()
    }

    /// Encodes `prompts` for images of side `size`.
    pub fn encode(&self, prompts: &[String], size: usize) -> Result<Conditioning> {
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let mut contexts = vec![];
        let mut pooled = None;
        for (tok, enc) in &self.encoders {
            let ids = tok.encode(&refs)?;
            let (b, t) = (ids.len(), ids[0].len());
            let flat: Vec<u32> = ids.into_iter().flatten().collect();
            let ids = Tensor::from_vec(flat, (b, t), &self.device)?;
            let out = enc.encode(&ids)?;
            if self.is_xl() {
                contexts.push(out.penultimate);
                pooled = Some(out.pooled);
            } else {
                contexts.push(out.last_hidden);
            }
        }
        let context = Tensor::cat(&contexts, 2)?.to_dtype(self.dtype)?;
        let added = match pooled {
            Some(p) if self.is_xl() => {
                let b = prompts.len();
                let s = size as f32;
                let ids: Vec<f32> = (0..b).flat_map(|_| [s, s, 0.0, 0.0, s, s]).collect();
                Some(AddedCond {
                    text_embeds: p.to_dtype(self.dtype)?,
                    time_ids: Tensor::from_vec(ids, (b, 6), &self.device)?.to_dtype(self.dtype)?,
                })
            }
            _ => None,
        };
        Ok(Conditioning { context, added })
    }

    /// The initial latents of one image: N(0, 1) of (4, s/8, s/8) from `seed`, on the CPU.
    pub fn initial_noise(&self, seed: u64, size: usize) -> Result<Tensor> {
        let lat = size / self.downscale();
        let c = self.unet.cfg.in_channels;
        normal(
            &mut rng_for(seed, "diffusion-latents"),
            1.0,
            (c, lat, lat),
            DType::F32,
            &Device::Cpu,
        )
    }

    /// Generates one image per prompt: (n, 3, size, size) in [-1, 1], f32 on the CPU.
    pub fn generate(&self, req: &GenerateRequest) -> Result<Tensor> {
        if req.prompts.len() != req.seeds.len() {
            return Err(Error::msg("one seed per prompt"));
        }
        let noise: Vec<Tensor> = req
            .seeds
            .iter()
            .map(|&s| self.initial_noise(s, req.size))
            .collect::<Result<_>>()?;
        self.generate_from(req, &Tensor::stack(&noise, 0)?)
    }

    /// Refuses an image side the model cannot take (the latent side must halve cleanly at every
    /// down block).
    pub fn check_size(&self, size: usize) -> Result<()> {
        let step = self.downscale() * (1 << (self.unet.cfg.block_out_channels.len() - 1));
        if size == 0 || size % step != 0 {
            return Err(Error::msg(format!(
                "image size {size}: must be a positive multiple of {step} for this model"
            )));
        }
        Ok(())
    }

    /// [`Pipeline::generate`] from given initial latents x_T / σ_init (n, 4, s/8, s/8).
    pub fn generate_from(&self, req: &GenerateRequest, latents: &Tensor) -> Result<Tensor> {
        self.check_size(req.size)?;
        let n = req.prompts.len();
        if latents.dim(0)? != n {
            return Err(Error::msg("one set of initial latents per prompt"));
        }
        let cond = self.encode(&req.prompts, req.size)?;
        let guided = req.guidance > 1.0;
        let both = if guided {
            let uncond = if req.negative.is_empty() && self.zeros_for_empty_prompt {
                Conditioning {
                    context: cond.context.zeros_like()?,
                    added: cond
                        .added
                        .as_ref()
                        .map(|a| -> Result<AddedCond> {
                            Ok(AddedCond {
                                text_embeds: a.text_embeds.zeros_like()?,
                                time_ids: a.time_ids.clone(),
                            })
                        })
                        .transpose()?,
                }
            } else {
                self.encode(&vec![req.negative.clone(); n], req.size)?
            };
            uncond.cat(&cond)?
        } else {
            cond
        };
        let mut s = sampler(req.sampler, &self.schedule, req.steps)?;
        let mut x =
            (latents.to_dtype(DType::F32)?.to_device(&self.device)? * s.init_noise_sigma())?;
        let timesteps = s.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let xin = s.scale_input(&x, i)?.to_dtype(self.dtype)?;
            let xin = if guided {
                Tensor::cat(&[&xin, &xin], 0)?
            } else {
                xin
            };
            let ts = Tensor::new(vec![t as f32; xin.dim(0)?], &self.device)?;
            let out = self
                .unet
                .forward(&xin, &ts, &both.context, both.added.as_ref())?
                .detach()
                .to_dtype(DType::F32)?;
            let eps = if guided {
                guide(&out.narrow(0, 0, n)?, &out.narrow(0, n, n)?, req.guidance)?
            } else {
                out
            };
            x = s.step(&eps, i, &x)?;
        }
        let images = self.to_images(&x.to_dtype(self.dtype)?)?;
        Ok(images
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .clamp(-1f32, 1f32)?)
    }
}

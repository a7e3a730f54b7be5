//! SingLoRA: low-rank adaptation through one matrix, ΔW = (α/r)·u(t)·A_out·A_inᵀ, with LoRA,
//! rsLoRA, LoRA+ and DoRA as baselines on the same code paths, PEFT-format adapter files,
//! merge into the base and export as a plain LoRA.

/// Serialises a type as its `Display` string and reads it back through `FromStr`, so settings
/// files hold the names users type (`"singlora"`, `"cuda:0"`) and bad names get the parse error.
macro_rules! serde_via_str {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> ::std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(
                d: D,
            ) -> ::std::result::Result<Self, D::Error> {
                let s = <String as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use serde_via_str;

/// A settings struct as an empty command line leaves it (plus `args`, e.g. required ones): the
/// defaults live once, in the `#[arg(default_value…)]` attributes the CLI shows.
pub(crate) fn cli_defaults<T: clap::Args + clap::FromArgMatches>(args: &[&str]) -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true));
    let m = cmd
        .try_get_matches_from(args)
        .expect("the defaults of a settings struct parse");
    T::from_arg_matches(&m).expect("the defaults of a settings struct parse")
}

pub mod adapter;
pub mod atomic;
pub mod chat;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod diffusion;
pub mod dist;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gguf;
pub mod inspect;
pub mod linear;
pub mod merge;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod quant;
pub mod rng;
pub mod session;
pub mod synthetic;
pub mod tokenize;
pub mod train;

pub use error::{Error, Result};
